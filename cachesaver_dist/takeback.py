"""Taking back what requests that gave up asked for, so no worker started later works
(and charges) for nobody: the queued jobs of a batch no cache worker served, or the
claims of requests no batch worker serves (``withdraw.lua``); and giving back the
indices of requests that failed, so that asking again gets them (``give_back.lua``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisError

from .errors import ProtocolError, redis_message
from .protocol import Keys, WorkItem, claimed_indices, waiter_id

log = logging.getLogger("cachesaver_dist")

TAKE_BACK_WAIT_S = 2.0


async def take_back(redis: Any, keys: Keys, client: str, batch: str, jobs: list[str],
                    items: list[WorkItem]) -> None:
    """Best effort, for a batch of ``client`` that failed for want of a worker: its
    queued ``jobs`` (given when none of the batch is still wanted) leave the queue (a
    cache worker that takes one later would reserve, and claim, for requests that gave
    up), then the claims of ``items`` (those whose model no batch worker serves) are
    withdrawn. Not for a named ACL user: its role's
    rules do not allow it."""
    if _acl_user(redis):
        return
    try:
        if jobs:
            await asyncio.wait_for(redis.zrem(keys.cache_queue, *jobs), TAKE_BACK_WAIT_S)
        if items:
            await asyncio.wait_for(_withdraw(redis, keys, client, batch, items),
                                   TAKE_BACK_WAIT_S)
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        log.info("what the requests without a worker asked for was not taken back: %s",
                 redis_message(exc))


async def give_back(redis: Any, keys: Keys, client: str, batch: str,
                    items: list[WorkItem], direct: bool = False) -> None:
    """Best effort, for requests of ``client``'s ``batch`` that failed (their errors are
    final): each one's indices go back to its namespace when no later request took indices
    after them, so the same request asked again gets them, as in the original
    CacheSaver. Not for a named ACL user other than a direct client's: the plain
    client's role may not write counters (the failed range then stays unused)."""
    if _acl_user(redis) and not direct:
        return
    from .scripts import give_back as give_back_script

    try:
        given = await asyncio.wait_for(give_back_script(redis, keys, client, batch, items),
                                       TAKE_BACK_WAIT_S)
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        log.info("the indices of %d failed request(s) were not given back: %s", len(items),
                 redis_message(exc))
        return
    log.debug("%d of %d failed request(s) gave their indices back", given, len(items))


def _acl_user(redis: Any) -> bool:
    """Logged in as a named ACL user (not ``default``): its rules are a role's."""
    kwargs = getattr(redis.connection_pool, "connection_kwargs", {})
    return kwargs.get("username") not in (None, "", "default")


async def _withdraw(redis: Any, keys: Keys, client: str, batch: str,
                    items: list[WorkItem]) -> None:
    """Withdraw the claims ``items`` made (their reservation records say which)."""
    from .scripts import withdraw

    wids = [waiter_id(client, it.uuid) for it in items]
    records = await redis.hmget(keys.reservations(client, batch), wids)
    claims: dict[tuple[str, str], tuple[list[str], list[int]]] = {}
    for it, wid, record in zip(items, wids, records):
        try:
            indices = claimed_indices(record) if record is not None else []
        except ProtocolError:  # not this client's to judge: reserve.lua replaces it
            continue
        if indices:
            wanted, claimed = claims.setdefault((it.route, it.key), ([], []))
            wanted.append(wid)
            claimed += indices
    for (route, key), (wanted, claimed) in claims.items():
        deleted, released = await withdraw(redis, keys, route, key, wanted, claimed)
        log.info("no batch worker for %s: %d claim(s) withdrawn, %d index(es) released",
                 route, deleted, released)
