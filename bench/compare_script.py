"""``compare --script``: the reserve script of two revisions, side by side, in Redis.

A hit's cost in Redis is mostly ``reserve.lua``; end to end (``compare``) a change of
a tenth of it is lost in the machine's noise. Here one process sends the same kind of
batches (32 hits, each in a namespace new to its prompt, as in ``hit_path``) through
each revision's script in turn, in short paired blocks (A B, B A, ...: the machine's
speed drifts over seconds, so many short pairs are compared, not a few long ones; an
A/A run of 40 rounds of 40 batches came out at 1.00-1.02), and reads what Redis
spent on them: ``INFO commandstats`` time of ``EVALSHA`` (the script) and the server's
CPU time (the script plus reading the call and writing the reply), per hit.

The arguments are laid out by the current package (``scripts.reserve``): the two
revisions must share the script's interface (its KEYS and ARGV). The figures are the
server's own, so the server must be otherwise idle: a private one (the default), or a
``REDIS_URL`` nothing else uses meanwhile. The same revision twice is an A/A run (the
noise floor).
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any
from unittest import mock

from bench import common as C
from bench import workloads as W
from bench._ours import asker, bench_request

BATCH = 32


def reserve_source(root: Path) -> str:
    """``lua/reserve.lua`` of the package under ``root``, its includes resolved."""
    from cachesaver_dist import scripts

    with mock.patch.object(scripts, "LUA_DIR", root / "cachesaver_dist" / "lua"):
        return str(scripts.source.__wrapped__("reserve"))  # type: ignore[attr-defined]


async def measure(url: str, prefix: str, model: str, sources: list[str], *,
                  workload: str, prompts: int, rounds: int, batches: int
                  ) -> list[list[dict[str, float]]]:
    """Per source (A, B), per block: ``script`` and ``server`` µs per hit."""
    import redis.asyncio as aredis
    from cachesaver_dist import OnlineAPI
    from cachesaver_dist.prepare import prepare
    from cachesaver_dist.protocol import Keys
    from cachesaver_dist.scripts import reserve

    async with OnlineAPI(model, cache=url, prefix=prefix, direct=True) as api:
        await W.warm(asker(api), prompts, workload=workload)
        run, route, model_id = api.run, api.route, api.model_id
    keys, prompt_of, counter = Keys(prefix), W.HIT_WORKLOADS[workload], itertools.count()
    clients = []
    for text in sources:  # one client per revision, its script registered
        client = aredis.Redis.from_url(url)
        client.__dict__["_cachesaver_scripts"] = {"reserve": client.register_script(text)}
        clients.append(client)
    admin = aredis.Redis.from_url(url)

    async def block(client: Any, count: int) -> None:
        for _ in range(count):
            items = []
            for _ in range(BATCH):
                i = next(counter)
                request = bench_request(prompt_of(i % prompts), n=1, request_id=f"ab/{i:09d}",
                                        namespace=f"ab-{i // prompts}")
                items.append(prepare(request, run=run, route=route, model_id=model_id))
            batch = f"ab{i}"
            got = await reserve(client, keys, "ab", items, batch=batch)
            if not all(r.complete for r in got):
                raise RuntimeError("a request of the A/B was not a hit: is the cache warm?")
            await client.delete(keys.reservations("ab", batch))

    async def reading() -> tuple[float, int, float]:
        stats, cpu = await admin.info("commandstats"), await admin.info("cpu")
        return (stats["cmdstat_evalsha"]["usec"], stats["cmdstat_evalsha"]["calls"],
                cpu["used_cpu_user"] + cpu["used_cpu_sys"])

    out: list[list[dict[str, float]]] = [[] for _ in sources]
    for client in clients:  # unmeasured: each script loaded, the counters' hash grown
        await block(client, batches // 3)
    for rnd in range(rounds):
        print(f"round {rnd + 1}/{rounds}", flush=True)
        for side in ((0, 1) if rnd % 2 == 0 else (1, 0)):
            usec0, calls0, cpu0 = await reading()
            await block(clients[side], batches)
            usec1, calls1, cpu1 = await reading()
            if calls1 - calls0 != batches:
                raise RuntimeError(f"{calls1 - calls0} script calls in a block of {batches}: "
                                   "something else uses this server; use a private one")
            hits = batches * BATCH
            out[side].append({"script": (usec1 - usec0) / hits,
                              "server": (cpu1 - cpu0) * 1e6 / hits})
    for client in (*clients, admin):
        await client.aclose()
    return out


def run(rev_a: str, rev_b: str, *, workload: str, rounds: int, batches: int,
        model: str, prompts: int) -> None:
    trees = [C.export_rev(r) for r in (rev_a, rev_b)]
    sources = [reserve_source(root) for _, root in trees]
    with C.Stack("compare") as st:
        env = C.environment(st.redis_version())
        st.start_worker("batch", "--model", model, "--sim-latency", "0")
        st.wait_alive(model)
        res = asyncio.run(measure(st.url, st.prefix, model, sources, workload=workload,
                                  prompts=prompts, rounds=rounds, batches=batches))
    report(env, [rev for rev, _ in trees], res, workload, rounds, batches)


def report(env: dict[str, Any], revs: list[str], res: list[list[dict[str, float]]],
           workload: str, rounds: int, batches: int) -> None:
    a, b = revs
    headers = ["revision", "script µs/hit (per block)", "script µs/hit", "server CPU µs/hit"]
    rows = [[f"{label} {rev}", " ".join(f"{x['script']:.2f}" for x in blocks),
             f"{C.median([x['script'] for x in blocks]):.2f}",
             f"{C.median([x['server'] for x in blocks]):.2f}"]
            for label, rev, blocks in zip("AB", revs, res)]
    ratio = {k: [y[k] / x[k] for x, y in zip(*res)] for k in ("script", "server")}
    lines = [
        f"## compare: `reserve.lua` of {a} and {b}, side by side (Redis time per hit)\n",
        C.environment_md(env),
        f"Command: `.venv/bin/python -m bench.compare {a} {b} --script --workload {workload} "
        f"--rounds {rounds} --batches {batches}`. One process sends batches of {BATCH} hits "
        f"({workload} workload, each in a namespace new to its prompt) through each "
        "revision's script, "
        f"{batches} batches per block, blocks paired (A B, B A, ...); script = `INFO "
        "commandstats` time of `EVALSHA`, server = redis-server CPU time, per hit.\n",
        C.md_table(headers, rows), "",
        f"{b} over {a}, median of the per-round ratios (each round's in brackets; below 1 "
        "is cheaper):\n",
        *(f"* {k}: **{C.median(v):.3f}** ({' '.join(f'{x:.2f}' for x in v)})"
          for k, v in ratio.items()),
        "",
    ]
    print()
    print(C.text_table(headers, rows))
    for k, v in ratio.items():
        print(f"{k}: {b} / {a} = {C.median(v):.3f} (median of {len(v)} paired rounds)")
    C.write_section("compare", "\n".join(lines))
    print(f"\nwritten to {C.RESULTS} (section compare)")
