"""Driver of cachesaver-dist (runs in ``/work/main/.venv``): the client side only.

Reads a JSON spec on stdin, prints one JSON line. The cache and batch workers are
separate processes started by the study; this process is a plain user of
``OnlineAPI("<model route>", cache=REDIS_URL, prefix=...)``.

With ``count_round_trips`` it counts this process's Redis round trips: every
``send_packed_command`` of redis-py's asyncio connection is one write followed by one
read (a pipeline is one call), so the count is the client's round trips.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from cachesaver_dist import OnlineAPI, Request

from bench import workloads as W

ROUND_TRIPS = {"n": 0}


def count_round_trips() -> None:
    from redis.asyncio.connection import AbstractConnection

    original = AbstractConnection.send_packed_command

    async def counted(self, command, check_health=True):  # type: ignore[no-untyped-def]
        ROUND_TRIPS["n"] += 1
        return await original(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


@dataclass(frozen=True)
class BenchRequest(Request):
    temperature: float = 0.7
    max_tokens: int = 64


@dataclass(frozen=True)
class BenchChatRequest(Request):
    temperature: float = 0.7
    max_tokens: int = W.CHAT_PARAMS["max_tokens"]
    top_p: float = W.CHAT_PARAMS["top_p"]
    stop: tuple[str, ...] = tuple(W.CHAT_PARAMS["stop"])


def bench_request(prompt: W.Prompt, **kw: Any) -> Request:
    """The same fields the original's driver sends, as a ``Request`` of ours."""
    return (BenchRequest(prompt=prompt, **kw) if isinstance(prompt, str)
            else BenchChatRequest(prompt=prompt, **kw))


def asker(api: OnlineAPI) -> W.Ask:
    async def ask(prompt: W.Prompt, n: int, namespace: str, request_id: str) -> W.Answer:
        r = await api.request(bench_request(prompt, n=n, request_id=request_id,
                                            namespace=namespace))
        return W.Answer(list(r.data), list(r.cached), list(r.duplicated),
                        [m["index"] for m in r.metadata])
    return ask


def api_for(spec: dict[str, Any], **kw: Any) -> OnlineAPI:
    return OnlineAPI(spec["model"], cache=spec["url"], prefix=spec["prefix"],
                     request_timeout=spec.get("request_timeout", 60),
                     **({"direct": True} if spec.get("direct") else {}), **kw)


async def hits(spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"phases": {}}
    if spec.get("warm", True):
        async with api_for(spec, batch_size=32, timeout=0.005) as api:
            await W.warm(asker(api), spec["prompts"], workload=spec.get("workload", "short"))
    for ph in spec["phases"]:
        async with api_for(spec, batch_size=ph["batch_size"], timeout=ph["timeout"]) as api:
            res = await W.hit_phase(asker(api), ph, spec,
                                    on_measure=lambda: ROUND_TRIPS.update(n=0))
            res["round_trips"] = ROUND_TRIPS["n"]
            if not spec.get("keep_latencies", True):
                res.pop("latencies_ms")
            out["phases"][ph["name"]] = res
    return out


async def burst(spec: dict[str, Any]) -> dict[str, Any]:
    rounds = []
    for r in range(spec["rounds"]):
        async with api_for(spec, batch_size=spec["batch_size"], timeout=spec["timeout"]) as api:
            rounds.append(await W.burst(asker(api), spec["count"], f"{spec['tag']}-{r}"))
    return {"rounds": rounds}


async def client_burst(spec: dict[str, Any]) -> dict[str, Any]:
    """``bench.client_burst``: ``clients`` clients (batch size 1, one batch per request)
    each send ``per_client`` hits at once; every request's latency and the wall time."""
    def prompt(i: int) -> str:
        return f"{W.hit_prompt(i)} (burst)"

    if spec.get("warm", True):
        async with api_for(spec, batch_size=32, timeout=0.005) as api:
            await asyncio.gather(*(api.request(bench_request(
                prompt(i), n=1, request_id=f"{i:06d}", namespace="warm"))
                for i in range(spec["per_client"])))
    apis = [api_for(spec, batch_size=1, timeout=0.005) for _ in range(spec["clients"])]
    latencies: list[float] = []

    async def one(api: OnlineAPI, c: int, i: int) -> None:
        t0 = time.perf_counter()
        await api.request(bench_request(prompt(i), n=1, request_id=f"{i:06d}",
                                        namespace=f"{spec['tag']}-{c}"))
        latencies.append(1000 * (time.perf_counter() - t0))

    try:
        for api in apis:
            await api.start()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(api, c, i) for c, api in enumerate(apis)
                               for i in range(spec["per_client"])))
        wall = time.perf_counter() - t0
    finally:
        for api in apis:
            await api.close()
    return {"wall": wall, "latencies_ms": latencies}


async def mp_client(spec: dict[str, Any]) -> dict[str, Any]:
    async with api_for(spec, batch_size=spec["batch_size"], timeout=spec["timeout"],
                       run=spec["run"]) as api:
        answers = await W.mp_client(asker(api), scenario=spec["scenario"],
                                    prompts=spec["prompts"], n=spec["n"],
                                    namespace=spec["namespace"], seed=spec["seed"],
                                    concurrency=spec["concurrency"], start_at=spec["start_at"])
    return {"answers": answers}


async def savings(spec: dict[str, Any]) -> dict[str, Any]:
    from cachesaver_dist.pipelines import connect
    from cachesaver_dist.protocol import Keys
    from cachesaver_dist.stats import read_stats

    redis = connect(spec["url"])
    run = spec["run"]

    async def snapshot() -> dict[str, float]:
        await asyncio.sleep(0.1)  # the last replies' tallies are written with the replies
        c = (await read_stats(redis, Keys(spec["prefix"]), run)).get(spec["model"], {})
        return {"samples": c.get("samples_generated", 0),
                "prompt_tokens": c.get("prompt_tokens_generated", 0),
                "completion_tokens": c.get("completion_tokens_generated", 0),
                "deduplicated": c.get("samples_deduplicated", 0),
                "cached": c.get("samples_cached", 0)}

    t0 = time.perf_counter()
    try:
        async with api_for(spec, batch_size=32, timeout=0.005, run=run) as api:
            rows = await W.savings(asker(api), spec["puzzles"], snapshot)
    finally:
        await redis.aclose()
    return {"rows": rows, "seconds": time.perf_counter() - t0}


async def round_trip_cost(spec: dict[str, Any]) -> dict[str, Any]:
    """CPU µs and wall µs of one Redis round trip (PING) on this machine: through the
    package's connection (redis-py asyncio) and over a bare socket."""
    import socket
    from urllib.parse import urlsplit

    from cachesaver_dist.pipelines import connect

    count, out = spec.get("count", 3000), {}
    redis = connect(spec["url"])
    await redis.ping()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(count):
        await redis.ping()
    out["redis-py asyncio"] = ((time.process_time() - c0) / count * 1e6,
                               (time.perf_counter() - t0) / count * 1e6)
    await redis.aclose()
    url = urlsplit(spec["url"])
    with socket.create_connection((url.hostname, url.port or 6379)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(count):
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            sock.recv(64)
        out["bare socket"] = ((time.process_time() - c0) / count * 1e6,
                              (time.perf_counter() - t0) / count * 1e6)
    if hasattr(os, "fork"):
        out.update(wake_up_cost(count * 4))
    return out


def wake_up_cost(count: int) -> dict[str, tuple[float, float]]:
    """CPU and wall µs per round trip of one byte each way over loopback TCP: between two
    processes that each block until the other's byte comes (a wake-up per message, as
    on every hop of the full path), and the same sends and receives in one process."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    for sock in (a, b):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = {}
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(count):
        a.send(b"x")
        b.recv(1)
        b.send(b"y")
        a.recv(1)
    out["one byte each way, one process at both ends (no wake-up; CPU per end)"] = (
        (time.process_time() - c0) / 2 / count * 1e6, (time.perf_counter() - t0) / count * 1e6)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the peer: echoes, then reports its CPU per round trip
        c0 = time.process_time()
        for _ in range(count):
            b.recv(1)
            b.send(b"y")
        os.write(w, repr(time.process_time() - c0).encode())
        os._exit(0)
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(count):
        a.send(b"x")
        a.recv(1)
    mine, wall = time.process_time() - c0, time.perf_counter() - t0
    os.waitpid(pid, 0)
    peer = float(os.read(r, 64))
    for fd in (r, w):
        os.close(fd)
    a.close()
    b.close()
    out["one byte each way, two processes, each woken per message (CPU per process)"] = (
        (mine + peer) / 2 / count * 1e6, wall / count * 1e6)
    return out


async def client_split(spec: dict[str, Any]) -> dict[str, Any]:
    """``bench.client_split``: this process's CPU per request at c32 (batch size 32),
    with the path cut at three places, interleaved over ``rounds``:

    * ``responses``: every batch answered in-process (``CacheClient.submit`` returns the
      replies a real run gave for those prompts), so only the client's own work counts:
      checking requests, batching, futures, responses, and this driver;
    * ``enqueue``: the batch's job and wake token really enqueued (one round trip, under
      a prefix no cache worker serves), then answered in-process: adds the enqueue;
    * ``full``: the real path: adds the reply subscription's read and decoding."""
    from cachesaver_dist.client import CacheClient

    real_submit, real_enqueue = CacheClient.submit, CacheClient._enqueue
    replies: dict[str, dict[str, Any]] = {}

    def answered(items: list[Any]) -> list[dict[str, Any]]:
        return [{**replies[it.key], "id": it.uuid} for it in items]

    async def capturing(self: CacheClient, items: list[Any], batch: str | None = None
                        ) -> list[Any]:
        out = await real_submit(self, items, batch)
        replies.update((it.key, dict(r)) for it, r in zip(items, out))
        return out

    async def given(self: CacheClient, items: list[Any], batch: str | None = None
                    ) -> list[Any]:
        await asyncio.sleep(0)  # a reply is never there before the loop turns
        return answered(items)

    async def enqueued(self: CacheClient, items: list[Any], deadline: float,
                       batch: str) -> None:
        await real_enqueue(self, items, deadline, batch)
        self._deliver(answered(items))

    patches = {"responses": {"submit": given},
               "enqueue": {"_enqueue": enqueued},
               "full": {}}
    async with api_for(spec, batch_size=32, timeout=0.005) as api:
        await W.warm(asker(api), spec["prompts"], workload=spec["workload"])
        CacheClient.submit = capturing  # type: ignore[method-assign]
        await W.closed_loop(asker(api), callers=32, duration=1e9, max_requests=spec["prompts"],
                            prompts=spec["prompts"], tag="capture", workload=spec["workload"])
    if any(r.get("flags") != "c" for r in replies.values()):
        raise RuntimeError("the captured replies are not all hits of stored samples")
    out: dict[str, list[float]] = {part: [] for part in patches}
    for rnd in range(spec["rounds"]):
        for part in (list(patches) if rnd % 2 == 0 else list(patches)[::-1]):
            CacheClient.submit, CacheClient._enqueue = real_submit, real_enqueue
            for name, fn in patches[part].items():
                setattr(CacheClient, name, fn)
            prefix = spec["prefix"] + ("split:" if part == "enqueue" else "")
            async with api_for({**spec, "prefix": prefix}, batch_size=32,
                               timeout=0.005) as api:
                c0 = time.process_time()
                await W.closed_loop(asker(api), callers=32, duration=1e9,
                                    max_requests=spec["requests"], prompts=spec["prompts"],
                                    tag=f"{part}-{rnd}", workload=spec["workload"])
                out[part].append((time.process_time() - c0) / spec["requests"] * 1e6)
    CacheClient.submit, CacheClient._enqueue = real_submit, real_enqueue
    return out


async def scaling(spec: dict[str, Any]) -> dict[str, Any]:
    """``bench.scaling``: phases one after another, each a closed loop that starts at its
    own ``start_at`` (the same instant in every client process): ``hits`` phases reuse
    sample 0 of the warmed prompts, ``misses`` phases (a ``salt`` of their own) ask for
    prompts never seen, one sample each."""
    out: dict[str, Any] = {"phases": {}}
    for ph in spec["phases"]:
        async with api_for(spec, batch_size=ph["batch_size"], timeout=ph["timeout"]) as api:
            await api.start()
            await asyncio.sleep(max(0.0, ph["start_at"] - time.time()))
            ROUND_TRIPS.update(n=0)
            res = await W.closed_loop(asker(api), callers=ph["callers"],
                                      duration=ph["duration"],
                                      max_requests=ph["max_requests"],
                                      prompts=ph["prompts"], tag=ph["name"],
                                      salt=ph.get("salt", ""))
            res["round_trips"] = ROUND_TRIPS["n"]
            out["phases"][ph["name"]] = res
    return out


async def dropin_hits(spec: dict[str, Any]) -> dict[str, Any]:
    """``bench.dropin``: the ``hit_path`` phases through ``cachesaver_dist.models.openai.
    AsyncOpenAI`` at its defaults (in-process workers; ``direct`` as the spec says)."""
    from cachesaver_dist.models.openai import AsyncOpenAI

    async with AsyncOpenAI(api_key="bench", base_url=spec["base_url"], max_retries=0,
                           cache=spec["url"], prefix=spec["prefix"],
                           direct=spec.get("direct", False)) as client:
        return await W.dropin_phases(client.chat.completions.create, spec)


def dropin_sync(spec: dict[str, Any]) -> dict[str, Any]:
    """``bench.dropin``'s sync phase: sequential hits through ``cachesaver_dist.models.
    openai.OpenAI`` at its defaults (``direct`` as the spec says), no event loop running."""
    from cachesaver_dist.models.openai import OpenAI

    with OpenAI(api_key="bench", base_url=spec["base_url"], max_retries=0, cache=spec["url"],
                prefix=spec["prefix"], direct=spec.get("direct", False)) as client:
        return W.sync_phase(client.chat.completions.create, spec)


MODES = {"hits": hits, "scaling": scaling, "dropin_hits": dropin_hits,
         "dropin_sync": dropin_sync, "round_trip_cost": round_trip_cost, "burst": burst,
         "mp_client": mp_client, "savings": savings, "client_burst": client_burst,
         "client_split": client_split}


def main() -> None:
    os.environ.pop("CACHESAVER_DIRECT", None)  # the spec says which path ("direct")
    spec = json.loads(sys.stdin.read())
    if spec.get("count_round_trips"):
        count_round_trips()
    result = MODES[spec["mode"]](spec)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
