"""What the cluster is doing right now, read from Redis: queue depth, stream lag, dead
letters and live workers per route. Shared by the workers' gauges, ``top`` and ``health``.

A route is ``cache`` (the cache workers) or a model name (the batch workers serving it).
Every figure is one cheap command per key (ZCARD, XLEN, ZCOUNT, XINFO GROUPS and
CONSUMERS, ZRANGEBYSCORE), sent in one pipeline; routes are found by a SCAN only when
none are named.
"""

from __future__ import annotations

import argparse
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from .heartbeat import server_ms
from .protocol import CONSUMER_GROUP, Keys, text

CACHE_ROUTE = "cache"


@dataclass
class RouteState:
    """One route: live workers; for a model, its work stream.

    ``lag``: entries not finished, waiting to be read or in a model call (Redis's group
    lag, undelivered, plus ``pending``); ``pending``: read by a worker, not acknowledged;
    ``orphaned``: of those, the ones leased by workers no longer alive (taken over when
    their lease runs out), ``None`` when the user may not read the consumers.
    """

    route: str
    workers: int = 0
    lag: int = 0
    pending: int = 0
    orphaned: int | None = 0


@dataclass
class ClusterState:
    queue_depth: int = 0  # cache jobs queued or running (the arq queue's sorted set)
    dead_letters: int = 0
    routes: list[RouteState] = field(default_factory=list)
    time: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


async def discover_routes(redis: Any, keys: Keys, count: int = 1000) -> list[str]:
    """Routes with a worker registry or a work stream under the prefix (a SCAN: for
    operator commands, not for a hot path). ``cache`` first, then models sorted.
    ``NoPermissionError`` for a user refused SCAN (the operator of ops/acl.conf): see
    ``routes_in_stats``."""
    found: set[str] = set()
    for kind, template in (("zset", keys.workers("*")), ("stream", keys.work_stream("*"))):
        head = template[:-1]
        async for raw in redis.scan_iter(match=_glob_escape(head) + "*", count=count,
                                         _type=kind):
            found.add(text(raw)[len(head):])
    return _routes(found)


async def routes_in_stats(redis: Any, keys: Keys) -> list[str]:
    """``cache`` and the models of the stats (for a named model, its route)."""
    fields = await redis.hgetall(keys.stats())  # the operator may HGETALL, not HKEYS
    return _routes({f.decode(errors="replace").rpartition("|")[0] for f in fields})


def _routes(found: set[str]) -> list[str]:
    models = sorted(found - {CACHE_ROUTE})
    return [CACHE_ROUTE, *models]


async def read_state(redis: Any, keys: Keys, routes: list[str] | tuple[str, ...]
                     ) -> ClusterState:
    """Queue depth, dead letters, and each route's live workers (and stream lag)."""
    now_ms = await server_ms(redis)
    pipe = redis.pipeline(transaction=False)
    pipe.zcard(keys.cache_queue)
    pipe.xlen(keys.dead_letters)
    models = [r for r in routes if r != CACHE_ROUTE]
    for route in routes:
        pipe.zcount(keys.workers(route), now_ms, "+inf")
    for route in models:
        pipe.xlen(keys.work_stream(route))
        pipe.xinfo_groups(keys.work_stream(route))
        pipe.xinfo_consumers(keys.work_stream(route), CONSUMER_GROUP)
        pipe.zrangebyscore(keys.workers(route), now_ms, "+inf")
    results = await pipe.execute(raise_on_error=False)
    for r in results[: 2 + len(routes)]:
        if isinstance(r, Exception):
            raise r
    state = ClusterState(queue_depth=int(results[0]), dead_letters=int(results[1]),
                         time=now_ms / 1000)
    workers = dict(zip(routes, results[2: 2 + len(routes)]))
    tail = results[2 + len(routes):]
    streams = {route: tail[4 * i: 4 * i + 4] for i, route in enumerate(models)}
    for route in routes:
        rs = RouteState(route, workers=int(workers[route]))
        if route in streams:
            length, groups, consumers, live = streams[route]
            rs.lag, rs.pending = _stream_lag(length, groups)
            rs.orphaned = _orphaned(consumers, live) if rs.pending else 0
        state.routes.append(rs)
    return state


def _orphaned(consumers: Any, live: Any) -> int | None:
    """Entries pending with consumers that are not live workers (XINFO CONSUMERS against
    the registry); ``None`` when either could not be read."""
    if isinstance(consumers, Exception) or isinstance(live, Exception):
        return None
    alive = {text(n) for n in live}
    return sum(int(c.get("pending") or 0) for c in consumers or []
               if text(c.get("name", b"")) not in alive)


def _stream_lag(length: Any, groups: Any) -> tuple[int, int]:
    """(unfinished, pending) of a work stream from XLEN and XINFO GROUPS."""
    if isinstance(groups, ResponseError) and "no such key" in str(groups).lower():
        return 0, 0  # no such stream yet: nothing waits
    for result in (length, groups):
        if isinstance(result, Exception):
            raise result
    length = int(length)
    for g in groups or []:
        name = g.get("name", b"")
        if text(name) != CONSUMER_GROUP:
            continue
        pending = int(g.get("pending") or 0)
        lag = g.get("lag")
        # Redis cannot always count the group's lag (after deletions in the stream); the
        # workers delete what they acknowledge, so the stream holds only unfinished work.
        undelivered = int(lag) if lag is not None else max(0, length - pending)
        return undelivered + pending, pending
    return length, 0  # no group yet: no batch worker ever read it, all of it waits


def _parse_name(name: str) -> str:
    """The host part of a worker name ``<host>-<pid>-<hex>``."""
    parts = name.rsplit("-", 2)
    return parts[0] if len(parts) == 3 else ""


async def live_worker_names(redis: Any, keys: Keys, route: str) -> list[str]:
    """Names of the workers of ``route`` whose heartbeat has not run out."""
    raw = await redis.zrangebyscore(keys.workers(route), await server_ms(redis), "+inf")
    return [text(n) for n in raw]


async def check_health(redis: Any, keys: Keys, routes: list[str], *, host: str | None = None
                       ) -> list[tuple[str, list[str]]]:
    """For each route, the live workers (of ``host`` only, unless it is empty)."""
    host = socket.gethostname() if host is None else host
    out = []
    for route in routes:
        names = await live_worker_names(redis, keys, route)
        if host:
            names = [n for n in names if _parse_name(n) == host]
        out.append((route, names))
    return out


def add_health_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("routes", nargs="+", metavar="ROUTE",
                   help="'cache' (a cache worker) or a model name (a batch worker)")
    p.add_argument("--cluster", action="store_true",
                   help="a worker on any host will do (default: one on this host, as named "
                        "by its hostname: the container or pod)")


async def run_health(redis: Any, keys: Keys, routes: list[str], *, cluster: bool = False) -> int:
    """``cachesaver-dist health``: 0 when every route has a live worker, else 1."""
    host = "" if cluster else socket.gethostname()
    where = "in the cluster" if cluster else f"on host {host}"
    ok = True
    for route, names in await check_health(redis, keys, routes, host=host):
        if names:
            print(f"{route}: {len(names)} live worker(s) {where}")
        else:
            ok = False
            print(f"{route}: no live worker {where} under prefix {keys.prefix!r}")
    return 0 if ok else 1
