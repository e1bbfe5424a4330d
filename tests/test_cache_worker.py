"""The cache worker's job pick-up: the claim script, wake-up tokens and arq's poll."""

from __future__ import annotations

import asyncio
import time

import fakeredis
import pytest
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from cachesaver_dist.client import CacheClient
from cachesaver_dist.connection import connection_pool
from cachesaver_dist.prepare import prepare
from cachesaver_dist.protocol import (
    ARQ_JOB,
    CACHE_JOB,
    arq_deserialize_job,
    arq_serialize,
    decode_stream_entry,
    encode_arq_job,
    encode_job,
    encode_replies,
    encode_sample,
    encode_wake_token,
    reply,
)
from cachesaver_dist.scripts import fill, reserve, source
from cachesaver_dist.typedefs import Request
from workers.cache_worker import cache_worker, serve_jobs, stop_worker

QUEUE = "unit:queue:cache"


async def claim(r, now_ms: int, *job_ids: str) -> list:
    script = r.register_script(source("claim_jobs"))
    return await script(keys=[QUEUE, *(in_progress_key_prefix + j for j in job_ids)],
                        args=[now_ms, 60_000, *job_ids])


async def test_claim_script_starts_each_due_job_once():
    r = fakeredis.FakeAsyncRedis()
    await r.zadd(QUEUE, {"due": 1000, "later": 5000, "taken": 1000})
    await r.set(in_progress_key_prefix + "taken", b"1")
    assert await claim(r, 2000, "due", "later", "taken", "gone") == [b"1000", None, None, None]
    assert 0 < await r.pttl(in_progress_key_prefix + "due") <= 60_000
    assert await claim(r, 2000, "due") == [None]  # a second worker gets nothing
    await r.aclose()


@pytest.fixture
async def worker(redis_url, keys):
    """An in-process cache worker with a long poll delay: only wake-ups start jobs fast."""
    pool = ArqRedis(connection_pool=connection_pool(redis_url))
    w = cache_worker(keys, redis_pool=pool, poll_delay=5.0)
    task = asyncio.create_task(w.async_run())
    yield w
    await stop_worker(w, task)


async def enqueue_plain_arq(redis_url, keys, request_uuid_holder: list,
                            namespace: str = "b") -> bytes:
    """A job as arq's own ``enqueue_job`` writes it: no wake-up token; its wake token."""
    item = prepare(Request("p", 1, None, namespace), run="run", route="sim:x",
                   model_id="sim:x")
    request_uuid_holder.append(item.uuid)
    arq = ArqRedis(connection_pool=connection_pool(redis_url), job_serializer=arq_serialize)
    job_id, payload = keys.new_job_id(), encode_job("c", [item], 60)
    await arq.enqueue_job(CACHE_JOB, payload, _job_id=job_id, _queue_name=keys.cache_queue)
    await arq.aclose()
    return encode_wake_token(job_id, payload)


async def served_within(redis, keys, request_uuid: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await redis.hexists(keys.reservations("c", ""), f"c:{request_uuid}"):
            return True
        await asyncio.sleep(0.05)
    return False


async def warm(redis, keys) -> None:
    """Sample 0 of prompt "p" exists, so a job for it is a pure hit."""
    item = prepare(Request("p", 1, None, "a"), run="run", route="sim:x", model_id="sim:x")
    await reserve(redis, keys, "c", [item])
    await fill(redis, keys, item.key, {0: encode_sample("sample")})


async def test_a_job_named_on_the_wake_list_starts_at_once(redis_url, keys, redis, worker):
    await warm(redis, keys)
    await asyncio.sleep(0.3)  # the worker's first poll is done; it now waits on the list
    uuids: list[str] = []
    token = await enqueue_plain_arq(redis_url, keys, uuids)
    job_id = (await redis.zrange(keys.cache_queue, 0, -1))[0]
    await redis.lpush(keys.cache_wake, token)
    assert await served_within(redis, keys, uuids[0], 2.0)
    # taken, served and finished in one step: nothing of the job is left
    assert await redis.zcard(keys.cache_queue) == 0
    assert [k async for k in redis.scan_iter(match=f"arq:*{job_id.decode()}")] == []


async def test_jobs_woken_together_are_served_by_one_script_call(redis_url, keys, redis,
                                                                 worker):
    await warm(redis, keys)
    await asyncio.sleep(0.3)
    uuids: list[str] = []
    tokens = [await enqueue_plain_arq(redis_url, keys, uuids, f"ns{i}") for i in range(3)]
    await redis.config_resetstat()
    await redis.lpush(keys.cache_wake, *tokens)  # one push: one pop takes all three
    for u in uuids:
        assert await served_within(redis, keys, u, 2.0)
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1, stats.get("cmdstat_evalsha")
    assert await redis.zcard(keys.cache_queue) == 0


async def test_a_token_of_a_job_held_elsewhere_serves_nothing(redis_url, keys, redis, worker):
    await warm(redis, keys)
    await asyncio.sleep(0.3)
    uuids: list[str] = []
    token = await enqueue_plain_arq(redis_url, keys, uuids)
    job_id = (await redis.zrange(keys.cache_queue, 0, -1))[0]
    await redis.set(in_progress_key_prefix + job_id.decode(), b"1", px=1500)  # another's
    await redis.lpush(keys.cache_wake, token)
    assert not await served_within(redis, keys, uuids[0], 1.0)
    assert await redis.zcard(keys.cache_queue) == 1  # still arq's to run


async def test_a_token_that_is_no_job_id_is_set_aside(redis_url, keys, redis, worker):
    await warm(redis, keys)
    await asyncio.sleep(0.3)
    await redis.lpush(keys.cache_wake, b"1", b"\xff\xfe")  # an old client's token; not UTF-8
    uuids: list[str] = []
    token = await enqueue_plain_arq(redis_url, keys, uuids)
    await redis.lpush(keys.cache_wake, token)
    assert await served_within(redis, keys, uuids[0], 2.0)  # the worker went on
    letters = await redis.xrange(keys.dead_letters)
    assert sorted(f[b"raw"] for _, f in letters) == [b"1", b"\xff\xfe"]
    assert all(f[b"kind"] == b"wake token" for _, f in letters)


async def test_a_token_of_a_job_already_taken_is_ignored(redis_url, keys, redis, worker):
    await warm(redis, keys)
    await asyncio.sleep(0.3)
    uuids: list[str] = []
    gone = encode_wake_token(keys.new_job_id(), encode_job("c", [], 60))
    await redis.lpush(keys.cache_wake, gone)  # a job run and finished already
    await enqueue_plain_arq(redis_url, keys, uuids)  # no token of its own
    assert not await served_within(redis, keys, uuids[0], 1.0)  # no poll was triggered
    assert await served_within(redis, keys, uuids[0], 6.0)


async def test_a_job_without_token_is_found_by_arqs_poll(redis_url, keys, redis, worker):
    await warm(redis, keys)
    await asyncio.sleep(0.3)
    uuids: list[str] = []
    await enqueue_plain_arq(redis_url, keys, uuids)
    assert not await served_within(redis, keys, uuids[0], 1.0)  # nobody woke the worker
    assert await served_within(redis, keys, uuids[0], 6.0)  # the next poll finds it


async def test_without_blmpop_tokens_are_taken_one_at_a_time(redis_url, keys, redis):
    """Redis before 7 has no BLMPOP: the worker falls back to BRPOP (forced here)."""
    pool = ArqRedis(connection_pool=connection_pool(redis_url))
    w = cache_worker(keys, redis_pool=pool, poll_delay=5.0)
    w._blmpop = False
    task = asyncio.create_task(w.async_run())
    try:
        await warm(redis, keys)
        await asyncio.sleep(0.3)
        uuids: list[str] = []
        tokens = [await enqueue_plain_arq(redis_url, keys, uuids, f"ns{i}") for i in range(2)]
        await redis.lpush(keys.cache_wake, *tokens)
        for u in uuids:
            assert await served_within(redis, keys, u, 2.0)
    finally:
        await stop_worker(w, task)


async def test_a_refused_job_fails_alone_among_jobs_woken_together(redis_url, keys, redis,
                                                                 worker):
    """One of two woken jobs has its reservation records under a key of another type:
    Redis refuses the shared reserve call, and the worker serves each job alone, so the
    other one is answered."""
    await warm(redis, keys)
    await asyncio.sleep(0.3)
    item = prepare(Request("p", 1, None, "bad"), run="run", route="sim:x", model_id="sim:x")
    bad_id, bad = keys.new_job_id(), encode_job("other", [item], 60, "hostile")
    await redis.set(keys.reservations("other", "hostile"), b"not a hash")
    await redis.zadd(keys.cache_queue, {bad_id: int(time.time() * 1000)})
    await redis.set(ARQ_JOB + bad_id, encode_arq_job(bad, 1), px=60_000)
    uuids: list[str] = []
    good = await enqueue_plain_arq(redis_url, keys, uuids)
    await redis.lpush(keys.cache_wake, encode_wake_token(bad_id, bad), good)
    assert await served_within(redis, keys, uuids[0], 2.0)
    assert await redis.type(keys.reservations("other", "hostile")) == b"string"
    # the refused job is done with (its waiters were told), not left for arq to re-run
    deadline = time.monotonic() + 2.0
    while await redis.zscore(keys.cache_queue, bad_id) is not None:
        assert time.monotonic() < deadline, "the refused job is still queued"
        await asyncio.sleep(0.05)
    assert not await redis.exists(ARQ_JOB + bad_id)


async def answer_within(redis, keys, namespace: str, seconds: float) -> dict:
    """One hit asked through a real client; its reply, or a failure after ``seconds``."""
    client = CacheClient(redis, keys, reply_timeout=seconds, request_timeout=seconds)
    await client.start()
    try:
        item = prepare(Request("p", 1, None, namespace), run="run", route="sim:x",
                       model_id="sim:x")
        [reply] = await asyncio.wait_for(client.submit([item]), seconds)
        assert not isinstance(reply, Exception), reply
        return reply
    finally:
        await client.close()


async def test_replies_do_not_wait_for_the_next_wake_token(redis_url, keys, redis, worker):
    """The replies go out in the pipeline of the worker's next blocking pop: Redis runs
    them before it blocks, so a lone request is answered long before that pop (here up
    to the 5 s poll delay) returns."""
    await warm(redis, keys)
    await asyncio.sleep(0.3)
    started = time.monotonic()
    reply = await answer_within(redis, keys, "lone", 4.0)
    assert reply["flags"] == "c" and time.monotonic() - started < 2.0


async def test_a_worker_stopped_mid_serve_still_sends_the_replies(redis_url, keys, redis,
                                                                 monkeypatch):
    """Stopping gives the jobs being served their grace; their replies are sent."""
    import workers.cache_worker as cw

    serving = asyncio.Event()
    real = cw.serve_jobs

    async def slow_serve(*args, **kwargs):
        serving.set()
        await asyncio.sleep(0.5)  # the stop comes now
        return await real(*args, **kwargs)

    monkeypatch.setattr(cw, "serve_jobs", slow_serve)
    pool = ArqRedis(connection_pool=connection_pool(redis_url))
    w = cache_worker(keys, redis_pool=pool, poll_delay=5.0)
    task = asyncio.create_task(w.async_run())
    await warm(redis, keys)
    await asyncio.sleep(0.3)
    asked = asyncio.create_task(answer_within(redis, keys, "stopping", 4.0))
    await asyncio.wait_for(serving.wait(), 2.0)
    await stop_worker(w, task, close_pool=False)
    reply = await asked
    assert reply["flags"] == "c"
    await pool.aclose()


async def test_a_clients_batch_waits_while_the_one_it_comes_after_is_queued(redis, keys):
    """reserve.lua takes a job only when the job its client sent before it (``after``) is
    no longer queued, or is taken earlier in the same call: one client's batches are
    reserved in the order it sent them, whichever workers pick them up."""
    from cachesaver_dist.protocol import CacheJob
    from cachesaver_dist.scripts import reserve_jobs

    def job(job_id: str, uuid: str, after: str = "") -> CacheJob:
        it = prepare(Request("p", 1, uuid, "ns"), run="run", route="sim:x", model_id="sim:x")
        return CacheJob("c", [it], 60, f"b-{uuid}", job_id, after)

    first, second, third = (keys.new_job_id() for _ in range(3))
    await redis.zadd(keys.cache_queue, {first: 1, second: 2, third: 3})
    waiting: set[str] = set()
    assert await reserve_jobs(redis, keys, [job(second, "r2", first)], waiting=waiting) == [None]
    assert waiting == {second}  # not taken: still queued, no in-progress key
    assert await redis.zscore(keys.cache_queue, second) == 2
    assert not await redis.exists(in_progress_key_prefix + second)

    waiting.clear()  # the one before it in the same call: both, in that order
    got = await reserve_jobs(redis, keys, [job(first, "r1"), job(second, "r2", first)],
                             waiting=waiting)
    assert waiting == set() and [[r.start for r in rs] for rs in got] == [[0], [1]]
    assert await redis.zcard(keys.cache_queue) == 1  # both finished
    got = await reserve_jobs(redis, keys, [job(third, "r3", second)], waiting=waiting)
    assert waiting == set() and [r.start for r in got[0]] == [2]  # its batch before: done

    fourth, fifth = keys.new_job_id(), keys.new_job_id()  # one taken elsewhere meanwhile:
    await redis.zadd(keys.cache_queue, {fourth: 4, fifth: 5})  # not held back, not taken
    await redis.set(in_progress_key_prefix + fifth, b"1")
    assert await reserve_jobs(redis, keys, [job(fifth, "r5", fourth)], waiting=waiting) == \
        [None]
    assert waiting == set()


async def test_jobs_whose_tokens_were_trimmed_are_served_first_in_order(redis, keys, worker):
    """A client with more batches queued than the wake-up list keeps loses the tokens of
    its first ones (``WAKE_TOKENS_KEPT``): the worker that holds a later batch back reads
    the ones before it from their job keys and serves them all at once, in the order
    they were sent (not one second later, and the rest after arq's poll, in any order)."""
    await asyncio.sleep(0.3)  # the worker's first poll is done (the next one in 5 s)
    now_ms, before, batches = int(time.time() * 1000), "", []
    pipe = redis.pipeline(transaction=True)
    for i in range(5):
        it = prepare(Request("p", 1, f"r{i}", "ns"), run="run", route="sim:x", model_id="sim:x")
        job_id = keys.new_job_id()
        payload = encode_job("c", [it], 60, f"b{i}", before)
        pipe.psetex(ARQ_JOB + job_id, 60_000, encode_arq_job(payload, now_ms))
        pipe.zadd(keys.cache_queue, {job_id: now_ms})
        batches.append((f"b{i}", it.uuid))
        before = job_id
    pipe.lpush(keys.cache_wake, encode_wake_token(job_id, payload))  # the others trimmed
    await pipe.execute()

    async def starts() -> list:
        return [await redis.hget(keys.reservations("c", batch), f"c:{uuid}")
                for batch, uuid in batches]
    deadline = time.monotonic() + 0.8
    while None in await starts() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await starts() == [f"{i}|g".encode() for i in range(5)]
    assert await redis.zcard(keys.cache_queue) == 0


async def enqueue_as_client(redis, keys, item, batch: str, *, body: bool = True,
                            body_item=None) -> str:
    """A job as ``CacheClient`` enqueues it: its body (none if ``body`` is false, as when
    it expired; ``body_item``'s instead of ``item``'s if given) and a wake token without
    specs; the job's id."""
    job_id, now_ms = keys.new_job_id(), int(time.time() * 1000)
    if body:
        await redis.psetex(ARQ_JOB + job_id, 60_000, encode_arq_job(
            encode_job("c", [body_item or item], 60, batch), now_ms))
    await redis.zadd(keys.cache_queue, {job_id: now_ms})
    token = encode_wake_token(job_id, encode_job("c", [item], 60, batch, specs=False))
    assert b"long prompt" not in token
    await redis.lpush(keys.cache_wake, token)
    return job_id


async def test_a_claim_reads_its_spec_from_the_job_body_not_the_wake_token(redis, keys,
                                                                           worker):
    """Wake tokens carry no prompts (a hit needs none): the request that claims gets its
    spec from the job's body, and the batch worker's stream entry has the whole prompt."""
    await asyncio.sleep(0.3)
    hit = prepare(Request("p", 1, "a", "ns1"), run="run", route="sim:x", model_id="sim:x")
    miss = prepare(Request("long prompt " * 200, 1, "b", "ns1"), run="run", route="sim:x",
                   model_id="sim:x")
    await warm(redis, keys)  # (its claim of "p" is the stream's first entry)
    await enqueue_as_client(redis, keys, hit, "b1")
    await enqueue_as_client(redis, keys, miss, "b2")
    deadline = time.monotonic() + 2.0
    while await redis.xlen(keys.work_stream("sim:x")) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    [_, (_, fields)] = await redis.xrange(keys.work_stream("sim:x"))
    entry = decode_stream_entry(fields, "sim:x")
    assert entry.key == miss.key and entry.spec.fields["prompt"] == "long prompt " * 200
    assert await redis.hget(keys.reservations("c", "b1"), f"c:{hit.uuid}") == b"0|c"
    assert await redis.zcard(keys.cache_queue) == 0


async def test_a_claim_whose_job_body_is_gone_is_left_to_its_client(redis, keys, worker,
                                                                    caplog):
    """A job whose body expired before the worker needed its prompts is not served: no
    index is claimed without a prompt (its client asks again with a new job), and the
    worker goes on with the next one."""
    await asyncio.sleep(0.3)
    lost = prepare(Request("q", 1, "a", "ns"), run="run", route="sim:x", model_id="sim:x")
    other = prepare(Request("o", 1, "o", "ns"), run="run", route="sim:x", model_id="sim:x")
    later = prepare(Request("r", 1, "b", "ns"), run="run", route="sim:x", model_id="sim:x")
    await enqueue_as_client(redis, keys, lost, "b1", body=False)
    await enqueue_as_client(redis, keys, lost, "b0", body_item=other)  # not its body
    await enqueue_as_client(redis, keys, later, "b2")
    deadline = time.monotonic() + 2.0
    while not await redis.xlen(keys.work_stream("sim:x")) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    [(_, fields)] = await redis.xrange(keys.work_stream("sim:x"))
    assert decode_stream_entry(fields, "sim:x").key == later.key
    assert await redis.hget(keys.reservations("c", "b1"), f"c:{lost.uuid}") is None
    assert not await redis.hget(keys.usage("run"), lost.key + "ns")  # nothing taken
    assert "its requests' prompts could not be read from its body (gone)" in caplog.text
    assert "(it is not the batch its wake token named)" in caplog.text
    assert await redis.zcard(keys.cache_queue) == 0  # finished, as arq finishes them
    assert not [k async for k in redis.scan_iter(match=f"arq:*{keys.prefix}*")]
    # asked again (a new job, with its body): the same request claims index 0
    await enqueue_as_client(redis, keys, lost, "b1")
    deadline = time.monotonic() + 2.0
    while await redis.xlen(keys.work_stream("sim:x")) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await redis.hget(keys.reservations("c", "b1"), f"c:{lost.uuid}") == b"0|g"


@pytest.mark.parametrize("n, size", [(1, 40), (3, 300), (20, 70_000)])
async def test_the_reserve_call_publishes_the_replies_of_woken_jobs(redis, keys, worker, n,
                                                                    size):
    """A woken job's hits are published by the reserve call itself, one message per job,
    byte for byte what ``encode_replies`` writes (short and long samples, fixed and
    16-bit arrays), before the worker reads the result."""
    await asyncio.sleep(0.3)
    item = prepare(Request("p", n, "a", "ns"), run="run", route="sim:x", model_id="sim:x")
    samples = {i: encode_sample(f"{i}:" + "x" * size) for i in range(n)}
    await reserve(redis, keys, "other", [item._replace(uuid="first", namespace="warm")])
    await fill(redis, keys, item.key, samples)
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.reply_channel("c"))
    await redis.config_resetstat()
    await enqueue_as_client(redis, keys, item, "b1")
    message = None
    deadline = time.monotonic() + 2.0
    while message is None and time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
    await pubsub.aclose()
    assert message is not None
    assert message["data"] == encode_replies([reply(item.uuid, 0, "c" * n,
                                                    [samples[i] for i in range(n)])])
    stats = await redis.info("commandstats")  # one call, and its PUBLISH only
    assert stats["cmdstat_evalsha"]["calls"] == 1 and stats["cmdstat_publish"]["calls"] == 1


async def test_the_reserve_call_publishes_nothing_when_writes_must_reach_replicas(
        redis, keys):
    """With ``--wait-replicas`` a reply may only leave once the reservation is on the
    replicas (``WAIT``, after the call; here there are none, so nothing is answered):
    the reserve call publishes nothing then. Without, the reply comes from the call
    itself (the worker's outbox, never sent here, has none)."""
    item = prepare(Request("p", 1, "a", "ns"), run="run", route="sim:x", model_id="sim:x")
    await reserve(redis, keys, "other", [item._replace(uuid="first", namespace="warm")])
    await fill(redis, keys, item.key, {0: encode_sample("s")})
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.reply_channel("c"))
    for replicas in (0, 1):
        job_id = await enqueue_as_client(redis, keys, item._replace(namespace=f"n{replicas}"),
                                         f"b{replicas}")
        await redis.rpop(keys.cache_wake)  # served here, not by a worker
        payload = arq_deserialize_job(await redis.get(ARQ_JOB + job_id))["a"][0]
        outbox = await serve_jobs(redis, keys, [(job_id, payload)], replicas=replicas)
        assert not outbox.replies and outbox.answered == (1 if replicas == 0 else 0)
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        message = message or await pubsub.get_message(ignore_subscribe_messages=True,
                                                      timeout=0.5)
        assert (message is not None) is (replicas == 0), message
    await pubsub.aclose()


async def test_a_busy_worker_writes_its_accounting_once_per_interval_and_when_stopping(
        redis_url, keys, redis, monkeypatch):
    """Under load, the accounting of several pops goes out in one write, at most every
    ``ACCOUNT_EVERY_S``; what is kept is written when due even if no pop comes (the
    worker went idle); a worker stopping writes what it kept."""
    from cachesaver_dist import defaults
    from cachesaver_dist.outbox import Outbox
    from cachesaver_dist.stats import account, read_stats

    monkeypatch.setattr(defaults, "ACCOUNT_EVERY_S", 0.5)
    w = cache_worker(keys, redis_pool=ArqRedis(connection_pool=connection_pool(redis_url)),
                     poll_delay=5.0)

    def served(hits: int) -> Outbox:
        outbox = Outbox(keys)
        for _ in range(hits):
            account(outbox.tally, "acc", "m", "c", [{"prompt_tokens": 3}])
        return outbox

    async def requests_counted() -> float:
        return (await read_stats(redis, keys, "acc")).get("m", {}).get("requests", 0)

    await w._pop_wake_tokens(None, served(1))  # the first: written at once
    await asyncio.gather(*w._tally_sends)  # (by a write of its own)
    assert await requests_counted() == 1
    await w._pop_wake_tokens(None, served(2))  # within the interval: kept
    await w._pop_wake_tokens(None, served(3))
    assert await requests_counted() == 1

    deadline = time.monotonic() + 2.0  # idle: written when due (0.5 s after the first)
    while await requests_counted() != 6:  # five requests, one write
        assert time.monotonic() < deadline, "the kept accounting was not written when due"
        await asyncio.sleep(0.02)

    await w._pop_wake_tokens(None, served(4))  # kept, then the worker stops
    assert await requests_counted() == 6
    await stop_worker(w, asyncio.create_task(asyncio.sleep(60)))
    assert await requests_counted() == 10
    stats = await read_stats(redis, keys, "acc")
    assert stats["m"]["prompt_tokens_cached"] == 30 and stats["m"]["samples_cached"] == 10


async def test_a_stopping_worker_finishes_the_accounting_write_it_had_begun(
        redis_url, keys, redis, monkeypatch):
    """A write of the accounting that has not gone out when the worker stops is finished,
    not cut short with what it carried (the counts would be lost without a word)."""
    from redis.asyncio.client import Pipeline

    from cachesaver_dist.stats import read_stats

    w = cache_worker(keys, redis_pool=ArqRedis(connection_pool=connection_pool(redis_url)),
                     poll_delay=5.0)
    w._tally = {("acc", "m|requests"): 3}
    w._tally_due = time.monotonic()
    gate, execute = asyncio.Event(), Pipeline.execute

    async def held(self, *args, **kwargs):  # not sent yet when the stop comes
        await gate.wait()
        return await execute(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "execute", held)
    w._tally_writer = asyncio.create_task(w._write_tally_when_due())
    while not w._tally_sends:
        await asyncio.sleep(0)
    stopping = asyncio.create_task(stop_worker(w, asyncio.create_task(asyncio.sleep(60))))
    await asyncio.sleep(0.05)
    gate.set()
    await stopping
    assert (await read_stats(redis, keys, "acc"))["m"]["requests"] == 3
