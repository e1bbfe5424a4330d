"""Cluster-wide limits per model, shared by every batch worker through Redis.

* requests per window: the ``limits`` *moving window* (a Redis list of call times;
  exact: no window of that length ever holds more than the limit);
* tokens per window: the ``limits`` *sliding window counter* (two counters, O(1)
  whatever the limit; approximate, it weighs the previous window linearly). The
  cost of a call is an estimate made before it: see ``chat.estimate_tokens``;
* concurrent calls: a sorted set of holders with expiry times, taken by
  ``acquire_slot.lua`` and released when the call ends; a dead worker's holder
  expires after ``slot_ttl`` seconds.

Over a limit, a call waits (until the window frees, from ``get_window_stats``)
rather than fail. It takes tokens, then a request, then a concurrency slot, so the
slot is held only while the call runs (its expiry stays meaningful); a call that
waits for a slot has already spent its tokens and request in the window.
The windows are exact where they are taken, in the workers; the provider sees each
call one network hop later. Windows use the workers' clocks (keep them in NTP sync).

Keys: ``{prefix}limit:requests/{model}/{limit}/{window}/second`` (list),
``{prefix}limit:{tokens/{model}/...}`` and ``.../-1`` (counters), and
``{prefix}limit:{model}:concurrent`` (sorted set). Workers configured with other
limits use other keys: give every worker of a model the same flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import (
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from redis.asyncio import Redis

from ..errors import ModelError
from ..protocol import Keys
from ..scripts import script

_MIN_WAIT_S, _JITTER_S = 0.01, 0.02


class ClusterLimiter:
    """Requests and tokens per ``window`` seconds and concurrent calls of ``model``."""

    def __init__(self, redis: Redis, keys: Keys, model: str, *, rpm: int | None = None,
                 tpm: int | None = None, max_concurrent: int | None = None,
                 window: int = 60, slot_ttl: float = 130.0) -> None:
        self.model, self.window = model, window
        storage = RedisStorage("async+redis://", implementation="redispy",
                               key_prefix=f"{keys.prefix}limit",
                               connection_pool=redis.connection_pool)  # type: ignore[arg-type]
        self._requests = RateLimitItemPerSecond(rpm, window, namespace="requests") if rpm \
            else None
        self._tokens = RateLimitItemPerSecond(tpm, window, namespace="tokens") if tpm else None
        self._moving = MovingWindowRateLimiter(storage)
        self._sliding = SlidingWindowCounterRateLimiter(storage)
        self._max_concurrent = max_concurrent
        self._slots_key = f"{keys.prefix}limit:{model}:concurrent"
        self._slot_ttl_ms = int(slot_ttl * 1000)
        self._redis = redis
        self._take_slot = script(redis, "acquire_slot")

    @contextlib.asynccontextmanager
    async def call(self, tokens: int) -> AsyncIterator[None]:
        """Wait for a token budget, a request slot and a concurrency slot; hold the last."""
        if self._tokens is not None:
            if tokens > self._tokens.amount:
                raise ModelError(
                    f"a call to {self.model} needs about {tokens} tokens, over the limit of "
                    f"{self._tokens.amount} per {self.window} s: raise --tpm, or lower "
                    "max_tokens or --max-n")
            await self._wait(self._sliding, self._tokens, tokens)
        if self._requests is not None:
            await self._wait(self._moving, self._requests, 1)
        holder = await self._acquire_slot() if self._max_concurrent else None
        try:
            yield
        finally:
            if holder is not None:
                await self._redis.zrem(self._slots_key, holder)

    async def _wait(self, limiter: RateLimiter, item: RateLimitItem, cost: int) -> None:
        while not await limiter.hit(item, self.model, cost=cost):
            stats = await limiter.get_window_stats(item, self.model)
            await asyncio.sleep(max(stats.reset_time - time.time(), _MIN_WAIT_S)
                                + random.uniform(0, _JITTER_S))

    async def _acquire_slot(self) -> str:
        holder, pause = uuid.uuid4().hex, _MIN_WAIT_S
        args: list[str | int] = [holder, self._max_concurrent or 0, self._slot_ttl_ms]
        while not await self._take_slot(keys=[self._slots_key], args=args):
            await asyncio.sleep(pause + random.uniform(0, _JITTER_S))
            pause = min(pause * 2, 0.25)
        return holder
