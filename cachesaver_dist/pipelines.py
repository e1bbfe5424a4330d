"""``OnlineAPI``: the pipeline users call, as in the single-process CacheSaver."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from . import defaults
from .client import CacheClient
from .connection import check_reachable, connect
from .errors import CacheSaverError, InvalidRequestError, ProtocolError
from .forksafe import ForkSafeLock
from .models import LocalCalls, check_model, model_identity, model_name_problem
from .prepare import check_run, check_text, prepare
from .protocol import CACHED, DUPLICATED, GENERATED, MAX_ID_CHARS, Keys, WorkItem
from .replication import replicas_to_wait
from .samples import read_sample
from .server import EmbeddedServer, resolve_redis_url
from .typedefs import Batch, Request, Response

log = logging.getLogger("cachesaver_dist")


def check_counts(**counts: Any) -> None:
    """``InvalidRequestError`` naming the first of ``counts`` that is not a positive int."""
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequestError(f"{name} must be a positive int, got {value!r}")


def check_seconds(**durations: Any) -> None:
    """``InvalidRequestError`` naming the first of ``durations`` that is not a number of
    seconds >= 0."""
    for name, seconds in durations.items():
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or \
                not 0 <= seconds < 1e7:
            raise InvalidRequestError(f"{name} must be a number of seconds >= 0, got "
                                      f"{seconds!r}")


# route -> (prompt key -> a request made for it, prompt key -> requests holding it): the
# requests in-process models get, shared by the pipelines of one route (OnlineAPI._held)
_HELD: dict[str, tuple[dict[str, Request], dict[str, int]]] = {}
_HELD_LOCK = ForkSafeLock()  # (pipelines of several threads' loops)


class OnlineAPI:
    """A cached, deduplicated, batched pipeline in front of a model.

    ``model`` is a model object (cache and batch workers then run in this process,
    with the same code as the worker pool) or the name of a model the worker pool
    serves. ``cache`` is a Redis URL, a ``redis.asyncio.Redis``, or ``None``
    (``REDIS_URL``, else a private server persisting to ``data_dir``). ``prefix`` and
    ``data_dir`` default to ``CACHESAVER_PREFIX`` and ``CACHESAVER_DATA_DIR``, as in
    the CLI. Concurrent ``request()`` calls are sent together, as in the original: a
    batch goes when ``batch_size`` requests wait or ``timeout`` seconds after its first
    one, so requests that arrive within that window are ordered by ``request_id``
    whatever their arrival order. ``eager=True``: a request made while no batch is in
    flight goes at the next loop turn instead (lower latency for lone requests; requests
    a few ms apart may then fall into different batches, ordered by arrival; the drop-in
    clients work so). ``run`` scopes the namespace counters (``None``: a fresh run, so
    samples are re-read from index 0).

    As in the original CacheSaver: ``hash`` (a callable ``Request -> str``) replaces the
    prompt key (see ``prepare.prompt_key_of``); ``allow_batch_overflow`` is accepted and
    changes nothing (a batch never waits for more than ``batch_size`` requests, and
    ``batch_request`` sends its batch whole); ``correctness=True`` is refused;
    ``cleanup()`` is ``close()``. ``model_batch_size``: requests per model call of an
    in-process batch-only model (default ``batch_size``).

    ``manifest=True``: the run keeps a manifest, the index range each request (with a
    ``request_id``) got per namespace, written atomically with its reservation.
    ``replay=RUN``: serve exactly the samples run ``RUN`` recorded to the same request ids
    (same namespace, prompt and ``n``), read straight from Redis: no worker is needed and
    nothing is generated; any other request fails with ``ReplayError``.

    ``direct=True`` (opt in; default ``CACHESAVER_DIRECT``, else off): this process runs
    the cache workers' reserve step itself,
    one Redis round trip per batch, so hits need no cache worker (misses still go to the
    batch workers). Same script, order and results; it costs this process the work a
    cache worker would do; under ACLs it needs the direct-client user
    (``docs/acl.md``). Worth it when most requests are hits (``docs/scaling.md``).

    ``wait_replicas``: with in-process workers or ``direct=True``, how many replicas must
    hold each reservation and store before it is answered, as the workers'
    ``--wait-replicas`` (default ``CACHESAVER_WAIT_REPLICAS``, else decided behind
    Sentinel as the workers decide). A direct client needs the cache workers' setting.
    """

    def __init__(
        self,
        model: Any,
        cache: Any = None,
        batch_size: int = defaults.BATCH_SIZE,
        hash: Callable[[Request], Any] | None = None,
        timeout: float | None = defaults.BATCH_TIMEOUT_S,
        allow_batch_overflow: bool = False,
        correctness: bool = False,
        *,
        run: str | None = None,
        model_id: str | None = None,
        model_batch_size: int | None = None,
        prefix: str | None = None,
        data_dir: str | Path | None = None,
        reply_timeout: float = defaults.REPLY_TIMEOUT_S,
        request_timeout: float = defaults.REQUEST_TIMEOUT_S,
        concurrency: int = defaults.CONCURRENCY,
        max_prompt_bytes: int = defaults.MAX_PROMPT_BYTES,
        run_ttl_s: int = defaults.RUN_TTL_S,
        manifest: bool = False,
        replay: str | None = None,
        direct: bool | None = None,
        wait_replicas: int | None = None,
        eager: bool = False,
    ) -> None:
        if correctness:
            raise InvalidRequestError(
                "correctness=True has no meaning here: every request gets samples of its own "
                "in its namespace, whatever its request_id; drop the argument")
        if hash is not None and not callable(hash):
            raise InvalidRequestError(f"hash must be a callable Request -> str, got "
                                      f"{type(hash).__name__}")
        if timeout is None or (isinstance(timeout, (int, float)) and timeout < 0):
            timeout = 0.0  # the original's wrappers pass None or -1 for "do not wait"
        model_batch_size = batch_size if model_batch_size is None else model_batch_size
        check_counts(batch_size=batch_size, concurrency=concurrency,
                     model_batch_size=model_batch_size, max_prompt_bytes=max_prompt_bytes,
                     run_ttl_s=run_ttl_s)
        if run_ttl_s > defaults.MAX_SECONDS:
            raise InvalidRequestError(f"run_ttl_s must be at most {defaults.MAX_SECONDS} "
                                      f"seconds (10 years), got {run_ttl_s!r}")
        if wait_replicas is not None and (not isinstance(wait_replicas, int) or
                                          isinstance(wait_replicas, bool) or wait_replicas < 0):
            raise InvalidRequestError(f"wait_replicas must be an int >= 0 or None, got "
                                      f"{wait_replicas!r}")
        self._wait_replicas = wait_replicas
        check_seconds(timeout=timeout, reply_timeout=reply_timeout,
                      request_timeout=request_timeout)
        if isinstance(model, str):
            check_text(model, "model")
            problem = model_name_problem(model)
            if problem:  # refused here: its work would wait for a worker that cannot exist
                raise InvalidRequestError(f"{problem}, so no batch worker can serve it")
            self.route, self.model_id, self._model = model, model_id or model, None
        else:
            check_model(model, type(model).__name__)
            self.model_id = model_id or model_identity(model)
            kind = model.route_kind if isinstance(model, LocalCalls) else "inproc"
            self.route, self._model = f"{kind}:{self.model_id}", model
        check_text(self.model_id, "model_id")
        # Workers read the route and model id of every request as ids of at most
        # MAX_ID_CHARS: a longer one would set every batch of this pipeline aside.
        if len(self.route) > MAX_ID_CHARS:
            local = self._model is not None
            what = "model_id" if local else "model name"
            spare = len(self.route) - len(self.model_id) if local else 0
            raise InvalidRequestError(f"{what} has {len(self.route) - spare} characters; use "
                                      f"at most {MAX_ID_CHARS - spare}")
        if len(self.model_id) > MAX_ID_CHARS:
            raise InvalidRequestError(f"model_id has {len(self.model_id)} characters; use at "
                                      f"most {MAX_ID_CHARS}")
        if replay is not None and direct:
            raise InvalidRequestError("replay=RUN reads the recorded samples itself: drop "
                                      "direct=True")
        if direct is None and replay is None:
            try:
                direct = defaults.direct()
            except ValueError as exc:
                raise InvalidRequestError(str(exc)) from None
        if replay is not None:
            check_run(replay)
            if manifest or (run is not None and run != replay):
                raise InvalidRequestError("replay=RUN serves a recorded run: it takes no "
                                          "manifest=True and no other run=")
            run = replay
        self.replay, self.manifest, self.direct = replay, bool(manifest), bool(direct)
        self.run = check_run(run) if run is not None else f"run-{uuid.uuid4().hex[:12]}"
        self.batch_size, self.timeout, self.eager = batch_size, timeout, bool(eager)
        self.allow_batch_overflow = allow_batch_overflow  # no effect: see the class docstring
        self._hash, self._model_batch_size = hash, model_batch_size
        self.keys = Keys(check_text(prefix if prefix is not None else defaults.prefix(),
                                    "prefix"))
        self._cache = cache
        # A diskcache.Cache: its samples are imported before requests reserve (migrate.py).
        self._folder, self._originals = None, dict[str, Request]()
        if cache is not None and not isinstance(cache, (str, Redis)):
            from . import migrate

            self._folder = migrate.folder_of(cache)
        self._data_dir = Path(data_dir if data_dir is not None else defaults.data_dir())
        self._reply_timeout, self._request_timeout = reply_timeout, request_timeout
        self._concurrency, self._max_prompt_bytes = concurrency, max_prompt_bytes
        self._run_ttl_s = run_ttl_s
        self._started: asyncio.Task | None = None
        self._server: EmbeddedServer | None = None
        self._redis: Redis | None = None
        self._client: CacheClient | Any = None  # Any: a runs.Replayer
        self._local: Any = None  # workers.run.LocalWorkers
        self._url: str | None = None  # set when this object opened the connection
        try:
            self._replicas = wait_replicas if wait_replicas is not None else \
                defaults.wait_replicas(None)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        self._pending: list[tuple[WorkItem, asyncio.Future[Response]]] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task] = set()  # batches sent: close() waits for them
        # A model object: prompt key -> a request made for it (the model gets a copy of
        # it: models.Job.original), and how many requests wait on it. Shared by the
        # pipelines of this process that serve the same route: the batch worker of any of
        # them may take another's work from the route's stream.
        held, self._holds = _HELD.setdefault(self.route, ({}, {}))
        self._held: dict[str, Request] | None = None if self._model is None else held
        self._batches_in_flight = 0
        self._starting = 0  # calls waiting for start-up: close() lets them in first
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop it started in
        self._closed: asyncio.Future[None] | None = None  # done when a close() under way ends

    # --- life cycle -------------------------------------------------------------------

    async def __aenter__(self) -> OnlineAPI:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # Left by a cancellation, Ctrl-C (KeyboardInterrupt) or SystemExit: nobody waits
        # for the requests in flight any more, so they are given up instead of finished.
        await self.close(give_up=exc_type is not None and not issubclass(exc_type, Exception))

    async def start(self) -> None:
        """Connect (and start in-process workers); called on first use if not before."""
        await self._leave_ended_loop()
        while self._closed is not None:  # a close() under way: open again after it
            await asyncio.shield(self._closed)
        if self._started is None:
            self._loop = asyncio.get_running_loop()
            self._started = asyncio.create_task(self._start())
        if not self._started.done():
            await asyncio.shield(self._started)
        self._started.result()  # raises what start-up raised

    async def _start(self) -> None:
        self._redis = await self._open_redis()
        if self.replay is not None:  # reads only: no subscription, no workers
            from .runs import Replayer

            self._client = Replayer(self._redis, self.keys, self.replay)
            await self._client.start()
            return
        replicas = 0
        if self.direct or self._model is not None:
            replicas = await replicas_to_wait(self._redis, self._replicas)
        self._client = CacheClient(self._redis, self.keys, reply_timeout=self._reply_timeout,
                                   request_timeout=self._request_timeout, direct=self.direct,
                                   run_ttl_s=self._run_ttl_s, replicas=replicas)
        await self._client.start()
        if self._model is not None:
            from workers.run import LocalWorkers

            self._local = LocalWorkers(self._redis, self.keys, self.route, self._model,
                                       batch_size=self._model_batch_size,
                                       concurrency=self._concurrency, run_ttl_s=self._run_ttl_s,
                                       replicas=replicas, with_cache_worker=not self.direct,
                                       url=self._url, originals=self._held)

    async def _leave_ended_loop(self) -> bool:
        """A pipeline started in an event loop that has ended without ``close()`` (a
        second ``asyncio.run``, a test framework's loop per test) forgets what lived in
        that loop (its connections, in-process workers and batches went with it), so it
        opens again in this one, as after ``close()``; True if it did. One used by two
        live loops at once (threads) is refused: its connections belong to one of them."""
        loop = self._loop
        if self._started is None or loop is None or loop is asyncio.get_running_loop():
            return False
        if not loop.is_closed():
            raise CacheSaverError(
                "this pipeline is in use in another event loop (another thread?); make one "
                "pipeline per event loop")
        log.info("the event loop this pipeline started in has ended; it opens again")
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
        self._started = self._server = self._redis = self._client = self._local = None
        self._url = self._flush_timer = self._loop = self._closed = None
        self._pending, self._flushes = [], set()
        self._originals.clear()  # (what its requests held, they let go as the loop ended)
        self._batches_in_flight = self._starting = 0
        return True

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
        self._url = url
        if self._wait_replicas is None:
            self._replicas = defaults.wait_replicas(url)
        await check_reachable(url)
        return connect(url)

    async def cleanup(self) -> None:
        """The original's name for ``close()``."""
        await self.close()

    async def close(self, *, give_up: bool = False) -> None:
        """Finish pending requests, stop in-process workers, release connections.

        ``give_up`` (what leaving ``async with`` by a cancellation or Ctrl-C does): the
        pending requests are given up instead (they raise ``CancelledError``); what they
        reserved stays consistent, and samples being generated for them are still stored."""
        if self._closed is not None:  # another close() is under way: it does the work
            await asyncio.shield(self._closed)
            return
        if self._started is None or await self._leave_ended_loop():
            return
        with contextlib.suppress(Exception):
            await self._started
        # Calls that waited for start-up are runnable now (it is done): a turn or two.
        while self._starting:  # noqa: ASYNC110
            await asyncio.sleep(0)
        # From here, a call waits until this close() is over and opens the pipeline again:
        # sent now, it would go to the client being closed, without workers.
        self._closed = asyncio.get_running_loop().create_future()
        try:
            if give_up:
                self._give_up()
            self._flush()
            while self._flushes:  # (wait: a close() cancelled does not cancel other callers')
                await asyncio.wait(list(self._flushes))
            if self._local is not None:
                await self._local.stop()
                self._local = None
            if self._client:
                await self._client.close()
            if self._redis is not None and self._redis is not self._cache:
                await self._redis.aclose()
            if self._server is not None:
                await asyncio.to_thread(self._server.stop)
            self._started = None
        finally:
            closed, self._closed = self._closed, None
            closed.set_result(None)

    # --- requests ---------------------------------------------------------------------

    def _prepare(self, request: Request) -> WorkItem:
        return prepare(request, run=self.run, route=self.route, model_id=self.model_id,
                       max_prompt_bytes=self._max_prompt_bytes, hash=self._hash,
                       manifest=self.manifest)

    async def request(self, request: Request) -> Response:
        """Samples for one request; concurrent calls are sent together in batches."""
        item = self._prepare(request)
        if item.n == 0:
            return _empty()
        loop = asyncio.get_running_loop()
        if not self._ready_here(loop):
            await self._start_for_call()
        if self._folder is not None:
            self._originals[item.uuid] = request
        future = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self.batch_size:
            self._flush()
        elif self._flush_timer is None:
            # Wait up to ``timeout`` for the batch to fill; eager and idle: send at the
            # next loop turn (requests made together still share a batch).
            delay = 0 if self.eager and not self._batches_in_flight else self.timeout
            self._flush_timer = loop.call_later(delay, self._flush)
        if self._held is None:
            return await future
        self._hold([(item, request)])
        try:
            return await future
        finally:
            self._release([item])

    async def batch_request(self, batch: Batch) -> list[Response]:
        """Samples for every request of ``batch``, served in ``request_id`` order.

        The batch is checked whole before anything is sent: one bad request refuses it."""
        if not isinstance(batch, Batch):
            batch = Batch(batch)  # a plain list works too; anything else is refused
        items = [self._prepare(r) for r in batch.requests]
        wanted = [it for it in items if it.n > 0]
        replies: dict[str, Any] = {}
        if wanted:
            await self._start_for_call()
            originals = [(it, r) for it, r in zip(items, batch.requests) if it.n > 0]
            sent = asyncio.ensure_future(self._submit(originals))
            self._flushes.add(sent)
            sent.add_done_callback(self._flushes.discard)
            replies = dict(zip((it.uuid for it in wanted), await sent))
        out = []
        for it in items:
            reply = replies.get(it.uuid)
            if reply is None:
                out.append(_empty())
            elif isinstance(reply, Exception):
                raise reply
            else:
                out.append(_response(reply))
        return out

    def _ready_here(self, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """Started in this loop (``loop``: the running one, if the caller has it), and no
        ``close()`` under way: a call need not wait."""
        started = self._started
        return started is not None and started.done() and self._closed is None and \
            self._loop is (loop or asyncio.get_running_loop()) and \
            not started.cancelled() and started.exception() is None

    async def _start_for_call(self) -> None:
        """``start()`` for a request: a ``close()`` meanwhile waits until it is sent."""
        if self._ready_here():
            return
        self._starting += 1
        try:
            await self.start()
        finally:
            self._starting -= 1

    def _hold(self, pairs: list[tuple[WorkItem, Request]]) -> None:
        assert self._held is not None
        with _HELD_LOCK:
            for item, request in pairs:
                self._held.setdefault(item.key, request)
                self._holds[item.key] = self._holds.get(item.key, 0) + 1

    def _release(self, items: list[WorkItem]) -> None:
        assert self._held is not None
        with _HELD_LOCK:
            for item in items:
                left = self._holds.pop(item.key) - 1
                if left:
                    self._holds[item.key] = left
                else:
                    del self._held[item.key]

    async def _submit(self, originals: list[tuple[WorkItem, Request]]) -> list[Any]:
        """``batch_request``'s batch, sent whole (a task: ``close()`` waits for it)."""
        if self._held is None:
            return await self._submit_now(originals)
        self._hold(originals)
        try:
            return await self._submit_now(originals)
        finally:
            self._release([it for it, _ in originals])

    async def _submit_now(self, originals: list[tuple[WorkItem, Request]]) -> list[Any]:
        assert self._client is not None and self._redis is not None
        if self._folder is not None:
            from . import migrate

            await migrate.import_for(self._redis, self.keys, self._folder, originals,
                                     self._hash)
        return list(await self._client.submit([it for it, _ in originals]))

    def _give_up(self) -> None:
        """Cancel the requests not sent yet and the batches in flight (a batch given up
        stops waiting and asking again; a client that gives up leaves nothing to undo)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        pending, self._pending = self._pending, []
        for item, future in pending:
            future.cancel()
            self._originals.pop(item.uuid, None)
        for task in self._flushes:
            task.cancel()

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

    async def _send(self, pending: list[tuple[WorkItem, asyncio.Future[Response]]]) -> None:
        self._batches_in_flight += 1
        try:
            assert self._client is not None and self._redis is not None
            if self._folder is not None:
                from . import migrate

                await migrate.import_for(self._redis, self.keys, self._folder, [
                    (it, self._originals.pop(it.uuid)) for it, _ in pending], self._hash)
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
                try:
                    fut.set_result(_response(reply))
                except ProtocolError as exc:
                    fut.set_exception(exc)


def __getattr__(name: str) -> Any:
    """``LocalAPI`` and ``OrderedLocalAPI``, importable from here as from the original's
    ``cachesaver.pipelines`` (they live in ``local``, which builds on this module)."""
    if name in ("LocalAPI", "OrderedLocalAPI"):
        from . import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _empty() -> Response:
    """What ``n=0`` gets: nothing, and nothing is sent."""
    return Response(data=[], cached=[], duplicated=[], metadata=[])


_SOURCES = {CACHED: "stored", DUPLICATED: "shared", GENERATED: "generated"}


def _response(reply: dict[str, Any]) -> Response:
    """Flags as the original CacheSaver defines them (see ``Response``).

    Raises ``ProtocolError`` for a sample that cannot be read (the workers check every
    sample before sending it, so this means a worker of another version)."""
    index, flags = reply["start"], reply["flags"]
    samples = reply.get("records") or [read_sample(raw) for raw in reply["samples"]]
    data, cached, duplicated, metadata = [], [], [], []
    for sample, flag in zip(samples, flags):
        data.append(sample.data)
        metadata.append(sample.metadata(index, _SOURCES.get(flag, flag)))
        index += 1
        generated = flag == GENERATED
        cached.append(not generated)
        duplicated.append(generated and not sample.first)
    return Response(data, cached, duplicated, metadata)
