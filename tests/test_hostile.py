"""Hostile entries: a table of malformed things written straight into Redis while real
worker processes (2 cache workers, 1 batch worker for ``sim:x``) serve the test's prefix.

Each entry writes one hostile thing of one message kind (cache job, queue entry, wake
token, work stream entry, waiter record, sample, reservation record, reply message).
After each, the test checks the contract:

* where the contract says so, a dead letter of the right ``kind`` is in ``<prefix>dead``
  (exactly as many as were written), logged exactly once per letter, and the hostile
  thing was acknowledged (the stream entry is no longer pending nor in the stream, the
  job left the queue, the token left the list, the record left its hash);
* no worker log line holds the entry's prompt text (a per-entry marker), and no log line
  is longer than a few hundred characters (truncated);
* where the entry names a waiting request, that request gets a clear
  ``GenerationError`` within a few seconds (not a timeout: the client re-asks only
  after 10 s), and a later request for the same prompt is served (the claim was released);
* a normal request from another client is served, and every worker process is alive.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis as sync_redis
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis

import cachesaver_dist.client as client_module
from cachesaver_dist import GenerationError, OnlineAPI, ReplyTimeoutError, Request
from cachesaver_dist.connection import connection_pool
from cachesaver_dist.deadletters import list_dead_letters
from cachesaver_dist.errors import RedisRefusedError
from cachesaver_dist.prepare import prepare
from cachesaver_dist.protocol import (
    CACHE_JOB,
    CONSUMER_GROUP,
    SCHEMA_VERSION,
    Keys,
    arq_serialize,
    encode_job,
    encode_replies,
    encode_sample,
    encode_spec,
    encode_wake_token,
    prompt_key,
    reply,
)
from tests.conftest import ROOT, Processes, subprocess_env
from workers.cache_worker import cache_worker

pytestmark = pytest.mark.processes

MODEL = "sim:x"
LETTER_WAIT_S = 8.0
ERROR_WITHIN_S = 4.0  # a waiter's error comes from the worker, long before a re-ask (10 s)


# --- the worker pool, shared by every entry of this module ----------------------------


@dataclass
class Pool:
    url: str
    keys: Keys
    procs: Processes

    def log_text(self) -> str:
        return "".join(Path(p.log_path).read_text(errors="replace") for p in self.procs.procs)

    def dead_letter_lines(self, kind: str) -> int:
        return self.log_text().count(f"dead letter: {kind} from ")


@pytest.fixture(scope="module")
def pool(redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    keys = Keys(f"hostile{uuid.uuid4().hex[:8]}:")
    procs = Processes(redis_url, keys, tmp_path_factory.mktemp("hostile"))
    try:
        for _ in range(2):
            procs.cli("worker", "cache", name="cache")
        procs.cli("worker", "batch", "--model", MODEL, "--sim-latency", "0.01", name="batch")
        procs.wait_alive("cache", 2)
        procs.wait_alive(MODEL, 1)
        yield Pool(redis_url, keys, procs)
    finally:
        procs.stop_all()
        client = sync_redis.Redis.from_url(redis_url)
        try:
            for pattern in (f"{keys.prefix}*", f"arq:*:{keys.prefix}*"):
                stale = list(client.scan_iter(match=pattern, count=1000))
                for i in range(0, len(stale), 500):
                    client.delete(*stale[i:i + 500])
        finally:
            client.close()


# --- what each entry gets -----------------------------------------------------------------


@dataclass
class Hostile:
    redis: Redis
    keys: Keys
    pipe: OnlineAPI
    marker: str  # the entry's "prompt text": must never reach a log line

    @property
    def stream(self) -> str:
        return self.keys.work_stream(MODEL)

    def key(self, prompt: str) -> str:
        return prompt_key(MODEL, {"prompt": prompt})

    async def until(self, check: Callable[[], Awaitable[bool]], what: str,
                    timeout: float = LETTER_WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
            await asyncio.sleep(0.02)

    # where a hostile thing goes

    async def xadd(self, fields: dict[str, Any]) -> Callable[[], Awaitable[bool]]:
        """Add a work stream entry; returns the check that it was acknowledged."""
        eid = await self.redis.xadd(self.stream, fields)

        async def acked() -> bool:
            pending = await self.redis.xpending_range(self.stream, CONSUMER_GROUP, "-", "+", 1000)
            still = await self.redis.xrange(self.stream, eid, eid)
            return not still and all(p["message_id"] != eid for p in pending)

        return acked

    async def job(self, data: bytes, *, job_id: str | None = None,
                  as_hash: bool = False) -> Callable[[], Awaitable[bool]]:
        """Put an arq job (its bytes as given) on the cache queue, with no wake token (a
        token carries the cache job message, never arq's job: arq's poll reads these);
        returns the check that it left the queue and its key was deleted."""
        job_id = job_id or self.keys.new_job_id()
        if as_hash:
            await self.redis.hset(job_key_prefix + job_id, "payload", data)
        elif data:
            await self.redis.set(job_key_prefix + job_id, data, px=60_000)
        await self.redis.zadd(self.keys.cache_queue, {job_id: int(time.time() * 1000)})

        async def acked() -> bool:
            return (await self.redis.zscore(self.keys.cache_queue, job_id) is None
                    and not await self.redis.exists(job_key_prefix + job_id))

        return acked

    def arq_job(self, payload: bytes) -> bytes:
        return serialize_job(CACHE_JOB, (payload,), {}, None, int(time.time() * 1000),
                             serializer=arq_serialize)

    async def token(self, raw: bytes) -> Callable[[], Awaitable[bool]]:
        await self.redis.lpush(self.keys.cache_wake, raw)

        async def acked() -> bool:
            return raw not in await self.redis.lrange(self.keys.cache_wake, 0, -1)

        return acked

    def spec(self, **fields: Any) -> bytes:
        return encode_spec(MODEL, MODEL, {"prompt": self.marker, **fields})


def mp(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


Check = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class Entry:
    id: str
    inject: Callable[[Hostile], Awaitable[Check | None]]
    kind: str | None  # the dead letter's kind; None: the contract sets nothing aside
    reason: str = ""  # regex on the dead letter's reason
    count: int = 1
    xfail: str | None = None  # a known bug: the reason


TABLE: list[Entry] = []


def entry(id: str, kind: str | None, reason: str = "", count: int = 1,
          xfail: str | None = None):
    def register(fn: Callable[[Hostile], Awaitable[Check | None]]):
        TABLE.append(Entry(id, fn, kind, reason, count, xfail))
        return fn

    return register


# --- work stream entries -----------------------------------------------------------------

STREAM = "work stream entry"


def _stream(id: str, reason: str, fields: Callable[[Hostile], dict[str, Any]]) -> None:
    async def inject(h: Hostile) -> Check:
        return await h.xadd(fields(h))

    entry(f"stream-{id}", STREAM, reason)(inject)


_stream("foo-bar", r"field 'key' is missing", lambda h: {"foo": "bar"})
_stream("key-missing", r"field 'key' is missing", lambda h: {"idx": "0", "spec": h.spec()})
_stream("key-not-utf8", r"field 'key' is missing or not UTF-8",
        lambda h: {"key": b"\xff\xfe", "idx": "0", "spec": h.spec()})
_stream("key-too-long", r"field 'key' has a bad length",
        lambda h: {"key": "k" * 300, "idx": "0", "spec": h.spec()})
_stream("idx-x", r"field 'idx' must list indices",
        lambda h: {"key": h.key(h.marker), "idx": "x", "spec": h.spec()})
_stream("idx-negative", r"field 'idx' has a negative index",
        lambda h: {"key": h.key(h.marker), "idx": "0,-1", "spec": h.spec()})
_stream("idx-empty", r"field 'idx' must list indices",
        lambda h: {"key": h.key(h.marker), "idx": "", "spec": h.spec()})
_stream("spec-missing", r"field 'spec' is missing", lambda h: {"key": h.key(h.marker), "idx": "0"})
_stream("spec-empty", r"generation spec is not valid msgpack",
        lambda h: {"key": h.key(h.marker), "idx": "0", "spec": b""})
_stream("spec-not-msgpack", r"generation spec is not valid msgpack",
        lambda h: {"key": h.key(h.marker), "idx": "0", "spec": b"\xc1" + h.marker.encode()})
_stream("spec-pickle", r"generation spec (is not valid msgpack|is a msgpack)",
        lambda h: {"key": h.key(h.marker), "idx": "0",
                   "spec": pickle.dumps({"v": 1, "route": MODEL, "fields": {"prompt": h.marker}})})
_stream("spec-v99", r"generation spec has schema version 99",
        lambda h: {"key": h.key(h.marker), "idx": "0",
                   "spec": mp({"v": 99, "route": MODEL, "model_id": MODEL,
                               "fields": {"prompt": h.marker}})})
_stream("spec-not-a-map", r"generation spec is a msgpack list, not a map",
        lambda h: {"key": h.key(h.marker), "idx": "0", "spec": mp([1, h.marker])})
_stream("spec-other-route", r"spec is for model 'sim:other', the stream serves 'sim:x'",
        lambda h: {"key": h.key(h.marker), "idx": "0",
                   "spec": encode_spec("sim:other", "sim:other", {"prompt": h.marker})})
_stream("spec-fields-not-map", r"field 'fields' must be dict",
        lambda h: {"key": h.key(h.marker), "idx": "0",
                   "spec": mp({"v": 1, "route": MODEL, "model_id": MODEL, "fields": h.marker})})
_stream("spec-fields-int-keys", r"field names must be str",
        lambda h: {"key": h.key(h.marker), "idx": "0",
                   "spec": mp({"v": 1, "route": MODEL, "model_id": MODEL,
                               "fields": {"prompt": h.marker, 1: 2}})})
_stream("spec-no-prompt", r"'prompt'",
        lambda h: {"key": h.key(h.marker), "idx": "0",
                   "spec": encode_spec(MODEL, MODEL, {"text": h.marker})})
_stream("spec-field-not-identifier", r"field name",
        lambda h: {"key": h.key(h.marker), "idx": "0",
                   "spec": encode_spec(MODEL, MODEL, {"prompt": h.marker, "not a name": 1})})
_stream("spec-routing-field", r"field name",
        lambda h: {"key": h.key(h.marker), "idx": "0",
                   "spec": encode_spec(MODEL, MODEL, {"prompt": h.marker, "n": 5})})
_stream("huge-garbage", r"generation spec is not valid msgpack",
        lambda h: {"key": h.key(h.marker), "idx": "0",
                   "spec": b"\xc1" + (h.marker.encode() + b"\x00\xff") * 60_000})


async def _waited_stream_entry(h: Hostile, spec: bytes, error: str) -> Check:
    """A real request waits on index 0 of its prompt, claimed by "someone"; the stream
    entry of that claim cannot be read. The waiter must hear so at once, and the
    claim must be free again."""
    prompt = f"waited {h.marker}"
    key = h.key(prompt)
    await h.redis.hset(h.keys.generation(key), "mark", 1)  # index 0: in flight elsewhere
    started = time.monotonic()
    waiting = asyncio.create_task(h.pipe.request(Request(prompt, 1, "w1", "first")))
    await h.until(lambda: _hlen(h.redis, h.keys.waiters(key)), "the request waits")
    acked = await h.xadd({"key": key, "idx": "0", "spec": spec})
    with pytest.raises(GenerationError, match=error) as info:
        await asyncio.wait_for(waiting, ERROR_WITHIN_S)
    assert time.monotonic() - started < ERROR_WITHIN_S
    assert h.marker not in str(info.value)
    again = await asyncio.wait_for(h.pipe.request(Request(prompt, 1, "w2", "second")), 10)
    assert again.metadata[0]["index"] == 0 and again.cached == [False]  # claimed anew
    return acked


async def _hlen(redis: Redis, key: str) -> bool:
    return bool(await redis.hlen(key))


@entry("stream-waited-spec-not-msgpack", STREAM, r"generation spec is not valid msgpack")
async def _(h: Hostile) -> Check:
    return await _waited_stream_entry(
        h, b"\xc1" + h.marker.encode(),
        r"the work for this request could not be read \(generation spec is not valid "
        r"msgpack.*claim released: ask again \(request_id 'w1'\)")


@entry("stream-waited-spec-v99", STREAM, r"schema version 99")
async def _(h: Hostile) -> Check:
    return await _waited_stream_entry(
        h, mp({"v": 99, "route": MODEL, "model_id": MODEL, "fields": {"prompt": h.marker}}),
        r"could not be read \(generation spec has schema version 99")


@entry("stream-waited-spec-no-prompt", STREAM, r"'prompt'")
async def _(h: Hostile) -> Check:
    return await _waited_stream_entry(h, encode_spec(MODEL, MODEL, {"text": h.marker}),
                                      r"could not be read \(.*'prompt'")


# --- cache queue: jobs and queue members --------------------------------------------------

JOB = "cache job"


@entry("job-not-msgpack", JOB, r"arq job is not valid msgpack")
async def _(h: Hostile) -> Check:
    return await h.job(b"\xc1\xc1 " + h.marker.encode())


@entry("job-pickle", JOB, r"arq job (is not valid msgpack|is not a 'process_batch' call)")
async def _(h: Hostile) -> Check:
    return await h.job(pickle.dumps({"t": 1, "f": CACHE_JOB, "a": (h.marker,), "k": {},
                                     "et": 1}))


@entry("job-other-function", JOB, r"arq job is not a 'process_batch' call")
async def _(h: Hostile) -> Check:
    return await h.job(arq_serialize({"t": 1, "f": "os.system", "a": [h.marker.encode()],
                                      "k": {}, "et": 1}))


@entry("job-args-not-bytes", JOB, r"arq job is not a 'process_batch' call with one bytes")
async def _(h: Hostile) -> Check:
    return await h.job(arq_serialize({"t": 1, "f": CACHE_JOB, "a": [h.marker], "k": {},
                                      "et": 1}))


@entry("job-without-try-field", JOB, r"arq job")
async def _(h: Hostile) -> Check:
    return await h.job(arq_serialize({"f": CACHE_JOB, "a": [h.marker.encode()], "k": {},
                                      "et": 1}))


@entry("job-looks-like-a-result", JOB, r"arq job")
async def _(h: Hostile) -> Check:
    return await h.job(arq_serialize({"r": h.marker, "s": True}))


@entry("job-payload-not-msgpack", JOB, r"cache job is not valid msgpack")
async def _(h: Hostile) -> Check:
    return await h.job(h.arq_job(b"\xc1" + h.marker.encode()))


@entry("job-payload-v99", JOB, r"cache job has schema version 99")
async def _(h: Hostile) -> Check:
    return await h.job(h.arq_job(mp({"v": 99, "client": "c", "requests": [h.marker]})))


@entry("job-payload-requests-not-list", JOB, r"field 'requests' must be list, got str")
async def _(h: Hostile) -> Check:
    return await h.job(h.arq_job(mp({"v": SCHEMA_VERSION, "client": "c", "requests": h.marker,
                                     "keep_s": 60})))


@entry("job-payload-bad-item", JOB, r"cache job request 0: n must be an int >= 0")
async def _(h: Hostile) -> Check:
    item = prepare(Request(h.marker, 1, "r", "ns"), run="run", route=MODEL, model_id=MODEL)
    wire = item.to_wire()
    wire[4] = "many"
    return await h.job(h.arq_job(mp({"v": SCHEMA_VERSION, "client": "c", "requests": [wire],
                                     "keep_s": 60})))


@entry("job-payload-item-wrong-arity", JOB, r"cache job request 0 must be a list of 9 or 10 fields")
async def _(h: Hostile) -> Check:
    return await h.job(h.arq_job(mp({"v": SCHEMA_VERSION, "client": "c",
                                     "requests": [[h.marker, 1]], "keep_s": 60})))


@entry("job-key-is-a-hash", JOB, r"^unreadable: WRONGTYPE Operation against a key")
async def _(h: Hostile) -> Check:
    return await h.job(h.marker.encode(), as_hash=True)


@entry("queue-members-not-utf8", "queue entry", r"job id is not UTF-8", count=5)
async def _(h: Hostile) -> Check:
    """Both cache workers' polls see them: each is set aside once, by one of them."""
    members = [b"\xff\xfe" + uuid.uuid4().bytes for _ in range(5)]
    await h.redis.zadd(h.keys.cache_queue, dict.fromkeys(members, int(time.time() * 1000)))

    async def acked() -> bool:
        return not any([await h.redis.zscore(h.keys.cache_queue, m) for m in members])

    return acked


@entry("queue-member-job-key-missing", None)
async def _(h: Hostile) -> Check:
    return await h.job(b"")  # a queued id whose job key does not exist: arq drops it


@entry("job-names-a-live-waiter", JOB, r"cache job has schema version 99")
async def _(h: Hostile) -> Check:
    """The client's own batch is unreadable (a newer client): its request hears so."""
    real = client_module.encode_job_and_copy
    sent: list[str] = []

    def newer_client(client: str, items: list, keep_s: int, batch: str,
                     after: str, stored: Any) -> tuple[bytes, bytes]:
        sent.append(items[0].uuid)
        return tuple(mp({**msgpack.unpackb(data), "v": 99})  # type: ignore[return-value]
                     for data in real(client, items, keep_s, batch, after, stored))

    client_module.encode_job_and_copy = newer_client
    try:
        started = time.monotonic()
        with pytest.raises(GenerationError, match=r"the request's batch could not be read by "
                           r"the cache worker \(cache job has schema version 99.*set aside; "
                           r"ask again \(request_id 'j1'\)"):
            await asyncio.wait_for(h.pipe.request(Request(h.marker, 1, "j1", "ns")),
                                   ERROR_WITHIN_S)
        assert time.monotonic() - started < ERROR_WITHIN_S
    finally:
        client_module.encode_job_and_copy = real
    again = await asyncio.wait_for(h.pipe.request(Request(h.marker, 1, "j2", "ns")), 10)
    assert again.metadata[0]["index"] == 0  # nothing was reserved for the unreadable batch

    async def acked() -> bool:
        return not await h.redis.zcard(h.keys.cache_queue)

    return acked


# --- wake-up tokens -------------------------------------------------------------------------

TOKEN = "wake token"


@entry("token-not-msgpack", TOKEN, r"wake token is not valid msgpack")
async def _(h: Hostile) -> Check:
    return await h.token(b"\xc1\xff\xfe" + h.marker.encode())


@entry("token-an-old-job-id", TOKEN, r"wake token is not a \[job id, payload\] pair")
async def _(h: Hostile) -> Check:
    return await h.token(mp(f"{h.keys.prefix}job:{h.marker}"))


@entry("token-without-prefix", TOKEN, r"wake token is not a job id under prefix")
async def _(h: Hostile) -> Check:
    return await h.token(mp([f"other:job:{h.marker}", b""]))


@entry("token-huge", TOKEN, r"wake token is not a job id under prefix")
async def _(h: Hostile) -> Check:
    return await h.token(mp([f"{h.keys.prefix}job:{h.marker}" * 5000, b""]))


@entry("token-payload-not-msgpack", JOB, r"cache job is not valid msgpack")
async def _(h: Hostile) -> Check:
    return await h.token(mp([f"{h.keys.prefix}job:x", b"\xc1" + h.marker.encode()]))


@entry("token-of-no-job", None)
async def _(h: Hostile) -> Check:  # a job run already: ignored, no dead letter
    return await h.token(encode_wake_token(f"{h.keys.prefix}job:nosuchjob",
                                           encode_job("c", [], 60)))


# --- waiter records -------------------------------------------------------------------------


async def _fill_with_waiter(h: Hostile, waiter: str, record: bytes) -> Check:
    """A hostile waiter record on a prompt key; a real request then claims and fills it."""
    prompt = f"fill {h.marker}"
    wkey = h.keys.waiters(h.key(prompt))
    await h.redis.hset(wkey, waiter, record)
    served = await asyncio.wait_for(h.pipe.request(Request(prompt, 2, "f", "ns")), 10)
    assert len(served.data) == 2

    async def acked() -> bool:
        return not await h.redis.hexists(wkey, waiter)

    return acked


@entry("waiter-record-garbage", "waiter record", r"not 'start\|flags\|run\|model'")
async def _(h: Hostile) -> Check:
    return await _fill_with_waiter(h, "cid:uuid1", f"garbage {h.marker}".encode())


@entry("waiter-record-not-utf8", "waiter record", r"not 'start\|flags\|run\|model'")
async def _(h: Hostile) -> Check:
    return await _fill_with_waiter(h, "cid:uuid2", b"0|g|\xff\xfe|" + h.marker.encode())


@entry("waiter-record-three-parts", "waiter record", r"not 'start\|flags\|run\|model'")
async def _(h: Hostile) -> Check:
    return await _fill_with_waiter(h, "cid:uuid3", b"0|g|" + h.marker.encode())


@entry("waiter-id-without-client", "waiter id", r"waiter id .* is not '<client>:<request>'")
async def _(h: Hostile) -> Check:
    return await _fill_with_waiter(h, "nocolon", f"0|d|run-x|{MODEL}".encode())


# --- samples ------------------------------------------------------------------------------


async def _bad_sample(h: Hostile, raw: bytes, n: int = 1) -> Check:
    """Sample 0 of a prompt is unreadable: the request that gets it hears so at once,
    the sample is set aside, and the next request has it generated anew."""
    prompt = f"sample {h.marker}"
    key = h.key(prompt)
    await h.redis.hset(h.keys.samples(key), 0, raw)
    await h.redis.hset(h.keys.generation(key), "mark", 1)
    started = time.monotonic()
    with pytest.raises(GenerationError, match=r"1 stored sample\(s\) of this request could not "
                       r"be read and were set aside .*ask again and they are generated anew "
                       r"\(request_id 's1'\)"):
        await asyncio.wait_for(h.pipe.request(Request(prompt, n, "s1", "first")),
                               ERROR_WITHIN_S)
    assert time.monotonic() - started < ERROR_WITHIN_S
    again = await asyncio.wait_for(h.pipe.request(Request(prompt, n, "s2", "second")), 10)
    assert again.cached[0] is False and again.metadata[0]["index"] == 0
    assert msgpack.unpackb(await h.redis.hget(h.keys.samples(key), 0))["data"] == again.data[0]

    async def acked() -> bool:
        return True  # the sample was replaced: checked above

    return acked


@entry("sample-not-msgpack", "sample", r"sample is not valid msgpack")
async def _(h: Hostile) -> Check:
    return await _bad_sample(h, b"\xc1" + h.marker.encode())


@entry("sample-v99", "sample", r"sample has schema version 99")
async def _(h: Hostile) -> Check:
    return await _bad_sample(h, mp({"v": 99, "data": h.marker}))


@entry("sample-no-data", "sample", r"sample has no field 'data'")
async def _(h: Hostile) -> Check:
    return await _bad_sample(h, mp({"v": SCHEMA_VERSION, "text": h.marker}))


@entry("sample-not-a-map", "sample", r"sample is a msgpack list, not a map")
async def _(h: Hostile) -> Check:
    return await _bad_sample(h, mp([h.marker]))


@entry("sample-met-on-fill", "sample", r"sample is not valid msgpack")
async def _(h: Hostile) -> Check:
    """Index 0 unreadable, index 1 generated: the fill completes the waiter with both."""
    return await _bad_sample(h, b"\xc1" + h.marker.encode(), n=2)


@entry("samples-hash-is-a-string-on-reserve", None)
async def _(h: Hostile) -> None:
    """A prompt's sample hash holds another type: the request that reads it fails with
    Redis's reason and what to do; the worker goes on (the common check is served)."""
    prompt = f"wrongtype {h.marker}"
    await h.redis.set(h.keys.samples(h.key(prompt)), h.marker)
    await h.redis.hset(h.keys.generation(h.key(prompt)), "mark", 1)
    with pytest.raises(GenerationError, match=r"Redis refused reserving samples: WRONGTYPE.*"
                                              r"another type.*\(request_id 't'\)"):
        await asyncio.wait_for(h.pipe.request(Request(prompt, 1, "t", "ns")), ERROR_WITHIN_S)


@entry("samples-hash-is-a-string-on-fill", "foreign key", r"holds a string, not a hash")
async def _(h: Hostile) -> None:
    """The samples key holds a string when the samples arrive: it is moved aside (its
    DUMP kept in the dead letter) and the samples, already paid for, are stored."""
    prompt = f"wrongtype fill {h.marker}"
    skey = h.keys.samples(h.key(prompt))
    await h.redis.set(skey, b"not a hash")  # mark is 0: reserve never reads it; fill does
    r = await asyncio.wait_for(h.pipe.request(Request(prompt, 1, "t", "ns")), ERROR_WITHIN_S)
    assert len(r.data) == 1 and r.cached == [False]
    assert await h.redis.type(skey) == b"hash"


# --- reservation records --------------------------------------------------------------------


async def _reserved_over(h: Hostile, record: Any, as_string: bool = False) -> Any:
    """A request whose reservation record is hostile, through the real client."""
    item = prepare(Request(f"reservation {h.marker}", 2, "r", "ns"), run=h.pipe.run,
                   route=h.pipe.route, model_id=h.pipe.model_id)
    assert h.pipe._client is not None
    client = h.pipe._client.client_id
    records = h.keys.reservations(client, h.marker)
    if as_string:
        await h.redis.set(records, record)
    else:
        await h.redis.hset(records, f"{client}:{item.uuid}", record)
    [result] = await asyncio.wait_for(h.pipe._client.submit([item], batch=h.marker), 10)
    return result


@entry("reservation-garbage", None)
async def _(h: Hostile) -> None:
    result = await _reserved_over(h, f"garbage {h.marker}".encode())
    assert not isinstance(result, Exception), result
    assert (result["start"], len(result["samples"])) == (0, 2)  # a fresh range


@entry("reservation-wrong-flags", None)
async def _(h: Hostile) -> None:
    result = await _reserved_over(h, b"7|g")  # readable, one flag for n=2: a fresh range
    assert not isinstance(result, Exception), result
    assert (result["start"], len(result["samples"])) == (0, 2)


@entry("reservation-records-are-a-string", None)
async def _(h: Hostile) -> None:
    result = await _reserved_over(h, h.marker, as_string=True)
    assert isinstance(result, GenerationError) and "WRONGTYPE" in str(result), result


# --- reply messages (to a live client) -----------------------------------------------------


async def _publish(h: Hostile, data: bytes) -> None:
    """Garbage on the live client's channel while one of its requests waits; the
    request is still answered, and so is the next one."""
    assert h.pipe._client is not None
    channel = h.keys.reply_channel(h.pipe._client.client_id)
    prompt = f"reply {h.marker}"
    in_flight = asyncio.create_task(h.pipe.request(Request(prompt, 1, "p", "ns")))
    assert await h.redis.publish(channel, data) == 1  # the client listens
    assert len((await asyncio.wait_for(in_flight, 10)).data) == 1


@entry("reply-garbage", None)
async def _(h: Hostile) -> None:
    await _publish(h, b"\xc1 " + h.marker.encode())


@entry("reply-v99", None)
async def _(h: Hostile) -> None:
    await _publish(h, mp({"v": 99, "replies": [h.marker]}))


@entry("reply-bad-items", None)
async def _(h: Hostile) -> None:
    await _publish(h, mp({"v": SCHEMA_VERSION, "replies": [{"id": 5}, h.marker]}))


@entry("reply-for-no-request", None)
async def _(h: Hostile) -> None:
    await _publish(h, encode_replies([reply("nobody", 0, "g", [encode_sample(h.marker)])]))


# --- the table, run ---------------------------------------------------------------------------


def test_the_table_covers_every_kind():
    kinds = {e.kind for e in TABLE}
    assert {STREAM, JOB, "queue entry", TOKEN, "waiter record", "waiter id", "sample"} <= kinds
    assert len(TABLE) >= 20 and len({e.id for e in TABLE}) == len(TABLE)


def _params() -> list:
    return [pytest.param(e, id=e.id, marks=[pytest.mark.xfail(
        strict=True, raises=ReplyTimeoutError, reason=e.xfail)] if e.xfail else [])
        for e in TABLE]


@pytest.mark.parametrize("e", _params())
async def test_hostile_entry(pool: Pool, e: Entry, caplog: pytest.LogCaptureFixture):
    keys = pool.keys
    redis = Redis.from_url(pool.url)
    marker = f"PROMPT-TEXT-{e.id}-{uuid.uuid4().hex[:8]}"
    sec, usec = await redis.time()
    since = f"{sec * 1000 + usec // 1000 - 1}-0"
    letters_before = {eid for eid, _ in await list_dead_letters(redis, keys, 10_000)}
    lines_before = pool.dead_letter_lines(e.kind) if e.kind else 0
    try:
        async with OnlineAPI(MODEL, cache=pool.url, prefix=keys.prefix, run=f"run-{e.id}",
                             reply_timeout=10, request_timeout=30) as pipe:
            h = Hostile(redis, keys, pipe, marker)
            acked = await e.inject(h)

            async def new_letters() -> list:
                return [(eid, d) for eid, d in await list_dead_letters(redis, keys, 10_000)
                        if eid not in letters_before]

            if e.kind is not None:
                await h.until(lambda: _at_least(new_letters, e.count),
                              f"{e.count} dead letter(s) of kind {e.kind!r}")
            if acked is not None:
                await h.until(acked, "the hostile entry was acknowledged")
            served = await asyncio.wait_for(
                pipe.request(Request(f"normal request after {e.id}", 1, "n", "ns")), 10)
            assert len(served.data) == 1 and served.cached == [False]
            await asyncio.sleep(0.1)  # a late second dead letter would show now
            letters = await new_letters()
        assert [d.kind for _, d in letters] == [e.kind] * (e.count if e.kind else 0), \
            [(d.kind, d.reason) for _, d in letters]
        for _, d in letters:
            assert re.search(e.reason, d.reason), d.reason
            assert marker not in d.reason and marker not in d.source
        if e.kind is not None:
            assert pool.dead_letter_lines(e.kind) - lines_before == e.count, "logged once"
        # nothing added to the work stream during this entry is still pending
        pending = await redis.xpending_range(h.stream, CONSUMER_GROUP, since, "+", 100)
        assert pending == [], pending
    finally:
        await redis.aclose()
    dead = [p for p in pool.procs.procs if p.poll() is not None]
    assert not dead, f"a worker exited: {Processes.logs(dead[0])}"
    log = pool.log_text()
    assert marker not in log, "a worker logged the entry's prompt text"
    assert max(map(len, log.splitlines())) < 1500, "a log line was not truncated"
    assert marker not in caplog.text, "the client logged the entry's prompt text"
    if e.id.startswith("reply-") and e.id != "reply-for-no-request":
        assert len(re.findall(r"unreadable reply on ", caplog.text)) == 1, caplog.text


async def _at_least(letters: Callable[[], Awaitable[list]], count: int) -> bool:
    return len(await letters()) >= count


def test_dead_letters_cli_lists_and_drops(pool: Pool):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cachesaver_dist.cli", "dead-letters", *args,
             "--prefix", pool.keys.prefix], env=subprocess_env(pool.url), cwd=ROOT,
            capture_output=True, text=True, timeout=30)

    client = sync_redis.Redis.from_url(pool.url)
    try:  # dead letters of its own, whatever else ran before
        before = client.xlen(pool.keys.dead_letters)
        client.lpush(pool.keys.cache_wake, b"cli-1", b"cli-2", b"cli-3")
        deadline = time.monotonic() + LETTER_WAIT_S
        while client.xlen(pool.keys.dead_letters) < before + 3:
            assert time.monotonic() < deadline, "the tokens were not set aside"
            time.sleep(0.02)
        total = client.xlen(pool.keys.dead_letters)
        listed = cli("--json", "--count", "1000")
        assert listed.returncode == 0, listed.stderr
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert len(rows) == total
        assert "wake token" in {r["kind"] for r in rows}
        assert all(r["bytes"] > 0 and r["reason"] and r["source"] for r in rows)
        assert "PROMPT-TEXT" not in listed.stdout  # raw bytes are not printed
        text = cli("--count", "3")  # a table of the 3 newest
        assert text.returncode == 0 and "dead letters, newest first" in text.stdout
        assert text.stdout.count("│ wake token │") == 3 and "PROMPT-TEXT" not in text.stdout
        assert all(r["id"] in text.stdout for r in rows[:3])  # whole, to copy for --drop
        one, two = rows[0]["id"], rows[1]["id"]
        typo = cli("--drop", one, "garbage-id")  # refused whole: nothing dropped
        assert typo.returncode == 1 and "Traceback" not in typo.stderr, typo.stderr
        assert "'garbage-id' is not a dead letter id" in typo.stderr
        assert client.xlen(pool.keys.dead_letters) == total
        dropped = cli("--drop", one, two)
        assert dropped.returncode == 0 and "dropped 2 dead letter(s)" in dropped.stdout
        assert client.xlen(pool.keys.dead_letters) == total - 2
        assert not client.xrange(pool.keys.dead_letters, one, one)
        dropped = cli("--drop")
        assert dropped.returncode == 0 and f"dropped {total - 2} dead letter(s)" in dropped.stdout
        assert client.xlen(pool.keys.dead_letters) == 0
        empty = cli()
        assert empty.returncode == 0 and "no dead letters under prefix" in empty.stdout
    finally:
        client.close()


async def test_a_queue_of_another_type_is_refused_with_what_to_do(redis_url, keys, redis):
    """The client's enqueue (a pipeline) is refused: the message is Redis's own, with the
    hint for its error code, and without the pipeline's command (which holds the job)."""
    await redis.set(keys.cache_queue, b"not a sorted set")
    async with OnlineAPI(MODEL, cache=redis_url, prefix=keys.prefix, request_timeout=10) as pipe:
        with pytest.raises(RedisRefusedError, match=r"^Redis refused enqueueing requests: "
                           r"WRONGTYPE Operation .*\(a key under this prefix holds another "
                           r"type: .*use another --prefix or delete that key\)$") as info:
            await asyncio.wait_for(pipe.request(Request("enqueue me", 1, "e", "ns")), 10)
    assert "Command #" not in str(info.value) and "enqueue me" not in str(info.value)


def test_a_wake_list_of_another_type_does_not_stop_cache_workers(redis_url, keys, processes):
    """The wake list holds a string: the worker moves it aside and goes on."""
    worker = processes.cli("worker", "cache", name="cache")
    processes.wait_alive("cache")
    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.set(keys.cache_wake, b"not a list")
        deadline = time.monotonic() + 10
        while client.type(keys.cache_wake) == b"string" and time.monotonic() < deadline:
            time.sleep(0.1)
        letters = client.xrange(keys.dead_letters)
    finally:
        client.close()
    assert worker.poll() is None, Processes.logs(worker)
    assert [(f[b"kind"], f[b"source"]) for _, f in letters] == [
        (b"foreign key", keys.cache_wake.encode())]


async def test_a_queue_member_seen_by_two_workers_is_set_aside_once(redis_url, keys, redis):
    """Every cache worker's poll sees an unreadable queue member; when two meet it at
    once, only the one that removes it sets it aside (one dead letter, one log line)."""
    workers = [cache_worker(keys, redis_pool=ArqRedis(connection_pool=connection_pool(redis_url)))
               for _ in range(2)]
    member = b"\xff\xfe" + uuid.uuid4().bytes
    await redis.zadd(keys.cache_queue, {member: 1})
    try:
        await asyncio.gather(*(w.start_jobs([member]) for w in workers))
    finally:
        for w in workers:
            await w.pool.aclose()
    letters = await redis.xrange(keys.dead_letters)
    assert [(f[b"kind"], f[b"raw"]) for _, f in letters] == [(b"queue entry", member)]
    assert await redis.zcard(keys.cache_queue) == 0
