"""Study ``replicas``: what ``--wait-replicas 1`` costs, against no wait, on one primary.

A private primary and one replica on loopback (``REPLICAOF``; never ``REDIS_URL``), two
sets of our worker processes on two key prefixes of the same primary: one with
``--wait-replicas 0``, one with ``--wait-replicas 1`` (each reserve and each store is
followed by ``WAIT 1`` on the same connection and answered only once the replica holds
it: what keeps a Sentinel failover from handing an index out twice,
``docs/reliability.md``). Both prefixes are replicated, so the replication stream costs
both the same; only the wait differs. The sets take turns, round by round, with the
``durability`` workloads: hits one at a time (``seq``) and at 32 callers (``c32``),
and a burst of 256 misses (``sim:bench`` at zero latency).

Prints the figures and the cost of waiting (its time ÷ no wait's; for throughput no
wait's ÷ its), writes ``bench/results/replicas.json``, summarised in
``docs/scaling.md`` (*What replicas and Sentinel add*). About a minute.

Usage: ``.venv/bin/python -m bench.replicas [--rounds N] [--duration S]``
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
import os  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

from bench.durability import MODEL, _medians, one_round  # noqa: E402

STUDY = "replicas"
MODES = {"no wait": "0", "wait 1 replica": "1"}


def start_replica(primary_url: str) -> tuple[Any, str]:
    """A second private server, made a replica of the primary; its URL once in sync."""
    import redis
    from cachesaver_dist.server import EmbeddedServer

    server = EmbeddedServer(C.WORK / f"redis-{STUDY}-replica-{uuid.uuid4().hex[:6]}",
                            persist=False)
    url = server.start()
    host_port = primary_url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    with redis.Redis.from_url(url) as r:
        r.execute_command("REPLICAOF", host, port)
        deadline = time.monotonic() + 30
        while r.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync within 30 s")
            time.sleep(0.1)
    return server, url


def run(rounds: int, duration: float) -> dict[str, Any]:
    os.environ.pop("REDIS_URL", None)  # a private primary and replica only
    t0 = time.monotonic()
    per: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with C.Stack(STUDY) as primary:
        replica, _ = start_replica(primary.url)
        try:
            stacks = {"no wait": primary, "wait 1 replica": C.Stack(f"{STUDY}-wait")}
            stacks["wait 1 replica"].url = primary.url
            stacks["wait 1 replica"].private = False  # the same server: its prefix only
            env = C.environment(primary.redis_version())
            env.pop("original", None)  # the original CacheSaver plays no part here
            for mode, st in stacks.items():
                flag = ["--wait-replicas", MODES[mode]]
                st.start_worker("batch", "--model", MODEL, "--sim-latency", "0",
                                "--concurrency", "32", *flag)
                st.start_worker("cache", *flag)
                st.wait_alive("cache")
                st.wait_alive(MODEL)
            for rnd in range(rounds):
                for mode in (list(MODES) if rnd % 2 == 0 else list(MODES)[::-1]):
                    print(f"round {rnd + 1}/{rounds}: {mode}", flush=True)
                    per[mode].append(one_round(stacks[mode], duration, rnd == 0,
                                               f"{STUDY}-{rnd}-{uuid.uuid4().hex[:6]}"))
            stacks["wait 1 replica"].__exit__(None, None, None)
        finally:
            replica.stop()
    med = {m: _medians(rs) for m, rs in per.items()}
    n, w = med["no wait"], med["wait 1 replica"]
    cost = {
        "hit_seq_p50": w["hit_seq"]["p50"] / n["hit_seq"]["p50"],
        "hit_c32_p50": w["hit_c32"]["p50"] / n["hit_c32"]["p50"],
        "hit_c32_throughput": n["hit_c32"]["throughput"] / w["hit_c32"]["throughput"],
        "miss_wall": w["miss"]["wall_s"] / n["miss"]["wall_s"],
    }
    return {"study": STUDY, "env": env, "seconds": round(time.monotonic() - t0, 1),
            "command": f".venv/bin/python -m bench.replicas --rounds {rounds} "
                       f"--duration {duration:g}",
            "setup": {"model": f"{MODEL} (batch worker, --sim-latency 0 --concurrency 32)",
                      "servers": "private primary + one replica on loopback, no persistence",
                      "rounds": rounds},
            "median": med, "cost_of_waiting": cost, "rounds": per}


def report(res: dict[str, Any]) -> None:
    med, cost = res["median"], res["cost_of_waiting"]
    rows = [[m, C.fmt(med[m]["hit_seq"]["p50"]), C.fmt(med[m]["hit_c32"]["p50"]),
             C.fmt(med[m]["hit_c32"]["throughput"], 0), C.fmt(med[m]["miss"]["wall_s"], 3)]
            for m in MODES]
    rows.append(["cost of waiting", C.fmt(cost["hit_seq_p50"]), C.fmt(cost["hit_c32_p50"]),
                 C.fmt(cost["hit_c32_throughput"]), C.fmt(cost["miss_wall"])])
    print()
    print(C.text_table(["workers", "hit seq p50 ms", "hit c32 p50 ms", "hit c32 req/s",
                        "miss burst 256 s"], rows))
    print(f"\n{res['seconds']:.0f} s in all")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="rounds per mode (4)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per hit phase (2)")
    a = p.parse_args()
    res = run(a.rounds, a.duration)
    report(res)
    out = C.write_json(STUDY, res)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
