"""Study ``dropin``: cache hits through the drop-in provider clients, ours vs the original's.

Most users call a model through a drop-in client (``from cachesaver_dist.models.openai
import AsyncOpenAI``; the original: ``from cachesaver.models.openai import AsyncOpenAI``),
so what a hit costs there, SDK response object included, is what they pay. Both sides
call ``client.chat.completions.create(model=..., messages=..., namespace=...,
request_id=..., metadata=True)`` with the ``hit_path`` chat workload (a ~1.5 kB
tree-of-thought request), each client at its defaults: ours with its in-process workers
on a private Redis (``ours``), and with ``direct=True`` (``ours direct``); the original
with its ``diskcache`` folder (batch size 1, its default). Misses go to the package's
LLM simulator over HTTP (``cachesaver-dist simulator``), only while warming: every
measured request is a hit (sample 0 of one of 512 warmed requests, in a namespace that
has not used it yet). Phases as in ``hit_path``: ``seq`` (1 caller), ``c32`` and
``c256`` (closed-loop callers); then ``sync``, in a process of its own: the same hits
one after another through the sync client (``OpenAI``), with no event loop running, as
a notebook cell or a script calls it. Rounds interleaved, figures are medians over
rounds.

CPU µs per hit: the client process (ours: with its in-process workers) plus, for ours,
redis-server. Not a target of its own: the issue's targets are ``hit_path``'s.

With ``--baseline REV``, the package at git revision REV runs as two more sides in the
same rounds (``ours REV``, ``ours direct REV``; the drivers are the current ones): a
before/after of a change on this path.

Usage: ``.venv/bin/python -m bench.dropin [--duration S] [--rounds N] [--baseline REV]``
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
import shutil  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

from bench.hit_path import PROMPTS, aggregate, phases  # noqa: E402

STUDY = "dropin"
MODEL = "sim-chat"  # the model name sent to the simulator


def run(duration: float, rounds: int, baseline: str | None = None) -> None:
    C.ensure_envs()
    work = C.WORK / f"{STUDY}-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True)
    roots: dict[str, Path | None] = {"ours": None, "ours direct": None}
    if baseline:
        rev, root = C.export_rev(baseline)
        roots.update({f"ours {rev}": root, f"ours direct {rev}": root})
    sides = ("original", *roots)
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    t_start = time.monotonic()
    sim, sim_url = C.start_simulator(work / "simulator.log", 0.0)
    try:
        with C.Stack(STUDY) as st:
            env = C.environment(st.redis_version())
            redis_pid = st.server_pid()
            common = {"mode": "dropin_hits", "base_url": f"{sim_url}/v1", "model": MODEL,
                      "workload": "chat",
                      "prompts": PROMPTS, "phases": phases(duration), "duration": duration}
            warmed: set[str] = set()
            for rnd in range(rounds):
                ours = list(roots) if rnd % 2 == 0 else list(roots)[::-1]
                for side in ("original", *ours):
                    print(f"round {rnd + 1}/{rounds}: {side}", flush=True)
                    if side == "original":
                        spec = {**common, "cache_dir": str(work / "original"),
                                "warm": side not in warmed}
                        res = C.run_driver("original", spec)
                        res["phases"].update(C.run_driver("original", {
                            **spec, "mode": "dropin_sync"})["phases"])
                    else:  # all of ours share one cache: warmed once
                        root = roots[side]
                        spec = {**common, "url": st.url, "prefix": st.prefix,
                                "warm": "ours" not in warmed, "direct": "direct" in side,
                                "watch": {"redis": redis_pid} if redis_pid else {}}
                        res = C.run_driver("ours", spec, env=st.env(root), root=root)
                        res["phases"].update(C.run_driver(
                            "ours", {**spec, "mode": "dropin_sync"}, env=st.env(root),
                            root=root)["phases"])
                    warmed.add(side.split()[0])
                    results[side].append(res["phases"])
    finally:
        C.stop_process(sim)
        shutil.rmtree(work, ignore_errors=True)
    report(env, results, duration, rounds, time.monotonic() - t_start, baseline)


def report(env: dict[str, Any], results: dict[str, list[dict[str, Any]]], duration: float,
           rounds: int, seconds: float, baseline: str | None) -> None:
    agg = {side: {ph: aggregate(rs, ph) for ph in ("seq", "c32", "c256", "sync")}
           for side, rs in results.items()}
    orig = agg["original"]
    headers = ["side", "seq p50 ms", "seq req/s", "c32 p50 ms", "c32 req/s", "c32 × original",
               "c256 req/s", "c256 × original", "CPU µs/hit (c32)"]
    rows = []
    for side in results:
        a = agg[side]
        cpu = a["c32"]["cpu_us"]
        rows.append([side, C.fmt(a["seq"]["p50"]), C.fmt(a["seq"]["thr"], 0),
                     C.fmt(a["c32"]["p50"]), C.fmt(a["c32"]["thr"], 0),
                     C.fmt(a["c32"]["thr"] / orig["c32"]["thr"]), C.fmt(a["c256"]["thr"], 0),
                     C.fmt(a["c256"]["thr"] / orig["c256"]["thr"]),
                     f"{sum(cpu.values()):.0f} (" + ", ".join(
                         f"{k} {v:.0f}" for k, v in cpu.items()) + ")"])
    misses = sum(a[ph]["misses"] for a in agg.values() for ph in a)
    sync_headers = ["side", "p50 ms", "p99 ms", "calls/s", "× original",
                    "CPU µs/call (client + Redis)"]
    sync_rows = []
    for side in results:
        a = agg[side]["sync"]
        sync_rows.append([side, C.fmt(a["p50"]), C.fmt(a["p99"]), C.fmt(a["thr"], 0),
                          C.fmt(a["thr"] / agg["original"]["sync"]["thr"]),
                          f"{sum(a['cpu_us'].values()):.0f}"])
    print()
    print(C.text_table(headers, rows))
    print()
    print(C.text_table(sync_headers, sync_rows))
    C.write_json(STUDY, {"env": env, "duration": duration, "rounds": rounds,
                         "sides": agg})
    lines = [
        "## dropin: cache hits through the drop-in provider clients, ours vs the original's\n",
        C.environment_md(env),
        f"Command: `.venv/bin/python -m bench.dropin --rounds {rounds}"
        f"{f' --baseline {baseline}' if baseline else ''}` ({duration:g} s per "
        f"phase, {seconds:.0f} s in all). Both sides: `AsyncOpenAI(...).chat.completions."
        "create(model=..., messages=..., namespace=..., request_id=..., metadata=True)`, the "
        "`hit_path` chat workload, each client at its defaults (ours: in-process workers, "
        "batch 32 and 5 ms; `ours direct`: `direct=True`; the original: batch size 1, "
        "`diskcache`), returning the SDK's `ChatCompletion`. Every measured request is a "
        f"hit ({misses} misses in all phases); misses while warming went to the package's "
        "LLM simulator over HTTP. req/s = median over interleaved rounds; CPU µs/hit = the "
        "client process (ours: with its workers) + redis-server, over the c32 phase.\n",
        C.md_table(headers, rows), "",
        "Sequential calls from a sync client (`OpenAI(...)`, one call after another with no "
        "event loop running, as a notebook cell or a script makes them; each client at its "
        f"defaults, {duration:g} s per round after 0.3 s unmeasured; medians over rounds):\n",
        C.md_table(sync_headers, sync_rows), "",
        *([f"`ours {rev}` rows: the package at {rev}, in the same rounds (`--baseline`)."
           for rev in {side.split()[-1] for side in results if side.startswith("ours ")
                       and side.split()[-1] != "direct"}]), "",
    ]
    C.write_section(STUDY, "\n".join(lines))
    print(f"\nwritten to {C.RESULTS} (section {STUDY})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=1.5, help="seconds per phase (1.5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--baseline", metavar="REV",
                   help="also run the package at this git revision, as two more sides")
    a = p.parse_args()
    run(a.duration, a.rounds, a.baseline)


if __name__ == "__main__":
    main()
