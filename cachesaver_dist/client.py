"""The client transport: enqueue batches for the cache workers, wait for replies.

One subscription per client process, to its own channel, receives every reply (the
request ids are in the payload); it is confirmed before the first enqueue. Pub/sub
delivers at most once, so a request with no reply after ``reply_timeout`` is asked
again with the same id (its reservation is idempotent); the wait between re-asks
doubles up to 30 s, until ``request_timeout``. A request whose model (or the cache
queue) has no live worker fails at its first re-ask, naming the worker to start.
Redis errors that retrying cannot fix (permissions, memory, a read-only replica) fail
at once; a lost connection is retried within ``request_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from . import defaults
from .errors import (
    GenerationError,
    NoWorkerError,
    ProtocolError,
    RedisUnavailableError,
    ReplyTimeoutError,
    redis_message,
    refused,
)
from .heartbeat import alive_workers
from .protocol import (
    ARQ_JOB,
    Keys,
    WorkItem,
    decode_replies,
    encode_arq_job,
    encode_job,
    encode_wake_token,
    unique_id,
)

log = logging.getLogger("cachesaver_dist.client")

MAX_REASK_WAIT_S = 30.0
WAKE_TOKENS_KEPT = 64
MAX_DELETES = 256  # answered batches' reservation records deleted per enqueue at most


class CacheClient:
    """Sends request batches through Redis and returns the raw replies."""

    def __init__(self, redis: Redis, keys: Keys, *,
                 reply_timeout: float = defaults.REPLY_TIMEOUT_S,
                 request_timeout: float = defaults.REQUEST_TIMEOUT_S) -> None:
        self.redis, self.keys = redis, keys
        self.reply_timeout, self.request_timeout = reply_timeout, request_timeout
        self.client_id = uuid.uuid4().hex
        self._waiting: dict[str, asyncio.Future] = {}
        # Reservation records of batches answered at their first ask: deleted with the
        # next enqueue (or at close), so a hit leaves nothing behind in Redis.
        self._answered: list[str] = []
        self._pubsub: Any = None
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        """Subscribe to this client's replies and wait until Redis confirms."""
        self._pubsub = self.redis.pubsub()
        channel = self.keys.reply_channel(self.client_id)
        try:
            await self._pubsub.subscribe(channel)
            deadline = time.monotonic() + 10
            while True:
                msg = await self._pubsub.get_message(timeout=1.0)
                if msg and msg["type"] == "subscribe":
                    break
                if time.monotonic() > deadline:
                    raise RedisUnavailableError(
                        f"Redis did not confirm the subscription to {channel} in 10 s")
        except ResponseError as exc:
            raise refused(exc, f"the subscription to {channel}") from None
        self._reader = asyncio.create_task(self._read_replies(), name="cachesaver-replies")

    async def close(self) -> None:
        if self._answered:
            with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self.redis.delete(*self._answered), 1.0)
            self._answered.clear()
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
        for fut in self._waiting.values():
            if not fut.done():
                fut.cancel()

    async def _read_replies(self) -> None:
        backoff = 0.1
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
                backoff = 0.1
            except (RedisError, OSError) as exc:  # reconnects and re-subscribes next call
                log.warning("reply subscription lost (%s); reconnecting", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if not msg or msg["type"] != "message":
                continue
            try:
                replies = decode_replies(msg["data"])
            except ProtocolError as exc:  # one bad message must not stop the reader
                log.error("unreadable reply on %s (%d bytes): %s; its requests are asked "
                          "again", msg["channel"], len(msg["data"]), exc)
                continue
            for reply in replies:
                fut = self._waiting.get(reply["id"])
                if fut is not None and not fut.done():
                    fut.set_result(reply)

    async def submit(self, items: list[WorkItem], batch: str | None = None,
                     ) -> list[dict[str, Any] | GenerationError]:
        """Send ``items`` as one batch; return their replies (or errors) in the same order.

        ``batch`` names the batch's reservation records (default: a fresh id); sending
        the same items under the same name again gets the same indices."""
        loop = asyncio.get_running_loop()
        futures = {it.uuid: loop.create_future() for it in items}
        self._waiting.update(futures)
        batch, asks = batch or unique_id(), 0
        try:
            deadline = time.monotonic() + self.request_timeout
            pending, wait = items, self.reply_timeout
            while pending:
                await self._enqueue(pending, deadline, batch)
                asks += 1
                left = deadline - time.monotonic()
                await asyncio.wait([futures[it.uuid] for it in pending], timeout=min(wait, left))
                pending = [it for it in pending if not futures[it.uuid].done()]
                if pending and time.monotonic() >= deadline:
                    raise ReplyTimeoutError(await self._timeout_message(pending))
                if pending:
                    await self._fail_unserved(pending, futures)
                    pending = [it for it in pending if not futures[it.uuid].done()]
                if pending:
                    log.debug("%d requests without reply after %.1f s; asking again",
                              len(pending), wait)
                wait = min(wait * 2, MAX_REASK_WAIT_S)
        finally:
            for it in items:
                self._waiting.pop(it.uuid, None)
        if asks == 1:  # asked again: a late job may still read the records; they expire
            self._answered.append(self.keys.reservations(self.client_id, batch))
        out: list[dict[str, Any] | GenerationError] = []
        for it in items:
            reply = futures[it.uuid].result()
            if isinstance(reply, GenerationError):
                out.append(reply)
            elif "error" in reply:
                out.append(GenerationError(f"{reply['error']['message']} ({describe(it)})"))
            else:
                out.append(reply)
        return out

    async def _enqueue(self, items: list[WorkItem], deadline: float, batch: str) -> None:
        """Enqueue one arq job and wake a cache worker, in one round trip.

        The job is written as arq's ``enqueue_job`` writes it, without its check for an
        existing job id (ours are unique): that check costs three round trips.
        """
        keep_s = int(self.request_timeout) + 60
        payload = encode_job(self.client_id, items, keep_s, batch)
        backoff = 0.1
        while True:
            job_id = self.keys.new_job_id()
            now_ms = int(time.time() * 1000)
            job = encode_arq_job(payload, now_ms)
            # taken off the list before the await: enqueues run concurrently
            answered, self._answered = self._answered[:MAX_DELETES], self._answered[MAX_DELETES:]
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.psetex(ARQ_JOB + job_id, int(self.request_timeout * 1000), job)
                pipe.zadd(self.keys.cache_queue, {job_id: now_ms})
                pipe.lpush(self.keys.cache_wake, encode_wake_token(job_id, payload))
                pipe.ltrim(self.keys.cache_wake, 0, WAKE_TOKENS_KEPT - 1)
                if answered:
                    pipe.delete(*answered)
                await pipe.execute()
                return
            except ResponseError as exc:
                raise refused(exc, "enqueueing requests") from None
            except (RedisError, OSError) as exc:
                self._answered += answered
                if time.monotonic() + backoff >= deadline:
                    raise RedisUnavailableError(
                        f"could not enqueue {len(items)} request(s) within request_timeout "
                        f"({redis_message(exc)}); is Redis up?") from None
                log.warning("enqueue failed (%s); retrying in %.1f s", redis_message(exc),
                            backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _fail_unserved(self, pending: list[WorkItem],
                             futures: dict[str, asyncio.Future]) -> None:
        """Fail at once the requests that no live worker can serve."""
        try:
            missing = await self._missing_workers({it.route for it in pending})
        except (RedisError, OSError):
            return  # Redis is away: the next re-ask will tell
        for it in pending:
            hint = missing.get("cache") or missing.get(it.route)
            if hint and not futures[it.uuid].done():
                futures[it.uuid].set_result(NoWorkerError(f"{hint} ({describe(it)})"))

    async def _missing_workers(self, routes: set[str]) -> dict[str, str]:
        """route (or "cache") -> what to start, for each one no live worker serves."""
        missing = {}
        if not await alive_workers(self.redis, self.keys, "cache"):
            missing["cache"] = ("no cache worker is alive: start one with "
                                "'cachesaver-dist worker cache'")
        for route in sorted(routes):
            if not await alive_workers(self.redis, self.keys, route):
                missing[route] = (f"no batch worker serves model {route!r}: start one with "
                                  f"'cachesaver-dist worker batch --model {route}'")
        return missing

    async def _timeout_message(self, pending: list[WorkItem]) -> str:
        hints: list[str] = []
        with contextlib.suppress(RedisError, OSError):
            hints = list((await self._missing_workers({it.route for it in pending})).values())
        hint = "; ".join(hints) or "workers are alive but slow: raise request_timeout"
        return (f"{len(pending)} request(s) got no reply within {self.request_timeout:.0f} s "
                f"({hint}); samples generated meanwhile stay cached")


def describe(item: WorkItem) -> str:
    """How messages name a request: its ``request_id``, else its place in the cache."""
    if item.request_id:
        return f"request_id {item.request_id!r}"
    return f"request without request_id, namespace {item.namespace!r}, n={item.n}"
