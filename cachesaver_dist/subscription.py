"""A client process's reply subscription: one channel, read by one task.

Pub/sub delivers at most once; what is lost is asked again by the client. The
subscription reconnects and subscribes again on its own when its connection drops, and
also when its server stops answering while the connection stays open (a primary that
froze, replaced by Sentinel): quiet for ``PING_AFTER_S``, it is PINGed, and made again
if nothing comes back within ``SILENT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from .connection import has_buffered_data
from .errors import ProtocolError, RedisUnavailableError, refused
from .protocol import decode_replies

log = logging.getLogger("cachesaver_dist.client")

CONFIRM_WAIT_S = 10.0  # Redis must confirm the subscription within this
PING_AFTER_S = 10.0  # a subscription quiet this long is PINGed, and
SILENT_S = 5.0  # made again if nothing comes this long after


class ReplySubscription:
    """Reads ``channel`` and hands every reply message, decoded, to ``deliver``."""

    def __init__(self, redis: Redis, channel: str,
                 deliver: Callable[[list[dict[str, Any]]], None]) -> None:
        self.channel, self._deliver = channel, deliver
        self._pubsub: Any = redis.pubsub()
        self._reader: asyncio.Task | None = None
        self._closing = False
        self._heard_at = 0.0  # event-loop time it last got anything
        self._pinged = False

    async def start(self) -> None:
        """Subscribe, wait until Redis confirms, then read in a task of its own."""
        try:
            await self._pubsub.subscribe(self.channel)
            deadline = time.monotonic() + CONFIRM_WAIT_S
            while True:
                msg = await self._pubsub.get_message(timeout=1.0)
                if msg and msg["type"] == "subscribe":
                    break
                if time.monotonic() > deadline:
                    raise RedisUnavailableError(f"Redis did not confirm the subscription to "
                                                f"{self.channel} in {CONFIRM_WAIT_S:g} s")
        except (ResponseError, AuthenticationError) as exc:
            raise refused(exc, f"the subscription to {self.channel}") from None
        self._heard_at = asyncio.get_running_loop().time()
        self._reader = asyncio.create_task(self._read(), name="cachesaver-replies")

    async def close(self) -> None:
        self._closing = True  # the reader also stops by itself within a second
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader], timeout=2.0)
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()

    async def _read(self) -> None:
        backoff = 0.1
        while not self._closing:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
                backoff = 0.1
                await self._keep_alive(msg is not None)
            except (RedisError, OSError) as exc:  # reconnects and re-subscribes next call
                log.warning("reply subscription lost (%s); reconnecting", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if not msg or msg["type"] != "message":
                continue
            try:
                replies = decode_replies(msg["data"])
            except ProtocolError as exc:  # one bad message must not stop the reader
                log.error("unreadable reply on %s (%d bytes): %s; its requests are asked "
                          "again", msg["channel"], len(msg["data"]), exc)
                continue
            self._deliver(replies)
            await self._let_callers_run()

    async def _let_callers_run(self) -> None:
        """When another message waits already, let the loop run once before it is
        delivered: the callers this one woke then make their next requests, and a batch
        they fill is sent, before the next message wakes more callers. Delivered all at
        once, the messages of several batches (one reserve call answers up to 16) would
        wake every caller before the first new batch could leave, and the workers would
        idle meanwhile."""
        if has_buffered_data(self._pubsub.connection):
            await asyncio.sleep(0)

    async def _keep_alive(self, heard: bool) -> None:
        """PING when quiet for ``PING_AFTER_S``; if nothing comes back, drop the
        connection: the next read connects (to the current primary) and subscribes."""
        now = asyncio.get_running_loop().time()
        if heard:
            self._heard_at, self._pinged = now, False
            return
        quiet = now - self._heard_at
        if quiet > PING_AFTER_S + SILENT_S:
            log.warning("reply subscription: Redis answered no PING for %.0f s; "
                        "subscribing again", quiet - PING_AFTER_S)
            self._heard_at, self._pinged = now, False
            await self._pubsub.connection.disconnect()
        elif quiet > PING_AFTER_S and not self._pinged:
            self._pinged = True
            await self._pubsub.ping()
