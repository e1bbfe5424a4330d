"""Cache workers: one arq job per client batch.

A job reorders its requests by ``request_id``, reserves indices for all of them in
one script call (which also hands claimed indices to the batch workers), and
publishes every reply that is already complete.

arq finds jobs by polling; clients also push each job's id to a wake-up list, and the
worker blocks on that list between polls and starts the job it pops at once, so a job
starts within a round trip while an idle worker costs next to nothing. arq's full poll
still runs every ``poll_delay`` and picks up whatever the list missed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import Worker, func

from cachesaver_dist.beacon import beacon_loop
from cachesaver_dist.protocol import CACHE_JOB, Keys, arq_deserialize, arq_serialize, decode_job
from cachesaver_dist.scripts import DEFAULT_RUN_TTL_S, WorkItem, reserve

from .outbox import Outbox

log = logging.getLogger("cachesaver_dist.cache_worker")

JOB_TIMEOUT_S = 10
LEGACY_WAKE_TOKEN = b"1"  # what clients before job-id tokens pushed
CLAIM_JOBS_LUA = (Path(__file__).parent / "claim_jobs.lua").read_text()


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
    """An arq worker that starts the jobs named on the wake-up list as they come, and
    polls arq's queue every ``poll_delay``."""

    def __init__(self, *args: Any, wake_key: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wake_key = wake_key
        self._claim_jobs: Any = None

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's ``start_jobs`` with its per-job WATCH/EXISTS/ZSCORE/MULTI claim (four
        round trips per job) done by one script call for all of them, same checks."""
        ids: list[str] = []
        for job_id in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                break
            self.job_counter += 1
            ids.append(job_id.decode())
        if not ids:
            return
        if self._claim_jobs is None:
            self._claim_jobs = self.pool.register_script(CLAIM_JOBS_LUA)
        try:
            scores = await self._claim_jobs(
                keys=[self.queue_name, *(in_progress_key_prefix + i for i in ids)],
                args=[int(time.time() * 1000), int(self.in_progress_timeout_s * 1000), *ids])
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
        # arq's main loop, with its fixed sleep replaced by a blocking pop.
        if self._pool is None:
            raise RuntimeError("CacheWorker needs redis_pool")
        log.info("cache worker started (queue %s)", self.queue_name)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        next_poll = 0.0
        while True:
            if time.monotonic() >= next_poll:
                await self._poll_iteration()
                next_poll = time.monotonic() + self.poll_delay_s
            popped = await self.pool.brpop([self.wake_key], timeout=self.poll_delay_s)
            if popped and popped[1] == LEGACY_WAKE_TOKEN:
                next_poll = 0.0  # from a client of an earlier version: poll the queue
            elif popped:
                # Not started when arq's poll or another worker got there first: fine.
                await self.start_jobs([popped[1]])


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
