"""Study ``compare``: the hit path of two package versions, side by side (A/B).

Both revisions are exported from git (their ``cachesaver_dist/`` and ``workers/``; the
``bench/`` files are the current ones) and run against one Redis, each with its own
cache worker process, in interleaved rounds (A B, B A, ...), with the ``hit_path``
phases and workloads (``bench.workloads.HIT_WORKLOADS``). On a shared, noisy machine
this is how a package change is judged: the ratio B / A within each round.

Usage: ``.venv/bin/python -m bench.compare REV_A [REV_B] [--workload short|chat] [--rounds 4]
[--direct | --script]`` (REV_B defaults to HEAD; ``--direct``: the clients run
``OnlineAPI(direct=True)`` and no cache worker runs; ``--script``: only the reserve
script, its time in Redis per hit, see ``compare_script``). Writes section ``compare`` of
``RESULTS.md``.
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
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from bench.hit_path import MODEL, PROMPTS, phases  # noqa: E402

STUDY = "compare"


def subject(rev: str) -> str:
    return subprocess.run(["git", "-C", str(C.REPO), "log", "-1", "--format=%s", rev],
                          capture_output=True, text=True).stdout.strip()


def run(rev_a: str, rev_b: str, workloads: list[str], rounds: int, duration: float,
        direct: bool = False) -> None:
    C.ensure_envs()
    trees = dict(C.export_rev(r) for r in (rev_a, rev_b))
    revs = list(trees)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {
        (wl, r): [] for wl in workloads for r in revs}
    t_start = time.monotonic()
    with C.Stack(STUDY) as st:
        env = C.environment(st.redis_version())
        redis_pid = st.server_pid()
        st.start_worker("batch", "--model", MODEL, "--sim-latency", "0")
        st.wait_alive(MODEL)
        warmed: set[str] = set()
        for rnd in range(rounds):
            for wl in workloads:
                for rev in (revs if rnd % 2 == 0 else revs[::-1]):
                    print(f"round {rnd + 1}/{rounds}: {wl}, {rev}", flush=True)
                    root = trees[rev]
                    worker = None if direct else st.start_worker("cache", root=root)
                    if worker is not None:
                        st.wait_alive("cache")
                    res = C.run_driver("ours", {
                        "mode": "hits", "url": st.url, "prefix": st.prefix, "model": MODEL,
                        "workload": wl, "prompts": PROMPTS, "warm": wl not in warmed,
                        "phases": phases(duration), "keep_latencies": True, "direct": direct,
                        "watch": {**({"worker": worker.pid} if worker else {}),
                                  **({"redis": redis_pid} if redis_pid else {})},
                    }, env=st.env(root), root=root)
                    warmed.add(wl)
                    if worker is not None:
                        st.stop_worker(worker)
                    results[wl, rev].append(res["phases"])
    report(env, revs, results, workloads, rounds, duration, time.monotonic() - t_start, direct)


def report(env: dict[str, Any], revs: list[str],
           results: dict[tuple[str, str], list[dict[str, Any]]], workloads: list[str],
           rounds: int, duration: float, seconds: float, direct: bool = False) -> None:
    a, b = revs
    headers = ["workload", "revision", "seq p50 ms", "seq req/s", "c32 req/s (per round)",
               "c32 req/s", "c256 req/s", "CPU µs/hit (c32)"]
    rows, ratio_lines = [], []
    for wl in workloads:
        for rev in revs:
            rs = results[wl, rev]
            count = sum(r["c32"]["count"] for r in rs)
            cpu = {k: 1e6 * sum(r["c32"]["cpu"][k] for r in rs) / count
                   for k in rs[0]["c32"]["cpu"]}
            seq = C.summary([x for r in rs for x in r["seq"]["latencies_ms"]])
            rows.append([wl, f"{rev} ({subject(rev)[:60]})", C.fmt(seq["p50"]),
                         C.fmt(C.median([r["seq"]["throughput"] for r in rs]), 0),
                         " ".join(C.fmt(r["c32"]["throughput"], 0) for r in rs),
                         C.fmt(C.median([r["c32"]["throughput"] for r in rs]), 0),
                         C.fmt(C.median([r["c256"]["throughput"] for r in rs]), 0),
                         f"{sum(cpu.values()):.0f} (" + ", ".join(
                             f"{k} {v:.0f}" for k, v in cpu.items()) + ")"])
        ratios = {ph: [rb[ph]["throughput"] / ra[ph]["throughput"]
                       for ra, rb in zip(results[wl, a], results[wl, b])]
                  for ph in ("seq", "c32", "c256")}
        ratio_lines.append(
            f"* {wl}: " + "; ".join(f"{ph} **{C.median(v):.2f}×** "
                                    f"({' '.join(f'{x:.2f}' for x in v)})"
                                    for ph, v in ratios.items()))
    print()
    print(C.text_table(headers, rows))
    path = "direct hit path (`OnlineAPI(direct=True)`)" if direct else "hit path"
    lines = [
        f"## compare: the {path} of {a} and {b}, side by side\n",
        C.environment_md(env),
        f"Command: `.venv/bin/python -m bench.compare {a} {b} --rounds {rounds}"
        f"{' --direct' if direct else ''}` "
        f"({duration:g} s per phase, {seconds:.0f} s in all). Each revision's package runs "
        + ("the direct client (no cache worker)" if direct else
           "its own cache worker and the client") + "; one Redis, one batch worker; rounds "
        "interleaved (A B, B A, ...); phases and workloads as in `hit_path`. req/s = "
        "median over rounds.\n",
        C.md_table(headers, rows), "",
        f"Throughput of {b} over {a}, median of the per-round ratios (each round's "
        f"ratios in brackets):\n",
        *ratio_lines,
        "",
    ]
    C.write_section(STUDY, "\n".join(lines))
    print(f"\nwritten to {C.RESULTS} (section {STUDY})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rev_a", help="the baseline revision")
    p.add_argument("rev_b", nargs="?", default="HEAD", help="the revision to judge (HEAD)")
    p.add_argument("--workload", action="append", choices=("short", "chat"),
                   help="a workload of hit_path; repeat for several (default: both)")
    p.add_argument("--rounds", type=int,
                   help="interleaved rounds (4; with --script, 40)")
    p.add_argument("--duration", type=float, default=1.5, help="seconds per phase (1.5)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--direct", action="store_true",
                      help="clients in direct mode (OnlineAPI(direct=True)), no cache worker")
    mode.add_argument("--script", action="store_true",
                      help="only reserve.lua: Redis time per hit of each revision's script")
    p.add_argument("--batches", type=int, default=40,
                   help="with --script: batches of 32 hits per block (40)")
    a = p.parse_args()
    if a.rounds is not None and a.rounds < 1:
        p.error("--rounds must be at least 1")
    if a.script:
        from bench import compare_script

        if a.workload and len(a.workload) > 1:
            p.error("--script measures one workload: give --workload once")
        compare_script.run(a.rev_a, a.rev_b, workload=(a.workload or ["short"])[0],
                           rounds=a.rounds or 40, batches=a.batches, model=MODEL,
                           prompts=PROMPTS)
        return
    run(a.rev_a, a.rev_b, a.workload or ["short", "chat"], a.rounds or 4, a.duration,
        a.direct)


if __name__ == "__main__":
    main()
