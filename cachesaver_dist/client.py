"""The client transport: enqueue batches for the cache workers, wait for replies.

One subscription per client process (``subscription.py``), to its own channel,
receives every reply (the request ids are in the payload); it is confirmed before the
first enqueue. Pub/sub
delivers at most once, so a request with no reply after ``reply_timeout`` is asked
again with the same id (its reservation is idempotent); the wait between re-asks
doubles up to 30 s, until ``request_timeout``. A request whose model (or the cache
queue) has no live worker fails at its first re-ask, naming the worker to start.
Redis errors that retrying cannot fix (permissions, memory, a read-only replica) fail
at once; a lost connection is retried within ``request_timeout``.

In direct mode (``OnlineAPI(direct=True)``) a batch is not enqueued: the client runs the
cache workers' reserve call itself and answers the complete requests from its result;
the others are answered on the reply channel, by the batch workers, as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shlex
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError, ResponseError

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
from .heartbeat import REGISTRY_KEPT_S, alive_workers
from .protocol import (
    ARQ_JOB,
    ASK_AGAIN,
    CacheJob,
    Keys,
    WorkItem,
    encode_arq_job,
    encode_job_and_copy,
    encode_wake_token,
    unique_id,
)
from .samples import as_sample, read_sample
from .subscription import ReplySubscription
from .takeback import give_back, take_back
from .timeouts import within

if TYPE_CHECKING:
    from .outbox import Outbox
    from .stats import Tally

log = logging.getLogger("cachesaver_dist.client")
T = TypeVar("T")

MAX_REASK_WAIT_S = 30.0
# The wake-up list keeps the newest tokens only, each with its job's message without the
# prompts (a bound on what it holds while no cache worker runs: about 4 MB for batches of
# 32 requests, whatever their prompts); a job whose token it dropped waits for arq's poll.
WAKE_TOKENS_KEPT = 1024
ENQUEUED_TOGETHER = 16  # batches per enqueue at most (a cache worker pops 16 tokens at once)
MAX_DELETES = 256  # answered batches' reservation records deleted per enqueue at most
CLOSE_WAIT_S = 2.0  # direct mode: how long close() waits to write the last accounting
CHECK_WAIT_S = 2.0  # the fail-fast check of live workers waits this long at most
STORED_KEYS_KEPT = 16_384  # prompt keys known to have a stored spec, per client (~2 MB)
# Workers register again within one heartbeat: an empty registry, when workers answered
# this client lately, is waited out this long (Redis restarted without its data).
REGISTRY_LOST_GRACE_S = 3 * defaults.HEARTBEAT_S


class CacheClient:
    """Sends request batches through Redis and returns the raw replies.

    ``direct``: run the reserve step in this process instead of a cache worker (one
    round trip per batch; hits are answered by its result, misses wait for the batch
    workers' replies as usual); ``run_ttl_s`` and ``replicas`` are then the cache
    worker's ``--run-ttl`` and ``--wait-replicas``.
    """

    def __init__(self, redis: Redis, keys: Keys, *,
                 reply_timeout: float = defaults.REPLY_TIMEOUT_S,
                 request_timeout: float = defaults.REQUEST_TIMEOUT_S,
                 direct: bool = False, run_ttl_s: int = defaults.RUN_TTL_S,
                 replicas: int = 0) -> None:
        self.redis, self.keys = redis, keys
        self.reply_timeout, self.request_timeout = reply_timeout, request_timeout
        self.direct, self.run_ttl_s, self.replicas = direct, run_ttl_s, replicas
        self.client_id = uuid.uuid4().hex
        self._waiting: dict[str, _Replies] = {}  # request id -> its batch's replies
        self._queued: dict[str, list[str]] = {}  # batch -> the arq jobs it enqueued
        # Reservation records of batches answered at their first ask: deleted with the
        # next enqueue (or at close), so a hit leaves nothing behind in Redis.
        self._answered: list[str] = []
        self._subscription: ReplySubscription | None = None
        # direct mode: accounting not written yet, and the task that writes it
        self._tally: Tally = {}
        self._accounting: asyncio.Task | None = None
        self._closing = asyncio.Event()
        # direct mode: one batch reserves at a time, in the order the batches were sent
        # (a batch that claims takes two script calls: another batch of this client in
        # between would take indices before the rest of it, unlike a re-run's order)
        self._reserving = asyncio.Lock()
        # worker path: batches waiting to be enqueued, in order; one enqueue at a time,
        # each job after the one before it
        self._outgoing: list[_Outgoing] = []
        self._enqueuing, self._last_job = asyncio.Lock(), ""
        self._replied_at = -math.inf  # when a worker's reply last came (monotonic)
        # Prompt keys answered with samples: their spec is stored (the generation hash
        # keeps the spec of a key's first claim), so a first send leaves their prompts
        # out of the job's body; a worker rebuilds a claiming request's spec from it.
        self._stored: set[str] = set()
        self._lost_since: dict[str, float] = {}  # route -> its registry found gone

    async def start(self) -> None:
        """Subscribe to this client's replies and wait until Redis confirms."""
        self._subscription = ReplySubscription(
            self.redis, self.keys.reply_channel(self.client_id), self._received)
        await self._subscription.start()

    async def close(self) -> None:
        self._closing.set()  # direct mode: the accounting not yet written goes out now
        task = self._accounting
        if task is not None:
            await asyncio.wait([task], timeout=CLOSE_WAIT_S)
            if not task.done():
                task.cancel()
                log.warning("accounting not written: Redis did not answer within %g s",
                            CLOSE_WAIT_S)
            elif self._tally:  # what a failed write left: tried once more
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._write_accounts(), CLOSE_WAIT_S)
        if self._answered:
            with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self.redis.delete(*self._answered), 1.0)
            self._answered.clear()
        if self._subscription is not None:
            await self._subscription.close()
        for replies in self._waiting.values():
            replies.complete.cancel()

    def _received(self, replies: list[dict[str, Any]]) -> None:
        """Replies a worker sent. Their samples are read here, once (the responses are
        built from them). A reply with a sample that cannot be read is one the reserve
        call published before its cache worker read it: that worker sets the sample
        aside and sends the error reply, which this request waits for (or asks again)."""
        self._replied_at = time.monotonic()
        ready = []
        for reply in replies:
            if reply["id"] not in self._waiting:
                continue
            if "samples" in reply:
                try:
                    reply["records"] = [read_sample(raw) for raw in reply["samples"]]
                except ProtocolError as exc:
                    log.debug("request %s: a sample of its reply cannot be read (%s); its "
                              "cache worker sends the error", reply["id"], exc)
                    continue
            ready.append(reply)
        self._deliver(ready)

    def _deliver(self, replies: list[dict[str, Any]]) -> None:
        for reply in replies:
            batch = self._waiting.get(reply["id"])
            if batch is not None:
                batch.put(reply["id"], reply)

    async def submit(self, items: list[WorkItem], batch: str | None = None,
                     ) -> list[dict[str, Any] | GenerationError]:
        """Send ``items`` as one batch; return their replies (or errors) in the same order.

        ``batch`` names the batch's reservation records (default: a fresh id); sending
        the same items under the same name again gets the same indices."""
        replies = _Replies(len({it.uuid for it in items}))
        self._waiting.update((it.uuid, replies) for it in items)
        batch, asks = batch or unique_id(), 0
        try:
            deadline = time.monotonic() + self.request_timeout
            pending, wait = items, self.reply_timeout
            send = self._reserve_here if self.direct else self._enqueue
            while pending:
                await send(pending, deadline, batch)
                asks += 1
                left = deadline - time.monotonic()
                if not replies.complete.done():  # (a direct-mode batch of hits is answered)
                    await asyncio.wait([replies.complete], timeout=min(wait, left))
                if replies.complete.cancelled():
                    raise asyncio.CancelledError  # the client was closed
                again = replies.take_again()  # asked again at once, with their prompts
                pending = [it for it in pending if it.uuid not in replies.got]
                if pending and time.monotonic() >= deadline:
                    raise ReplyTimeoutError(await self._timeout_message(pending))
                if pending and len(again) < len(pending):
                    await self._fail_unserved(pending, replies, batch)
                    pending = [it for it in pending if it.uuid not in replies.got]
                if pending:
                    log.debug("%d requests without reply after %.1f s; asking again",
                              len(pending), wait)
                wait = min(wait * 2, MAX_REASK_WAIT_S)
        finally:
            jobs = self._queued.pop(batch, [])
            for it in items:
                self._waiting.pop(it.uuid, None)
        # Asked again, or enqueued again after a send whose reply was lost: a late job may
        # still read the records (it then gets the same indices); they expire.
        if asks == 1 and len(jobs) <= 1:
            self._answered.append(self.keys.reservations(self.client_id, batch))
        out: list[dict[str, Any] | GenerationError] = []
        failed = []
        stored = self._stored
        if len(stored) >= STORED_KEYS_KEPT:
            stored.clear()
        for it in items:
            reply = replies.got[it.uuid]
            if isinstance(reply, GenerationError):
                out.append(reply)
            elif "error" in reply:
                out.append(GenerationError(f"{reply['error']['message']} ({describe(it)})"))
            else:
                out.append(reply)
                stored.add(it.key)
                continue
            failed.append(it)
        if failed:  # their errors are final: asking again gets the same indices
            await give_back(self.redis, self.keys, self.client_id, batch,
                            sorted(failed, key=_request_id),  # in the order they reserved
                            self.direct)
        return out

    async def _enqueue(self, items: list[WorkItem], deadline: float, batch: str) -> None:
        """Enqueue one arq job and wake a cache worker, in one round trip.

        The job is written as arq's ``enqueue_job`` writes it, without its check for an
        existing job id (ours are unique): that check costs three round trips.

        Batches are enqueued in the order they were sent, each naming the job of the batch
        before it (``after``), so that workers reserve them in that order (reserve.lua); a
        re-ask names none (it is not held back); a send tried again after an error is not
        a re-ask. Batches sent while an enqueue is under way go together in the next one,
        in one transaction: a worker waiting on the wake-up list then gets all their
        tokens at once.
        """
        again = batch in self._queued

        async def send() -> None:
            mine = _Outgoing(items, batch, again)
            self._outgoing.append(mine)
            try:
                async with self._enqueuing:
                    while not mine.done:  # else an enqueue before took it
                        await self._enqueue_outgoing()
            finally:
                if mine in self._outgoing:  # given up before it went
                    self._outgoing.remove(mine)
            if mine.error is not None:  # of the enqueue that took it: tried again
                raise mine.error
        await self._retrying(send, f"enqueue {len(items)} request(s)", "enqueueing requests",
                             deadline)

    async def _enqueue_outgoing(self) -> None:
        """Enqueue the batches waiting to go (``ENQUEUED_TOGETHER`` at most, the oldest
        first), in order, in one round trip (the caller holds ``_enqueuing``)."""
        taken = self._outgoing[:ENQUEUED_TOGETHER]
        del self._outgoing[:ENQUEUED_TOGETHER]
        try:
            pipe = self.redis.pipeline(transaction=len(taken) > 1)
            now_ms = int(time.time() * 1000)
            last = self._last_job
            for out in taken:
                job_id = self.keys.new_job_id()
                self._queued.setdefault(out.batch, []).append(job_id)
                # a re-ask carries every prompt (a spec left out may have been the cause)
                body, slim = encode_job_and_copy(self.client_id, out.items, self._keep_s,
                                                 out.batch, "" if out.again else last,
                                                 () if out.again else self._stored)
                pipe.psetex(ARQ_JOB + job_id, int(self.request_timeout * 1000),
                            encode_arq_job(body, now_ms))
                pipe.zadd(self.keys.cache_queue, {job_id: now_ms})
                pipe.lpush(self.keys.cache_wake, encode_wake_token(job_id, slim))
                last = job_id
            pipe.ltrim(self.keys.cache_wake, 0, WAKE_TOKENS_KEPT - 1)
            await self._with_deletes(pipe.execute, pipe)
        except BaseException as exc:  # each caller tries again (cancelled: as timed out)
            error = exc if isinstance(exc, Exception) else asyncio.TimeoutError()
            for out in taken:
                out.done, out.error = True, error
            raise
        self._last_job = last
        for out in taken:
            out.done = True

    async def _reserve_here(self, items: list[WorkItem], deadline: float, batch: str) -> None:
        """Direct mode: reserve for ``items`` in this process, with the cache workers'
        script and ordering; complete requests are answered at once, the others get
        their replies from the batch workers. Samples are checked as a cache worker
        checks them (``Outbox``); the run's accounting is written within
        ``defaults.ACCOUNT_EVERY_S``, several batches' in one round trip."""
        from .outbox import Outbox
        from .scripts import Reservation, reserve_jobs
        from .stats import account

        job = CacheJob(self.client_id, sorted(items, key=_request_id), self._keep_s, batch)

        async def reserve() -> list[list[Reservation] | None]:
            return await reserve_jobs(self.redis, self.keys, [job], self.run_ttl_s,
                                      self.replicas)

        # not acknowledged by enough replicas (NotReplicatedError): asked again, as a
        # lost connection is; the reservation records make that idempotent
        async with self._reserving:
            [reservations] = await self._retrying(
                reserve, f"reserve samples for {len(items)} request(s)", "reserving samples",
                deadline)
        outbox, replies = Outbox(self.keys), []
        for r in reservations or ():
            if r.complete:
                it = r.item
                answer, records = outbox.answer(it.uuid, it.key, r.start, r.flags, r.samples)
                replies.append(answer)
                if records is not None:
                    if r.new:
                        account(self._tally, it.run, it.model_id, r.flags,
                                [rec.get("usage") for rec in records])
                    # decoded once: the response is built from these
                    answer["records"] = [as_sample(rec) for rec in records]
        if outbox.bad_samples:  # removed before the error is told, so asking again works
            await self._set_aside(outbox)
        self._deliver(replies)
        if self._tally and (self._accounting is None or self._accounting.done()):
            self._accounting = asyncio.create_task(self._write_accounts())

    async def _write_accounts(self) -> None:
        """Direct mode: write the accounting gathered over ``defaults.ACCOUNT_EVERY_S``
        (at once when closing), with the deletion of answered batches' reservation
        records."""
        from . import metrics
        from .stats import add_tally, write_tally

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._closing.wait(), defaults.ACCOUNT_EVERY_S)
        tally, self._tally = self._tally, {}
        pipe = self.redis.pipeline(transaction=False)
        write_tally(pipe, self.keys, tally)
        try:
            await self._with_deletes(pipe.execute, pipe)
        except (RedisError, OSError) as exc:  # the requests are answered all the same
            if self._closing.is_set():
                log.warning("accounting of %d counter(s) not written: %s", len(tally),
                            redis_message(exc))
                return
            log.warning("accounting not written (%s); trying again with the next batch",
                        redis_message(exc))
            add_tally(self._tally, tally)
            return
        metrics.count(tally)

    async def _set_aside(self, outbox: Outbox) -> None:
        """Direct mode: discard a batch's unreadable samples and file them as dead
        letters (so asking again regenerates them)."""
        pipe = self.redis.pipeline(transaction=False)
        try:
            await outbox.queue(self.redis, pipe)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("unreadable samples not set aside: %s", redis_message(exc))

    @property
    def _keep_s(self) -> int:
        """How long a batch's reservation records must live: as long as it may ask again."""
        return int(self.request_timeout) + 60

    async def _with_deletes(self, execute: Callable[[], Awaitable[Any]], pipe: Any) -> None:
        """Run ``execute`` (which sends ``pipe``) with the deletion of answered batches'
        reservation records added to ``pipe``; they are kept for later if it fails."""
        # taken off the list before the await: sends run concurrently
        answered, self._answered = self._answered[:MAX_DELETES], self._answered[MAX_DELETES:]
        if answered:
            pipe.delete(*answered)
        try:
            await execute()
        except BaseException:
            self._answered += answered
            raise

    async def _retrying(self, send: Callable[[], Awaitable[T]], what: str, doing: str,
                        deadline: float) -> T:
        """``send()``, tried again with backoff while Redis is unreachable, until
        ``deadline``; a command Redis refuses fails at once (``RedisRefusedError``)."""
        backoff = 0.1
        while True:
            try:  # bounded: a server that stops answering (paused, partitioned) keeps
                # the connection open, and redis-py would wait for its reply forever; a
                # reply READ_TIMEOUT_S late is given up (its connection with it) and the
                # send tried again, on the current primary behind Sentinel
                left = deadline - time.monotonic()
                return await within(send(), min(left, defaults.READ_TIMEOUT_S))
            except (ResponseError, AuthenticationError) as exc:  # retrying cannot fix these
                raise refused(exc, doing) from None
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                cause = ("Redis did not answer; is it paused, overloaded or cut off?"
                         if isinstance(exc, asyncio.TimeoutError)
                         else f"{redis_message(exc)}; is Redis up?")
                if time.monotonic() + backoff >= deadline:
                    raise RedisUnavailableError(
                        f"could not {what} within request_timeout ({self.request_timeout:g} "
                        f"s): {cause}") from None
                log.warning("could not %s (%s); retrying in %.1f s", what, cause, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _fail_unserved(self, pending: list[WorkItem], replies: _Replies,
                             batch: str) -> None:
        """Fail at once the requests that no live worker can serve, and take back what
        they asked for: without a cache worker, the batch's jobs leave the queue (one
        that starts later would reserve for requests that gave up); without a batch
        worker, their claims are withdrawn (one that starts later would generate, and
        charge for, samples nobody waits for)."""
        try:
            missing = await within(self._missing_workers({it.route for it in pending}),
                                   CHECK_WAIT_S)
        except (RedisError, OSError, asyncio.TimeoutError):
            return  # Redis is away: the next re-ask will tell
        if missing:
            missing = await self._unless_registry_lost(missing)
        if missing:  # what they asked for is taken back (the jobs: if all of it fails)
            failing = [it for it in pending if it.route in missing]
            jobs = self._queued.get(batch, []) if "cache" in missing or \
                len(failing) == len(pending) else []
            await take_back(self.redis, self.keys, self.client_id, batch, jobs, failing)
        for it in pending:
            hint = missing.get("cache") or missing.get(it.route)
            if hint:
                replies.put(it.uuid, NoWorkerError(f"{hint} ({describe(it)})"))

    async def _unless_registry_lost(self, missing: dict[str, str]) -> dict[str, str]:
        """``missing`` without the routes whose registry is gone altogether although
        workers answered this client lately: Redis restarted without its data, and its
        workers register again at their next heartbeat. They are waited for up to
        ``REGISTRY_LOST_GRACE_S``; a registry that holds only stale workers is not."""
        now = time.monotonic()
        for route in list(self._lost_since):
            if route not in missing:
                del self._lost_since[route]
        if now - self._replied_at > REGISTRY_KEPT_S:  # it may have expired meanwhile
            return missing
        out = {}
        for route, hint in missing.items():
            if await self.redis.zcount(self.keys.workers(route), "-inf", "+inf"):
                out[route] = hint  # its workers stopped beating: they are gone
                continue
            since = self._lost_since.setdefault(route, now)
            if since == now:
                log.warning("no worker is registered for %s although workers answered "
                            "lately: Redis may have restarted without its data; waiting up "
                            "to %g s for its workers to register again", route,
                            REGISTRY_LOST_GRACE_S)
            if now - since >= REGISTRY_LOST_GRACE_S:
                out[route] = hint
        return out

    async def _missing_workers(self, routes: set[str]) -> dict[str, str]:
        """route (or "cache") -> what to start, for each one no live worker serves."""
        missing = {}
        # the command as this client needs it: its prefix, unless workers default to it
        prefix = "" if self.keys.prefix == defaults.prefix() else \
            f" --prefix {shlex.quote(self.keys.prefix)}"
        if not self.direct and not await alive_workers(self.redis, self.keys, "cache"):
            missing["cache"] = ("no cache worker is alive: start one with "
                                f"'cachesaver-dist worker cache{prefix}' (on this Redis)")
        for route in sorted(routes):
            if not await alive_workers(self.redis, self.keys, route):
                missing[route] = (f"no batch worker serves model {route!r}: start one with "
                                  f"'cachesaver-dist worker batch{prefix} --model "
                                  f"{shlex.quote(route)}' (on this Redis)")
        return missing

    async def _timeout_message(self, pending: list[WorkItem]) -> str:
        hints: list[str] = []
        with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
            hints = list((await within(self._missing_workers({it.route for it in pending}),
                                       CHECK_WAIT_S)).values())
        hint = "; ".join(hints) or (
            "workers are alive but did not answer: their logs say why (slow model calls: "
            "raise request_timeout; too few replicas for --wait-replicas; Redis refusing them)")
        return (f"{len(pending)} request(s) got no reply within {self.request_timeout:g} s "
                f"({hint}); samples generated meanwhile stay cached")


class _Outgoing:
    """A batch waiting to be enqueued (``again``: a re-ask); ``done`` once an enqueue
    took it, with the ``error`` that enqueue raised, if any."""

    def __init__(self, items: list[WorkItem], batch: str, again: bool) -> None:
        self.items, self.batch, self.again = items, batch, again
        self.done = False
        self.error: BaseException | None = None


class _Replies:
    """The replies of one batch as they come (request id -> reply, or the error to
    raise), and the requests to ask again at once (``ASK_AGAIN``); ``complete`` is done
    once every request has one or the other."""

    __slots__ = ("again", "complete", "got", "wanted")

    def __init__(self, wanted: int) -> None:
        self.got: dict[str, Any] = {}
        self.again: set[str] = set()
        self.wanted = wanted
        self.complete: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def put(self, request_id: str, reply: Any) -> None:
        if request_id in self.got or self.complete.done():
            return
        if type(reply) is dict and "error" in reply and reply["error"]["kind"] == ASK_AGAIN:
            self.again.add(request_id)
        else:
            self.got[request_id] = reply
        if len(self.got) + len(self.again) == self.wanted:
            self.complete.set_result(None)

    def take_again(self) -> set[str]:
        """The requests to ask again at once, taken out; the batch then waits anew."""
        again, self.again = self.again, set()
        if again and len(self.got) < self.wanted and not self.complete.cancelled():
            self.complete = asyncio.get_running_loop().create_future()
        return again


def _request_id(item: WorkItem) -> str:
    return item.request_id


def describe(item: WorkItem) -> str:
    """How messages name a request: its ``request_id``, else its place in the cache."""
    if item.request_id:
        return f"request_id {item.request_id!r}"
    return f"request without request_id, namespace {item.namespace!r}, n={item.n}"
