"""Batch workers: collect generation work from all clients, call the model, fill.

Work arrives on one Redis stream per route (model name), read through a consumer
group. An entry is one prompt key with the indices claimed for it. An entry that is
read but not acknowledged is leased: the worker refreshes its lease while the model
call runs; entries of a worker that died are claimed by another one once their lease
has run out, and generated again (late fills are ignored: set-if-absent).

An entry that cannot be read is set aside as a dead letter and acknowledged; the
claim it names (if it names one) is released and its waiters get an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.asyncio.connection import async_timeout as timeout_scope
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from cachesaver_dist import defaults, metrics
from cachesaver_dist.errors import ModelError, NotReplicatedError, ProtocolError, refused
from cachesaver_dist.heartbeat import heartbeat_loop, retire, worker_name
from cachesaver_dist.models import Job, generate
from cachesaver_dist.outbox import Outbox
from cachesaver_dist.protocol import CONSUMER_GROUP, Keys, Spec, decode_stream_entry, entry_claim
from cachesaver_dist.scripts import fill_many, release

log = logging.getLogger("cachesaver_dist.batch_worker")

STEP_GRACE_S = 1.1
STORE_ATTEMPTS = 10


@dataclass
class Work:
    """Generation work for one prompt key, merged from one or more stream entries."""

    route: str
    key: str
    spec: Spec
    indices: list[int] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)


@dataclass
class StoreBatch:
    """Results waiting to be stored together, and when they are."""

    done: asyncio.Future
    items: list[tuple[str, Work, Any]] = field(default_factory=list)


@dataclass
class BatchWorkerConfig:
    batch_size: int = defaults.BATCH_SIZE
    batch_wait: float = defaults.BATCH_WAIT_S
    concurrency: int = defaults.CONCURRENCY
    lease: float = defaults.LEASE_S
    stop_grace: float = defaults.STOP_GRACE_S
    replicas: int | None = 0  # replicas that must hold stored samples before replies go out
    # in-process workers: whoever waits on a failed call gets its error as an exception in
    # this process, so the worker logs it at INFO, not a second time at ERROR
    in_process: bool = False


class BatchWorker:
    """Serves the work streams of ``models`` (route -> model object) until stopped."""

    def __init__(self, redis: Redis, keys: Keys, models: Mapping[str, Any],
                 config: BatchWorkerConfig | None = None, name: str | None = None, *,
                 originals: Mapping[str, Any] | None = None) -> None:
        self.redis, self.keys, self.models = redis, keys, dict(models)
        # in-process: prompt key -> a request object its caller made (see models.Job)
        self.originals = originals if originals is not None else {}
        self.config = config or BatchWorkerConfig()
        self.name = name or worker_name()
        self.streams = {keys.work_stream(route): route for route in self.models}
        # Entries read and not yet acknowledged (their leases are refreshed), and how
        # many of them are in a model call right now (what ``concurrency`` bounds).
        self._inflight: dict[str, set[str]] = {s: set() for s in self.streams}
        self._calling = 0
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._open_store: StoreBatch | None = None  # accepting results, not yet written
        self._store_lock = asyncio.Lock()
        self._next_upkeep = 0.0
        self._stopped_at = 0.0
        self._reading: asyncio.Future | None = None  # the blocking read of new entries

    def stop(self) -> None:
        """Ask ``run()`` to stop; it returns within about ``stop_grace`` seconds, at
        once when idle: a blocking read or a wait for a free call slot is cut short."""
        self._stopped_at = self._stopped_at or time.monotonic()
        self._stop.set()
        self._slot_freed.set()
        if self._reading is not None:
            self._reading.cancel()

    async def run(self) -> None:
        """Read, generate and fill until ``stop()``; then give the calls in flight
        ``stop_grace`` seconds (an unfinished one stays leased and is taken over)."""
        routes = tuple(self.models)
        heartbeat = heartbeat_loop(self.redis, self.keys, *routes, name=self.name)
        stopping = asyncio.create_task(self._stop.wait())
        log.info("batch worker %s serving %s", self.name, ", ".join(routes))
        try:
            await self._until_stopped(self._ensure_groups(), stopping)
            while not self._stop.is_set():
                await self._until_stopped(self._step(), stopping)
        finally:
            heartbeat.cancel()
            stopping.cancel()
            await self._finish()
            await retire(self.redis, self.keys, routes, self.name)

    @staticmethod
    async def _until_stopped(work: Any, stopping: asyncio.Task) -> None:
        """Run one step; on stop, let it finish for up to ``STEP_GRACE_S`` (``stop()``
        cuts a blocking read short, and entries it got are then dispatched, not left
        leased), then cancel it (Redis down: a command may wait on reconnects)."""
        step = asyncio.ensure_future(work)
        await asyncio.wait({step, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not step.done():
            await asyncio.wait({step}, timeout=STEP_GRACE_S)
        if not step.done():
            step.cancel()
        await asyncio.gather(step, return_exceptions=stopping.done())

    async def _step(self) -> None:
        try:
            if time.monotonic() >= self._next_upkeep:
                await self._upkeep()
                self._next_upkeep = time.monotonic() + self.config.lease / 3
            await self._read_once()
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # a stream was deleted: make it again
                await self._ensure_groups()
                return
            log.error("%s; trying again in 1 s", refused(exc, "reading work"))
            await asyncio.sleep(1.0)
        except AuthenticationError as exc:  # the password changed under a running worker
            log.error("%s; trying again in 1 s", refused(exc, "the batch worker's login"))
            await asyncio.sleep(1.0)
        except (RedisError, OSError) as exc:
            log.warning("Redis unavailable (%s); trying again in 1 s", exc)
            await asyncio.sleep(1.0)

    async def _finish(self) -> None:
        if not self._tasks:
            return
        spent = time.monotonic() - self._stopped_at if self._stopped_at else 0.0
        _, late = await asyncio.wait(list(self._tasks),
                                     timeout=max(0.5, self.config.stop_grace - spent))
        for task in late:
            task.cancel()
        if late:
            log.warning("stopped with %d model call(s) unfinished: their work stays leased "
                        "and is taken over", len(late))
            await asyncio.gather(*late, return_exceptions=True)

    async def _ensure_groups(self) -> None:
        """Create the work streams' consumer groups where missing. A refusal (ACL rules
        that do not cover this prefix, a read-only replica) is raised: asking again would
        not help."""
        while True:
            try:
                for stream in self.streams:
                    try:
                        await self.redis.xgroup_create(stream, CONSUMER_GROUP, id="0",
                                                       mkstream=True)
                    except ResponseError as exc:
                        if "BUSYGROUP" not in str(exc):  # BUSYGROUP: it exists already
                            raise refused(exc, f"the batch worker (prefix {self.keys.prefix!r}, "
                                               f"stream {stream})") from None
                return
            except (RedisError, OSError) as exc:
                log.warning("Redis unavailable (%s); trying again in 1 s", exc)
                await asyncio.sleep(1.0)

    def _free(self) -> int:
        return self.config.concurrency - self._calling

    async def _read_once(self) -> None:
        free = self._free()
        if free <= 0:
            self._slot_freed.clear()
            # a timeout scope of this task: wait_for (Python < 3.12) can lose the
            # cancellation that ends this worker's loop
            with contextlib.suppress(asyncio.TimeoutError):
                async with timeout_scope(1.0):
                    await self._slot_freed.wait()
            return
        count = min(self.config.batch_size, free)
        got = await self._read_new(count)
        if got and self.config.batch_wait > 0 and _size(got) < count and \
                not self._stop.is_set():
            await asyncio.sleep(self.config.batch_wait)
            more = await self.redis.xreadgroup(
                CONSUMER_GROUP, self.name, dict.fromkeys(self.streams, ">"),
                count=count - _size(got),
            )
            got = list(got) + list(more or [])
        await self._dispatch([(s.decode(), entries) for s, entries in got or []])

    async def _read_new(self, count: int) -> Any:
        """Wait up to a second for new entries; ``stop()`` cuts the wait short."""
        if self._stop.is_set():
            return None
        block = int(min(1.0, self.config.lease / 3) * 1000)
        read = asyncio.ensure_future(self.redis.xreadgroup(
            CONSUMER_GROUP, self.name, dict.fromkeys(self.streams, ">"), count=count, block=block
        ))
        self._reading = read
        try:
            await asyncio.wait({read})
        finally:
            self._reading = None
            read.cancel()  # done: no effect; else this task is being cancelled
        if read.cancelled():
            return await self._read_back()
        return read.result()

    async def _read_back(self) -> Any:
        """After a read cut short by ``stop()``: the entries Redis handed it before the
        connection closed (it adds them to this consumer's pending list as it sends
        them), read back from that list so they are dispatched, not left leased."""
        try:
            async with timeout_scope(1.0):
                got = await self.redis.xreadgroup(
                    CONSUMER_GROUP, self.name, dict.fromkeys(self.streams, "0"))
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.warning("pending entries not read back on stop (%s): they stay leased and "
                        "are taken over", str(exc) or type(exc).__name__)
            return None
        return [(stream, [(eid, data) for eid, data in entries
                          if eid.decode() not in self._inflight[stream.decode()]])
                for stream, entries in got or []]

    async def _upkeep(self) -> None:
        """Refresh our leases, take over expired ones of dead workers."""
        lease_ms = int(self.config.lease * 1000)
        for stream, ids in self._inflight.items():
            if ids:
                await self.redis.xclaim(stream, CONSUMER_GROUP, self.name, 0, list(ids),
                                        justid=True)
        free = self._free()
        for stream in self.streams:
            if free <= 0:
                return
            _, entries, _ = await self.redis.xautoclaim(
                stream, CONSUMER_GROUP, self.name, lease_ms, "0-0", count=free
            )
            if entries:
                log.warning("took over %d expired work entries on %s", len(entries), stream)
                await self._dispatch([(stream, entries)])
                free -= len(entries)

    async def _dispatch(self, got: list[tuple[str, list]]) -> None:
        by_route: dict[str, dict[str, Work]] = {}
        poison: list[tuple[str, str, dict[bytes, bytes], ProtocolError]] = []
        for stream, entries in got:
            route = self.streams[stream]
            works = by_route.setdefault(route, {})
            for entry_id, data in entries:
                if not data:  # deleted meanwhile
                    continue
                eid = entry_id.decode()
                try:
                    entry = decode_stream_entry(data, route)
                except ProtocolError as exc:
                    poison.append((stream, eid, data, exc))
                    continue
                self._inflight[stream].add(eid)
                self._calling += 1
                work = works.get(entry.key)
                if work is None:
                    work = works[entry.key] = Work(route, entry.key, entry.spec)
                work.indices += entry.indices
                work.entries.append(eid)
        for route, works in by_route.items():
            # A model with request() gets one call per key, each filled as soon as it
            # returns; a batch-only model gets the whole batch in one call.
            if callable(getattr(self.models[route], "request", None)):
                groups = [[w] for w in works.values()]
            else:
                groups = [list(works.values())]
            for group in groups:
                if group:
                    self._spawn(self._generate(route, group))
        if poison:
            await self._set_aside(poison)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_aside(self, poison: list[tuple[str, str, dict[bytes, bytes], ProtocolError]]
                         ) -> None:
        """Dead-letter unreadable entries, release the claims they name, tell waiters."""
        outbox = Outbox(self.keys)
        for stream, eid, data, exc in poison:
            outbox.dead.append(("work stream entry", str(exc),
                                msgpack.packb(data, use_bin_type=True), f"{stream}/{eid}"))
            claim = entry_claim(data)
            if claim is not None:
                waiters, bad = await release(self.redis, self.keys, *claim)
                outbox.malformed_waiters(bad)
                for w in waiters:
                    outbox.error(w.waiter_id, "protocol_error",
                                 f"the work for this request could not be read ({exc}); it "
                                 "was set aside and its claim released: ask again")

        def ack(pipe: Any) -> None:
            for stream, eid, _, _ in poison:
                pipe.xack(stream, CONSUMER_GROUP, eid)
                pipe.xdel(stream, eid)

        await outbox.send(self.redis, also=ack)

    async def _generate(self, route: str, works: list[Work]) -> None:
        stream = self.keys.work_stream(route)
        for work in works:  # a fill may already cover some indices (a takeover)
            work.indices = sorted(set(work.indices))
        entries = sum(len(w.entries) for w in works)
        try:
            started = time.monotonic()
            try:
                results = await self._call(self.models[route], works)
            except Exception as exc:  # a failure of the call itself: its requests fail
                log.exception("%s: the model call failed", route)  # (their claims released)
                results = [ModelError(f"the model call failed: {type(exc).__name__}: {exc}")
                           ] * len(works)
            finally:  # the call slot is free; the entries stay leased until acknowledged
                self._calling -= entries
                self._slot_freed.set()
                metrics.model_call_done(route, time.monotonic() - started)
            log.debug("%s: %d keys generated in %.3f s", route, len(works),
                      time.monotonic() - started)
            await self._store(stream, works, results)
        finally:
            for w in works:
                self._inflight[stream].difference_update(w.entries)

    async def _call(self, model: Any, works: list[Work]) -> list[Any]:
        """The model's results for ``works``. A model may refuse work of a model id it
        does not make (``refuses(model_id)``: a drop-in client on another base URL):
        that work fails, its keys are not filled."""
        refuses = getattr(model, "refuses", None)
        problems = [refuses(w.spec.model_id) if callable(refuses) else None for w in works]
        ours = [w for w, problem in zip(works, problems) if problem is None]
        made = iter(await generate(model, [
            Job(w.spec.fields, w.indices, w.spec.namespace, w.spec.request_id,
                self.originals.get(w.key)) for w in ours]) if ours else [])
        return [next(made) if problem is None else ModelError(problem) for problem in problems]

    async def _store(self, stream: str, works: list[Work], results: list[Any]) -> None:
        """Store results. Calls that return while a store is being written go together
        in the next one: under load a wave of returns costs two round trips, not two
        per call."""
        batch = self._open_store
        if batch is None:
            batch = self._open_store = StoreBatch(asyncio.get_running_loop().create_future())
            self._spawn(self._write_when_free(batch))
        batch.items += [(stream, work, result) for work, result in zip(works, results)]
        await asyncio.shield(batch.done)

    async def _write_when_free(self, batch: StoreBatch) -> None:
        async with self._store_lock:
            if self._open_store is batch:
                self._open_store = None
            try:
                for attempt in range(STORE_ATTEMPTS):
                    try:
                        await self._write(batch.items)
                        break
                    except NotReplicatedError as exc:  # a failover: store again (idempotent)
                        log.warning("%s (attempt %d of %d)", exc, attempt + 1, STORE_ATTEMPTS)
                        if attempt == STORE_ATTEMPTS - 1:
                            raise
                        await asyncio.sleep(0.5)
            except ResponseError as exc:
                log.error("%s; the entries stay leased and will be generated again",
                          refused(exc, "storing samples"))
            except (RedisError, OSError) as exc:
                log.warning("could not store results (%s); the entries stay leased and "
                            "will be generated again", exc)
            except Exception:
                log.exception("storing results failed; the entries stay leased")
            finally:
                batch.done.set_result(None)

    async def _write(self, items: list[tuple[str, Work, Any]]) -> None:
        """Fill every key in one script call, then send the replies and acknowledge
        the entries in one pipeline (replies first)."""
        outbox = Outbox(self.keys)
        filled = []
        for _, work, result in items:
            if isinstance(result, Exception):
                await self._fail(outbox, work, result)
            elif len(result) != len(work.indices):  # acknowledged so, the rest never fills
                await self._fail(outbox, work, ModelError(
                    f"{len(result)} samples came back for {len(work.indices)} indices"))
            else:
                filled.append((work, dict(zip(work.indices, result))))
        if filled:
            fills = [(work.key, samples) for work, samples in filled]
            completed, bad = await fill_many(self.redis, self.keys, fills,
                                             replicas=self.config.replicas or 0)
            outbox.malformed_waiters(bad)
            for (work, _), waiters in zip(filled, completed):
                for w in waiters:
                    outbox.reply(w.waiter_id, work.key, w.start, w.flags, w.samples, w.run,
                                 w.model_id)

        def ack(pipe: Any) -> None:
            by_stream: dict[str, list[str]] = {}
            for stream, work, _ in items:
                by_stream.setdefault(stream, []).extend(work.entries)
            for stream, ids in by_stream.items():
                pipe.xack(stream, CONSUMER_GROUP, *ids)
                pipe.xdel(stream, *ids)

        await outbox.send(self.redis, also=ack)

    async def _fail(self, outbox: Outbox, work: Work, error: Exception) -> None:
        message = f"model {work.spec.model_id!r} failed: {type(error).__name__}: {error}"
        log.log(logging.INFO if self.config.in_process else logging.ERROR,
                "%s (prompt key %s, %d samples)", message, work.key, len(work.indices))
        metrics.model_failed(work.route)
        waiters, bad = await release(self.redis, self.keys, work.key, work.indices)
        outbox.malformed_waiters(bad)
        for w in waiters:
            outbox.error(w.waiter_id, "model_error", message)


def _size(got: Any) -> int:
    return sum(len(entries) for _, entries in got or [])
