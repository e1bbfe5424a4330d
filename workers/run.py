"""How workers are started and stopped: the CLI's worker processes and in-process ones.

Every worker stops within a few seconds of SIGTERM/SIGINT, whatever it is doing
(idle, busy, Redis down). At start-up a worker that cannot reach or log in to Redis
within ``CONNECT_WAIT_S`` exits with status 1 and says why; once running, it rides
out Redis restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from cachesaver_dist import defaults, logs
from cachesaver_dist import metrics as worker_metrics
from cachesaver_dist.connection import check_reachable, connect, connection_pool, safe_url
from cachesaver_dist.errors import CacheSaverError, refused
from cachesaver_dist.protocol import Keys
from cachesaver_dist.replication import replicas_to_wait
from cachesaver_dist.retention import check_eviction_policy

from .batch_worker import BatchWorker, BatchWorkerConfig
from .cache_worker import cache_worker, stop_worker

log = logging.getLogger("cachesaver_dist.workers")

EXIT_OK, EXIT_REDIS, EXIT_USAGE = 0, 1, 2


class LocalWorkers:
    """A cache worker and a batch worker for one model, inside this process (no cache
    worker with ``with_cache_worker=False``: a direct-mode client reserves itself).

    With ``url`` they open their own connections to it, with the worker processes' read
    timeout, so they leave a primary that froze as those do; without, they share
    ``redis`` (a client the caller made), whose reads wait as long as it says."""

    def __init__(self, redis: Redis, keys: Keys, route: str, model: Any, *,
                 batch_size: int = defaults.BATCH_SIZE, concurrency: int = defaults.CONCURRENCY,
                 run_ttl_s: int = defaults.RUN_TTL_S, replicas: int = 0,
                 with_cache_worker: bool = True, url: str | None = None,
                 originals: Mapping[str, Any] | None = None) -> None:
        self._own = (connect(url, read_timeout=worker_read_timeout(defaults.POLL_DELAY_S))
                     if url else None)
        redis = self._own or redis
        self._batch = BatchWorker(redis, keys, {route: model},
                                  BatchWorkerConfig(batch_size=batch_size, concurrency=concurrency,
                                                    replicas=replicas, in_process=True),
                                  originals=originals)
        self._batch_task = asyncio.create_task(self._batch.run())
        self._cache: Any = None
        if with_cache_worker:
            pool = ArqRedis(connection_pool=redis.connection_pool)
            self._cache = cache_worker(keys, redis_pool=pool, run_ttl_s=run_ttl_s,
                                       replicas=replicas)
            self._cache_task = asyncio.create_task(self._cache.async_run())

    async def stop(self) -> None:
        """Stop both within a few seconds; a client given to them stays open."""
        try:
            self._batch.stop()
            await asyncio.gather(self._batch_task, return_exceptions=True)
            if self._cache is not None:
                await stop_worker(self._cache, self._cache_task, close_pool=False)
        finally:
            if self._own is not None:
                with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
                    await asyncio.wait_for(self._own.aclose(), 1.0)


def worker_read_timeout(poll_delay: float) -> float:
    """A worker's socket read timeout: longer than its longest blocking read (the cache
    worker's pop waits ``poll_delay``; the batch worker's stream read, 1 s)."""
    return max(defaults.READ_TIMEOUT_S, poll_delay + 10)


async def wait_reachable(url: str, stop: asyncio.Event, wait_s: float = defaults.CONNECT_WAIT_S
                         ) -> None:
    """Wait up to ``wait_s`` for Redis at ``url`` to answer (a compose stack starts
    workers and Redis together); a refused login fails at once. Returns early, without
    error, when ``stop`` is set meanwhile."""
    loop = asyncio.get_running_loop()
    deadline, said = loop.time() + wait_s, ("", 0.0)
    while True:
        try:
            await check_reachable(url)
            return
        except ConnectionError as exc:  # what check_reachable raises
            if stop.is_set():
                return
            # a refused login or command (a database that does not exist) stays refused
            if isinstance(exc.__cause__, (AuthenticationError, ResponseError)) or \
                    loop.time() >= deadline:
                raise
            if str(exc) != said[0] or loop.time() - said[1] >= 5.0:  # not every 0.5 s
                log.info("waiting for Redis at %s (%s)", safe_url(url), exc)
                said = (str(exc), loop.time())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


def serve(main: Callable[[asyncio.Event], Awaitable[int]], url: str) -> int:
    """Run a worker's ``main(stop)`` until it returns or a signal sets ``stop``."""

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await wait_reachable(url, stop)
            if stop.is_set():
                return EXIT_OK
            await check_eviction(url)
            return await main(stop)
        except (CacheSaverError, ConnectionError) as exc:
            logs.fail(f"cachesaver-dist: {exc}")
            return EXIT_REDIS

    return asyncio.run(run())


async def check_eviction(url: str) -> None:
    """At start-up: warn unless Redis's ``maxmemory-policy`` is ``noeviction`` (samples
    must never be evicted silently); a refused ``CONFIG GET`` is logged as a skipped check."""
    redis = connect(url)
    try:
        await check_eviction_policy(redis)
    except (RedisError, OSError) as exc:  # the worker's own start-up will say more
        log.warning("eviction check skipped: %s", exc)
    finally:
        await redis.aclose()


async def _first(task: asyncio.Task, stop: asyncio.Event) -> None:
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()


def serve_cache(url: str, keys: Keys, *, poll_delay: float, max_jobs: int, run_ttl_s: int,
                metrics: worker_metrics.MetricsOptions | None = None,
                replicas: int | None = 0) -> int:
    """The ``cachesaver-dist worker cache`` process (serving ``/metrics`` with ``metrics``)."""

    async def main(stop: asyncio.Event) -> int:
        exporter = await worker_metrics.start(metrics, url, keys, (), kind="cache")
        pool = ArqRedis(connection_pool=connection_pool(
            url, read_timeout=worker_read_timeout(poll_delay)))
        worker = cache_worker(keys, redis_pool=pool, poll_delay=poll_delay, max_jobs=max_jobs,
                              run_ttl_s=run_ttl_s,
                              replicas=await replicas_to_wait(pool, replicas))
        log.info("cache worker on %s (queue %s)", safe_url(url), keys.cache_queue)
        task = asyncio.create_task(worker.async_run())
        await _first(task, stop)
        failed = task.done() and not task.cancelled() and task.exception()
        await asyncio.wait_for(stop_worker(worker, task), defaults.STOP_GRACE_S + 2.0)
        if exporter is not None:
            await exporter.stop()
        if isinstance(failed, ResponseError):
            raise refused(failed, f"the cache worker (prefix {keys.prefix!r})")
        if failed:
            raise failed
        return EXIT_OK

    return serve(main, url)


def serve_batch(url: str, keys: Keys, models: Callable[[Redis], dict[str, Any]],
                config: BatchWorkerConfig,
                metrics: worker_metrics.MetricsOptions | None = None) -> int:
    """The ``cachesaver-dist worker batch`` process; ``models`` builds route -> model."""

    async def main(stop: asyncio.Event) -> int:
        redis = connect(url, read_timeout=defaults.READ_TIMEOUT_S)
        settings = dataclasses.replace(
            config, replicas=await replicas_to_wait(redis, config.replicas))
        exporter = None
        try:
            try:
                served = models(redis)
            except (ValueError, TypeError) as exc:
                logs.fail(f"cachesaver-dist: {exc}")
                return EXIT_USAGE
            exporter = await worker_metrics.start(metrics, url, keys, served, kind="batch")
            worker = BatchWorker(redis, keys, served, settings)
            log.info("batch worker on %s", safe_url(url))
            task = asyncio.create_task(worker.run())
            await _first(task, stop)
            worker.stop()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True),
                                   config.stop_grace + 1.5)
            failed = None if task.cancelled() else task.exception()
            if isinstance(failed, CacheSaverError):  # a refusal at start, say
                raise failed
            for model in served.values():
                if callable(getattr(model, "aclose", None)):
                    await asyncio.wait_for(model.aclose(), 1.0)
        finally:
            if exporter is not None:
                await exporter.stop()
            await redis.aclose()
        return EXIT_OK

    return serve(main, url)
