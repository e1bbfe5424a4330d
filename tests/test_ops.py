"""ops/: the Grafana dashboard queries only metrics the workers export, the Kubernetes
manifests validate offline (kubernetes-validate's bundled schemas) and agree with each
other and with the CLI, and ops/README.md lists every metric."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cachesaver_dist.cli import build_parser
from cachesaver_dist.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "ops" / "grafana" / "cachesaver.json"
K8S = ROOT / "ops" / "k8s"
MANIFESTS = ["redis.yaml", "cache-worker.yaml", "batch-worker.yaml", "secret.template.yaml"]
K8S_VERSIONS = ["1.28.0", kubernetes_validate.utils.latest_version()]
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "offset", "bool", "inf", "nan"}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return WorkerMetrics().sample_names()


def families() -> set[str]:
    """Our metric families (without the process and platform collectors')."""
    return {f.name for f in WorkerMetrics().registry.collect() if f.name.startswith("cachesaver_")}


# -- dashboard ------------------------------------------------------------------------------

def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out += _panels(p.get("panels", []))
    return out


def _queries(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dash["panels"]) for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, ranges, groupings and function
    names left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\blabel_values\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)", r"\1", expr)
    names = set()
    for m in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)\s*(\()?", expr):
        if not m.group(2) and m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def test_metric_names_parser():
    assert metric_names('histogram_quantile(0.95, sum by (le, model) (rate('
                        'cachesaver_model_call_seconds_bucket{model=~"$model"}[5m])))') == \
        {"cachesaver_model_call_seconds_bucket"}
    assert metric_names("max(a) / sum without (x) (b_total offset 5m) > bool 1") == \
        {"a", "b_total"}


def test_dashboard_queries_only_exported_metrics(exported):
    dash = json.loads(DASHBOARD.read_text())
    queries = _queries(dash)
    assert len(queries) >= 15
    used = set()
    for expr in queries:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, f"{expr!r}: {names - exported} not exported by the workers"
        used |= names
    # every metric of ours is on the dashboard
    covered = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families() <= covered, families() - covered


def test_dashboard_is_importable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    panels = _panels(dash["panels"])
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in dash["templating"]["list"]}
    for p in panels:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"] and all(t["refId"] for t in p["targets"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
    for expr in _queries(dash):
        for var in re.findall(r"\$(\w+)", expr):
            assert var in variables or var.startswith("__"), (var, expr)


def test_readme_lists_every_metric():
    text = (ROOT / "ops" / "README.md").read_text()
    listed = set(re.findall(r"^\| `(cachesaver_\w+)`", text, re.M))
    listed = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in listed}
    assert listed == families()


# -- Kubernetes ------------------------------------------------------------------------------

def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return [d for name in MANIFESTS for d in _docs(name)]


def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate(objects, version):
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Service", "StatefulSet", "Deployment",
                                            "HorizontalPodAutoscaler", "Secret"}
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({version}): "
                        f"{exc.message} at {list(exc.path)}")


def test_kustomization_applies_everything_but_the_secret_template():
    kust = _docs("kustomization.yaml")[0]
    assert kust["resources"] == [m for m in MANIFESTS if m != "secret.template.yaml"]
    assert sorted(p.name for p in K8S.glob("*.yaml")) == sorted(
        [*MANIFESTS, "kustomization.yaml", "prometheus-adapter-values.yaml"])


def test_redis_statefulset_uses_ops_redis_conf_and_persists(objects):
    [conf] = _by_kind(objects, "ConfigMap").values()
    assert conf["data"]["redis.conf"] == (ROOT / "ops" / "redis.conf").read_text()
    sts = _by_kind(objects, "StatefulSet")["cachesaver-redis"]
    pod = sts["spec"]["template"]["spec"]
    [redis] = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in redis["volumeMounts"]}
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == "/data" and "/data" in redis["args"]
    config_volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert config_volume["configMap"]["name"] == conf["metadata"]["name"]
    assert f"{mounts[config_volume['name']]}/redis.conf" in redis["args"]
    assert "--requirepass" in redis["args"]  # protected-mode stays on: a password is set
    assert sts["spec"]["serviceName"] in _by_kind(objects, "Service")


def test_references_resolve(objects):
    secret = _by_kind(objects, "Secret")["cachesaver-secrets"]
    assert all(v in ("", "CHANGE-ME") or "CHANGE-ME" in v for v in secret["stringData"].values())
    pods = [w["spec"]["template"] for kind in ("Deployment", "StatefulSet")
            for w in _by_kind(objects, kind).values()]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "cachesaver-secrets"
                    assert ref.get("optional") or ref["key"] in secret["stringData"]
    for svc in _by_kind(objects, "Service").values():
        selected = [p for p in pods
                    if svc["spec"]["selector"].items() <= p["metadata"]["labels"].items()]
        assert len(selected) == 1, svc["metadata"]["name"]
        ports = {p["name"] for c in selected[0]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    for w in [*_by_kind(objects, "Deployment").values(), *_by_kind(objects, "StatefulSet")
              .values()]:
        assert w["spec"]["selector"]["matchLabels"].items() <= \
            w["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("name", ["cachesaver-cache-worker", "cachesaver-batch-worker"])
def test_worker_deployments_agree_with_the_cli(objects, name):
    pod = _by_kind(objects, "Deployment")[name]["spec"]["template"]
    [c] = pod["spec"]["containers"]
    args = build_parser().parse_args(c["command"][1:])
    assert c["command"][0] == "cachesaver-dist" and args.command == "worker"
    [port] = [p["containerPort"] for p in c["ports"] if p["name"] == "metrics"]
    assert args.metrics_port == port and args.metrics_host == "0.0.0.0"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    probe = build_parser().parse_args(c["livenessProbe"]["exec"]["command"][1:])
    assert probe.command == "health" and not probe.cluster
    assert probe.routes == (["cache"] if args.kind == "cache" else args.model)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CACHESAVER_LOG_FORMAT"] == "json" and "REDIS_URL" in env
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_batch_workers_autoscale_on_exported_stream_lag(objects, exported):
    hpa = _by_kind(objects, "HorizontalPodAutoscaler")["cachesaver-batch-worker"]
    target = hpa["spec"]["scaleTargetRef"]
    deployment = _by_kind(objects, target["kind"])[target["name"]]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    name = metric["external"]["metric"]["name"]
    assert name == "cachesaver_stream_lag" and name in exported
    # the selector is a pod label as Prometheus' labelmap writes it
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    mapped = {re.sub(r"[^\w]", "_", k): v for k, v in labels.items()}
    assert metric["external"]["metric"]["selector"]["matchLabels"].items() <= mapped.items()
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # the adapter serves that name from that series
    [rule] = _docs("prometheus-adapter-values.yaml")[0]["rules"]["external"]
    assert rule["name"]["as"] == name
    assert metric_names(rule["seriesQuery"]) == {name}
    assert "<<.LabelMatchers>>" in rule["metricsQuery"]


# -- JSON logs -------------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "said", "status"), [
    (["drop-run", "r99"], "run 'r99' has no counters", 1),
    (["drop-run", "bad run"], "run id 'bad run' is not valid", 1),
    (["fork", "r9", "x"], "run 'r9' has no counters", 1),
    (["export", "{tmp}/out.gz", "--run", "r99"], "run 'r99' has no counters and no manifest", 1),
    (["import", "{tmp}/missing.gz"], "missing.gz: no such file", 1),
    (["prune", "--run", "r99"], "prune: no run 'r99'", 1),
    (["prune"], "prune: give one of --model", 2),  # a usage error
    (["stats", "--run", "r99"], "no statistics yet for run 'r99'", 1),
    (["stats", "--run", "r99", "--json"], "no statistics yet for run 'r99'", 1),
])
def test_a_failing_commands_last_line_is_json_too(redis_url, keys, tmp_path, argv, said,
                                                   status):
    """ops/README.md: in JSON mode, a command's final error line is a JSON object too.
    Not found is status 1 for every command; 2 is for usage errors."""
    from tests.test_archive import cli

    done = cli(redis_url, keys.prefix, *(a.format(tmp=tmp_path) for a in argv),
               "--log-format", "json")
    assert done.returncode == status, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    assert lines and lines[-1]["level"] == "ERROR", done.stderr
    assert lines[-1]["message"].startswith("cachesaver-dist: ") and said in lines[-1]["message"]
    assert done.stdout == ""


def test_python_m_runs_the_command():
    """``python -m cachesaver_dist`` is the ``cachesaver-dist`` command."""
    done = subprocess.run([sys.executable, "-m", "cachesaver_dist", "stats", "--help"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: cachesaver-dist stats")
