"""Liveness beacons: short-lived keys that say a worker serves a route."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .protocol import Keys

log = logging.getLogger("cachesaver_dist.workers")

BEACON_EVERY_S = 5.0


def worker_name() -> str:
    """A readable, unique name for this worker process."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def beacon_loop(redis: Redis, keys: Keys, *routes: str) -> asyncio.Task:
    """Refresh ``alive`` keys for ``routes`` until the task is cancelled."""
    name = worker_name()

    async def loop() -> None:
        while True:
            try:
                pipe = redis.pipeline(transaction=False)
                for route in routes:
                    pipe.set(keys.worker_beacon(route, name), 1, ex=int(BEACON_EVERY_S * 3))
                await pipe.execute()
            except RedisError as exc:  # Redis restarting: try again next round
                log.warning("beacon not written: %s", exc)
            await asyncio.sleep(BEACON_EVERY_S)

    return asyncio.create_task(loop(), name=f"beacon:{name}")


async def alive_workers(redis: Redis, keys: Keys, route: str) -> int:
    """How many workers serving ``route`` refreshed their beacon recently."""
    count = 0
    async for _ in redis.scan_iter(match=keys.worker_beacon(route, "*"), count=1000):
        count += 1
    return count
