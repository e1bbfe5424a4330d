"""Redis connections that ride out restarts: commands retry with backoff on connection loss.

Every URL form of docs/redis-urls.md (``redis://``, ``rediss://``, ``unix://``,
``redis+sentinel://``) goes through :func:`connection_pool`; parsing is in ``urls.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from contextvars import ContextVar
from functools import cache
from typing import Any

from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio import Connection, ConnectionPool, Redis, SSLConnection
from redis.asyncio.connection import AbstractConnection, UnixDomainSocketConnection
from redis.asyncio.connection import async_timeout as timeout_scope
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.backoff import ExponentialBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE

from .errors import RedisRefusedError, RedisUnavailableError
from .urls import RedisURL, explain_failure, parse_url, refused_login, safe_url

__all__ = ["check_reachable", "connect", "connection_options", "connection_pool", "safe_url"]

DEFAULT_CONNECT_TIMEOUT_S = 5.0


class _HiredisFastPath:
    """Two costs of every command of redis-py 5's asyncio connections removed, and one
    lost cancellation.

    * Commands are packed with hiredis (C), as its sync client does: a script call with
      hundreds of arguments costs microseconds, not a millisecond.
    * Taking a connection from the pool checks it for stale data by looking at what is
      already buffered, as redis-py 8 does (redis/redis-py#4063), instead of a read
      with a zero timeout: that read costs an event-loop turn and a timer per command.
      (arq pins redis-py below 6.)
    * A command is written under a timeout scope (``send_packed_command``), not in a
      task of its own under ``asyncio.wait_for``, which loses a cancellation.
    """

    _serializer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        if not HIREDIS_AVAILABLE:
            return super().pack_command(*args)  # type: ignore[misc]
        return self._serializer.pack(*args)

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """redis-py 5's, with the write bounded by a timeout scope in this task instead of
        ``asyncio.wait_for``: before Python 3.12, ``wait_for`` returns normally when its
        task is cancelled after the write ended and before it resumed, and the
        cancellation is lost (redis/redis-py#2028). A worker loop that loses its one
        cancellation never ends: ``asyncio.run`` cancels each task once at its end, and
        waited for ever on the cache worker of an in-process pipeline never closed."""
        conn: Any = self
        timeout = conn.socket_timeout
        if not timeout:  # written in this task already
            return await super().send_packed_command(  # type: ignore[misc]
                command, check_health)
        if not conn.is_connected:
            await conn.connect()
        elif check_health:
            await conn.check_health()
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            async with timeout_scope(timeout):
                await conn._send_packed_command(command)
        except asyncio.TimeoutError:
            await conn.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await conn.disconnect(nowait=True)
            err_no, message = exc.args[:2] if len(exc.args) >= 2 else ("UNKNOWN", exc)
            raise RedisConnectionError(
                f"Error {err_no} while writing to socket. {message}.") from exc
        except BaseException:  # cancelled mid-write: the connection cannot be reused
            await conn.disconnect(nowait=True)
            raise

    async def can_read_destructive(self) -> bool:
        parser = self._parser  # type: ignore[attr-defined]
        if not isinstance(parser, _AsyncHiredisParser) or not parser._connected:
            return await super().can_read_destructive()  # type: ignore[misc]
        return has_buffered_data(self)


def has_buffered_data(conn: Any) -> bool:
    """Data (or the end of the stream) read from ``conn``'s socket and not parsed yet;
    False when that cannot be told without reading (a connection of another class, or
    without hiredis)."""
    parser = getattr(conn, "_parser", None)
    if not isinstance(conn, _HiredisFastPath) or not isinstance(parser, _AsyncHiredisParser) \
            or not parser._connected:
        return False
    stream: Any = parser._stream
    reader: Any = parser._reader
    return bool(reader.has_data() or stream.at_eof() or stream._buffer)


class HiredisPackConnection(_HiredisFastPath, Connection):
    """``redis://``: TCP."""


class HiredisSSLConnection(_HiredisFastPath, SSLConnection):
    """``rediss://``: TCP with TLS."""


class HiredisUnixConnection(_HiredisFastPath, UnixDomainSocketConnection):
    """``unix://``: a local socket."""


class SentinelConnection(_HiredisFastPath, SentinelManagedConnection):
    """``redis+sentinel://``: a connection to the service's current primary. redis-py asks
    the sentinels at each connection attempt, and turns ``READONLY`` from a demoted
    primary into a lost connection, so commands are retried on the new primary."""


class SentinelSSLConnection(SentinelConnection, SSLConnection):
    """``rediss+sentinel://``: the primary over TLS."""


class SentinelPool(SentinelConnectionPool):
    """redis-py's Sentinel pool (primary only) that can be cloned the way a plain pool is,
    ``pool.__class__(connection_class=pool.connection_class, **pool.connection_kwargs)``,
    and that closes its connections to the sentinels when it is closed."""

    def __init__(self, service_name: str | None = None, sentinel_manager: Sentinel | None = None,
                 **kwargs: Any) -> None:
        twin = kwargs.pop("connection_pool", None)  # set by SentinelConnectionPool itself
        if service_name is None and twin is not None:
            service_name, sentinel_manager = twin.service_name, twin.sentinel_manager
        if service_name is None or sentinel_manager is None:
            raise TypeError("SentinelPool needs service_name and sentinel_manager")
        super().__init__(service_name, sentinel_manager, **kwargs)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # closing, not the idle sweep after a new primary was seen
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.connection_pool.disconnect()


class RetryUnlessRefused(Retry):
    """redis-py's retry with backoff, except for a refused login, and not nested.

    redis-py counts ``AuthenticationError`` (a wrong password, a server that now wants
    one, a disabled user) as a ``ConnectionError``, so it would be retried; and a new
    connection's health-check PING, refused that way, reconnects inside the retry of
    the connect that sent it: the retries nest and a call never returns. Asking again
    cannot fix a login, so it is raised at once.

    A command's retry reconnects through ``connect()``, which has a retry of its own:
    nested, a Redis that stays away failed a command after about 13 x 12 attempts (about
    4 minutes), not 13 (about 20 s). A retry inside another makes one attempt; the outer
    one does the retrying."""

    async def call_with_retry(self, do: Any, fail: Any) -> Any:
        nested = _retrying.get()

        async def once() -> Any:
            token = _retrying.set(True)  # while trying: not while failing (pubsub reconnects)
            try:
                return await do()
            except AuthenticationError as exc:
                raise _LoginRefused(exc) from exc
            finally:
                _retrying.reset(token)

        try:
            if not nested:
                return await super().call_with_retry(once, fail)
            try:
                return await once()
            except self._supported_errors as error:
                await fail(error)
                raise
        except _LoginRefused as refused:
            raise refused.error from None


_retrying: ContextVar[bool] = ContextVar("cachesaver_retrying", default=False)


class _LoginRefused(Exception):
    """Carries an ``AuthenticationError`` through the retry loop (not a RedisError)."""

    def __init__(self, error: AuthenticationError) -> None:
        super().__init__(str(error))
        self.error = error


def connection_options() -> dict[str, Any]:
    """Keyword arguments for a pool: ~20 s of retries with backoff, health checks, a
    bounded connect (TCP connect + TLS handshake), and a dead peer dropped in about 30 s
    (``KEEPALIVE``). Each connection class takes the ones it accepts; options in the URL
    win."""
    return {
        "decode_responses": False,
        "health_check_interval": 30,
        "socket_keepalive": True,
        "socket_keepalive_options": KEEPALIVE,
        "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT_S,
        "retry": RetryUnlessRefused(ExponentialBackoff(cap=2.0, base=0.05), retries=12),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, ConnectionResetError,
                           ConnectionRefusedError],
    }


def _keepalive() -> dict[int, int]:
    """TCP options that drop a connection whose peer is gone without a word (its host
    crashed or rebooted, a partition, a frozen VM) in about 30 s, where the kernel's
    defaults take over two hours: a worker blocked on such a connection would wait that
    long. Probes after 15 s idle, every 5 s, 3 unanswered end it; data unacknowledged
    for 30 s ends it too (Linux). Options this platform lacks are left out."""
    wanted = [("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3),
              ("TCP_USER_TIMEOUT", 30_000)]
    if not hasattr(socket, "TCP_KEEPIDLE"):  # macOS names the idle time TCP_KEEPALIVE
        wanted.append(("TCP_KEEPALIVE", 15))
    return {getattr(socket, name): value for name, value in wanted if hasattr(socket, name)}


KEEPALIVE = _keepalive()


@cache
def _accepted(connection_class: type) -> frozenset[str]:
    """The keyword arguments ``connection_class`` (and its bases) take."""
    names: set[str] = set()
    for klass in connection_class.__mro__:
        if "__init__" in vars(klass) and klass is not object:
            params = inspect.signature(vars(klass)["__init__"]).parameters.values()
            names.update(p.name for p in params if p.kind in (p.KEYWORD_ONLY,
                                                              p.POSITIONAL_OR_KEYWORD))
    return frozenset(names - {"self"})


def _connection_class(u: RedisURL) -> type[AbstractConnection]:
    if u.kind == "unix":
        return HiredisUnixConnection
    if u.kind == "sentinel":
        return SentinelSSLConnection if u.tls else SentinelConnection
    return HiredisSSLConnection if u.tls else HiredisPackConnection


def _pool(u: RedisURL, options: dict[str, Any]) -> ConnectionPool:
    """A pool for ``u`` with ``options`` (URL options win), for the ones the class takes."""
    connection_class = _connection_class(u)
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in u.options and not os.path.isfile(u.options[name]):
            raise ValueError(f"invalid Redis URL {u.safe!r}: {name}={u.options[name]!r}: "
                             "no such file")
    options = {**options, **u.options}
    if u.kind == "unix":
        options["path"] = u.path
    elif u.kind == "tcp":
        options["host"], options["port"] = u.addresses[0]
    accepted = _accepted(connection_class) | {"max_connections"}  # type: ignore[arg-type]
    kwargs = {k: v for k, v in options.items() if k in accepted}
    if u.kind != "sentinel":
        return ConnectionPool(connection_class=connection_class, **kwargs)
    sentinel_kwargs = {k: v for k, v in options.items()
                       if k in ("socket_connect_timeout", "socket_timeout")}
    sentinel_kwargs.setdefault("socket_timeout", sentinel_kwargs.get("socket_connect_timeout"))
    sentinel_kwargs.update(u.sentinel_options)
    if u.tls:
        sentinel_kwargs.update(ssl=True, **{k: v for k, v in options.items()
                                            if k.startswith("ssl_")})
    manager = Sentinel(list(u.addresses), sentinel_kwargs=sentinel_kwargs)
    return SentinelPool(u.service, manager, connection_class=connection_class, **kwargs)


def connection_pool(url: str, *, read_timeout: float | None = None) -> ConnectionPool:
    """A pool for ``url`` (any accepted form) whose commands ride out restarts and, with
    Sentinel, failovers. Usable as ``Redis(connection_pool=...)`` and ``ArqRedis(...)``.

    ``read_timeout``: a reply that takes longer drops the connection and the command is
    tried again on a new one (on the current primary, behind Sentinel); it must exceed
    the longest blocking command sent. ``?socket_timeout=`` in the URL wins."""
    options = connection_options()
    if read_timeout is not None:
        options["socket_timeout"] = read_timeout
    return _pool(parse_url(url), options)


def connect(url: str, *, read_timeout: float | None = None) -> Redis:
    """A Redis client for ``url`` that reconnects on its own (and closes its pool);
    ``read_timeout`` as in ``connection_pool``."""
    return Redis.from_pool(connection_pool(url, read_timeout=read_timeout))


async def check_reachable(url: str) -> None:
    """Fail fast, with a clear message, when nothing answers at ``url``: one attempt,
    bounded by the connect timeout (Sentinel: ask the sentinels, then ping the primary).

    Raises ``RedisUnavailableError`` naming the URL (no password), the cause and a fix;
    ``RedisRefusedError`` when the server answered and refused the login (a wrong
    password or user, a user refused PING): asking again cannot help.
    """
    u = parse_url(url)
    timeout = u.options.get("socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)
    pool = _pool(u, {"decode_responses": False, "socket_connect_timeout": timeout,
                     "socket_timeout": u.options.get("socket_timeout", timeout)})
    probe = Redis.from_pool(pool)
    try:
        if isinstance(pool, SentinelPool):
            await _ask_sentinels(u, pool, timeout)
        await probe.ping()
    except RedisUnavailableError:
        raise
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        where = u.where
        if isinstance(pool, SentinelPool) and pool.master_address:
            where = "the primary {}:{} named by the sentinels".format(*pool.master_address)
        cause, fix = explain_failure(exc, u, where, timeout)
        error = RedisRefusedError if refused_login(exc) else RedisUnavailableError
        raise error(f"cannot reach Redis at {u.safe}: {cause}; {fix}") from exc
    finally:
        await probe.aclose()


async def _ask_sentinels(u: RedisURL, pool: SentinelPool, timeout: float) -> None:
    """Return if a sentinel names a healthy primary, else say what each one answered."""
    problems = []
    for sentinel in pool.sentinel_manager.sentinels:
        kwargs = sentinel.connection_pool.connection_kwargs
        name = f"sentinel {kwargs['host']}:{kwargs['port']}"
        try:
            state = (await sentinel.sentinel_masters()).get(u.service)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            problems.append(f"{name}: {explain_failure(exc, u, name, timeout)[0]}")
            continue
        if state and pool.sentinel_manager.check_master_state(state, u.service):
            return
        problems.append(f"{name} " + (f"reports the primary of {u.service!r} down" if state
                                      else f"monitors no service {u.service!r}"))
    raise RedisUnavailableError(
        f"cannot reach Redis at {u.safe}: no sentinel names a healthy primary "
        f"({'; '.join(problems)}); check the sentinel addresses, the service name "
        "(SENTINEL MASTERS lists them) and ?sentinel_password=")
