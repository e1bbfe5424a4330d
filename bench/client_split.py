"""Study ``client_split``: where a client's CPU per hit goes on the full path (c32).

One client process (``OnlineAPI``, batch size 32, 32 closed-loop callers, every request
a hit) measures its own CPU per request with the path cut at three places, interleaved
over rounds in the same process: ``responses`` (each batch answered in-process with the
replies a real run gave: the client's own work and the bench driver's), ``enqueue``
(the batch's job and wake token really enqueued, one round trip, then answered
in-process) and ``full`` (the real path: the reply subscription's read and decoding
added). The differences are the enqueue's and the reply path's costs per request. One
cache worker and one batch worker process at their default flags, a private Redis.

Usage: ``.venv/bin/python -m bench.client_split [--workload short|chat] [--rounds N]
[--requests N]``
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
import time  # noqa: E402
from typing import Any  # noqa: E402

STUDY = "client_split"
MODEL = "sim:bench"
PROMPTS = 512
PARTS = {"responses": "answered in-process: the client's own work (and the driver's)",
         "enqueue": "+ the enqueue round trip (job and wake token)",
         "full": "+ the reply path (subscription read, decoding): the real path"}


def run(workloads: list[str], rounds: int, requests: int) -> None:
    C.ensure_envs()
    t0 = time.monotonic()
    results: dict[str, dict[str, list[float]]] = {}
    with C.Stack(STUDY) as st:
        env = C.environment(st.redis_version())
        st.start_pool(MODEL)
        for wl in workloads:
            print(f"{wl} workload: {rounds} rounds of {len(PARTS)} parts", flush=True)
            results[wl] = C.run_driver("ours", {
                "mode": "client_split", "url": st.url, "prefix": st.prefix, "model": MODEL,
                "workload": wl, "prompts": PROMPTS, "rounds": rounds, "requests": requests},
                env=st.env(), timeout=600)
    report(env, results, rounds, requests, time.monotonic() - t0)


def report(env: dict[str, Any], results: dict[str, dict[str, list[float]]], rounds: int,
           requests: int, seconds: float) -> None:
    headers = ["workload", "part", "client CPU µs/request", "added µs", "per round"]
    rows = []
    for wl, parts in results.items():
        before = 0.0
        for part, what in PARTS.items():
            us = C.median(parts[part])
            rows.append([wl, f"`{part}`: {what}", C.fmt(us, 1),
                         C.fmt(us - before, 1) if before else "",
                         " ".join(C.fmt(x, 1) for x in parts[part])])
            before = us
    print()
    print(C.text_table(headers, rows))
    workloads = list(results)
    lines = [
        f"## {STUDY}: where a client's CPU per hit goes (full path, c32)\n",
        C.environment_md(env),
        f"Command: `.venv/bin/python -m bench.{STUDY}"
        + "".join(f" --workload {wl}" for wl in workloads)
        + f" --rounds {rounds} --requests {requests}` ({seconds:.0f} s). One `OnlineAPI` "
        f"client process, batch size 32, 32 closed-loop callers, {requests} hits per part "
        "and round (each a new namespace's sample 0 of 512 warmed prompts, as in "
        "*hit_path*); its CPU (`time.process_time`) per request with the path cut at three "
        "places, interleaved in the same process, the order reversed every other round; "
        "one cache worker and one batch worker at their default flags. Figures: medians "
        "over rounds; `added`: the part's cost over the one before.\n",
        C.md_table(headers, rows), "",
    ]
    C.write_section(STUDY, "\n".join(lines))
    C.write_json(STUDY, {"rounds": rounds, "requests": requests, "results": results})
    print(f"\nwritten to {C.RESULTS} (section {STUDY})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", action="append", choices=["short", "chat"],
                   help="short or chat; repeat for both (default: both)")
    p.add_argument("--rounds", type=int, default=4, help="rounds (4)")
    p.add_argument("--requests", type=int, default=16_000,
                   help="requests per part and round (16000)")
    a = p.parse_args()
    run(a.workload or ["short", "chat"], a.rounds, a.requests)


if __name__ == "__main__":
    main()
