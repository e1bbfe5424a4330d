"""``OnlineAPI``: the pipeline users call, as in the single-process CacheSaver."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import Redis

from .client import CacheClient
from .connection import check_reachable, connect
from .errors import CacheSaverError
from .models import check_model, model_identity
from .prepare import DEFAULT_MAX_PROMPT_BYTES, check_run, prepare
from .protocol import CACHED, DEFAULT_PREFIX, DUPLICATED, Keys, decode_sample
from .scripts import DEFAULT_RUN_TTL_S, WorkItem
from .server import EmbeddedServer, resolve_redis_url
from .typedefs import Batch, Request, Response

log = logging.getLogger("cachesaver_dist")


class OnlineAPI:
    """A cached, deduplicated, batched pipeline in front of a model.

    ``model`` is a model object (cache and batch workers then run in this process,
    with the same code as the worker pool) or the name of a model the worker pool
    serves. ``cache`` is a Redis URL, a ``redis.asyncio.Redis``, or ``None``
    (``REDIS_URL``, else a private server persisting to ``data_dir``). Concurrent
    ``request()`` calls are sent together: at once when no batch is in flight, else
    after up to ``timeout`` seconds or when ``batch_size`` requests are waiting. ``run`` scopes the
    namespace counters (``None``: a fresh run, so samples are re-read from index 0).
    """

    def __init__(
        self,
        model: Any,
        cache: Any = None,
        batch_size: int = 32,
        timeout: float = 0.005,
        run: str | None = None,
        model_id: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        data_dir: str | Path = ".cachesaver",
        reply_timeout: float = 2.0,
        request_timeout: float = 600.0,
        concurrency: int = 32,
        max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
        run_ttl_s: int = DEFAULT_RUN_TTL_S,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(model, str):
            self.route, self.model_id, self._model = model, model_id or model, None
        else:
            check_model(model, type(model).__name__)
            self.model_id = model_id or model_identity(model)
            self.route, self._model = f"inproc:{self.model_id}", model
        self.run = check_run(run) if run is not None else f"run-{uuid.uuid4().hex[:12]}"
        self.batch_size, self.timeout = batch_size, timeout
        self.keys = Keys(prefix)
        self._cache, self._data_dir = cache, Path(data_dir)
        self._reply_timeout, self._request_timeout = reply_timeout, request_timeout
        self._concurrency, self._max_prompt_bytes = concurrency, max_prompt_bytes
        self._run_ttl_s = run_ttl_s
        self._started: asyncio.Task | None = None
        self._server: EmbeddedServer | None = None
        self._redis: Redis | None = None
        self._client: CacheClient | None = None
        self._background: list[tuple[Any, asyncio.Task]] = []
        self._pending: list[tuple[WorkItem, asyncio.Future]] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task] = set()
        self._batches_in_flight = 0

    # --- life cycle -------------------------------------------------------------------

    async def __aenter__(self) -> OnlineAPI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect (and start in-process workers); called on first use if not before."""
        if self._started is None:
            self._started = asyncio.create_task(self._start())
        if not self._started.done():
            await asyncio.shield(self._started)
        self._started.result()  # raises what start-up raised

    async def _start(self) -> None:
        self._redis = await self._open_redis()
        self._client = CacheClient(self._redis, self.keys, reply_timeout=self._reply_timeout,
                                   request_timeout=self._request_timeout)
        await self._client.start()
        if self._model is not None:
            self._start_local_workers()

    async def _open_redis(self) -> Redis:
        cache = self._cache
        if isinstance(cache, Redis):
            if cache.connection_pool.connection_kwargs.get("decode_responses"):
                raise CacheSaverError("the Redis client decodes responses; create it with "
                                      "decode_responses=False (samples are binary msgpack)")
            return cache
        if cache is not None and not isinstance(cache, str):
            directory = getattr(cache, "directory", None)
            if directory is None:
                raise TypeError(f"cache must be a Redis URL, a redis.asyncio.Redis or None, "
                                f"got {type(cache).__name__}")
            # A diskcache.Cache from single-process code: keep its folder as the data home.
            self._data_dir, cache = Path(directory) / "cachesaver-redis", None
        url, self._server = await asyncio.to_thread(resolve_redis_url, cache, self._data_dir)
        await check_reachable(url)
        return connect(url)

    def _start_local_workers(self) -> None:
        from workers.batch_worker import BatchWorker, BatchWorkerConfig
        from workers.cache_worker import cache_worker

        pool = self._redis.connection_pool
        arq_pool = ArqRedis(pool.__class__(connection_class=pool.connection_class,
                                           **pool.connection_kwargs))
        cw = cache_worker(self.keys, redis_pool=arq_pool, run_ttl_s=self._run_ttl_s,
                          handle_signals=False)
        bw = BatchWorker(self._redis, self.keys, {self.route: self._model},
                         BatchWorkerConfig(batch_size=self.batch_size,
                                           concurrency=self._concurrency))
        self._background = [(cw, asyncio.create_task(cw.async_run())),
                            (bw, asyncio.create_task(bw.run()))]

    async def close(self) -> None:
        """Finish pending requests, stop in-process workers, release connections."""
        if self._started is None:
            return
        with contextlib.suppress(Exception):
            await self._started
        self._flush()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self._background:
            from workers.cache_worker import stop_worker

            (cw, cw_task), (bw, bw_task) = self._background
            bw.stop()
            await asyncio.gather(bw_task, return_exceptions=True)
            await stop_worker(cw, cw_task)
        self._background = []
        if self._client:
            await self._client.close()
        if self._redis is not None and self._redis is not self._cache:
            await self._redis.aclose()
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
        self._started = None

    # --- requests ---------------------------------------------------------------------

    def _prepare(self, request: Request) -> WorkItem:
        return prepare(request, run=self.run, route=self.route, model_id=self.model_id,
                       max_prompt_bytes=self._max_prompt_bytes)

    async def request(self, request: Request) -> Response:
        """Samples for one request; concurrent calls are sent together in batches."""
        item = self._prepare(request)
        await self.start()
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self.batch_size:
            self._flush()
        elif self._flush_timer is None:
            # Idle: send at the next loop turn (requests made together still share a
            # batch). Busy: wait up to ``timeout`` for the batch to fill.
            delay = self.timeout if self._batches_in_flight else 0
            self._flush_timer = asyncio.get_running_loop().call_later(delay, self._flush)
        return _response(await future)

    async def batch_request(self, batch: Batch) -> list[Response]:
        """Samples for every request of ``batch``, served in ``request_id`` order."""
        items = [self._prepare(r) for r in batch.requests]  # refuse before sending any
        if not items:
            return []
        await self.start()
        replies = await self._client.submit(items)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [_response(reply) for reply in replies]

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        task = asyncio.create_task(self._send(pending))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _send(self, pending: list[tuple[WorkItem, asyncio.Future]]) -> None:
        self._batches_in_flight += 1
        try:
            replies = await self._client.submit([item for item, _ in pending])
        except BaseException as exc:
            for _, fut in pending:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._batches_in_flight -= 1
        for (_, fut), reply in zip(pending, replies):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)


def _response(reply: dict[str, Any]) -> Response:
    samples = [decode_sample(raw) for raw in reply["samples"]]
    flags = reply["flags"]
    return Response(
        data=[s["data"] for s in samples],
        cached=[f == CACHED for f in flags],
        duplicated=[f == DUPLICATED for f in flags],
        metadata=[{"index": reply["start"] + i, **{k: v for k, v in s.items()
                                                   if k not in ("v", "data")}}
                  for i, s in enumerate(samples)],
    )
