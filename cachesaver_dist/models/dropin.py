"""The core of the drop-in provider clients (``cachesaver_dist.models.<provider>``).

A client takes the SDK's own constructor arguments plus ours, and answers
``chat.completions.create`` (Anthropic: ``messages.create``) with the SDK's own types,
through an ``OnlineAPI`` per model: cached, deduplicated and batched. The model object
of each pipeline calls the real SDK in this process, so API keys never leave it. Every
other attribute (``client.models.list()``, ``client.chat.completions.parse``, ...) is
the real SDK client's, uncached. See ``docs/dropin.md``.

The sync clients are in ``sync.py``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import inspect
import itertools
import json
import os
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar
from urllib.parse import urlsplit

from redis.asyncio import Redis

from .. import defaults
from ..connection import check_reachable, connect
from ..errors import (
    CacheSaverError,
    GenerationError,
    InvalidRequestError,
    NoWorkerError,
    ProviderError,
)
from ..pipelines import OnlineAPI, check_counts, check_seconds
from ..prepare import check_run, check_text
from ..protocol import prompt_key
from ..server import EmbeddedServer, resolve_redis_url
from ..typedefs import Metadata, Request, Response, SingleRequestModel
from ..urls import parse_url

__all__ = ["AsyncChunkStream", "AsyncClient", "Metadata", "Provider"]

_CLOSING: set[asyncio.Task[None]] = set()  # closes of collected clients, until they end

# Arguments of every SDK call that never shape generation: sent, but not in the key.
NOT_IN_KEY = frozenset({"stream", "stream_options", "timeout", "extra_headers", "extra_query"})
DEFAULT_REQUEST_TIMEOUT_S = 3600.0  # a reply may wait for the SDK's own timeouts and retries
CLOSE_WAIT_S = 10.0
ACCEPTED_KEPT = 1024  # sets of argument names remembered as accepted by the SDK's create
FAILURES_KEPT = 256  # the latest failed calls' SDK errors kept for their callers
FAILURES_PER_KEY = 8  # of one prompt key (the calls of a request split by max_n fail together)


@dataclass(frozen=True)
class Provider:
    """One provider: its SDK client classes, answer format and defaults.

    ``key_env`` / ``url_env``: when set, ``api_key`` / ``base_url`` not given come from
    these variables (else ``default_key`` / ``default_url``), never from the SDK's own
    (an OpenAI key must not reach Groq). ``default_url`` is also what the identity
    compares with: a client on another URL gets ``<name>@<host/path>`` as provider id.
    """

    name: str
    async_sdk: Any
    sync_sdk: Any
    format: Any  # formats.ChatFormat | formats.MessagesFormat
    default_url: str | None = None
    key_env: str | None = None
    url_env: str | None = None
    default_key: str | None = None
    max_n: int | None = None

    def derive(self, **changes: Any) -> Provider:
        return dataclasses.replace(self, **changes)

    def sdk_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kw = dict(kwargs)
        if self.key_env is not None and kw.get("api_key") is None:
            kw["api_key"] = os.environ.get(self.key_env) or self.default_key
            if not kw["api_key"]:
                raise CacheSaverError(f"{self.name}: pass api_key=... or set {self.key_env}")
        if self.url_env is not None and kw.get("base_url") is None:
            kw["base_url"] = os.environ.get(self.url_env) or self.default_url
            if not kw["base_url"]:
                raise CacheSaverError(f"{self.name}: pass base_url=... (the server's OpenAI-"
                                      f"compatible URL, e.g. http://localhost:8000/v1) or set "
                                      f"{self.url_env}")
        return kw


def _where(url: Any) -> str:
    """``host[:port]/path`` of a URL: no scheme, credentials or query."""
    parts = urlsplit(str(url))
    host = (parts.hostname or "").lower()
    return host + (f":{parts.port}" if parts.port else "") + parts.path.rstrip("/")


def _omitted(value: Any) -> bool:
    return value is None or type(value).__name__ in ("NotGiven", "Omit")


def plain(value: Any) -> Any:
    """``value`` as plain data (SDK objects dumped, tuples and iterables as lists, sets
    as sorted lists, dict keys as the JSON the SDK sends: ``{50256: -100}`` is
    ``{"50256": -100}``)."""
    if value is None or isinstance(value, (str, int, float, bytes)):
        return value
    if isinstance(value, Mapping):
        return {_json_key(k): plain(v) for k, v in value.items()}
    if isinstance(value, type):
        raise TypeError(f"a class ({value.__name__}) cannot be sent: for response_format=<a "
                        "pydantic model>, call chat.completions.parse() (the SDK's own, not "
                        "cached), or pass the JSON schema as a dict")
    if hasattr(value, "model_dump"):
        return plain(value.model_dump(mode="json", exclude_unset=True, by_alias=True,
                                      warnings=False))
    if isinstance(value, (set, frozenset)):  # in an order that is the same in every process
        return sorted((plain(v) for v in value), key=repr)
    if isinstance(value, Iterable):
        return [plain(v) for v in value]
    return value  # prepare() names the field that cannot be stored


def _json_key(key: Any) -> Any:
    """A dict key as JSON writes it (an int, float, bool or None key as its text)."""
    if key is None or isinstance(key, (int, float)):
        return json.dumps(key)
    return key  # str, or a key prepare() refuses, naming it


@cache
def _request_type(names: tuple[str, ...]) -> type[Request]:
    return dataclasses.make_dataclass(
        "DropinRequest", [(name, Any, dataclasses.field(default=None)) for name in names],
        bases=(Request,), frozen=True)


def _walk(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def _provider_error(provider: str, exc: Exception) -> Exception:
    """An SDK error as ``ProviderError`` (status and the provider's message), else as is."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        from ..backends.retry import error_parts

        kind, message = error_parts(getattr(exc, "body", None))
        return ProviderError(provider, status, message or str(exc), kind=kind)
    if type(exc).__name__ in ("APIConnectionError", "APITimeoutError"):
        return ProviderError(provider, None, str(exc))
    return exc


def _lent_key(model_id: str, fields: dict[str, Any]) -> str:
    """Where a caller's arguments outside the prompt key wait for the model call: its
    key without ``seed`` (sample ``i > 0`` of a seeded request is called with a seed
    derived from it, ``models.derive_seed``)."""
    return prompt_key(model_id, {k: v for k, v in fields.items() if k != "seed"})


async def _nothing_to_close() -> None:
    """``aclose`` of an SDK client whose event loop is gone."""


class DropinModel(SingleRequestModel):
    """The in-process model of one pipeline: the request's fields are the SDK call."""

    def __init__(self, core: _Core, model_id: str) -> None:
        self.core, self.model = core, model_id

    def refuses(self, model_id: str) -> str | None:
        """Why it makes no samples for work of ``model_id`` (a batch worker asks): a client
        of the same provider on another URL (its model id says so) would get another
        server's samples under its keys. A client's own ``provider_id`` is its choice."""
        name = self.core.provider.name
        if model_id == self.model or not model_id.startswith((f"{name}:", f"{name}@")):
            return None
        return (f"this batch worker makes samples of {self.model!r}, not of {model_id!r} "
                "(another server or base URL), so none were made: start its batch workers "
                "with the --base-url of the client's server")

    async def request(self, request: Request) -> Response:
        core = self.core
        fields = request.model_fields()
        key = _lent_key(self.model, fields)
        extras: dict[str, Any] = {}
        if core.lent:  # arguments outside the key of a caller in this process: its own
            # call, else (sample i > 0 of a seeded request) one of the same prompt
            waiting = core.lent.get(prompt_key(self.model, fields)) or core.lent.get(key)
            extras = waiting[0] if waiting else {}
        kwargs = {k: v for k, v in fields.items() if k != "prompt" and v is not None}
        create = _walk(core.sdk, core.format.path).create

        async def call(**kw: Any) -> Any:
            try:
                return await create(**kw)
            except Exception as exc:
                failure = _provider_error(core.provider.name, exc)
                core.remember_failure(key, exc, failure)
                raise failure from exc

        return await core.format.generate(call, {**kwargs, **extras}, request.n, core.max_n)

    async def aclose(self) -> None:
        """Close the SDK client (a batch worker serving this model calls it at exit)."""
        await self.core.aclose()


def pool_route(provider: str, model: str) -> str:
    """The model name under which a batch worker pool serves a drop-in client's model:
    ``cachesaver-dist worker batch --model dropin:<provider>:<model>``."""
    return f"dropin:{provider}:{model}"


def pool_model(name: str, base_url: str | None = None) -> DropinModel:
    """The model a batch worker serves for ``dropin:<provider>:<model>``: the provider's
    SDK, configured from the environment (``OPENAI_API_KEY``, ...) and ``base_url``; the
    samples it stores are the ones the drop-in client of that provider reads."""
    import importlib

    _, provider, model = name.split(":", 2) if name.count(":") >= 2 else (name, "", "")
    try:
        module = importlib.import_module(f"cachesaver_dist.models.{provider}")
    except ImportError as exc:
        raise ValueError(f"model name {name!r}: no drop-in provider {provider!r} ({exc}); "
                         "use dropin:<openai|together|anthropic|groq|openrouter|vllm>:<model>"
                         ) from None
    clients = [c for c in vars(module).values() if isinstance(c, type)
               and issubclass(c, AsyncClient) and c is not AsyncClient]
    if not clients or not model:
        raise ValueError(f"model name {name!r} is not dropin:<provider>:<model>")
    client = clients[0](base_url=base_url) if base_url else clients[0]()
    return DropinModel(client._core, f"{client._core.provider_id}:{model}")


class _Core:
    """State shared by the async and sync clients: SDK client, Redis, one pipeline per model."""

    def __init__(self, provider: Provider, sdk_kwargs: dict[str, Any], *, namespace: str,
                 cache: Any, run: str | None, batch_size: int, batch_timeout: float,
                 prefix: str | None, data_dir: str | None, provider_id: str | None,
                 max_n: int | None, request_timeout: float, max_prompt_bytes: int,
                 workers: str = "local", direct: bool | None = None,
                 wait_replicas: int | None = None) -> None:
        if workers not in ("local", "pool"):
            raise ValueError(f"workers must be 'local' (call the provider from this process) "
                             f"or 'pool' (a batch worker pool calls it), got {workers!r}")
        self.workers, self.direct, self.wait_replicas = workers, direct, wait_replicas
        if cache is not None and not isinstance(cache, (str, Redis)):
            raise TypeError(f"cache must be a Redis URL, a redis.asyncio.Redis or None, got "
                            f"{type(cache).__name__}")
        if isinstance(cache, str):
            parse_url(cache)  # the pipelines start at the first call: check what they use now
        if prefix is not None:
            check_text(prefix, "prefix")
        check_counts(batch_size=batch_size, max_prompt_bytes=max_prompt_bytes,
                     **({} if max_n is None else {"max_n": max_n}))
        check_seconds(batch_timeout=batch_timeout, request_timeout=request_timeout)
        self.provider, self.format = provider, provider.format
        self.sdk_kwargs = sdk_kwargs
        self._sdk: Any = provider.async_sdk(**sdk_kwargs)  # raises for a missing key, as the SDK
        self.signature = inspect.signature(_walk(self._sdk, self.format.path).create)
        self._accepted: set[frozenset[str]] = set()  # argument names the signature took
        if provider_id is None:
            where = _where(self._sdk.base_url)
            default = provider.default_url and _where(provider.default_url)
            provider_id = provider.name if where == default else f"{provider.name}@{where}"
        self.provider_id = check_text(provider_id, "provider_id")
        self.namespace = check_text(namespace, "namespace")
        # One run for the client's life (all its models, and after close() too).
        self.run = check_run(run) if run is not None else f"run-{uuid.uuid4().hex[:12]}"
        self.max_n = max_n or provider.max_n
        self.batch_size, self._batch_timeout = batch_size, batch_timeout
        self._prefix, self._request_timeout = prefix, request_timeout
        self._max_prompt_bytes = max_prompt_bytes
        self._cache, self.data_dir = cache, data_dir or defaults.data_dir()
        self._ids = itertools.count()
        self.lent: dict[str, list[dict[str, Any]]] = {}
        # the SDK's errors of the latest failed calls, per key, for their callers
        self.failed: dict[str, list[tuple[Exception, str]]] = {}
        self.exit_hook: Callable[[], Any] | None = None  # run at exit before the server stops
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = os.getpid()  # the process of _loop: a forked child has its parent's copy
        self._reset()

    def _reset(self) -> None:
        self._pipelines: dict[str, asyncio.Task[OnlineAPI]] = {}
        self._connecting: asyncio.Task[Redis] | None = None
        self._redis: Redis | None = None
        self._server: EmbeddedServer | None = None

    def remember_failure(self, key: str, sdk_error: Exception, failure: Exception) -> None:
        """Keep an in-process model call's SDK error for the callers of ``key``, who get
        ``failure`` (its text) in a ``GenerationError`` and raise the SDK's own instead."""
        kept = self.failed.pop(key, [])
        kept.append((sdk_error, str(failure)))
        self.failed[key] = kept[-FAILURES_PER_KEY:]
        while len(self.failed) > FAILURES_KEPT:
            del self.failed[next(iter(self.failed))]

    @property
    def sdk(self) -> Any:
        if self._sdk is None:
            self._sdk = self.provider.async_sdk(**self.sdk_kwargs)
        return self._sdk

    # --- requests -------------------------------------------------------------------

    async def create(self, kwargs: dict[str, Any], namespace: str | None,
                     request_id: str | None, metadata: Any) -> tuple[Any, Metadata | None, bool]:
        """``(response or chunk iterator, Metadata if asked for, streamed)`` for
        ``create(**kwargs)``."""
        want_meta = metadata if isinstance(metadata, bool) else False
        if not isinstance(metadata, bool) and not _omitted(metadata):
            if not isinstance(metadata, Mapping):
                raise TypeError(f"{self.format.name}.create(): metadata={metadata!r:.40} is "
                                "neither a bool nor a dict: pass metadata=True for (response, "
                                "Metadata), or a dict for the SDK's own metadata argument")
            kwargs["metadata"] = metadata  # the SDK's own metadata argument
        kwargs = {k: v for k, v in kwargs.items() if not _omitted(v)}
        names = frozenset(kwargs)
        if names not in self._accepted:  # keywords only: their names decide, not values
            try:
                self.signature.bind(**kwargs)
            except TypeError as exc:
                raise TypeError(f"{self.format.name}.create(): {exc}") from None
            if len(self._accepted) < ACCEPTED_KEPT:
                self._accepted.add(names)
        n = kwargs.pop("n", 1) if self.format.has_n else 1
        if n == 0 and type(n) is int:  # other values: prepare() names what is wrong
            raise InvalidRequestError(f"{self.format.name}.create(): n=0 asks for no choices, "
                                      "and a response has at least one: pass n >= 1")
        stream, options = kwargs.pop("stream", False), kwargs.pop("stream_options", None)
        extras = {k: kwargs.pop(k) for k in list(kwargs) if k in self.format.not_in_key}
        fields = {k: plain(v) for k, v in kwargs.items()}
        model = fields.get("model")
        if not isinstance(model, str) or not model:
            raise TypeError(f"{self.format.name}.create(): model must be a non-empty str, "
                            f"got {model!r:.80}")
        request = _request_type(tuple(sorted(fields)))(
            prompt=self.format.name, n=n,
            namespace=self.namespace if namespace is None else namespace,
            request_id=request_id if request_id is not None else f"{next(self._ids):012d}",
            **fields)
        api = self._open_pipeline(model) or await self._pipeline(model)
        if extras:  # under its key, and its key without the seed (_lent_key)
            try:
                lent_keys = {prompt_key(api.model_id, request.model_fields()),
                             _lent_key(api.model_id, request.model_fields())}
            except (TypeError, ValueError, OverflowError):  # a value that cannot be stored:
                lent_keys = set()  # api.request() refuses it, naming the field
            for key in lent_keys:
                self.lent.setdefault(key, []).append(extras)
        try:
            response = await api.request(request)
        except NoWorkerError as exc:
            if self.workers == "pool" and self.provider_id != self.provider.name:
                raise NoWorkerError(f"{exc}; this client calls {self.sdk.base_url}: give "
                                    f"the worker --base-url {self.sdk.base_url} too") from None
            raise
        except GenerationError as exc:
            kept = self.failed.get(_lent_key(api.model_id, request.model_fields()), []) \
                if self.failed else []
            for sdk_error, text in reversed(kept):
                if text and text in str(exc):
                    raise sdk_error from None  # that failure: as the SDK raises it
            raise
        finally:
            for key in lent_keys if extras else ():
                waiting = self.lent[key]
                waiting.remove(extras)
                if not waiting:
                    del self.lent[key]
        result = self.format.assemble(response.data)
        if stream:
            result = self.format.stream(result, options)
        meta = Metadata(len(response.data), list(response.cached or []),
                        list(response.duplicated or [])) if want_meta else None
        return result, meta, bool(stream)

    def _open_pipeline(self, model: str) -> OnlineAPI | None:
        """The pipeline of ``model`` if it is open on the running loop (the usual case,
        answered without a coroutine or a shield), else None."""
        task = self._pipelines.get(model)
        if task is not None and task.done() and self._loop is asyncio.get_running_loop() \
                and not task.cancelled() and task.exception() is None:
            return task.result()
        return None

    async def _pipeline(self, model: str) -> OnlineAPI:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if not self._loop_gone():
                raise CacheSaverError("this client is in use on another running event loop; "
                                      "create one client per event loop")
            self._abandon()
            self._loop, self._pid = loop, os.getpid()
        api = self._open_pipeline(model)
        if api is not None:
            return api
        task = self._pipelines.get(model)
        if task is None or task.done():
            task = self._pipelines[model] = loop.create_task(self._open(model))
        return await asyncio.shield(task)

    async def _open(self, model: str) -> OnlineAPI:
        if self._connecting is None or (self._connecting.done() and (
                self._connecting.cancelled() or self._connecting.exception())):
            self._connecting = asyncio.create_task(self._connect())
        redis = await asyncio.shield(self._connecting)
        model_id = f"{self.provider_id}:{model}"
        served = (pool_route(self.provider.name, model) if self.workers == "pool"
                  else DropinModel(self, model_id))
        api = OnlineAPI(served, cache=redis, run=self.run,
                        model_id=model_id, batch_size=self.batch_size,
                        timeout=self._batch_timeout, prefix=self._prefix,
                        request_timeout=self._request_timeout,
                        max_prompt_bytes=self._max_prompt_bytes, direct=self.direct,
                        wait_replicas=self.wait_replicas, eager=True)
        await api.start()
        return api

    async def _connect(self) -> Redis:
        if isinstance(self._cache, Redis):
            return self._cache
        url, self._server = await asyncio.to_thread(resolve_redis_url, self._cache,
                                                    self.data_dir)
        if self._server is not None and self.exit_hook is not None:
            atexit.register(self.exit_hook)  # atexit is last in, first out
        await check_reachable(url)
        self._redis = connect(url)
        return self._redis

    # --- life cycle -----------------------------------------------------------------

    def _loop_gone(self) -> bool:
        """Whether the event loop of the pipelines is gone: none, closed, or the parent's
        (in a forked child, where no thread runs it)."""
        return self._loop is None or self._loop.is_closed() or self._pid != os.getpid()

    def _abandon(self) -> None:
        """Forget what was started on an event loop that is now gone."""
        if self._server is not None and self._pid == os.getpid():  # not a parent's server
            self._server.stop()
        if self._loop is not None and self._sdk is not None:
            # its connections belong to the closed loop: collected, the SDK would schedule
            # their close on the next loop, where it fails with a traceback
            http = getattr(self._sdk, "_client", None)
            with contextlib.suppress(AttributeError, TypeError):
                http.aclose = _nothing_to_close  # type: ignore[union-attr]
            self._sdk = None
        self._reset()

    def close_soon(self) -> None:
        """Close on the event loop the pipelines run on, from any thread, without waiting
        (for a client the garbage collector found); nothing if that loop is gone."""
        loop = self._loop
        if loop is None or self._loop_gone():
            return

        def close() -> None:
            task = loop.create_task(self.aclose())
            _CLOSING.add(task)
            task.add_done_callback(_CLOSING.discard)

        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(close)

    async def aclose(self, give_up: bool = False) -> None:
        """Close the pipelines (pending requests finish, or are given up with ``give_up``:
        see ``OnlineAPI.close``), Redis, the embedded server, the SDK."""
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            if not self._loop_gone():
                raise CacheSaverError("close the client on the event loop it runs on")
            self._abandon()
        pipelines, connecting = list(self._pipelines.values()), self._connecting
        for task in pipelines:
            with contextlib.suppress(Exception):
                await (await task).close(give_up=give_up)
        if connecting is not None:
            with contextlib.suppress(Exception):
                await connecting
        if self._redis is not None:
            await self._redis.aclose()
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
        self._reset()
        self._loop = None
        if self._sdk is not None:
            sdk, self._sdk = self._sdk, None
            await sdk.close()


class _Resource:
    """One node of the SDK's resource tree: ``create`` (or the named child) is ours,
    every other attribute the real SDK client's."""

    def __init__(self, sdk: Callable[[], Any], **children: Any) -> None:
        self._sdk = sdk
        self.__dict__.update(children)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._sdk(), name)


def _mount(client: Any, sdk: Callable[[], Any], path: tuple[str, ...], create: Any) -> None:
    """Set ``client.<path[0]>...<path[-1]>.create`` to ``create``."""
    def at(depth: int) -> Callable[[], Any]:
        return lambda: _walk(sdk(), path[:depth])

    create.__qualname__ = ".".join((*path, "create"))  # as errors name it: the SDK's name
    node = _Resource(at(len(path)), create=create)
    for i in range(len(path) - 1, 0, -1):
        node = _Resource(at(i), **{path[i]: node})
    setattr(client, path[0], node)


def _wrap(result: tuple[Any, Metadata | None, bool], stream_type: type) -> Any:
    out, meta, streamed = result
    if streamed:
        out = stream_type(out)
    return out if meta is None else (out, meta)


def data_home(data_dir: str | None, cachedir: str | None) -> str | None:
    """``data_dir``, or ``cachedir`` (the original's name for it); both must agree."""
    if data_dir is not None and cachedir is not None and data_dir != cachedir:
        raise ValueError(f"data_dir={data_dir!r} and cachedir={cachedir!r} name two folders: "
                         f"cachedir is the original's name for data_dir, pass one of them")
    return data_dir or cachedir


class ClientSettings:
    """The original clients' attributes: ``namespace``, ``batch_size``, ``cachedir``."""

    _core: _Core

    @property
    def namespace(self) -> str:
        return self._core.namespace

    @property
    def batch_size(self) -> int:
        return self._core.batch_size

    @property
    def cachedir(self) -> str:
        """Where the embedded server keeps its data (unused with a Redis URL)."""
        return str(self._core.data_dir)


class AsyncClient(ClientSettings):
    """Base of the async drop-in clients (``AsyncOpenAI``, ``AsyncAnthropic``, ...).

    Arguments: the SDK client's own (``api_key``, ``base_url``, ``timeout``,
    ``max_retries``, ``default_headers``, ...: passed to it, by keyword), and ours:
    ``namespace`` (default ``"default"``), ``cachedir`` (the original's name for
    ``data_dir``), ``batch_size`` and ``batch_timeout`` (seconds a batch waits to fill;
    default 5 ms), which may also be given by position, as the original's ``namespace,
    cachedir, batch_size, timeout``; by keyword only: ``cache`` (Redis URL,
    ``redis.asyncio.Redis``, or None: ``REDIS_URL``, else an embedded server in
    ``data_dir``), ``run``, ``prefix``, ``provider_id`` (cache identity), ``max_n``
    (samples per provider call), ``request_timeout``, ``max_prompt_bytes``, ``workers``:
    ``"local"`` (the provider is called from this process) or ``"pool"`` (batch workers
    started with ``--model dropin:<provider>:<model>`` call it), ``direct``
    (``OnlineAPI(direct=True)``: hits answered without the cache worker hop) and
    ``wait_replicas`` (as ``OnlineAPI``'s). See ``docs/dropin.md``.
    """

    provider: ClassVar[Provider]

    def __init__(self, namespace: str = "default", cachedir: str | None = None,
                 batch_size: int = defaults.BATCH_SIZE, batch_timeout: float | None = None, *,
                 cache: Any = None, run: str | None = None, prefix: str | None = None,
                 data_dir: str | None = None, provider_id: str | None = None,
                 max_n: int | None = None, request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
                 max_prompt_bytes: int = defaults.MAX_PROMPT_BYTES, workers: str = "local",
                 direct: bool | None = None, wait_replicas: int | None = None,
                 **sdk_options: Any) -> None:
        self._core = core = _Core(
            self.provider, self.provider.sdk_kwargs(sdk_options), namespace=namespace,
            cache=cache, run=run, batch_size=batch_size,
            batch_timeout=defaults.BATCH_TIMEOUT_S if batch_timeout is None else batch_timeout,
            prefix=prefix, data_dir=data_home(data_dir, cachedir), provider_id=provider_id,
            max_n=max_n, request_timeout=request_timeout, max_prompt_bytes=max_prompt_bytes,
            workers=workers, direct=direct, wait_replicas=wait_replicas)

        async def create(*, namespace: str | None = None, request_id: str | None = None,
                         metadata: Any = False, **kwargs: Any) -> Any:
            # through ``self``: a client used without a name stays open while its call runs
            return _wrap(await self._core.create(kwargs, namespace, request_id, metadata),
                         AsyncChunkStream)

        _mount(self, lambda: core.sdk, core.format.path, create)
        # A client nothing names any more (``AsyncOpenAI(...)`` made per call) is closed
        # when collected: its pipelines, workers and connections would stay open otherwise.
        weakref.finalize(self, core.close_soon).atexit = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._core.sdk, name)

    async def close(self) -> None:
        """Close the pipelines and connections; the client opens them again if used."""
        await self._core.aclose()

    aclose = close

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # left by a cancellation or Ctrl-C: the calls in flight are given up, as by OnlineAPI
        await self._core.aclose(give_up=exc_type is not None and
                                not issubclass(exc_type, Exception))

    def __repr__(self) -> str:
        core = self._core
        return f"<{type(self).__name__} {core.provider_id} namespace={core.namespace!r}>"


class AsyncChunkStream:
    """``await create(stream=True)`` of an async client: ``async for`` the SDK's chunks."""

    def __init__(self, items: Iterable[Any]) -> None:
        self._items: Iterator[Any] = iter(items)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        self._items = iter(())

    async def __aenter__(self) -> AsyncChunkStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
