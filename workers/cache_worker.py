"""Cache workers: one arq job per client batch.

A job reorders its requests by ``request_id`` and reserves indices for all of them in
one script call, which also hands claimed indices to the batch workers; the replies
of the requests already complete go out at once (see ``serve_jobs``).

arq finds jobs by polling; clients also push a wake token (the job's id and its
message) to a wake-up list. The worker blocks on that list between polls and serves
the jobs it pops at once, up to ``WAKE_BATCH`` together, in one round trip whatever
their number: one script call takes the jobs (arq's claim), reserves for all their
requests, publishes their replies and finishes the jobs; the accounting goes out in a
write of its own, gathered over ``defaults.ACCOUNT_EVERY_S`` at most (a stopping worker
finishes the writes it began). arq's full poll
still runs every ``poll_delay`` and runs, with arq's own steps and retry rules, whatever
the list missed and every job started before.

A job, wake token or queue entry that cannot be read is set aside as a dead letter;
the worker never stops for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.constants import retry_key_prefix as arq_retry_prefix
from arq.worker import Worker, func
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cachesaver_dist import defaults, metrics
from cachesaver_dist.deadletters import set_aside, set_aside_key
from cachesaver_dist.errors import NotReplicatedError, ProtocolError, redis_message, refused
from cachesaver_dist.heartbeat import heartbeat_loop, retire, worker_name
from cachesaver_dist.outbox import Outbox
from cachesaver_dist.protocol import (
    ASK_AGAIN,
    CACHE_JOB,
    CacheJob,
    Keys,
    MalformedJob,
    arq_deserialize_job,
    arq_serialize,
    decode_job,
    decode_wake_token,
    job_waiters,
    waiter_id,
)
from cachesaver_dist.scripts import Reservation, reserve_jobs, script
from cachesaver_dist.stats import Tally, add_tally, write_tally
from cachesaver_dist.timeouts import within

log = logging.getLogger("cachesaver_dist.cache_worker")

CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
WAKE_BATCH = 16  # wake tokens (jobs) served together at most
# A woken job whose client's batch before it is still queued is asked again after
# AFTER_RETRY_S, doubling up to AFTER_RETRY_MAX_S, and served anyway after AFTER_WAIT_S
# (that batch was lost, or is slow).
AFTER_RETRY_S, AFTER_RETRY_MAX_S, AFTER_WAIT_S = 0.002, 0.032, 1.0
# arq's poll starts only jobs queued this long: younger ones are the wake-up list's, which
# serves a client's batches in order (the poll starts the jobs it finds all at once).
POLL_GRACE_MS = 1000
# A held-back job's predecessors read from their job keys, per round at most (the rest on
# the next rounds): one round trip each, and all served in the next reserve call.
JOBS_BEFORE_READ = 64
HEALTH_CHECK_S = 15  # arq's health-check key (arq --check) is rewritten this often
STOP_ACCOUNTING_S = 2.0  # a stopping worker waits this long for its accounting's writes


async def handle_jobs(
    redis: Any, keys: Keys, payloads: list[tuple[str, bytes | MalformedJob]],
    run_ttl_s: int = defaults.RUN_TTL_S, replicas: int = 0,
) -> int:
    """Serve client batches and send their replies; return how many requests were
    answered (see ``serve_jobs``)."""
    outbox = await serve_jobs(redis, keys, payloads, run_ttl_s, replicas)
    answered = outbox.answered
    await outbox.send(redis)
    return answered


async def serve_jobs(
    redis: Any, keys: Keys, payloads: list[tuple[str, bytes | MalformedJob]],
    run_ttl_s: int = defaults.RUN_TTL_S, replicas: int = 0, in_progress_ms: int = 60_000,
    *, waiting: set[str] | None = None, force: frozenset[str] | set[str] = frozenset(),
) -> Outbox:
    """Serve client batches, given as (arq job id, payload), with one reserve call for
    all of them; return what is left to send (in one round trip): the accounting, and
    the replies the reserve call did not publish. A job whose client's
    batch before it is still queued is not served: its id goes into ``waiting``, to be
    served later; one in ``force`` is served whatever its place.

    A job id is given for a job read from a wake token: the reserve call takes the job
    (unless arq's poll or another worker has it; ``in_progress_ms``: how long it is held,
    arq's in-progress timeout) and finishes it. ``""``: arq runs it."""
    outbox = Outbox(keys)
    jobs: list[CacheJob] = []
    for job_id, payload in payloads:
        try:
            if isinstance(payload, MalformedJob):
                raise ProtocolError(payload.reason)
            job = decode_job(payload, keys)
        except ProtocolError as exc:
            raw = payload.raw if isinstance(payload, MalformedJob) else payload
            await set_aside(redis, keys, "cache job", str(exc), raw, keys.cache_queue)
            for wid in job_waiters(raw):
                outbox.error(wid, "protocol_error", f"the request's batch could not be read "
                             f"by the cache worker ({exc}) and was set aside; ask again")
            if job_id:
                outbox.finished.append(job_id)
            continue
        items = sorted(job.items, key=lambda it: it.request_id)
        after = job.after if job_id and job_id not in force else ""
        jobs.append(CacheJob(job.client, items, job.keep_s, job.batch, job_id, after))
    # Without replicas to wait for, the reserve call publishes the replies of the woken
    # jobs itself (they leave before this worker reads the result), and their samples
    # are read here to be counted; a request with one that cannot be read gets the
    # error reply, once the sample is set aside (its client ignores the published reply
    # and waits for that). The replies of jobs arq runs, and all of them when the
    # writes must reach replicas first (``WAIT``), go out with the outbox.
    publish = not replicas
    for job, reservations in await _reserve(redis, keys, jobs, run_ttl_s, replicas, outbox,
                                            in_progress_ms, waiting, publish):
        published = publish and bool(job.job_id)
        for r in reservations:
            if r.complete:
                it = r.item
                if not (published and outbox.count(it.run, it.model_id, r.flags, r.samples,
                                                   first=r.new)):
                    outbox.reply_to(job.client, it.uuid, it.key, r.start, r.flags, r.samples,
                                    it.run, it.model_id, first=r.new)
                outbox.answered += 1
        if len(reservations) < len(job.items):  # its prompts could not be read: the rest
            reserved = {r.item.uuid for r in reservations}  # is asked again at once
            for it in job.items:
                if it.uuid not in reserved:
                    outbox.error(waiter_id(job.client, it.uuid), ASK_AGAIN,
                                 "the request's prompt could not be read (its batch's job "
                                 "is gone or unreadable, or left it out and its prompt key "
                                 "keeps none); it is asked again with it")
    log.debug("%d batch(es): %d requests answered from cache", len(payloads), outbox.answered)
    return outbox


async def _reserve(
    redis: Any, keys: Keys, jobs: list[CacheJob], run_ttl_s: int, replicas: int,
    outbox: Outbox, in_progress_ms: int, waiting: set[str] | None, publish: bool = False,
) -> list[tuple[CacheJob, list[Reservation]]]:
    """Reserve for all ``jobs`` in one call. When Redis refuses it (a key of another
    type, say), each job is tried alone, so only the batches it concerns get the error."""
    if not jobs:
        return []
    try:
        per_job = await reserve_jobs(redis, keys, jobs, run_ttl_s, replicas,
                                     in_progress_ms=in_progress_ms, waiting=waiting,
                                     publish=publish)
        return [(job, r) for job, r in zip(jobs, per_job) if r is not None]
    except NotReplicatedError as exc:  # nothing acknowledged: the clients ask again
        log.warning("%d batch(es) not answered: %s", len(jobs), exc)
        return []
    except ResponseError as exc:  # Redis refused: retrying the job would not help
        if len(jobs) > 1:
            out = []
            for job in jobs:
                out += await _reserve(redis, keys, [job], run_ttl_s, replicas, outbox,
                                      in_progress_ms, waiting, publish)
            return out
        job = jobs[0]
        message = str(refused(exc, "reserving samples"))
        log.error("%s (batch of %d from client %s)", message, len(job.items), job.client)
        for it in job.items:
            outbox.error(waiter_id(job.client, it.uuid), "redis_refused", message)
        if job.job_id:  # the script let it go; done with, as arq finishes a refused one
            outbox.finished.append(job.job_id)
        return []


async def process_batch(ctx: dict[str, Any], payload: bytes | MalformedJob) -> int:
    """The arq job function: one client batch."""
    started = time.perf_counter()
    try:
        return await handle_jobs(ctx["redis"], ctx["keys"], [("", payload)],
                                 ctx["run_ttl_s"], ctx.get("replicas", 0))
    finally:
        metrics.cache_job_done(time.perf_counter() - started)


async def _startup(ctx: dict[str, Any]) -> None:
    ctx["name"] = worker_name()
    ctx["heartbeat"] = heartbeat_loop(ctx["redis"], ctx["keys"], "cache", name=ctx["name"])


async def _shutdown(ctx: dict[str, Any]) -> None:
    """Stop beating; the worker then counts ``RESTART_GRACE_S`` more, as a batch worker."""
    if "heartbeat" in ctx:
        ctx["heartbeat"].cancel()
        await retire(ctx["redis"], ctx["keys"], ("cache",), ctx["name"])


class CacheWorker(Worker):
    """An arq worker that starts the jobs named on the wake-up list as they come, polls
    arq's queue every ``poll_delay``, and rides out Redis restarts."""

    def __init__(self, *args: Any, keys: Keys, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keys = keys
        self._blmpop = True
        # woken jobs that wait for their client's batch before them: id -> (payload, since)
        self._held_back: dict[str, tuple[bytes | MalformedJob, float]] = {}
        # the accounting of the jobs served since the last write, and when it is due
        self._tally: Tally = {}
        self._tally_due = 0.0
        self._tally_writer: asyncio.Task | None = None  # writes it when due, if no pop does
        self._tally_sends: set[asyncio.Task] = set()  # writes under way

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's ``start_jobs`` with its per-job WATCH/EXISTS/ZSCORE/MULTI claim (four
        round trips per job) done by one script call for all of them, same checks."""
        ids: list[str] = []
        for raw in job_ids:
            try:
                job_id = raw.decode()
            except UnicodeDecodeError:
                # Every worker's poll sees it: the one that removes it sets it aside.
                if await self.pool.zrem(self.queue_name, raw):
                    await set_aside(self.pool, self.keys, "queue entry", "job id is not UTF-8",
                                    raw, self.queue_name)
                continue
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                break
            self.job_counter += 1
            ids.append(job_id)
        if not ids:
            return
        try:
            scores = await script(self.pool, "claim_jobs")(
                keys=[self.queue_name, *(in_progress_key_prefix + i for i in ids)],
                args=[int(time.time() * 1000) - POLL_GRACE_MS,
                      int(self.in_progress_timeout_s * 1000), *ids])
        except BaseException:
            for _ in ids:
                self._release_sem_dec_counter_on_complete()
            raise
        for job_id, score in zip(ids, scores):
            if score is None:  # running elsewhere, finished, or deferred
                self._release_sem_dec_counter_on_complete()
                continue
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def main(self) -> None:
        # arq's main loop, with its fixed sleep replaced by a blocking pop, and Redis
        # outages waited out instead of ending the worker.
        if self._pool is None:
            raise RuntimeError("CacheWorker needs redis_pool")
        log.info("cache worker started (queue %s)", self.queue_name)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        next_poll, retry_s = 0.0, AFTER_RETRY_S
        replies: Outbox | None = None  # of the jobs just served: sent with the next pop
        while True:
            try:
                if time.monotonic() >= next_poll:
                    if replies:
                        add_tally(self._tally, replies.take_tally())
                        await replies.send(self.pool)
                    replies = None
                    await self._poll_iteration()
                    next_poll = time.monotonic() + self.poll_delay_s
                if self._held_back:  # jobs to ask again for: no blocking wait
                    tokens, replies = await self._pop_wake_tokens(None, replies), None
                    if not tokens:
                        await asyncio.sleep(retry_s)
                        retry_s = min(retry_s * 2, AFTER_RETRY_MAX_S)
                    replies = await self._serve_now(tokens)
                    continue
                retry_s = AFTER_RETRY_S
                wait_s = max(0.01, next_poll - time.monotonic())
                tokens, replies = await self._pop_wake_tokens(wait_s, replies), None
                if tokens:
                    replies = await self._serve_now(tokens)
            except CONNECTION_ERRORS as exc:
                if isinstance(exc, AuthenticationError):  # the password changed meanwhile
                    log.error("%s; trying again in 1 s", refused(exc, "the cache worker's login"))
                else:
                    log.warning("Redis unavailable (%s); trying again in 1 s", exc)
                replies = None  # the clients ask again
                await asyncio.sleep(1.0)
            except ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                await set_aside_key(self.pool, self.keys, self.keys.cache_wake, "list")

    async def _pop_wake_tokens(self, wait_s: float | None, replies: Outbox | None
                               ) -> list[bytes]:
        """Send ``replies`` and wait up to ``wait_s`` (``None``: not at all) for wake
        tokens, in one round trip; take up to ``WAKE_BATCH`` tokens at once (``BLMPOP``,
        Redis 7; one at a time with ``BRPOP`` on older servers). Redis runs the replies
        first, so they go out at once; their accounting is written once
        ``defaults.ACCOUNT_EVERY_S`` has passed since the last write (under load, several
        pops' in one write), else kept and written when due (``_send_tally``)."""
        pipe = self.pool.pipeline(transaction=False)
        if replies:
            add_tally(self._tally, replies.take_tally())
            await replies.queue(self.pool, pipe)
        if self._tally and time.monotonic() >= self._tally_due:
            self._send_tally()
        elif self._tally and (self._tally_writer is None or self._tally_writer.done()):
            self._tally_writer = asyncio.create_task(self._write_tally_when_due())
        if wait_s is None:
            if self._blmpop:
                pipe.execute_command("LMPOP", 1, self.keys.cache_wake, "RIGHT", "COUNT",
                                     WAKE_BATCH)
            else:
                pipe.rpop(self.keys.cache_wake)
        elif self._blmpop:
            pipe.execute_command("BLMPOP", round(wait_s, 3), 1, self.keys.cache_wake, "RIGHT",
                                 "COUNT", WAKE_BATCH)
        else:
            pipe.brpop([self.keys.cache_wake], timeout=wait_s)  # type: ignore[arg-type]
        # (a pipeline that fails is not sent again with its counts: they may have been
        # written, and the wait after them cut short; they are lost, not counted twice)
        *sent, popped = await pipe.execute(raise_on_error=False)
        for result in sent:
            if isinstance(result, Exception):  # the clients ask again
                log.error("replies not sent: %s", redis_message(result))
        if isinstance(popped, ResponseError) and self._blmpop and \
                "unknown command" in str(popped).lower():
            log.info("this Redis has no BLMPOP: wake tokens are taken one at a time")
            self._blmpop = False
            return []
        if isinstance(popped, Exception):
            raise popped
        if not popped:
            return []
        if not self._blmpop:
            return [popped if wait_s is None else popped[1]]
        return list(popped[1])

    async def _write_tally_when_due(self) -> None:
        """Write the accounting kept when it is due, if no pop has by then (the worker
        went idle, or waits on Redis)."""
        await asyncio.sleep(max(0.0, self._tally_due - time.monotonic()))
        if time.monotonic() < self._tally_due:  # a pop wrote meanwhile: the next is due later
            await asyncio.sleep(self._tally_due - time.monotonic())
        sending = self._send_tally()
        if sending is not None:
            await asyncio.shield(sending)

    def _send_tally(self) -> asyncio.Task | None:
        """Write the accounting kept, in a task of its own: cancelled before its command
        went out (a stop), a write would lose it."""
        tally, self._tally = self._tally, {}
        if not tally:
            return None
        self._tally_due = time.monotonic() + defaults.ACCOUNT_EVERY_S
        task = asyncio.create_task(self._write_counts(tally))
        self._tally_sends.add(task)
        task.add_done_callback(self._tally_sends.discard)
        return task

    async def _write_counts(self, tally: Tally) -> None:
        pipe = self.pool.pipeline(transaction=False)
        write_tally(pipe, self.keys, tally)
        try:
            await pipe.execute()
        except (*CONNECTION_ERRORS, ResponseError) as exc:  # (not sent again: it may be in)
            log.warning("accounting of the last hits not written: %s", redis_message(exc))
            return
        metrics.count(tally)

    async def stop_accounting(self) -> None:
        """Write the accounting kept, at once, and wait for the writes under way (the
        worker is stopping)."""
        if self._tally_writer is not None:
            self._tally_writer.cancel()
            await asyncio.gather(self._tally_writer, return_exceptions=True)
        self._send_tally()
        if self._tally_sends:
            _, late = await asyncio.wait(self._tally_sends, timeout=STOP_ACCOUNTING_S)
            for task in late:
                task.cancel()
                log.warning("accounting of the last hits not written: Redis did not answer "
                            "within %g s", STOP_ACCOUNTING_S)

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        except ResponseError as exc:  # e.g. the job key holds another type: set it aside
            await set_aside(self.pool, self.keys, "cache job", f"unreadable: {redis_message(exc)}",
                            job_id, job_key_prefix + job_id)
            await self.finish_failed_job(job_id, None)

    async def _serve_now(self, tokens: list[bytes]) -> Outbox | None:
        """``_serve_woken`` as a task of the worker's: a worker stopping mid-way gives it
        its grace (``stop_worker``) and it then sends its own replies."""
        task = self.loop.create_task(self._serve_woken(tokens))
        name = f"woken:{id(task)}"
        self.tasks[name] = task
        task.add_done_callback(lambda _: self.tasks.pop(name, None))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self.tasks[f"{name}:send"] = self.loop.create_task(self._send_when_done(task))
            raise

    async def _send_when_done(self, task: asyncio.Task) -> None:
        with contextlib.suppress(Exception):
            replies = await task
            if replies:  # its accounting goes with the stop's (stop_accounting)
                add_tally(self._tally, replies.take_tally())
                await replies.send(self.pool)

    async def _serve_woken(self, tokens: list[bytes]) -> Outbox | None:
        """Take, serve and finish the jobs the tokens carry, with one reserve call; the
        replies, for the caller to send.

        Never raises but for Redis outages: a job that could not be served stays queued
        (or keeps its in-progress key until it expires) and arq's poll runs it again; its
        reservations are idempotent."""
        now = time.monotonic()
        held_back, self._held_back = self._held_back, {}
        woken: list[tuple[str, bytes | MalformedJob]] = [
            (job_id, payload) for job_id, (payload, _) in held_back.items()]
        force = {job_id for job_id, (_, since) in held_back.items()
                 if now - since >= AFTER_WAIT_S}  # the batch before it is lost, or slow
        for token in tokens:
            try:
                woken.append(decode_wake_token(token, self.keys))
            except ProtocolError as exc:  # its job, if any, is run by arq's poll
                await set_aside(self.pool, self.keys, "wake token", str(exc), token,
                                self.keys.cache_wake)
        if not woken:
            return None
        started = time.perf_counter()
        waiting: set[str] = set()
        try:
            replies = await within(
                serve_jobs(self.pool, self.keys, woken, self.ctx["run_ttl_s"],
                           self.ctx.get("replicas", 0), int(self.in_progress_timeout_s * 1000),
                           waiting=waiting, force=force),
                defaults.JOB_TIMEOUT_S)
        except CONNECTION_ERRORS:
            raise
        except Exception as exc:  # logged: arq's poll runs the jobs again
            log.warning("%d woken job(s) not served (%s: %s); arq's poll runs them again",
                        len(woken), type(exc).__name__, redis_message(exc))
            return None
        metrics.cache_job_done(time.perf_counter() - started)
        self._held_back = await self._with_jobs_before({  # in the order they came
            job_id: (payload, held_back[job_id][1] if job_id in held_back else now)
            for job_id, payload in woken if job_id in waiting})
        return replies

    async def _with_jobs_before(self, held: dict[str, tuple[bytes | MalformedJob, float]]
                                ) -> dict[str, tuple[bytes | MalformedJob, float]]:
        """``held``, each job preceded by the jobs it waits for that no one has taken and
        this worker holds no token of, read from their job keys: their tokens were trimmed
        from the wake-up list (a client had more than the list keeps queued), so only
        arq's poll would start them, after ``POLL_GRACE_MS`` and in any order. Asked
        again first, they are served in their client's order."""
        out: dict[str, tuple[bytes | MalformedJob, float]] = {}
        budget = JOBS_BEFORE_READ
        for job_id, (payload, since) in held.items():
            chain: list[tuple[str, bytes]] = []
            after = _after(payload, self.keys)
            while after and budget > 0 and after not in out and after not in held and \
                    all(after != a for a, _ in chain):
                budget -= 1
                pipe = self.pool.pipeline(transaction=False)
                pipe.exists(in_progress_key_prefix + after)
                pipe.get(job_key_prefix + after)
                try:
                    busy, body = await pipe.execute(raise_on_error=False)
                except CONNECTION_ERRORS:  # read again at the next round
                    break
                if busy != 0 or not isinstance(body, bytes):  # taken, done, or not ours
                    break
                before = arq_deserialize_job(body)["a"][0]
                if isinstance(before, MalformedJob):  # arq's poll sets it aside
                    break
                chain.append((after, before))
                after = _after(before, self.keys)
            out.update((a, (p, since)) for a, p in reversed(chain))
            out[job_id] = (payload, since)
        return out

    # arq's finish steps without its global ``arq:abort`` set (jobs are never aborted
    # here), so a worker touches only keys of its own prefix.

    async def finish_job(self, job_id: str, finish: bool, result_data: bytes | None,
                         result_timeout_s: float | None, keep_result_forever: bool,
                         incr_score: int | None, keep_in_progress: float | None) -> None:
        async with self.pool.pipeline(transaction=True) as tr:
            delete_keys = [in_progress_key_prefix + job_id]
            if finish:
                delete_keys += [arq_retry_prefix + job_id, job_key_prefix + job_id]
                tr.zrem(self.queue_name, job_id)
            elif incr_score:
                tr.zincrby(self.queue_name, incr_score, job_id)
            tr.delete(*delete_keys)
            await tr.execute()

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        async with self.pool.pipeline(transaction=True) as tr:
            tr.delete(arq_retry_prefix + job_id, in_progress_key_prefix + job_id,
                      job_key_prefix + job_id, result_key_prefix + job_id)
            tr.zrem(self.queue_name, job_id)
            await tr.execute()


def _after(payload: bytes | MalformedJob, keys: Keys) -> str:
    """The job a cache job comes after (``""``: none, or unreadable)."""
    if isinstance(payload, MalformedJob):
        return ""
    try:
        return decode_job(payload, keys).after
    except ProtocolError:
        return ""


async def stop_worker(worker: Worker, task: asyncio.Task, grace: float = defaults.STOP_GRACE_S,
                      *, close_pool: bool = True) -> None:
    """Stop a worker within about ``grace`` seconds whatever its state: no new jobs,
    running jobs get ``grace`` to finish (an unfinished one is re-run by arq later),
    then Redis is released."""
    while not task.done():  # a cancellation lost inside a Redis read is asked again
        task.cancel()
        await asyncio.wait([task], timeout=0.5)
    await asyncio.gather(task, return_exceptions=True)
    running = [t for t in worker.tasks.values() if not t.done()]
    if running:
        _, late = await asyncio.wait(running, timeout=grace)
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    if isinstance(worker, CacheWorker):
        await worker.stop_accounting()
    if worker.on_shutdown:
        await worker.on_shutdown(worker.ctx)
    if close_pool and worker._pool is not None:
        await asyncio.wait_for(worker.pool.aclose(close_connection_pool=True), 1.0)


def cache_worker(
    keys: Keys,
    *,
    redis_pool: ArqRedis,
    poll_delay: float = defaults.POLL_DELAY_S,
    max_jobs: int = defaults.MAX_JOBS,
    run_ttl_s: int = defaults.RUN_TTL_S,
    replicas: int = 0,
) -> CacheWorker:
    """A worker for the cache queue: msgpack jobs, short job timeout, woken by clients;
    ``replicas``: how many replicas must hold a reservation before it is answered.

    Signals are not handled here: the caller runs it and stops it with ``stop_worker``.
    """
    return CacheWorker(
        keys=keys,
        functions=[func(process_batch, name=CACHE_JOB, timeout=defaults.JOB_TIMEOUT_S,
                        max_tries=5, keep_result=0)],
        queue_name=keys.cache_queue,
        redis_pool=redis_pool,
        poll_delay=poll_delay,
        max_jobs=max_jobs,
        keep_result=0,
        job_serializer=arq_serialize,
        job_deserializer=arq_deserialize_job,
        handle_signals=False,
        health_check_interval=HEALTH_CHECK_S,
        health_check_key=keys.cache_health,
        ctx={"keys": keys, "run_ttl_s": run_ttl_s, "replicas": replicas},
        on_startup=_startup,
        on_shutdown=_shutdown,
        log_results=False,
    )
