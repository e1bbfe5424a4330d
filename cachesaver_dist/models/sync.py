"""The sync drop-in clients (``OpenAI``, ``Anthropic``, ...).

They run the async machinery on a private event loop in a daemon thread (one per
client) and wait for each call there, so they work inside a running event loop (a
notebook) as well as outside one.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from .. import defaults
from ..errors import CacheSaverError
from ..forksafe import ForkSafeLock
from .dropin import (
    CLOSE_WAIT_S,
    DEFAULT_REQUEST_TIMEOUT_S,
    ClientSettings,
    Provider,
    _Core,
    _mount,
    _wrap,
    data_home,
)

__all__ = ["ChunkStream", "Client"]


_LOOP_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


class _LoopThread:
    """A private event loop in a daemon thread; ``run`` waits for a coroutine there."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = ForkSafeLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @property
    def started(self) -> bool:
        return self._loop is not None and not self._forked()

    def _forked(self) -> bool:
        """Whether this is a forked child of the process that started the loop: its
        thread, which runs the loop, is not in this process."""
        return self._pid != os.getpid()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        with self._lock:
            if self._loop is None or self._forked():
                self._loop, self._pid = asyncio.new_event_loop(), os.getpid()
                self._thread = threading.Thread(target=_serve, args=(self._loop,),
                                                name=self.name, daemon=True)
                _LOOP_THREADS.add(self._thread)
                self._thread.start()
            if threading.current_thread() is self._thread:
                coro.close()
                raise CacheSaverError("a sync client was called from its own event loop thread")
            # submitted under the lock: a stop() after it finds the call on the loop
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.CancelledError:  # only stop() cancels a call: see _serve
            raise CacheSaverError(f"the client was closed while this call was in flight (close() "
                                  f"waits {CLOSE_WAIT_S:g} s for the calls in flight): call it "
                                  "again, or close the client once its calls are answered"
                                  ) from None
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None or self._forked():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CLOSE_WAIT_S)
        if not thread.is_alive():
            loop.close()


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """Run ``loop`` until ``stop()``; then cancel what still runs on it (calls that
    close() did not wait for), so that the threads waiting for them get an error
    instead of waiting forever."""
    loop.run_forever()
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=CLOSE_WAIT_S))


def _shutdown(runner: _LoopThread, core: _Core) -> None:
    """Close ``core`` on its loop, then stop the loop. The garbage collector runs a
    collected client's finalizer in whatever thread it happens to run in: from a
    client's loop thread this moves to a thread of its own, since waiting there for a
    loop would stall that loop, or stop it under a call it is serving."""
    if threading.current_thread() in _LOOP_THREADS:
        threading.Thread(target=_shutdown, args=(runner, core), name="cachesaver-close",
                         daemon=True).start()
        return
    if runner.started:
        with contextlib.suppress(Exception):
            runner.run(asyncio.wait_for(core.aclose(), CLOSE_WAIT_S))
        runner.stop()


class Client(ClientSettings):
    """Base of the sync drop-in clients (``OpenAI``, ``Anthropic``, ...): the arguments of
    ``AsyncClient``, of which ``namespace``, ``cachedir`` and ``batch_timeout`` may be given
    by position, as the original's sync clients took them. Calls run on the client's own
    event loop thread; an ``http_client`` given goes only to the SDK client serving the
    attributes we do not wrap."""

    provider: ClassVar[Provider]

    def __init__(self, namespace: str = "default", cachedir: str | None = None,
                 batch_timeout: float | None = None, *, batch_size: int = defaults.BATCH_SIZE,
                 cache: Any = None, run: str | None = None, prefix: str | None = None,
                 data_dir: str | None = None, provider_id: str | None = None,
                 max_n: int | None = None, request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
                 max_prompt_bytes: int = defaults.MAX_PROMPT_BYTES, workers: str = "local",
                 direct: bool | None = None, wait_replicas: int | None = None,
                 **sdk_options: Any) -> None:
        self._sdk_options = self.provider.sdk_kwargs(sdk_options)
        self._core = core = _Core(
            self.provider, {k: v for k, v in self._sdk_options.items() if k != "http_client"},
            namespace=namespace, cache=cache, run=run, batch_size=batch_size,
            batch_timeout=defaults.BATCH_TIMEOUT_S if batch_timeout is None else batch_timeout,
            prefix=prefix, data_dir=data_home(data_dir, cachedir),
            provider_id=provider_id, max_n=max_n, request_timeout=request_timeout,
            max_prompt_bytes=max_prompt_bytes, workers=workers, direct=direct,
            wait_replicas=wait_replicas)
        self._runner = runner = _LoopThread(f"cachesaver-{type(self).__name__}")
        self._finalizer = core.exit_hook = weakref.finalize(self, _shutdown, runner, core)
        self._sync_sdk: Any = None

        def create(*, namespace: str | None = None, request_id: str | None = None,
                   metadata: Any = False, **kwargs: Any) -> Any:
            # through ``self``: a client used without a name (``OpenAI(...).chat...``)
            # stays alive, and open, while its call runs
            return _wrap(self._runner.run(self._core.create(kwargs, namespace, request_id,
                                                            metadata)), ChunkStream)

        _mount(self, self._sdk, core.format.path, create)

    def _sdk(self) -> Any:
        if self._sync_sdk is None:
            self._sync_sdk = self.provider.sync_sdk(**self._sdk_options)
        return self._sync_sdk

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._sdk(), name)

    def close(self) -> None:
        """Close the pipelines, connections and the loop thread (started again if used)."""
        _shutdown(self._runner, self._core)
        atexit.unregister(self._finalizer)
        if self._sync_sdk is not None:
            self._sync_sdk.close()
            self._sync_sdk = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        core = self._core
        return f"<{type(self).__name__} {core.provider_id} namespace={core.namespace!r}>"


class ChunkStream:
    """``create(stream=True)`` of a sync client: iterate for the SDK's chunk objects."""

    def __init__(self, items: Iterable[Any]) -> None:
        self._items: Iterator[Any] = iter(items)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._items)

    def close(self) -> None:
        self._items = iter(())

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
