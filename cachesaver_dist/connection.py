"""Redis connections that ride out restarts: commands retry with backoff on connection loss."""

from __future__ import annotations

from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


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
    return ConnectionPool.from_url(url, **connection_options())


def connect(url: str) -> Redis:
    """A Redis client for ``url`` that reconnects on its own."""
    return Redis(connection_pool=connection_pool(url))
