"""Study ``client_burst``: several clients' batches queued at once on the full path.

``--clients`` clients (default 8), each an ``OnlineAPI`` with batch size 1 (so one arq
job per request), send ``--per-client`` hits at once (default 300): thousands of jobs
wait together, more than a cache worker pops at a time. One cache worker and one batch
worker process at their default flags, a fresh private Redis per side and round. What
it shows: whether every job is served as it comes (from the wake-up list) or some wait
for arq's poll (a second and more). With ``--baseline REV`` the package at git revision
REV runs too (its own workers and client), interleaved with the current one: a
before/after of a change.

Usage: ``.venv/bin/python -m bench.client_burst [--clients N] [--per-client N]
[--rounds N] [--baseline REV]``
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

STUDY = "client_burst"
MODEL = "sim:bench"
SLOW_MS = 1000.0  # a request this slow waited for arq's poll, not for its turn


def one_side(root: Path | None, clients: int, per_client: int, tag: str) -> dict[str, Any]:
    with C.Stack(STUDY) as st:
        st.start_worker("batch", "--model", MODEL, "--sim-latency", "0", root=root)
        st.start_worker("cache", root=root)
        st.wait_alive(MODEL)
        st.wait_alive("cache")
        res = C.run_driver("ours", {"mode": "client_burst", "url": st.url, "prefix": st.prefix,
                                    "model": MODEL, "clients": clients,
                                    "per_client": per_client, "tag": tag},
                           env=st.env(root), root=root)
        res["redis"] = st.redis_version()
    lat = res.pop("latencies_ms")
    return {**res, **C.summary(lat), "max": max(lat), "slow": sum(x >= SLOW_MS for x in lat)}


def run(clients: int, per_client: int, rounds: int, baseline: str | None) -> None:
    C.ensure_envs()
    sides: dict[str, Path | None] = {"current": None}
    if baseline:
        rev, root = C.export_rev(baseline)
        sides = {f"baseline {rev}": root, "current": None}
    t0 = time.monotonic()
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for rnd in range(rounds):
        order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
        for side in order:
            print(f"round {rnd + 1}/{rounds}: {side}", flush=True)
            results[side].append(one_side(sides[side], clients, per_client, f"r{rnd}"))
    seconds = time.monotonic() - t0
    env = C.environment(results["current"][0]["redis"])
    headers = ["side", "wall s", "p50 ms", "p99 ms", "max ms", f"requests ≥ {SLOW_MS:.0f} ms",
               "walls per round"]
    rows = []
    for side, rs in results.items():
        rows.append([side, C.fmt(C.median([r["wall"] for r in rs]), 3),
                     C.fmt(C.median([r["p50"] for r in rs]), 1),
                     C.fmt(C.median([r["p99"] for r in rs]), 1),
                     C.fmt(C.median([r["max"] for r in rs]), 0),
                     " ".join(str(r["slow"]) for r in rs),
                     " ".join(C.fmt(r["wall"], 2) for r in rs)])
    print()
    print(C.text_table(headers, rows))
    total = clients * per_client
    lines = [
        f"## {STUDY}: {clients} clients' batches queued at once (full path)\n",
        C.environment_md(env),
        f"Command: `.venv/bin/python -m bench.{STUDY} --clients {clients} --per-client "
        f"{per_client} --rounds {rounds}" + (f" --baseline {baseline}" if baseline else "")
        + f"` ({seconds:.0f} s). {clients} `OnlineAPI('{MODEL}', batch_size=1)` clients in "
        f"one process each send {per_client} hits at once ({total} arq jobs, each request "
        "its own batch); one cache worker and one batch worker process at their default "
        "flags; a fresh private Redis per side and round, rounds interleaved. Figures: "
        "medians over rounds (latencies pooled per round); the count of slow requests is "
        "per round.\n",
        C.md_table(headers, rows), "",
    ]
    C.write_section(STUDY, "\n".join(lines))
    C.write_json(STUDY, {"clients": clients, "per_client": per_client, "results": results})
    print(f"\nwritten to {C.RESULTS} (section {STUDY})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=8, help="clients (8)")
    p.add_argument("--per-client", type=int, default=300, help="requests per client (300)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side (3)")
    p.add_argument("--baseline", help="a git revision to run side by side")
    a = p.parse_args()
    run(a.clients, a.per_client, a.rounds, a.baseline)


if __name__ == "__main__":
    main()
