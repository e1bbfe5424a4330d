"""Study ``startup``: how long the package takes to import, to serve its first hit, and
to close (issue #11).

Every figure comes from a fresh process (``bench/_startup_probe.py``), run ``--runs``
times, the kinds interleaved, median reported:

* ``import cachesaver_dist`` (timed inside the process), which heavy modules it loaded,
  and the whole process (``python -c 'import cachesaver_dist'``) beside the bare
  interpreter (``python -c pass``);
* ``from cachesaver_dist import OnlineAPI, Request``: what a script pays before its
  first constructor;
* pool: ``OnlineAPI("sim:bench", cache=URL)`` to the first ``await api.request(...)``
  returning a cached sample, with a cache worker and a batch worker process already
  running on a private Redis and the sample warmed; then 5 more hits and ``close()``;
* in-process: the same with ``OnlineAPI(SimModel("sim:bench"), cache=URL)`` (another key
  prefix, no worker processes): the constructor starts in-process cache and batch
  workers, and ``close()`` stops them;
* for reference, the original CacheSaver 0.0.6 (``bench/.venv-original``, skipped with a
  note when absent): its imports and its first hit from a warmed ``diskcache`` folder;
* with ``--baseline REV``, the same probes with the package of commit REV (an export in
  ``bench/.work``), against the same workers, in the same run.

Targets: import ≤ 120 ms, constructor to first hit ≤ 150 ms, ``close()`` ≤ 50 ms. A
missed target gets a py-spy profile (wall clock, idle stacks included) of one probe.
Writes its RESULTS.md section and ``bench/results/startup.json``. About a minute.

Usage: ``.venv/bin/python -m bench.startup [--runs N] [--baseline REV] [--no-profile]``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import common as C

C.reexec_in_project_venv()

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

STUDY = "startup"
MODEL = "sim:bench"
PROMPT = "How many r's are in 'strawberry'? Think step by step."
REQUESTS = 5  # hits after the first one, before close()
PROBE = C.ROOT / "bench" / "_startup_probe.py"
OUT = C.BENCH_HOME / "results" / "startup.json"
TARGET_IMPORT_MS, TARGET_FIRST_HIT_MS, TARGET_CLOSE_MS = 120.0, 150.0, 50.0
HEAVY_NAMES = ("arq", "redis", "workers", "msgpack", "asyncio")  # as the probe's HEAVY


def probe(python: Path, kind: str, spec: dict[str, Any], env: dict[str, str],
          profile: Path | None = None) -> dict[str, Any]:
    """Run one probe in a fresh process; its JSON plus ``process_ms`` (spawn to exit)."""
    cmd = [str(python), str(PROBE), kind, json.dumps(spec)]
    if profile is not None:
        cmd = [str(C.PYSPY), "record", "--idle", "--nonblocking", "--rate", "1000",
               "--format", "raw", "--output", str(profile), "--", *cmd]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=C.ROOT, timeout=120)
    took = (time.perf_counter() - t0) * 1000
    if res.returncode != 0:
        raise RuntimeError(f"probe {kind} failed ({res.returncode}): {res.stderr[-3000:]}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1]  # not py-spy's
    return {**json.loads(line), "process_ms": took}


def bare(python: Path, code: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(python), "-c", code], env=env, cwd=C.ROOT, check=True)
    return (time.perf_counter() - t0) * 1000


def run(runs: int, profile: bool, baseline: str | None) -> dict[str, Any]:
    t0 = time.monotonic()
    original = C.ORIG_PY.exists()
    cache_dir = C.WORK / f"startup-original-{uuid.uuid4().hex[:6]}"
    samples: dict[str, list[dict[str, Any]]] = {}
    with C.Stack(STUDY) as st:
        env = C.environment(st.redis_version())
        if not original:
            env.pop("original", None)
        st.start_pool(MODEL)
        # As an installed package: bytecode cached (written by the warm-up runs).
        penv = {k: v for k, v in st.env().items() if k != "PYTHONDONTWRITEBYTECODE"}
        inproc_prefix = f"bench-{STUDY}-inproc-{uuid.uuid4().hex[:8]}:"
        specs = {
            "pool": {"url": st.url, "prefix": st.prefix, "model": MODEL, "prompt": PROMPT,
                     "requests": REQUESTS},
            "inproc": {"url": st.url, "prefix": inproc_prefix, "model": MODEL,
                       "prompt": PROMPT, "requests": REQUESTS, "inproc": True},
        }
        orig_spec = {"cache_dir": str(cache_dir), "prompt": PROMPT, "requests": REQUESTS}
        trees = {"": penv}  # "" = the tree under test; "base-" = the baseline revision
        if baseline:
            rev, src = C.export_rev(baseline)
            env["baseline"] = rev
            trees["base-"] = {**penv, "PYTHONPATH": str(src)}
        # Warm: the first run of each generates the sample (and compiles bytecode).
        for tree_env in trees.values():
            for spec in specs.values():
                probe(C.OURS_PY, "hit", spec, tree_env)
        if original:
            probe(C.ORIG_PY, "original-hit", orig_spec, penv)
        for i in range(runs):
            print(f"run {i + 1}/{runs}", flush=True)
            steps: list[tuple[str, Any]] = [
                ("python", lambda: {"process_ms": bare(C.OURS_PY, "pass", penv)})]
            for tag, e in trees.items():
                steps += [
                    (f"{tag}import", lambda e=e: probe(C.OURS_PY, "import", {}, e)),
                    (f"{tag}import-api", lambda e=e: probe(C.OURS_PY, "import-api", {}, e)),
                    (f"{tag}pool", lambda e=e: probe(C.OURS_PY, "hit", specs["pool"], e)),
                    (f"{tag}inproc", lambda e=e: probe(C.OURS_PY, "hit", specs["inproc"], e)),
                ]
            if original:
                steps += [
                    ("original-import",
                     lambda: probe(C.ORIG_PY, "original-import", {}, penv)),
                    ("original", lambda: probe(C.ORIG_PY, "original-hit", orig_spec, penv)),
                ]
            for name, step in steps:
                samples.setdefault(name, []).append(step())
        med = {name: _medians(rs) for name, rs in samples.items()}
        misses = [f"{name}: {r['cached']}" for name, rs in samples.items() for r in rs
                  if not all(r.get("cached", [True]))]
        missed = _missed(med)
        profiles: dict[str, Any] = {}
        if profile and missed and C.PYSPY.exists():
            for name in sorted({m.split(":")[0] for m in missed}):
                kind, spec = ("import", {}) if name == "import" else ("hit", specs[name])
                out = C.WORK / "profiles" / f"startup-{name}.txt"
                out.parent.mkdir(parents=True, exist_ok=True)
                probe(C.OURS_PY, kind, spec, penv, profile=out)
                profiles[name] = C.top_entries(out)
    shutil.rmtree(cache_dir, ignore_errors=True)
    command = f".venv/bin/python -m bench.startup --runs {runs}" + (
        f" --baseline {baseline}" if baseline else "")
    return {"study": STUDY, "env": env, "seconds": round(time.monotonic() - t0, 1),
            "command": command,
            "setup": {"model": MODEL, "requests_before_close": REQUESTS, "runs": runs,
                      "pool": "1 cache worker + 1 batch worker process (--sim-latency 0)",
                      "inproc": "SimModel('sim:bench'), no worker processes",
                      "original": original, "baseline": env.get("baseline")},
            "targets_ms": {"import": TARGET_IMPORT_MS, "first_hit": TARGET_FIRST_HIT_MS,
                           "close": TARGET_CLOSE_MS},
            "median": med, "missed": missed, "not_cached": misses, "profiles": profiles,
            "runs": samples}


def _medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: C.median([r[k] for r in rows]) for k in rows[0]
                           if isinstance(rows[0][k], (int, float))}
    if "loaded" in rows[0]:
        out["loaded"] = sorted({m for r in rows for m in r["loaded"]})
    return out


def _missed(med: dict[str, Any]) -> list[str]:
    out = []
    if med["import"]["import_ms"] > TARGET_IMPORT_MS:
        out.append(f"import: {med['import']['import_ms']:.0f} ms")
    for mode in ("pool", "inproc"):
        if med[mode]["first_hit_ms"] > TARGET_FIRST_HIT_MS:
            out.append(f"{mode}: first hit {med[mode]['first_hit_ms']:.0f} ms")
        if med[mode]["close_ms"] > TARGET_CLOSE_MS:
            out.append(f"{mode}: close {med[mode]['close_ms']:.0f} ms")
    return out


def report(res: dict[str, Any]) -> None:
    med, f = res["median"], C.fmt
    base = res["setup"].get("baseline")
    rows = [["python -c pass", "", "", "", f(med["python"]["process_ms"], 0)]]
    labels = [("import", "import cachesaver_dist"),
              ("import-api", "from cachesaver_dist import OnlineAPI, Request"),
              ("original-import", "original: from cachesaver.pipelines import OnlineAPI "
                                  "(+ typedefs, diskcache)"),
              ("pool", 'OnlineAPI("sim:bench", cache=URL)'),
              ("inproc", 'OnlineAPI(SimModel("sim:bench"), cache=URL)'),
              ("original", "original: OnlineAPI(model, Cache(dir))")]
    for key, label in labels:
        tags = ("", "base-") if base and not key.startswith("original") else ("",)
        for tag in tags:
            m = med.get(tag + key)
            if m is not None:
                rows.append([label + (f" (baseline {base})" if tag else ""),
                             f(m["import_ms"], 1), _cell(m, "first_hit_ms"),
                             _cell(m, "close_ms"), f(m["process_ms"], 0)])
    headers = ["what (fresh process each)", "import ms", "constructor → first hit ms",
               "close() ms", "whole process ms"]
    print()
    print(C.text_table(headers, rows))
    loaded = med["import"]["loaded"]
    verdicts = [
        f"* `import cachesaver_dist` ≤ {TARGET_IMPORT_MS:g} ms: "
        f"**{med['import']['import_ms']:.1f} ms** → "
        f"{C.verdict(med['import']['import_ms'] <= TARGET_IMPORT_MS)} (heavy modules it "
        f"loads: {', '.join(loaded) if loaded else 'none of ' + ', '.join(HEAVY_NAMES)}).",
    ]
    for mode in ("pool", "inproc"):
        m = med[mode]
        verdicts += [
            f"* {mode}: constructor → first hit ≤ {TARGET_FIRST_HIT_MS:g} ms: "
            f"**{m['first_hit_ms']:.1f} ms** → "
            f"{C.verdict(m['first_hit_ms'] <= TARGET_FIRST_HIT_MS)}; `close()` ≤ "
            f"{TARGET_CLOSE_MS:g} ms: **{m['close_ms']:.1f} ms** → "
            f"{C.verdict(m['close_ms'] <= TARGET_CLOSE_MS)}.",
        ]
    env = res["env"]
    note = ("" if res["setup"]["original"] else
            " The original CacheSaver is left out: `bench/.venv-original` is absent "
            "(`python bench/original_env.py` builds it).")
    lines = [
        "## startup: import, first hit, close (issue #11)\n",
        C.environment_md(env) if "original" in env else _environment_md_ours(env),
        f"Command: `{res['command']}` ({res['seconds']:.0f} s). Each figure is the median "
        f"of {res['setup']['runs']} fresh processes (`bench/_startup_probe.py`), the kinds "
        "interleaved. *import ms* is timed inside the process around the import statement(s); "
        "*whole process ms* is spawn to exit as the parent sees it (interpreter start and "
        "shutdown included). *constructor → first hit*: from `OnlineAPI(...)` to the first "
        "`await api.request(...)` returning a cached sample (n=1). Pool: one cache worker "
        "and one batch worker process already running on a private Redis, sample warmed. "
        f"In-process: a `SimModel` and another key prefix, no worker processes (the "
        f"pipeline starts its own cache and batch workers). *close()*: after {REQUESTS} "
        f"more hits. The original: CacheSaver 0.0.6 with a warmed `diskcache` folder, "
        f"`cleanup()` as its close.{note}"
        + (f" Rows marked *(baseline {base})* run the client code of commit {base} (an "
           f"export, `git archive`) against the same workers and server, in the same run, "
           f"interleaved." if base else "") + "\n",
        C.md_table(headers, rows), "",
        "### Targets\n", *verdicts, "",
    ]
    if res["not_cached"]:
        lines += [f"*Requests that were not hits (the figures above include them): "
                  f"{'; '.join(res['not_cached'])}*", ""]
    for name, prof in res["profiles"].items():
        lines.append(C.profile_md(f"py-spy, one `{name}` probe (wall clock, idle included)",
                                  prof))
    C.write_section(STUDY, "\n".join(lines))
    print("\n" + "\n".join(verdicts))
    print(f"\nwritten to {C.RESULTS} (section {STUDY}) and {OUT}")


def _cell(m: dict[str, Any], key: str) -> str:
    return C.fmt(m[key], 1) if key in m else ""


def _environment_md_ours(env: dict[str, Any]) -> str:
    ours = ", ".join(f"{k} {v}" for k, v in env["ours"].items())
    return (f"*{env['date']}* · {env['machine']} ({env['load']}) · redis-server "
            f"{env['redis']} (private, loopback) · commit {env['commit']}\n\n"
            f"* ours (`.venv`): {ours}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=10, help="fresh processes per figure (10)")
    p.add_argument("--baseline", metavar="REV", help="also measure the client of this "
                   "revision (an export in bench/.work), same run, interleaved")
    p.add_argument("--no-profile", action="store_true", help="no py-spy run on a miss")
    a = p.parse_args()
    res = run(a.runs, not a.no_profile, a.baseline)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    report(res)


if __name__ == "__main__":
    main()
