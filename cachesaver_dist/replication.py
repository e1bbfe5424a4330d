"""How many replicas a worker waits for before it answers (behind Sentinel).

Redis replicates asynchronously: after a failover, the old primary may still accept
writes on connections opened before it, until Sentinel turns it into a replica and
it throws them away. A reservation answered from such a write hands indices out
twice. A worker that waits (``WAIT``) for one replica to hold each reservation and
each store never answers from a write a failover can lose.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

log = logging.getLogger("cachesaver_dist.replication")


async def replicas_to_wait(redis: Any, configured: int | None) -> int:
    """``configured`` (with a warning when the primary has fewer replicas now), or for
    None: 1 if the primary has two replicas or more now (``ROLE``), so losing one stops
    nothing; else 0, with a warning for one replica (waiting on it would stop every write
    when it is down: the operator chooses)."""
    if configured == 0:
        return 0
    try:
        role = await redis.execute_command("ROLE")
        connected = len(role[2]) if role and role[0] in (b"master", "master") else 0
    except RedisError as exc:
        if configured is not None:
            return configured
        log.warning("could not ask the primary for its replicas (%s); not waiting for "
                    "replicas (set --wait-replicas / CACHESAVER_WAIT_REPLICAS)", exc)
        return 0
    if configured is not None:
        if connected < configured:
            log.warning("waiting for %d replica(s) per write (--wait-replicas / "
                        "CACHESAVER_WAIT_REPLICAS), but the primary has %d connected now: "
                        "every request fails until enough replicas are back; lower the "
                        "setting, or connect replicas", configured, connected)
        return configured
    if connected == 1:
        log.warning("the primary has one replica: not waiting for it, so a failover may "
                    "hand an index out twice; add a replica, or pass --wait-replicas 1 "
                    "(writes then stop while that replica is down)")
        return 0
    waits = min(1, connected)
    log.info("the primary has %d replica(s): each reservation and store waits for %d",
             connected, waits)
    return waits
