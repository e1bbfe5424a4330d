"""``OnlineAPI(direct=True)``: the client runs the reserve step itself.

Same script, same order, same results as through a cache worker; hits need no cache
worker, misses still go to the batch workers. Real Redis; the cross-process cases run
real client and worker processes.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import msgpack
import pytest

from cachesaver_dist import (
    Batch,
    GenerationError,
    InvalidRequestError,
    OnlineAPI,
    Request,
    SimModel,
)
from cachesaver_dist.deadletters import list_dead_letters
from cachesaver_dist.errors import RedisRefusedError
from cachesaver_dist.protocol import prompt_key
from cachesaver_dist.stats import read_stats
from tests.conftest import ROOT, subprocess_env
from tests.test_processes import MODEL, check_invariants, collect, start_pool

BATCH = [Request(f"prompt {i % 3}", 1 + i % 2, f"{i:02d}", f"ns{i % 2}") for i in range(12)]


def api(model, redis_url, keys, **kw) -> OnlineAPI:
    return OnlineAPI(model, cache=redis_url, prefix=keys.prefix, **kw)


def pattern(responses) -> list:
    return [([m["index"] for m in r.metadata], r.cached, r.duplicated) for r in responses]


async def test_direct_gives_what_the_worker_path_gives(redis_url, keys):
    """The same batch, in fresh runs: the same indices and flags either way, and a
    direct run after a worker run reads the very samples the worker path stored."""
    model = SimModel("direct-same")
    async with api(model, redis_url, keys, run="via-worker") as pipe:
        via_worker = await pipe.batch_request(Batch(BATCH))
    calls = len(model.calls)
    async with api(model, redis_url, keys, run="direct", direct=True) as pipe:
        direct = await pipe.batch_request(Batch(BATCH))
    assert len(model.calls) == calls, "the direct run generated samples already stored"
    assert [r.data for r in direct] == [r.data for r in via_worker]
    assert all(all(r.cached) for r in direct)

    fresh = SimModel("direct-same")  # an empty cache (other prefix): generation again
    async with OnlineAPI(fresh, cache=redis_url, prefix=keys.prefix + "w:", run="r") as pipe:
        a = await pipe.batch_request(Batch(BATCH))
    async with OnlineAPI(fresh, cache=redis_url, prefix=keys.prefix + "d:", run="r",
                         direct=True) as pipe:
        b = await pipe.batch_request(Batch(BATCH))
    assert pattern(a) == pattern(b)


async def test_direct_hits_are_counted_and_leave_nothing_behind(redis_url, keys, redis):
    model = SimModel("direct-stats")
    async with api(model, redis_url, keys, run="fill") as pipe:
        await pipe.batch_request(Batch(BATCH))
    async with api(model, redis_url, keys, run="hits", direct=True) as pipe:
        out = await asyncio.gather(*(pipe.request(r) for r in BATCH))
    assert all(all(r.cached) for r in out)
    stats = (await read_stats(redis, keys, "hits"))[pipe.model_id]
    assert stats["requests"] == len(BATCH)
    assert stats["samples_cached"] == sum(r.n for r in BATCH)
    assert stats["samples_generated"] == 0
    assert [k async for k in redis.scan_iter(match=keys.reservations("*", "*"))] == []
    assert not await redis.exists(keys.cache_queue, keys.cache_wake)


async def test_direct_accounting_is_gathered_and_survives_a_failed_write(
        redis_url, keys, redis, monkeypatch):
    """Several batches' accounting goes out in one write within ``ACCOUNT_EVERY_S``
    (no close needed); a write that fails is tried again with the next batch."""
    from redis.asyncio.client import Pipeline

    from cachesaver_dist import defaults

    model = SimModel("direct-accounting")
    async with api(model, redis_url, keys, run="fill") as pipe:
        await pipe.batch_request(Batch(BATCH))
    writes = {"n": 0, "fail": 1}
    execute = Pipeline.execute

    async def counted(self, *a, **kw):  # accounting writes only (not heartbeats, say)
        if not any(args[1] == keys.stats("hits") for args, _ in self.command_stack):
            return await execute(self, *a, **kw)
        writes["n"] += 1
        if writes["fail"]:
            writes["fail"] -= 1
            raise ConnectionError("injected: accounting write lost")
        return await execute(self, *a, **kw)

    monkeypatch.setattr(defaults, "ACCOUNT_EVERY_S", 0.3)
    async with api(model, redis_url, keys, run="hits", direct=True, batch_size=2) as pipe:
        monkeypatch.setattr(Pipeline, "execute", counted)
        await asyncio.gather(*(pipe.request(r) for r in BATCH))  # six batches of two
        await asyncio.sleep(0.5)
        assert writes["n"] == 1, "six batches' accounting should be one write"
        assert await read_stats(redis, keys, "hits") == {}, "the failed write counted"
        await pipe.request(BATCH[0])  # the next batch: its accounting and the lost one
        await asyncio.sleep(0.5)
        stats = (await read_stats(redis, keys, "hits"))[pipe.model_id]
        assert writes["n"] == 2
        assert stats["requests"] == len(BATCH) + 1
        assert stats["samples_cached"] == sum(r.n for r in BATCH) + BATCH[0].n


async def test_close_gives_up_on_a_redis_that_stopped_answering(tmp_path, caplog):
    """A frozen server (SIGSTOP): close() waits CLOSE_WAIT_S for the last accounting,
    says it was not written, and returns; it does not wait out every retry."""
    import os
    import signal
    import time

    from cachesaver_dist import client as client_mod
    from cachesaver_dist.server import EmbeddedServer

    server = EmbeddedServer(tmp_path / "frozen", persist=False)
    url = server.start()
    pid = server._proc.pid
    try:
        api = OnlineAPI("sim:none", cache=url, direct=True, request_timeout=30)
        await api.start()
        await api._redis.hset(f"{api.keys.prefix}s:{prompt_key(api.model_id, {'prompt': 'p'})}",
                              "0", msgpack.packb({"v": 1, "data": "stored"}))
        hit = await api.request(Request("p", 1, "q1", "ns"))
        assert hit.data == ["stored"] and hit.cached == [True]
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        await api.close()
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
        server.stop()
    assert took < client_mod.CLOSE_WAIT_S + 2, took
    assert "accounting not written: Redis did not answer" in caplog.text


async def test_direct_sets_an_unreadable_sample_aside(redis_url, keys, redis):
    pipe = api(SimModel("direct-bad"), redis_url, keys, direct=True)
    key = prompt_key(pipe.model_id, {"prompt": "p"})
    await redis.hset(keys.samples(key), 0, b"\xc1 not msgpack")
    await redis.hset(keys.generation(key), "mark", 1)
    async with pipe:
        with pytest.raises(GenerationError, match=r"could not be read and were set aside.*"
                                                  r"\(request_id 'a'\)"):
            await pipe.request(Request("p", 1, "a", "first"))
        again = await pipe.request(Request("p", 1, "b", "second"))
    assert again.cached == [False] and again.metadata[0]["index"] == 0
    assert msgpack.unpackb(await redis.hget(keys.samples(key), 0))["data"] == again.data[0]
    [(_, letter)] = await list_dead_letters(redis, keys)
    assert letter.kind == "sample" and letter.raw == b"\xc1 not msgpack"


async def test_direct_refusal_names_what_to_do(redis_url, keys, redis):
    pipe = api(SimModel("direct-refused"), redis_url, keys, direct=True)
    key = prompt_key(pipe.model_id, {"prompt": "p"})
    await redis.set(keys.samples(key), "a string")
    await redis.hset(keys.generation(key), "mark", 1)
    async with pipe:
        with pytest.raises(RedisRefusedError, match=r"^Redis refused reserving samples: "
                                                    r"WRONGTYPE.*another type"):
            await pipe.request(Request("p", 1, "a", "ns"))
        ok = await pipe.request(Request("q", 1, "a", "ns"))  # the pipeline goes on
    assert len(ok.data) == 1


async def test_a_direct_run_keeps_a_manifest_that_replays(redis_url, keys):
    """manifest=True works in direct mode (the same script records the ranges): a run of
    hits and misses is replayed exactly, with nothing generated."""
    model = SimModel("direct-manifest")
    async with api(model, redis_url, keys, run="warm") as pipe:  # some prompts stored
        await pipe.batch_request(Batch(BATCH[:4]))
    async with api(model, redis_url, keys, run="recorded", direct=True,
                   manifest=True) as pipe:
        recorded = await asyncio.gather(*(pipe.request(r) for r in BATCH))
    assert any(all(r.cached) for r in recorded) and not all(all(r.cached) for r in recorded)
    calls = len(model.calls)
    async with api(model, redis_url, keys, replay="recorded") as pipe:
        replayed = await asyncio.gather(*(pipe.request(r) for r in reversed(BATCH)))
    assert [r.data for r in reversed(replayed)] == [r.data for r in recorded]
    assert len(model.calls) == calls


def test_direct_with_replay_is_refused(redis_url, keys):
    with pytest.raises(InvalidRequestError, match="drop direct=True"):
        api("sim:x", redis_url, keys, replay="some-run", direct=True)


def _clients(redis_url, keys, run, count, direct: list[bool]) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tests.client_proc", keys.prefix, run, MODEL, "shared",
             str(i), str(count)],
            env=subprocess_env(redis_url, CLIENT_DIRECT="1" if d else "0"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        for i, d in enumerate(direct)
    ]


@pytest.mark.processes
def test_direct_clients_need_no_cache_worker(redis_url, keys, processes):
    """Three direct client processes share one namespace; only a batch worker runs."""
    counter = f"{keys.prefix}test-counter"
    start_pool(processes, cache_workers=0, counter=counter)
    results = collect(_clients(redis_url, keys, "direct-only", 40, [True] * 3))
    check_invariants([("shared", r) for r in results], redis_url, keys, counter)
    per_prompt: dict[str, list[int]] = {}
    for answers in results:
        for a in answers:
            per_prompt.setdefault(a["prompt"], []).extend(a["index"])
    for prompt, indices in per_prompt.items():
        assert sorted(indices) == list(range(len(indices))), prompt


@pytest.mark.processes
def test_direct_and_worker_clients_share_a_namespace(redis_url, keys, processes):
    """Direct clients and clients of the worker path, one namespace, one run: no index is
    handed out twice and nothing is generated twice."""
    counter = f"{keys.prefix}test-counter"
    start_pool(processes, cache_workers=1, counter=counter)
    results = collect(_clients(redis_url, keys, "mixed", 40, [True, False, True, False]))
    check_invariants([("shared", r) for r in results], redis_url, keys, counter)


def test_wait_replicas_is_checked(redis_url, keys, monkeypatch):
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(InvalidRequestError, match="wait_replicas must be an int >= 0"):
            api("sim:x", redis_url, keys, direct=True, wait_replicas=bad)
    monkeypatch.setenv("CACHESAVER_WAIT_REPLICAS", "abc")
    with pytest.raises(InvalidRequestError, match=r"CACHESAVER_WAIT_REPLICAS='abc': use a "):
        api("sim:x", redis_url, keys, direct=True)


async def test_waiting_for_more_replicas_than_the_primary_has_is_warned_at_start(redis,
                                                                                 caplog):
    from cachesaver_dist.replication import replicas_to_wait

    with caplog.at_level(logging.WARNING, logger="cachesaver_dist"):
        assert await replicas_to_wait(redis, 2) == 2  # the setting stands: the operator's
        assert await replicas_to_wait(redis, 0) == 0
        assert await replicas_to_wait(redis, None) == 0  # a server with no replica
    [warning] = [r.getMessage() for r in caplog.records]
    assert "waiting for 2 replica(s) per write" in warning and "has 0 connected" in warning


def test_direct_from_the_environment(redis_url, keys, monkeypatch):
    monkeypatch.setenv("CACHESAVER_DIRECT", "1")
    assert api("sim:x", redis_url, keys).direct is True
    assert api("sim:x", redis_url, keys, direct=False).direct is False  # the argument wins
    assert api("sim:x", redis_url, keys, replay="some-run").direct is False  # replay reads
    monkeypatch.setenv("CACHESAVER_DIRECT", "maybe")
    with pytest.raises(InvalidRequestError, match=r"CACHESAVER_DIRECT='maybe': use 1 or 0"):
        api("sim:x", redis_url, keys)
    monkeypatch.setenv("CACHESAVER_DIRECT", "0")
    assert api("sim:x", redis_url, keys).direct is False


async def test_direct_batches_in_flight_reserve_in_the_order_they_were_sent(redis_url, keys):
    """Many batches of one direct client at once, on a cold cache: each batch that claims
    takes two script calls, and no other batch of the client may reserve in between, or
    the first run hands out indices in another order than its re-run (other samples)."""
    requests = [Request(f"prompt {i % 6}", 1, f"{i:03d}", "ns") for i in range(96)]
    for attempt in range(3):
        model = SimModel(f"direct-order-{attempt}")
        indices = []
        for run in ("first", "re-run"):
            async with api(model, redis_url, keys, run=f"{run}-{attempt}", direct=True,
                           batch_size=4, timeout=0.05) as pipe:
                got = await asyncio.gather(*(pipe.request(r) for r in requests))
            indices.append([[m["index"] for m in r.metadata] for r in got])
        first, again = indices
        assert first == again, f"attempt {attempt}: the first run's order differs"
        assert first == [[i // 6] for i in range(96)]  # request_id order, batch after batch
