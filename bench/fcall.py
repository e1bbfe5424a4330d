"""Study ``fcall``: the reserve script as a Redis Function (FCALL) against EVALSHA.

Same server, same body, same calls: ``lua/reserve.lua`` is registered as a script
(``EVALSHA``, the package's path) and, wrapped as a function of a library
(``redis.register_function{function_name=..., callback=function(KEYS, ARGV) <body>
end}``), loaded with ``FUNCTION LOAD``. ``scripts.reserve`` is called on a batch of 32
requests (``--batch``), all hits: as many prompt keys, their samples stored first, each
batch in a new namespace (so each request still writes its counter and its reservation
record, as on the hit path). Its ``EVALSHA`` is sent either unchanged or as ``FCALL`` of
the function. The two alternate call by call (the order of each pair swapped every
pair): on a shared machine, blocks of one kind then the other measure the neighbours'
load.

Per round (``--block`` pairs): Redis's own time per call (``INFO commandstats``,
``usec_per_call`` of ``evalsha`` and ``fcall``), the redis-server process's CPU per call
(its threads' run time across each call, all of it: parsing, the script, the reply;
nothing else talks to this server) and the client's wall time per call.
Then the fixed cost of each command alone: an empty body (``return 0``) called with the
same number of keys and arguments, pipelined, the two alternating.

Always a private server (``redis-server`` on PATH, or ``--binary``; never ``REDIS_URL``),
no persistence, loopback. Prints the table; writes ``bench/results/fcall.json`` and the
``fcall`` section of ``bench/RESULTS.md``. About 20 seconds.

Usage: ``.venv/bin/python -m bench.fcall [--rounds N] [--block N] [--batch N]
[--binary PATH]``
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
import asyncio  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

STUDY = "fcall"
MODES = ("evalsha", "fcall")
LIBRARY, FUNCTION, EMPTY = "bench_fcall", "bench_fcall_reserve", "bench_fcall_empty"
OUT = C.BENCH_HOME / "results" / "fcall.json"


def library(body: str) -> str:
    """The reserve body and an empty one as functions of one library."""
    return (f"#!lua name={LIBRARY}\n"
            f"redis.register_function{{function_name='{FUNCTION}', "
            f"callback=function(KEYS, ARGV)\n{body}\nend}}\n"
            f"redis.register_function{{function_name='{EMPTY}', "
            "callback=function(KEYS, ARGV) return 0 end}\n")


class Router:
    """Sends the reserve script's ``EVALSHA`` unchanged, or as ``FCALL`` of the function
    (``mode``). Installed on the client object the way tests watch script calls, so the
    package lays out KEYS/ARGV as it always does."""

    def __init__(self, client: Any, sha: str) -> None:
        self.client, self.sha, self.mode = client, sha, "evalsha"
        self.shape = (0, 0)  # keys, arguments of the last reserve call
        self.evalsha = client.evalsha
        client.evalsha = self

    async def __call__(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        if sha == self.sha:
            self.shape = (numkeys, len(keys_and_args) - numkeys)
        if self.mode == "fcall" and sha == self.sha:
            return await self.client.fcall(FUNCTION, numkeys, *keys_and_args)
        return await self.evalsha(sha, numkeys, *keys_and_args)


def server_cpu_s(pid: int) -> float:
    """CPU seconds of every thread of ``pid``: ``/proc/<pid>/task/*/schedstat`` (ns) where
    there is one, else user + system time (clock ticks: coarse for short blocks)."""
    tasks = Path(f"/proc/{pid}/task")
    if tasks.is_dir():
        try:
            return sum(int((t / "schedstat").read_text().split()[0])
                       for t in tasks.iterdir()) / 1e9
        except (OSError, ValueError, IndexError):
            pass
    return C.cpu_seconds(pid)


def commandstats(r: Any, names: tuple[str, ...] | None = MODES) -> dict[str, tuple[int, int]]:
    """(calls, usec) of EVALSHA and FCALL, or of every command (``names=None``)."""
    st = {k.removeprefix("cmdstat_"): v for k, v in r.info("commandstats").items()}
    return {m: (int(st.get(m, {}).get("calls", 0)), int(st.get(m, {}).get("usec", 0)))
            for m in (st if names is None else names)}


async def measure(url: str, pid: int, rounds: int, block: int, size: int
                  ) -> dict[str, Any]:
    import redis
    from cachesaver_dist import scripts
    from cachesaver_dist.connection import connect
    from cachesaver_dist.protocol import Keys, WorkItem, encode_spec

    keys = Keys(f"bench-{STUDY}-{uuid.uuid4().hex[:8]}:")
    spec = {i: encode_spec("sim:bench", "sim:bench", {"prompt": f"question {i}"})
            for i in range(size)}

    def batch(ns: str) -> list[WorkItem]:
        return [WorkItem(uuid.uuid4().hex, "", f"key{i:02d}", ns, 1, "bench", "sim:bench",
                         "sim:bench", spec[i]) for i in range(size)]

    client = connect(url)
    with redis.Redis.from_url(url) as admin:
        admin.execute_command("FUNCTION", "LOAD", "REPLACE", library(scripts.source("reserve")))
        router = Router(client, scripts.script(client, "reserve").sha)
        await scripts.reserve(client, keys, "bench", batch("warm"))
        await scripts.fill_many(client, keys, [(f"key{i:02d}", {0: b"sample %02d " % i * 40})
                                               for i in range(size)])
        count = 0

        async def call(mode: str) -> tuple[float, float]:
            """One reserve batch by ``mode``: (client wall µs, server CPU µs)."""
            nonlocal count
            count += 1
            router.mode, items = mode, batch(f"ns{count}")
            c0 = server_cpu_s(pid)
            t0 = time.perf_counter()
            got = await scripts.reserve(client, keys, "bench", items)
            wall = (time.perf_counter() - t0) * 1e6
            cpu = (server_cpu_s(pid) - c0) * 1e6
            if not all(g.complete and g.flags == "c" and g.samples for g in got):
                raise AssertionError(f"{mode}: not a hit batch: {got[:2]}")
            return wall, cpu

        for _ in range(max(block // 4, 10)):  # warm-up, both paths
            for mode in MODES:
                await call(mode)
        per: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        all0 = commandstats(admin, None)
        for _ in range(rounds):
            s0 = commandstats(admin)
            walls: dict[str, list[float]] = {m: [] for m in MODES}
            cpus: dict[str, list[float]] = {m: [] for m in MODES}
            for i in range(block):  # pairs, the order swapped every pair
                for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                    wall, cpu = await call(mode)
                    walls[mode].append(wall)
                    cpus[mode].append(cpu)
            s1 = commandstats(admin)
            for mode in MODES:
                ncalls = s1[mode][0] - s0[mode][0]
                assert ncalls == block, (mode, ncalls)
                per[mode].append({"usec_per_call": (s1[mode][1] - s0[mode][1]) / ncalls,
                                  "server_cpu_us": statistics.fmean(cpus[mode]),
                                  "server_cpu_p50_us": C.percentile(cpus[mode], 50),
                                  "wall_p50_us": C.percentile(walls[mode], 50),
                                  "wall_p90_us": C.percentile(walls[mode], 90)})
        all1 = commandstats(admin, None)
        inner = {name: ((c - all0.get(name, (0, 0))[0]) / (2 * rounds * block),
                        (u - all0.get(name, (0, 0))[1]) / (2 * rounds * block))
                 for name, (c, u) in all1.items()
                 if name not in (*MODES, "info") and c > all0.get(name, (0, 0))[0]}
        batch_shape = {"keys": router.shape[0], "args": router.shape[1]}
        fixed = fixed_cost(admin, rounds, n_keys=router.shape[0], n_args=router.shape[1])
        admin.execute_command("FUNCTION", "DELETE", LIBRARY)
        for key in list(admin.scan_iter(match=f"{keys.prefix}*", count=1000)):
            admin.delete(key)
    await client.aclose()
    return {"per_round": per, "fixed": fixed, "inner_per_call": inner,
            "batch_shape": batch_shape, "calls": count}


def fixed_cost(r: Any, rounds: int, n_keys: int, n_args: int, per: int = 500
               ) -> dict[str, list[float]]:
    """usec_per_call of an empty body by EVALSHA and FCALL, with as many keys and arguments
    as a reserve batch: per round one pipeline of ``per`` pairs, the two alternating."""
    sha = r.script_load("return 0")
    argv = [*(f"k{i}" for i in range(n_keys)), *(f"a{i}" for i in range(n_args))]
    command = {"evalsha": ("EVALSHA", sha), "fcall": ("FCALL", EMPTY)}
    out: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(rounds):
        pipe = r.pipeline(transaction=False)
        for i in range(per):
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                pipe.execute_command(*command[mode], n_keys, *argv)
        s0 = commandstats(r)
        pipe.execute()
        s1 = commandstats(r)
        for mode in MODES:
            out[mode].append((s1[mode][1] - s0[mode][1]) / (s1[mode][0] - s0[mode][0]))
    return out


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    per = res["per_round"]
    med = {m: {k: C.median([r[k] for r in per[m]]) for k in per[m][0]} for m in MODES}
    ratio = {k: C.median([f[k] / e[k] for e, f in zip(per["evalsha"], per["fcall"])])
             for k in per["evalsha"][0]}
    fixed = {m: C.median(v) for m, v in res["fixed"].items()}
    return {"median": med, "ratio_fcall_over_evalsha": ratio, "fixed_usec_per_call": fixed}


def report(res: dict[str, Any]) -> str:
    s, per = res["summary"], res["raw"]["per_round"]
    med, ratio, fixed = s["median"], s["ratio_fcall_over_evalsha"], s["fixed_usec_per_call"]
    headers = ["command", "Redis µs/call (commandstats)", "server CPU µs/call",
               "client wall p50 µs", "client wall p90 µs", "empty body µs/call"]
    rows = [[m.upper(), C.fmt(med[m]["usec_per_call"], 1), C.fmt(med[m]["server_cpu_us"], 1),
             C.fmt(med[m]["wall_p50_us"], 0), C.fmt(med[m]["wall_p90_us"], 0),
             C.fmt(fixed[m], 1)] for m in MODES]
    rows.append(["FCALL ÷ EVALSHA", C.fmt(ratio["usec_per_call"], 3),
                 C.fmt(ratio["server_cpu_us"], 3), C.fmt(ratio["wall_p50_us"], 3),
                 C.fmt(ratio["wall_p90_us"], 3), C.fmt(fixed["fcall"] / fixed["evalsha"], 3)])
    print()
    print(C.text_table(headers, rows))
    per_round = {k: " ".join(f"{f[k] / e[k]:.2f}" for e, f in zip(per["evalsha"], per["fcall"]))
                 for k in ("usec_per_call", "server_cpu_us", "wall_p50_us")}
    setup = res["setup"]
    env = res["env"]
    ours = ", ".join(f"{k} {v}" for k, v in env["ours"].items())
    gain = 1 - ratio["usec_per_call"]
    ratios = [f["usec_per_call"] / e["usec_per_call"] for e, f in zip(per["evalsha"], per["fcall"])]
    lo, hi, call = min(ratios), max(ratios), med["evalsha"]["usec_per_call"]
    inner = res["raw"]["inner_per_call"]
    inner_calls = sum(c for c, _ in inner.values())
    inner_usec = sum(u for _, u in inner.values())
    inner_desc = ", ".join(f"{name.upper()} {c:.0f}" for name, (c, _) in
                           sorted(inner.items(), key=lambda kv: -kv[1][0]))
    return "\n".join([
        "## fcall: the reserve script as a Redis Function (FCALL) vs EVALSHA\n",
        f"*{env['date']}* · {env['machine']} ({env['load']}) · redis-server {env['redis']} "
        f"(private, loopback, no persistence) · commit {env['commit']}\n",
        f"* ours (`.venv`): {ours}\n",
        f"Command: `{res['command']}` ({res['seconds']:.0f} s). `scripts.reserve` on a batch "
        f"of {setup['batch']} requests, all hits ({setup['batch_shape']['keys']} keys, "
        f"{setup['batch_shape']['args']} arguments per call; each batch in a new namespace, "
        "so every request still writes its counter and reservation record), the same "
        "`lua/reserve.lua` body sent by `EVALSHA` or by `FCALL` of it wrapped as a "
        f"library function; {setup['rounds']} rounds of {setup['block']} calls per "
        "command, alternating call by call (each pair's order swapped). Figures: "
        "medians over rounds; the ratio row is the median of the per-round ratios. Redis "
        "µs/call: `INFO commandstats`; server CPU: the redis-server process (all its "
        "threads' run time, `/proc/<pid>/task/*/schedstat`) across each call, mean per "
        "round; empty body: `return 0` with as many keys and arguments, pipelined, the two "
        "alternating (the fixed cost of each command).\n",
        C.md_table(headers, rows), "",
        "Per-round ratios FCALL ÷ EVALSHA: " + "; ".join(
            f"{k} {v}" for k, v in per_round.items()) + ".\n",
        "### Result\n",
        f"* Redis's own time per call: FCALL {abs(gain) * 100:.1f} % "
        f"{'cheaper' if gain > 0 else 'dearer'} than EVALSHA for this body; per round "
        f"the ratio ranged {lo:.2f} to {hi:.2f}"
        + (" (both sides of 1: no difference this run can tell)." if lo < 1 < hi
           else " (every round on the same side of 1)."),
        f"* The command itself (empty body, same keys and arguments) costs "
        f"{fixed['evalsha']:.1f} µs by EVALSHA and {fixed['fcall']:.1f} µs by FCALL; the "
        f"difference is {100 * abs(fixed['fcall'] - fixed['evalsha']) / call:.1f} % of a "
        f"reserve call ({call:.0f} µs). The body is the cost: {inner_calls:.0f} commands "
        f"per call ({inner_desc}), {inner_usec:.0f} µs of their own time, the rest the "
        "script engine around them (each `redis.call`, building KEYS and ARGV, the "
        "reply), the same for both.",
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (10)")
    p.add_argument("--block", type=int, default=150, help="calls per command per round (150)")
    p.add_argument("--batch", type=int, default=32, help="requests per reserve call (32)")
    p.add_argument("--binary", help="redis-server to start (default: the one on PATH)")
    a = p.parse_args()
    from cachesaver_dist.server import EmbeddedServer

    t0 = time.monotonic()
    data = C.WORK / f"redis-{STUDY}-{uuid.uuid4().hex[:6]}"
    server = EmbeddedServer(data, persist=False, binary=a.binary)
    url = server.start()
    try:
        import redis

        with redis.Redis.from_url(url) as r:
            info = r.info("server")
            version, pid = str(info["redis_version"]), int(info["process_id"])
        env = C.environment(version)
        env.pop("original", None)  # the original CacheSaver plays no part here
        raw = asyncio.run(measure(url, pid, a.rounds, a.block, a.batch))
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)
    res = {"study": STUDY, "env": env, "seconds": round(time.monotonic() - t0, 1),
           "command": f".venv/bin/python -m bench.fcall --rounds {a.rounds} --block {a.block}"
                      + (f" --batch {a.batch}" if a.batch != 32 else "")
                      + (f" --binary {a.binary}" if a.binary else ""),
           "setup": {"batch": a.batch, "batch_shape": raw["batch_shape"], "rounds": a.rounds,
                     "block": a.block, "server": server.binary},
           "raw": raw}
    res["summary"] = summarise(raw)
    section = report(res)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    C.write_section(STUDY, section)
    print(f"\nwritten to {OUT} and {C.RESULTS} (section {STUDY})")


if __name__ == "__main__":
    main()
