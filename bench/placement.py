"""Study ``placement``: on one host, which cores the client, the cache worker and Redis
run on, and what that does to cache hits.

On a host that runs all three (a workstation; this 2-core VM), the kernel places them
as it likes. This study runs the ``hit_path`` workloads (ours only, the default path:
client → queue → cache worker → reply) with each placement in turn, the placements
interleaved in each round. S is the *server core*, the last CPU this process may use;
a placement is set with ``os.sched_setaffinity``, as ``taskset -pc`` sets it:

* ``kernel``: none set (what a deployment gets unless it asks);
* ``server core``: Redis and the cache worker on S, the client anywhere;
* ``server core, client apart``: Redis and the cache worker on S, the client on the
  other CPUs;
* ``Redis alone on S``: Redis on S, the cache worker and the client anywhere;
* ``worker apart``: Redis on S, the cache worker on the other CPUs, the client anywhere.

Per placement, workload and phase (``c32``, ``c256``, as in ``hit_path``): hits/s, the
CPU µs per hit of each process, the share of the machine's CPU time left idle over the
measured window (``/proc/stat``) and how often per second the kernel moved the cache
worker and Redis from one CPU to another (``/proc/<pid>/sched``). Needs Linux, at least
2 CPUs and a private Redis (``REDIS_URL`` unset: a server not started here is never
placed).

Writes its section of ``bench/RESULTS.md`` and ``bench/results/placement.json``.

Usage: ``.venv/bin/python -m bench.placement [--duration S] [--rounds N]``
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
import contextlib  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

STUDY = "placement"
MODEL = "sim:bench"
WORKLOADS = ("short", "chat")
PHASES = ("c32", "c256")
PROMPTS = 512
# name -> (client, cache worker, Redis): "S" the server core, "rest" the other CPUs,
# None anywhere
PLACEMENTS: dict[str, tuple[str | None, str | None, str | None]] = {
    "kernel": (None, None, None),
    "server core": (None, "S", "S"),
    "server core, client apart": ("rest", "S", "S"),
    "Redis alone on S": (None, None, "S"),
    "worker apart": (None, "rest", "S"),
}


def phase(name: str, duration: float) -> dict[str, Any]:
    callers = {"c32": 32, "c256": 256}[name]
    return {"name": name, "callers": callers, "batch_size": 32, "timeout": 0.005,
            "duration": duration, "max_requests": 1_000_000, "warmup": 0.5}


def cpus_of(where: str | None, server: int) -> set[int] | None:
    if where is None:
        return None
    every = os.sched_getaffinity(0)
    return {server} if where == "S" else every - {server}


def run(duration: float, rounds: int) -> None:
    server = C.server_core()
    if server is None:
        sys.exit("placement: needs Linux and at least 2 CPUs this process may use")
    if os.environ.get("REDIS_URL"):
        sys.exit("placement: places the Redis server it starts itself; unset REDIS_URL")
    C.ensure_envs()
    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    t_start = time.monotonic()
    with C.Stack(STUDY) as st:
        env = C.environment(st.redis_version())
        redis_pid = st.server_pid()
        assert redis_pid is not None
        _, worker = st.start_pool(MODEL)
        watch = {"worker": worker.pid, "redis": redis_pid}
        warmed: set[str] = set()
        names = list(PLACEMENTS)
        for rnd in range(rounds):
            for wl in WORKLOADS:
                for name in names if rnd % 2 == 0 else names[::-1]:
                    print(f"round {rnd + 1}/{rounds}: {wl}, {name}", flush=True)
                    client, cache, redis = (cpus_of(w, server) for w in PLACEMENTS[name])
                    with contextlib.ExitStack() as placing:
                        for pids, cpus in (([os.getpid()], client), ([worker.pid], cache),
                                           ([redis_pid], redis)):
                            if cpus is not None:  # (the driver inherits this process's)
                                placing.enter_context(C.placed(pids, cpus))
                        res = C.run_driver("ours", {
                            "mode": "hits", "url": st.url, "prefix": st.prefix,
                            "model": MODEL, "workload": wl, "prompts": PROMPTS,
                            "warm": wl not in warmed, "keep_latencies": False,
                            "phases": [phase(ph, duration) for ph in PHASES],
                            "watch": watch}, env=st.env())
                    warmed.add(wl)
                    for ph in PHASES:
                        results.setdefault((name, wl, ph), []).append(res["phases"][ph])
    report(env, server, results, duration, rounds, time.monotonic() - t_start)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    count = sum(r["count"] for r in runs)
    wall = sum(r["wall"] for r in runs)
    cpu = {k: 1e6 * sum(r["cpu"][k] for r in runs) / count for k in runs[0]["cpu"]}
    moved = {k: sum(r["migrations"][k] for r in runs) / wall for k in runs[0]["migrations"]}
    idle = [r["machine_idle"] for r in runs if r["machine_idle"] is not None]
    return {"thr": C.median([r["throughput"] for r in runs]),
            "thr_all": [r["throughput"] for r in runs], "cpu_us": cpu,
            "migrations_per_s": moved, "idle": C.median(idle) if idle else None}


def report(env: dict[str, Any], server: int,
           results: dict[tuple[str, str, str], list[dict[str, Any]]],
           duration: float, rounds: int, seconds: float) -> None:
    agg = {k: aggregate(v) for k, v in results.items()}
    headers = ["workload", "phase", "placement", "hits/s", "× kernel", "idle %",
               "CPU µs/hit (client, worker, redis)", "moves/s (worker, redis)"]
    rows = []
    for wl in WORKLOADS:
        for ph in PHASES:
            base = agg["kernel", wl, ph]["thr"]
            for name in PLACEMENTS:
                a = agg[name, wl, ph]
                cpu, moved = a["cpu_us"], a["migrations_per_s"]
                rows.append([wl, ph, name, C.fmt(a["thr"], 0), C.fmt(a["thr"] / base),
                             "-" if a["idle"] is None else f"{100 * a['idle']:.0f}",
                             f"{sum(cpu.values()):.0f} (" + ", ".join(
                                 f"{cpu.get(k, 0):.0f}" for k in ("client", "worker", "redis"))
                             + ")",
                             f"{moved.get('worker', 0):.0f}, {moved.get('redis', 0):.0f}"])
    print()
    print(C.text_table(headers, rows))
    gains = {(wl, ph): agg["server core", wl, ph]["thr"] / agg["kernel", wl, ph]["thr"]
             for wl in WORKLOADS for ph in PHASES}
    C.write_json(STUDY, {"env": env, "server_core": server, "duration": duration,
                         "rounds": rounds, "placements": PLACEMENTS,
                         "results": {" / ".join(k): v for k, v in agg.items()},
                         "server_core_gain": {" / ".join(k): v for k, v in gains.items()}})
    lines = [
        "## placement: which cores the client, the cache worker and Redis run on\n",
        C.environment_md(env),
        f"Command: `.venv/bin/python -m bench.placement` ({rounds} rounds, {duration:g} s "
        f"per phase, {seconds:.0f} s in all). Ours only, the default path, the `hit_path` "
        f"workloads and phases (every request a hit; batch size 32; `c32` = 32 closed-loop "
        f"callers, `c256` = 256), one client process, one cache worker, one private Redis. "
        f"S = CPU {server} (the *server core*); a placement is set with "
        f"`os.sched_setaffinity`, as `taskset -pc` sets it: `kernel` = none; "
        f"`server core` = Redis and the cache worker on S, the client anywhere; "
        f"`server core, client apart` = the same, the client on the other CPUs; "
        f"`Redis alone on S` = only Redis placed; `worker apart` = Redis on S, the cache "
        f"worker on the other CPUs. hits/s = median over rounds; × kernel = against "
        f"`kernel` in the same phase; idle % = the machine's CPU time left idle over the "
        f"measured window (`/proc/stat`, median over rounds); moves/s = how often the "
        f"kernel moved the process from one CPU to another (`/proc/<pid>/sched`).\n",
        C.md_table(headers, rows), "",
        "`server core` against `kernel`, hits/s: " + "; ".join(
            f"{wl} {ph} **{g:.2f}×**" for (wl, ph), g in gains.items()) + ".",
        "",
    ]
    C.write_section(STUDY, "\n".join(lines))
    print(f"\nwritten to {C.RESULTS} (section {STUDY})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=3.0, help="seconds per phase (3)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (2)")
    args = p.parse_args()
    run(args.duration, args.rounds)


if __name__ == "__main__":
    main()
