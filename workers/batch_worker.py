"""Batch workers: collect generation work from all clients, call the model, fill.

Work arrives on one Redis stream per route (model name), read through a consumer
group. An entry is one prompt key with the indices claimed for it. An entry that is
read but not acknowledged is leased: the worker refreshes its lease while the model
call runs; entries of a worker that died are claimed by another one once their lease
has run out, and generated again (late fills are ignored: set-if-absent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from cachesaver_dist.beacon import beacon_loop, worker_name
from cachesaver_dist.models import generate
from cachesaver_dist.protocol import CONSUMER_GROUP, Keys, decode_spec
from cachesaver_dist.scripts import fill_many, release

from .outbox import Outbox

log = logging.getLogger("cachesaver_dist.batch_worker")


@dataclass
class Work:
    """Generation work for one prompt key, merged from one or more stream entries."""

    route: str
    key: str
    fields: dict[str, Any]
    model_id: str
    indices: list[int] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)


@dataclass
class StoreBatch:
    """Results waiting to be stored together, and when they are."""

    done: asyncio.Future
    items: list[tuple[str, Work, Any]] = field(default_factory=list)


@dataclass
class BatchWorkerConfig:
    batch_size: int = 32
    batch_wait: float = 0.005
    concurrency: int = 32
    lease: float = 30.0


class BatchWorker:
    """Serves the work streams of ``models`` (route -> model object) until stopped."""

    def __init__(self, redis: Redis, keys: Keys, models: Mapping[str, Any],
                 config: BatchWorkerConfig | None = None, name: str | None = None) -> None:
        self.redis, self.keys, self.models = redis, keys, dict(models)
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

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Read, generate and fill until ``stop()``; then finish the calls in flight."""
        await self._ensure_groups()
        beacon = beacon_loop(self.redis, self.keys, *self.models)
        log.info("batch worker %s serving %s", self.name, ", ".join(self.models))
        next_upkeep = 0.0
        try:
            while not self._stop.is_set():
                try:
                    if time.monotonic() >= next_upkeep:
                        await self._upkeep()
                        next_upkeep = time.monotonic() + self.config.lease / 3
                    await self._read_once()
                except (RedisError, OSError) as exc:
                    log.warning("redis unavailable (%s); retrying in 1 s", exc)
                    await asyncio.sleep(1.0)
        finally:
            beacon.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _ensure_groups(self) -> None:
        for stream in self.streams:
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists already
                await self.redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)

    def _free(self) -> int:
        return self.config.concurrency - self._calling

    async def _read_once(self) -> None:
        free = self._free()
        if free <= 0:
            self._slot_freed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), timeout=1.0)
            return
        count = min(self.config.batch_size, free)
        block = int(min(1.0, self.config.lease / 3) * 1000)
        got = await self.redis.xreadgroup(
            CONSUMER_GROUP, self.name, dict.fromkeys(self.streams, ">"), count=count, block=block
        )
        if got and self.config.batch_wait > 0 and _size(got) < count:
            await asyncio.sleep(self.config.batch_wait)
            more = await self.redis.xreadgroup(
                CONSUMER_GROUP, self.name, dict.fromkeys(self.streams, ">"),
                count=count - _size(got),
            )
            got = list(got) + list(more or [])
        self._dispatch([(s.decode(), entries) for s, entries in got or []])

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
                self._dispatch([(stream, entries)])
                free -= len(entries)

    def _dispatch(self, got: list[tuple[str, list]]) -> None:
        by_route: dict[str, dict[str, Work]] = {}
        for stream, entries in got:
            route = self.streams[stream]
            works = by_route.setdefault(route, {})
            for entry_id, data in entries:
                if not data:  # deleted meanwhile
                    continue
                eid = entry_id.decode()
                self._inflight[stream].add(eid)
                self._calling += 1
                key = data[b"key"].decode()
                work = works.get(key)
                if work is None:
                    spec = decode_spec(data[b"spec"])
                    work = works[key] = Work(route, key, spec["fields"], spec["model_id"])
                work.indices += [int(i) for i in data[b"idx"].split(b",")]
                work.entries.append(eid)
        for route, works in by_route.items():
            # A model with request() gets one call per key, each filled as soon as it
            # returns; a batch-only model gets the whole batch in one call.
            if callable(getattr(self.models[route], "request", None)):
                groups = [[w] for w in works.values()]
            else:
                groups = [list(works.values())]
            for group in groups:
                task = asyncio.create_task(self._generate(route, group))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _generate(self, route: str, works: list[Work]) -> None:
        stream = self.keys.work_stream(route)
        for work in works:  # a fill may already cover some indices (a takeover)
            work.indices = sorted(set(work.indices))
        entries = sum(len(w.entries) for w in works)
        try:
            started = time.monotonic()
            try:
                results = await generate(self.models[route], [(w.fields, len(w.indices))
                                                              for w in works])
            finally:  # the call slot is free; the entries stay leased until acknowledged
                self._calling -= entries
                self._slot_freed.set()
            log.debug("%s: %d keys generated in %.3f s", route, len(works),
                      time.monotonic() - started)
            await self._store(stream, works, results)
        finally:
            for w in works:
                self._inflight[stream].difference_update(w.entries)

    async def _store(self, stream: str, works: list[Work], results: list[Any]) -> None:
        """Store results. Calls that return while a store is being written go together
        in the next one: under load a wave of returns costs two round trips, not two
        per call."""
        batch = self._open_store
        if batch is None:
            batch = self._open_store = StoreBatch(asyncio.get_running_loop().create_future())
            task = asyncio.create_task(self._write_when_free(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        batch.items += [(stream, work, result) for work, result in zip(works, results)]
        await asyncio.shield(batch.done)

    async def _write_when_free(self, batch: StoreBatch) -> None:
        async with self._store_lock:
            if self._open_store is batch:
                self._open_store = None
            try:
                await self._write(batch.items)
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
            else:
                filled.append((work, dict(zip(work.indices, result))))
        if filled:
            completed = await fill_many(self.redis, self.keys,
                                        [(work.key, samples) for work, samples in filled])
            for waiters in completed:
                for w in waiters:
                    outbox.reply(w.waiter_id, w.start, w.flags, w.samples, w.run, w.model_id)
        pipe = self.redis.pipeline(transaction=False)
        outbox.queue(pipe)
        by_stream: dict[str, list[str]] = {}
        for stream, work, _ in items:
            by_stream.setdefault(stream, []).extend(work.entries)
        for stream, ids in by_stream.items():
            pipe.xack(stream, CONSUMER_GROUP, *ids)
            pipe.xdel(stream, *ids)
        await pipe.execute()

    async def _fail(self, outbox: Outbox, work: Work, error: Exception) -> None:
        message = f"model {work.model_id!r} failed: {type(error).__name__}: {error}"
        log.error("%s (prompt key %s, %d samples)", message, work.key, len(work.indices))
        for w in await release(self.redis, self.keys, work.key, work.indices):
            outbox.error(w.waiter_id, "model_error", message)


def _size(got: Any) -> int:
    return sum(len(entries) for _, entries in got or [])
