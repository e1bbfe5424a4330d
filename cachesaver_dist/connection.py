"""Redis connections that ride out restarts: commands retry with backoff on connection loss."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio import Connection, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE


class HiredisPackConnection(Connection):
    """redis-py 5's asyncio connection with two costs of every command removed.

    * Commands are packed with hiredis (C), as its sync client does: a script call with
      hundreds of arguments costs microseconds, not a millisecond.
    * Taking a connection from the pool checks it for stale data by looking at what is
      already buffered, as redis-py 8 does (redis/redis-py#4063), instead of a read
      with a zero timeout: that read costs an event-loop turn and a timer per command.
      (arq pins redis-py below 6.)
    """

    _serializer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return self._serializer.pack(*args)

    async def can_read_destructive(self) -> bool:
        parser = self._parser
        if not isinstance(parser, _AsyncHiredisParser) or not parser._connected:
            return await super().can_read_destructive()  # raises when closed
        stream = parser._stream
        return parser._reader.has_data() or stream.at_eof() or bool(stream._buffer)


def connection_options() -> dict[str, Any]:
    """Keyword arguments for a pool: ~20 s of retries with backoff, health checks."""
    return {
        "decode_responses": False,
        "health_check_interval": 30,
        "socket_keepalive": True,
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=12),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError, ConnectionResetError],
    }


def connection_pool(url: str) -> ConnectionPool:
    options = connection_options()
    if HIREDIS_AVAILABLE and urlsplit(url).scheme == "redis":
        options["connection_class"] = HiredisPackConnection
    return ConnectionPool.from_url(url, **options)


def connect(url: str) -> Redis:
    """A Redis client for ``url`` that reconnects on its own."""
    return Redis(connection_pool=connection_pool(url))


async def check_reachable(url: str) -> None:
    """Fail fast, with a clear message, when nothing answers at ``url``."""
    probe = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        await probe.ping()
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise ConnectionError(
            f"cannot reach Redis at {safe_url(url)} ({exc}); start it, fix REDIS_URL/cache, "
            "or leave both unset to use the embedded server"
        ) from exc
    finally:
        await probe.aclose()


def safe_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    return url.replace(f":{parts.password}@", ":***@") if parts.password else url
