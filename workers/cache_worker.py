"""Cache workers: one arq job per client batch.

A job reorders its requests by ``request_id``, reserves indices for all of them in
one script call (which also hands claimed indices to the batch workers), and
publishes every reply that is already complete.

arq finds jobs by polling; clients also push a token to a wake-up list after each
enqueue, and the worker blocks on that list between polls, so a job starts within a
round trip while an idle worker costs next to nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Worker, func

from cachesaver_dist.beacon import beacon_loop
from cachesaver_dist.protocol import CACHE_JOB, Keys, arq_deserialize, arq_serialize, decode_job
from cachesaver_dist.scripts import DEFAULT_RUN_TTL_S, WorkItem, reserve

from .outbox import Outbox

log = logging.getLogger("cachesaver_dist.cache_worker")

JOB_TIMEOUT_S = 10


async def handle_batch(
    redis: Any, keys: Keys, payload: bytes, run_ttl_s: int = DEFAULT_RUN_TTL_S
) -> int:
    """Serve one client batch; return how many requests were answered at once."""
    job = decode_job(payload)
    client = job["client"]
    items = sorted((WorkItem.from_wire(r) for r in job["requests"]), key=lambda it: it.request_id)
    reservations = await reserve(redis, keys, client, items, run_ttl_s, job["keep_s"])
    outbox = Outbox(keys)
    for r in reservations:
        if r.complete:
            it = r.item
            outbox.reply(f"{client}:{it.uuid}", r.start, r.flags, r.samples, it.run, it.model_id,
                         first=r.new)
    await outbox.send(redis)
    answered = sum(r.complete for r in reservations)
    log.debug("batch of %d from %s: %d answered from cache", len(items), client, answered)
    return answered


async def process_batch(ctx: dict[str, Any], payload: bytes) -> int:
    """The arq job function."""
    return await handle_batch(ctx["redis"], ctx["keys"], payload, ctx["run_ttl_s"])


async def _startup(ctx: dict[str, Any]) -> None:
    ctx["beacon"] = beacon_loop(ctx["redis"], ctx["keys"], "cache")


async def _shutdown(ctx: dict[str, Any]) -> None:
    if "beacon" in ctx:
        ctx["beacon"].cancel()


class CacheWorker(Worker):
    """An arq worker that waits for a wake-up token (or ``poll_delay``) between polls."""

    def __init__(self, *args: Any, wake_key: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wake_key = wake_key

    async def main(self) -> None:
        # arq's main loop, with its fixed sleep replaced by a blocking pop.
        if self._pool is None:
            raise RuntimeError("CacheWorker needs redis_pool")
        log.info("cache worker started (queue %s)", self.queue_name)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        while True:
            await self._poll_iteration()
            await self.pool.blpop([self.wake_key], timeout=self.poll_delay_s)


async def stop_worker(worker: Worker, task: asyncio.Task) -> None:
    """Stop an in-process worker: no new jobs, let running jobs finish, release Redis."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    if worker.on_shutdown:
        await worker.on_shutdown(worker.ctx)
    if worker._pool is not None:  # arq has no public way to stop without cancelling jobs
        await worker.pool.aclose(close_connection_pool=True)


def cache_worker(
    keys: Keys,
    *,
    redis_pool: ArqRedis,
    poll_delay: float = 0.5,
    max_jobs: int = 50,
    run_ttl_s: int = DEFAULT_RUN_TTL_S,
    handle_signals: bool = True,
) -> CacheWorker:
    """A worker for the cache queue: msgpack jobs, short job timeout, woken by clients."""
    return CacheWorker(
        wake_key=keys.cache_wake,
        functions=[func(process_batch, name=CACHE_JOB, timeout=JOB_TIMEOUT_S, max_tries=5,
                        keep_result=0)],
        queue_name=keys.cache_queue,
        redis_pool=redis_pool,
        poll_delay=poll_delay,
        max_jobs=max_jobs,
        keep_result=0,
        job_serializer=arq_serialize,
        job_deserializer=arq_deserialize,
        handle_signals=handle_signals,
        health_check_interval=15,
        health_check_key=f"{keys.prefix}health:cache",
        ctx={"keys": keys, "run_ttl_s": run_ttl_s},
        on_startup=_startup,
        on_shutdown=_shutdown,
        log_results=False,
    )
