"""Worker heartbeats: which workers serve which routes (models, or ``cache``).

Each worker keeps its name in a sorted set per route, scored with the time (ms) until
which it promises to be alive; a client asks ``alive_workers`` when a request waits
too long, and fails fast, naming the missing worker, when there is none.

Every time here is the Redis server's (``server_ms``): hosts whose clocks disagree
still agree on which workers are alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import Any

from redis.asyncio.connection import async_timeout as timeout_scope
from redis.exceptions import NoPermissionError, RedisError

from . import defaults
from .protocol import Keys

log = logging.getLogger("cachesaver_dist.workers")


REGISTRY_KEPT_S = 12 * defaults.HEARTBEAT_S  # a route's registry outlives its last beat
_LOCAL_CLOCK = {"warned": False}


async def server_ms(redis: Any) -> int:
    """The Redis server's clock, in ms (``TIME``). A user refused TIME (an ACL file from
    before it was granted) gets this host's clock, with one warning naming the fix."""
    try:
        seconds, micros = await redis.time()
        return int(seconds) * 1000 + int(micros) // 1000
    except NoPermissionError:
        if not _LOCAL_CLOCK["warned"]:
            _LOCAL_CLOCK["warned"] = True
            log.warning("this Redis user may not run TIME: worker heartbeats are judged by "
                        "this host's clock, which other hosts' clocks may not match; grant "
                        "the user +time (see ops/acl.conf)")
        return int(time.time() * 1000)


def worker_name() -> str:
    """A readable, unique name for this worker process."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def beat(redis: Any, keys: Keys, routes: tuple[str, ...], name: str) -> None:
    """Say once that ``name`` serves ``routes`` for three heartbeat periods."""
    now_ms = await server_ms(redis)
    ttl_ms = int(defaults.HEARTBEAT_S * 3000)
    kept_ms = int(REGISTRY_KEPT_S * 1000)
    pipe = redis.pipeline(transaction=False)
    for route in routes:
        key = keys.workers(route)
        pipe.zadd(key, {name: now_ms + ttl_ms})
        pipe.zremrangebyscore(key, "-inf", now_ms)
        pipe.pexpire(key, kept_ms)
    await pipe.execute()


def heartbeat_loop(redis: Any, keys: Keys, *routes: str, name: str | None = None
                   ) -> asyncio.Task:
    """Beat every ``HEARTBEAT_S`` until the task is cancelled."""
    name = name or worker_name()

    async def loop() -> None:
        while True:
            pause = defaults.HEARTBEAT_S
            # bounded: a primary that froze must not hold the beats past their TTL; in a
            # timeout scope of this task (asyncio.wait_for, before Python 3.12, loses a
            # cancellation that comes as the beat ends: the loop would beat on for ever)
            try:
                async with timeout_scope(defaults.HEARTBEAT_S):
                    await beat(redis, keys, routes, name)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:  # on a new connection
                log.warning("heartbeat not written: %s",
                            str(exc) or f"no answer from Redis within {defaults.HEARTBEAT_S:g} s "
                            "(down, unreachable or overloaded?)")
                pause = min(1.0, defaults.HEARTBEAT_S)
            await asyncio.sleep(pause)

    return asyncio.create_task(loop(), name=f"heartbeat:{name}")


RESTART_GRACE_S = 5.0  # a worker that stopped cleanly still counts this long


async def retire(redis: Any, keys: Keys, routes: tuple[str, ...], name: str) -> None:
    """Shorten ``name``'s promise to ``RESTART_GRACE_S`` from now (best effort, bounded):
    a request waiting through a restart (stop, then start) waits for the replacement
    instead of failing; with no replacement, it fails at its first re-ask after that."""
    async def shorten() -> None:
        deadline_ms = await server_ms(redis) + int(RESTART_GRACE_S * 1000)
        pipe = redis.pipeline(transaction=False)
        for route in routes:
            pipe.zadd(keys.workers(route), {name: deadline_ms}, xx=True)
        await pipe.execute()

    with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
        await asyncio.wait_for(shorten(), 1.0)


async def alive_workers(redis: Any, keys: Keys, route: str) -> int:
    """How many workers serving ``route`` beat recently."""
    return int(await redis.zcount(keys.workers(route), await server_ms(redis), "+inf"))
