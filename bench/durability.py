"""Study ``durability``: what ``appendfsync always`` costs against ``everysec``.

Same run, side by side: two private persistent servers (``EmbeddedServer`` with the
shipped persistence flags, data in ``bench/.work`` on the same disk), one switched to
``everysec`` with ``CONFIG SET``, each with our worker processes: one cache worker and
one batch worker serving ``sim:bench`` at zero latency (the bookkeeping alone: the
worst case for the fsync cost; a real model's seconds per call hide it). The two
servers take turns, round by round. Workloads, through ``OnlineAPI`` (the
``bench._ours`` driver):

* hit-heavy: the ``hit_path`` phases ``seq`` (1 caller) and ``c32`` (32 callers,
  batch size 32), every request a hit (each still writes: its usage counter and its
  reservation record);
* miss-heavy: the ``miss_backlog`` burst, 256 never-seen prompts at once (3 bursts,
  the median wall time).

Prints the figures and the slowdown of ``always`` (its time ÷ everysec's time; for
throughput everysec's ÷ always's) and writes them to ``bench/results/durability.json``
with the fsync latency of the data disk. About a minute and a half.

Usage: ``.venv/bin/python -m bench.durability [--rounds N] [--duration S]``
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
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

STUDY = "durability"
MODEL = "sim:bench"
POLICIES = ("everysec", "always")
PROMPTS, BURST, BURSTS = 512, 256, 3
OUT = C.BENCH_HOME / "results" / "durability.json"


class PersistentStack(C.Stack):
    """``C.Stack`` on a private server persisting like the shipped embedded server (AOF +
    RDB), with ``appendfsync`` set to ``policy``; never ``REDIS_URL``."""

    def __init__(self, policy: str) -> None:
        super().__init__(f"{STUDY}-{policy}")
        self.policy, self.url, self.private = policy, None, True

    def __enter__(self) -> PersistentStack:
        from cachesaver_dist.server import EmbeddedServer

        self.server = EmbeddedServer(C.WORK / f"redis-{self.study}-{uuid.uuid4().hex[:6]}")
        self.url = self.server.start()
        with self.sync_redis() as r:
            r.config_set("appendfsync", self.policy)
            got = r.config_get("appendfsync")["appendfsync"]
        assert got == self.policy, got
        return self


def fsync_latency_ms(directory: Path, count: int = 300) -> dict[str, float]:
    """fdatasync of a 200-byte append, as an AOF write, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path, times = directory / f"fsync-probe-{uuid.uuid4().hex[:6]}", []
    try:
        with open(path, "ab") as f:
            for _ in range(count):
                f.write(b"x" * 200)
                f.flush()
                t0 = time.perf_counter()
                os.fdatasync(f.fileno())
                times.append((time.perf_counter() - t0) * 1000)
    finally:
        path.unlink(missing_ok=True)
    return {k: v for k, v in C.summary(times).items() if k != "n"}


def hit_phases(duration: float) -> list[dict[str, Any]]:
    return [
        {"name": "seq", "callers": 1, "batch_size": 1, "timeout": 0.005, "duration": duration,
         "max_requests": 20_000, "warmup": 0.3},
        {"name": "c32", "callers": 32, "batch_size": 32, "timeout": 0.005,
         "duration": duration, "max_requests": 200_000, "warmup": 0.3},
    ]


def one_round(st: PersistentStack, duration: float, warm: bool, tag: str) -> dict[str, Any]:
    """The hit-heavy and the miss-heavy workload once, against ``st``."""
    spec = {"url": st.url, "prefix": st.prefix, "model": MODEL}
    hits = C.run_driver("ours", {**spec, "mode": "hits", "workload": "short",
                                 "prompts": PROMPTS, "warm": warm,
                                 "phases": hit_phases(duration)}, env=st.env())["phases"]
    bursts = C.run_driver("ours", {**spec, "mode": "burst", "count": BURST,
                                   "rounds": BURSTS, "batch_size": 32, "timeout": 0.005,
                                   "tag": tag}, env=st.env())["rounds"]
    wall = C.median([b["wall"] for b in bursts])
    out = {"miss": {"wall_s": wall, "throughput": BURST / wall,
                    "misses": sum(b["misses"] for b in bursts)}}
    for name, ph in hits.items():
        out[f"hit_{name}"] = {"throughput": ph["throughput"], "misses": ph["misses"],
                              "count": ph["count"], **C.summary(ph["latencies_ms"])}
    with st.sync_redis() as r:
        aof = r.info("persistence").get("aof_current_size", 0)  # 0: no AOF
        forks = r.info("stats")["total_forks"]
    out["context"] = {"aof_mib": aof / 2**20, "forks": forks, "load1": os.getloadavg()[0]}
    return out


def run(rounds: int, duration: float) -> dict[str, Any]:
    t0 = time.monotonic()
    per: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
    with contextlib.ExitStack() as stack:
        stacks = {p: stack.enter_context(PersistentStack(p)) for p in POLICIES}
        env = C.environment(stacks["always"].redis_version())
        env.pop("original", None)  # the original CacheSaver plays no part here
        fsync = fsync_latency_ms(stacks["always"].server.data_dir)
        for st in stacks.values():
            st.start_worker("batch", "--model", MODEL, "--sim-latency", "0",
                            "--concurrency", "32")
            st.start_worker("cache")
            st.wait_alive("cache")
            st.wait_alive(MODEL)
        for rnd in range(rounds):
            for policy in (POLICIES if rnd % 2 == 0 else POLICIES[::-1]):
                print(f"round {rnd + 1}/{rounds}: appendfsync {policy}", flush=True)
                per[policy].append(one_round(stacks[policy], duration, rnd == 0,
                                             f"{policy}-{rnd}-{uuid.uuid4().hex[:6]}"))
    med = {p: _medians(rs) for p, rs in per.items()}
    e, a = med["everysec"], med["always"]
    slowdown = {
        "hit_seq_p50": a["hit_seq"]["p50"] / e["hit_seq"]["p50"],
        "hit_seq_throughput": e["hit_seq"]["throughput"] / a["hit_seq"]["throughput"],
        "hit_c32_p50": a["hit_c32"]["p50"] / e["hit_c32"]["p50"],
        "hit_c32_throughput": e["hit_c32"]["throughput"] / a["hit_c32"]["throughput"],
        "miss_wall": a["miss"]["wall_s"] / e["miss"]["wall_s"],
    }
    return {"study": STUDY, "env": env, "seconds": round(time.monotonic() - t0, 1),
            "command": f".venv/bin/python -m bench.durability --rounds {rounds} "
                       f"--duration {duration:g}",
            "setup": {"model": f"{MODEL} (batch worker, --sim-latency 0 --concurrency 32)",
                      "cache_workers": 1, "hit_phases": hit_phases(duration),
                      "hit_prompts": PROMPTS, "miss_burst": BURST, "bursts_per_round": BURSTS,
                      "rounds": rounds,
                      "data_disk_fsync_ms": fsync},
            "median": med, "slowdown_always_vs_everysec": slowdown, "rounds": per}


def _medians(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per workload and figure, the median over rounds."""
    return {w: {k: C.median([r[w][k] for r in rounds]) for k in rounds[0][w]}
            for w in rounds[0]}


def report(res: dict[str, Any]) -> None:
    med, slow = res["median"], res["slowdown_always_vs_everysec"]
    rows = []
    for p in POLICIES:
        m = med[p]
        rows.append([p, C.fmt(m["hit_seq"]["p50"]), C.fmt(m["hit_seq"]["throughput"], 0),
                     C.fmt(m["hit_c32"]["p50"]), C.fmt(m["hit_c32"]["p99"]),
                     C.fmt(m["hit_c32"]["throughput"], 0), C.fmt(m["miss"]["wall_s"], 3),
                     C.fmt(m["miss"]["throughput"], 0)])
    rows.append(["slowdown (always)", C.fmt(slow["hit_seq_p50"]),
                 C.fmt(slow["hit_seq_throughput"]), C.fmt(slow["hit_c32_p50"]), "",
                 C.fmt(slow["hit_c32_throughput"]), C.fmt(slow["miss_wall"]), ""])
    print()
    print(C.text_table(["appendfsync", "hit seq p50 ms", "hit seq req/s", "hit c32 p50 ms",
                        "hit c32 p99 ms", "hit c32 req/s", f"miss burst {BURST} s",
                        "miss req/s"], rows))
    fs = res["setup"]["data_disk_fsync_ms"]
    print(f"\nfdatasync on the data disk: p50 {fs['p50']:.2f} ms, p99 {fs['p99']:.2f} ms; "
          f"{res['seconds']:.0f} s in all")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds per policy (5)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per hit phase (3)")
    a = p.parse_args()
    res = run(a.rounds, a.duration)
    report(res)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
