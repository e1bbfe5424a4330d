"""Study ``batch_work``: the Python work one batch of 32 hits costs each side of the
full path, without its round trips.

Each part runs in this one process, many times over, on one batch as a real run makes
it: the client's requests (``prepare``), and the reserve call's result as Redis returned
it for them (captured once from a private server warmed through the full path, then
handed back in place of the call). No hop is timed, so the figures hold still on a noisy
machine, and two revisions can be compared by running the study at each:

* ``client: encode``: the job's body, the arq job around it and the wake token
  (``CacheClient._enqueue``'s work before it writes);
* ``worker: decode``: the wake token and the job in it (``serve_jobs``' first step);
* ``worker: reserve call``: the call's keys and arguments, packed as the connection
  writes them, and its result read into reservations (``scripts.reserve_jobs``);
* ``worker: serve, all``: ``serve_jobs`` end to end (the two above, and the accounting
  of the published hits).

Usage: ``.venv/bin/python -m bench.batch_work [--rounds N] [--batches N]``
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
import time  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from typing import Any  # noqa: E402

STUDY = "batch_work"
MODEL = "sim:bench"
BATCH = 32


async def capture(url: str, prefix: str, workload: str) -> tuple[list[Any], Any]:
    """A batch of hits as a client makes it, and the reserve call's result for it."""
    from cachesaver_dist import OnlineAPI
    from cachesaver_dist import scripts as S
    from cachesaver_dist.connection import connect
    from cachesaver_dist.prepare import prepare
    from cachesaver_dist.protocol import CacheJob, Keys

    from bench import _ours as O
    from bench import workloads as W

    async with OnlineAPI(MODEL, cache=url, prefix=prefix, batch_size=BATCH,
                         timeout=0.005) as api:
        await W.warm(O.asker(api), BATCH, workload=workload)
        run = api.run
    prompt_of = W.HIT_WORKLOADS[workload]
    items = [prepare(O.bench_request(prompt_of(i), n=1, namespace=f"{workload}-capture-{i}",
                                     request_id=f"capture/{i:05d}"),
                     run=run, route=MODEL, model_id=MODEL) for i in range(BATCH)]
    captured: list[Any] = []
    real = S.run_script

    async def capturing(*args: Any, **kw: Any) -> Any:
        captured.append(await real(*args, **kw))
        return captured[-1]

    redis, keys = connect(url), Keys(prefix)
    S.run_script = capturing
    try:
        reservations = await S.reserve_jobs(
            redis, keys, [CacheJob("c" * 32, sorted(items, key=lambda it: it.request_id),
                                   120, "capture")])
    finally:
        S.run_script = real
        await redis.aclose()
    if len(captured) != 1 or not all(r.complete and r.flags == "c" for r in reservations[0] or []):
        raise RuntimeError("the captured reserve call did not answer every request from cache")
    return items, captured[0]


def measure(items: list[Any], raw: Any, batches: int) -> dict[str, float]:
    """µs per batch of each part (one timing loop each)."""
    import workers.cache_worker as CW
    from cachesaver_dist import protocol as P
    from cachesaver_dist import scripts as S
    from cachesaver_dist.connection import _HiredisFastPath  # the connections' packer
    from redis.asyncio.connection import Connection

    keys = P.Keys("bench:")
    job_id = keys.new_job_id()
    client = "c" * 32
    _, slim = P.encode_job_and_copy(client, items, 120, "b" * 32, "")
    token = P.encode_wake_token(job_id, slim)
    results, stopped_at, _ = raw

    class Packer(_HiredisFastPath, Connection):  # type: ignore[misc]
        pass

    conn = Packer()

    async def replayed(redis: Any, name: str, k: list[str], argv: list[Any],
                       replicas: int = 0) -> Any:
        conn.pack_command("EVALSHA", "0" * 40, len(k), *k, *argv)  # what the worker writes
        return [results, stopped_at, [1]]

    def encode() -> None:
        b, s = P.encode_job_and_copy(client, items, 120, "b" * 32, "")
        P.encode_arq_job(b, 1)
        P.encode_wake_token(job_id, s)

    def decode() -> None:
        _, payload = P.decode_wake_token(token, keys)
        P.decode_job(payload, keys)

    job = P.CacheJob(client, P.decode_job(slim, keys).items, 120, "b" * 32, job_id)

    def reserve() -> Awaitable[Any]:
        return S.reserve_jobs(None, keys, [job], publish=True)  # type: ignore[arg-type]

    def serve() -> Awaitable[Any]:
        return CW.serve_jobs(None, keys, [(job_id, slim)])

    loop = asyncio.new_event_loop()

    def timed(part: Callable[[], Any], is_async: bool) -> float:
        def once() -> None:
            if is_async:
                loop.run_until_complete(part())
            else:
                part()
        for _ in range(min(200, batches)):
            once()
        t0 = time.process_time()
        for _ in range(batches):
            once()
        return (time.process_time() - t0) / batches * 1e6

    real = S.run_script
    S.run_script = replayed
    try:
        out = {"client: encode": timed(encode, False),
               "worker: decode": timed(decode, False),
               "worker: reserve call": timed(reserve, True),
               "worker: serve, all": timed(serve, True)}
    finally:
        S.run_script = real
        loop.close()
    # an event loop turn per batch in the async parts: measured alone and taken off
    idle = asyncio.new_event_loop()

    async def nothing() -> None:
        return None

    t0 = time.process_time()
    for _ in range(batches):
        idle.run_until_complete(nothing())
    turn = (time.process_time() - t0) / batches * 1e6
    idle.close()
    out["worker: reserve call"] -= turn
    out["worker: serve, all"] -= turn
    return out


def run(workloads: list[str], rounds: int, batches: int) -> None:
    C.ensure_envs()
    t0 = time.monotonic()
    results: dict[str, dict[str, list[float]]] = {}
    with C.Stack(STUDY) as st:
        env = C.environment(st.redis_version())
        st.start_pool(MODEL)
        captured = {wl: asyncio.run(capture(st.url, st.prefix, wl)) for wl in workloads}
    for rnd in range(rounds):
        for wl in workloads:
            print(f"round {rnd + 1}/{rounds}: {wl} workload", flush=True)
            for part, us in measure(*captured[wl], batches).items():
                results.setdefault(wl, {}).setdefault(part, []).append(us)
    report(env, results, rounds, batches, time.monotonic() - t0)


def report(env: dict[str, Any], results: dict[str, dict[str, list[float]]], rounds: int,
           batches: int, seconds: float) -> None:
    headers = ["workload", "part", "CPU µs per batch of 32", "µs per request", "per round"]
    rows = []
    for wl, parts in results.items():
        for part, values in parts.items():
            us = C.median(values)
            rows.append([wl, part, C.fmt(us, 1), C.fmt(us / BATCH, 2),
                         " ".join(C.fmt(x, 1) for x in values)])
    print()
    print(C.text_table(headers, rows))
    lines = [
        f"## {STUDY}: the Python work of one batch of 32 hits, each side, without its "
        "round trips\n",
        C.environment_md(env),
        f"Command: `.venv/bin/python -m bench.{STUDY} --rounds {rounds} --batches {batches}` "
        f"({seconds:.0f} s). One batch of {BATCH} hits as a client makes it (`prepare`), "
        "and the reserve call's result as Redis returned it for them (captured once from "
        "a private server warmed through the full path, then handed back in place of the "
        f"call); each part run {batches} times in this one process, its CPU "
        "(`time.process_time`) per batch, median over rounds. `client: encode`: the job's "
        "body, the arq job and the wake token; `worker: decode`: the wake token and the "
        "job; `worker: reserve call`: the call's keys and arguments packed as the "
        "connection writes them, and its result read; `worker: serve, all`: `serve_jobs` "
        "end to end (the two before, and the accounting of the published hits), an event "
        "loop turn taken off. No hop is timed: the figures hold still on a noisy machine, "
        "and two revisions compare by running the study at each.\n",
        C.md_table(headers, rows), "",
    ]
    C.write_section(STUDY, "\n".join(lines))
    C.write_json(STUDY, {"rounds": rounds, "batches": batches, "results": results})
    print(f"\nwritten to {C.RESULTS} (section {STUDY})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", action="append", choices=["short", "chat"],
                   help="short or chat; repeat for both (default: both)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    p.add_argument("--batches", type=int, default=3000, help="batches per part and round (3000)")
    a = p.parse_args()
    run(a.workload or ["short", "chat"], a.rounds, a.batches)


if __name__ == "__main__":
    main()
