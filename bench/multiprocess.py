"""Study ``multiprocess``: 4 client processes on one cache, ours vs the original.

Two scenarios, 100 prompts each, every process asks every prompt once for n = 2
samples, in its own random order, 16 requests at a time, all processes starting
together:

* ``shared``: the 4 processes in one run and one namespace (one experiment split over
  4 machines): every process must get samples no other process got, so the minimum is
  4 × 100 × 2 = 800 generated samples;
* ``distinct``: the 4 processes in 4 namespaces (4 methods): each namespace reuses the
  same samples, so the minimum is 100 × 2 = 200.

Measured: samples generated (counted at the model: ours by a counting model in the
batch worker process, the original by its in-process model in each client process)
vs the minimum; i.i.d. violations = a sample (same text, or for ours the same index)
handed out twice within one namespace; and, for ``distinct``, prompts whose namespaces
were handed different samples (reuse broken). Ours: cache and batch worker processes,
clients with the same ``run``. Original: 4 processes sharing one ``diskcache`` folder.

Target: ours generated == minimum, zero violations.

Usage: ``.venv/bin/python -m bench.multiprocess``
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
import collections  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

STUDY = "multiprocess"
MODEL = "bench.models:counting_sim"
PROCS, PROMPTS, N, CONCURRENCY, LATENCY = 4, 100, 2, 16, 0.05
SCENARIOS = {"shared": PROCS * PROMPTS * N, "distinct": PROMPTS * N}


def namespaces(scenario: str) -> list[str]:
    return ["shared"] * PROCS if scenario == "shared" else [f"method-{i}" for i in range(PROCS)]


def run() -> None:
    C.ensure_envs()
    t0 = time.monotonic()
    out: dict[str, dict[str, Any]] = {}
    tag = uuid.uuid4().hex[:6]
    with C.Stack(STUDY) as st:
        env = C.environment(st.redis_version())
        counter = f"{st.prefix}bench:generated"
        st.start_worker("cache")
        st.start_worker("batch", "--model", MODEL, "--concurrency", "32",
                        env={"BENCH_COUNTER_KEY": counter, "BENCH_MODEL_LATENCY": str(LATENCY)})
        st.wait_alive("cache")
        st.wait_alive(MODEL)
        for scenario, minimum in SCENARIOS.items():
            sc = f"{scenario}-{tag}"
            # ours
            print(f"{scenario}: ours, {PROCS} client processes", flush=True)
            run_id = f"bench-mp-{sc}"
            start_at = time.time() + 4.0
            drivers = [C.start_driver("ours", {
                "mode": "mp_client", "url": st.url, "prefix": st.prefix, "model": MODEL,
                "run": run_id, "scenario": sc, "prompts": PROMPTS, "n": N, "namespace": ns,
                "seed": i, "concurrency": CONCURRENCY, "batch_size": 8, "timeout": 0.002,
                "start_at": start_at}, env=st.env()) for i, ns in enumerate(namespaces(scenario))]
            res = [C.finish_driver(d, timeout=110) for d in drivers]
            wall = time.time() - start_at
            with st.sync_redis() as r:
                counts = {k.decode(): int(v) for k, v in r.hgetall(counter).items()}
            from bench.workloads import mp_prompt

            generated = sum(counts.get(mp_prompt(sc, i), 0) for i in range(PROMPTS))
            out[f"ours/{scenario}"] = analyse(scenario, minimum, res, generated, wall)
            # original
            print(f"{scenario}: original, {PROCS} processes on one diskcache", flush=True)
            cache_dir = C.WORK / f"orig-{STUDY}-{sc}"
            start_at = time.time() + 4.0
            drivers = [C.start_driver("original", {
                "mode": "mp_client", "cache_dir": str(cache_dir), "latency": LATENCY,
                "scenario": sc, "prompts": PROMPTS, "n": N, "namespace": ns, "seed": i,
                "concurrency": CONCURRENCY, "batch_size": 8, "timeout": 0.5,
                "start_at": start_at}) for i, ns in enumerate(namespaces(scenario))]
            res = [C.finish_driver(d, timeout=110) for d in drivers]
            wall = time.time() - start_at
            shutil.rmtree(cache_dir, ignore_errors=True)
            out[f"original/{scenario}"] = analyse(scenario, minimum, res,
                                                  sum(r["generated"] for r in res), wall)
    report(env, out, time.monotonic() - t0)


def analyse(scenario: str, minimum: int, results: list[dict[str, Any]], generated: int,
            wall: float) -> dict[str, Any]:
    nss = namespaces(scenario)
    texts: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
    indices: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    per_ns: dict[int, dict[str, list[str]]] = collections.defaultdict(dict)
    handed = 0
    for ns, res in zip(nss, results):
        for a in res["answers"]:
            handed += len(a["texts"])
            texts[ns, a["prompt"]] += a["texts"]
            if a.get("indices") is not None:
                indices[ns, a["prompt"]] += a["indices"]
            per_ns[a["prompt"]][ns] = a["texts"]
    text_dups = sum(len(v) - len(set(v)) for v in texts.values())
    index_dups = sum(len(v) - len(set(v)) for v in indices.values()) if indices else None
    disagree = None
    if scenario == "distinct":
        disagree = sum(len({tuple(t) for t in d.values()}) > 1 for d in per_ns.values())
    return {"generated": generated, "minimum": minimum, "handed": handed,
            "text_violations": text_dups, "index_violations": index_dups,
            "disagree": disagree, "wall": wall}


def report(env: dict[str, Any], out: dict[str, dict[str, Any]], seconds: float) -> None:
    headers = ["side / scenario", "samples handed out", "generated", "minimum",
               "generated / minimum", "i.i.d. violations (same text twice in a namespace)",
               "same index twice (ours)", "prompts whose namespaces got different samples",
               "wall s"]
    rows = []
    for k, r in out.items():
        rows.append([k, r["handed"], r["generated"], r["minimum"],
                     C.fmt(r["generated"] / r["minimum"]), r["text_violations"],
                     "-" if r["index_violations"] is None else r["index_violations"],
                     "-" if r["disagree"] is None else f"{r['disagree']} / {PROMPTS}",
                     C.fmt(r["wall"], 1)])
    print()
    print(C.text_table(headers, rows))
    ours = [r for k, r in out.items() if k.startswith("ours/")]
    ok = all(r["generated"] == r["minimum"] and r["text_violations"] == 0
             and not r["index_violations"] and not r["disagree"] for r in ours)
    lines = [
        "## multiprocess: 4 client processes on one cache\n",
        C.environment_md(env),
        f"Command: `.venv/bin/python -m bench.multiprocess` ({seconds:.0f} s in all). "
        f"{PROCS} client processes start together; each asks each of {PROMPTS} prompts once "
        f"for n = {N}, in its own random order, {CONCURRENCY} requests at a time; model "
        f"latency {LATENCY * 1000:.0f} ms. `shared`: one run, one namespace (minimum "
        f"{SCENARIOS['shared']} samples: every process needs samples of its own). `distinct`: "
        f"one namespace per process (minimum {SCENARIOS['distinct']}: all reuse the same "
        f"samples). Generated = counted at the model (ours: a counting model, "
        f"`bench/models.py`, in the batch worker process; original: the in-process model of "
        f"each of its processes). Ours: `worker cache` + `worker batch --model {MODEL}`, "
        f"clients `OnlineAPI(..., run=<shared run id>, batch_size=8)`. Original: "
        f"`OnlineAPI(model, Cache(<one shared folder>), batch_size=8, timeout=0.5)` in each "
        f"process.\n",
        C.md_table(headers, rows), "",
        "### Target\n",
        f"* ours: generated == minimum and zero violations in both scenarios → "
        f"{C.verdict(ok)}.",
    ]
    for k, r in out.items():
        if k.startswith("original/"):
            lines.append(f"* {k}: generated {r['generated']} vs minimum {r['minimum']} "
                         f"({r['generated'] / r['minimum']:.2f}×), {r['text_violations']} "
                         "samples handed out twice in one namespace"
                         + (f", {r['disagree']} prompts whose namespaces saw different "
                            "samples" if r["disagree"] is not None else "") + ".")
    lines += ["",
              "The original keeps its per-namespace counters in each process's memory and "
              "writes a key's whole sample list back to `diskcache` after each generation "
              "(read-modify-write, no lock across processes): processes sharing a namespace "
              "each start at index 0 (so they are handed the same samples whenever another "
              "process wrote them first), and concurrent writers overwrite each other's "
              "lists (paid samples are lost and generated again).", ""]
    link = C.plot(STUDY, {"kind": "multiprocess", "labels": list(out),
                          "ratio": [r["generated"] / r["minimum"] for r in out.values()],
                          "violations": [r["text_violations"] for r in out.values()],
                          "size": (10, 4)})
    if link:
        lines += [link, ""]
    C.write_section(STUDY, "\n".join(lines))
    print(f"\nwritten to {C.RESULTS} (section {STUDY})")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    run()


if __name__ == "__main__":
    main()
