"""``cachesaver-dist top``: a live view of the cluster.

Per model, what the cache saved over all runs (the ``stats`` total, with rates between
frames); per route (``cache`` and each model), the live workers, the backlog (cache jobs
queued; a model's unfinished work entries) and the work in model calls; the dead
letters. ``--once`` prints one frame, ``--json`` one snapshot as JSON.

Routes are the ones named with ``--model``, else found by a SCAN of the worker
registries and work streams under the prefix (at start and every ``REDISCOVER_S``), or,
for a user refused SCAN, the models of the stats.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from datetime import datetime
from typing import Any

from redis.exceptions import NoPermissionError, RedisError
from rich.console import Console, Group, RenderableType
from rich.text import Text

from . import argtypes, defaults
from .cluster import CACHE_ROUTE, discover_routes, read_state, routes_in_stats
from .connection import connect, safe_url
from .protocol import Keys
from .report import load_prices, price_of, summarize
from .stats import read_stats
from .tables import Col, fit_table

REDISCOVER_S = 30.0
SNAPSHOT_WAIT_S = 5.0  # a live view's read of Redis waits at most this long


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=argtypes.positive_seconds, default=defaults.TOP_INTERVAL_S,
                   help=f"seconds between frames ({defaults.TOP_INTERVAL_S:g})")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="routes to show (repeatable; default: every one found under the "
                        "prefix)")
    p.add_argument("--prices", default=None,
                   help="JSON price file (default: $CACHESAVER_PRICES, else the built-in table)")


async def snapshot(redis: Any, keys: Keys, routes: list[str],
                   prices: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Everything one frame shows, as plain data (the ``--json`` output)."""
    state = await read_state(redis, keys, routes)
    models = []
    for model_id, counters in sorted((await read_stats(redis, keys, None)).items()):
        row = {"model": model_id, **summarize(counters, price_of(model_id, prices))}
        served = row["samples_generated"] + row["samples_cached"] + row["samples_deduplicated"]
        row["hit_ratio"] = row["samples_cached"] / served if served else None
        models.append(row)
    return {"time": state.time, "prefix": keys.prefix, "queue_depth": state.queue_depth,
            "dead_letters": state.dead_letters, "models": models,
            "routes": [vars(r) for r in state.routes]}


_scan_refused = False


async def find_routes(redis: Any, keys: Keys) -> list[str]:
    """Routes under the prefix (SCAN); for a user refused SCAN, once, the stats' models."""
    global _scan_refused
    if not _scan_refused:
        try:
            return await discover_routes(redis, keys)
        except NoPermissionError:
            _scan_refused = True
    return await routes_in_stats(redis, keys)


def _rates(now: dict[str, Any], before: dict[str, Any] | None) -> dict[str, float]:
    """Requests per second of each model since the previous frame."""
    if before is None:
        return {}
    dt = now["time"] - before["time"]
    old = {m["model"]: m["requests"] for m in before["models"]}
    return {m["model"]: max(0.0, (m["requests"] - old.get(m["model"], 0)) / dt)
            for m in now["models"]} if dt > 0 else {}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _dollars(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _calls(route: dict[str, Any]) -> str:
    if route["route"] == CACHE_ROUTE:
        return "-"
    orphaned = route.get("orphaned")
    return f"{route['pending']} ({orphaned} orphaned)" if orphaned else str(route["pending"])


def render(snap: dict[str, Any], width: int, rates: dict[str, float] | None = None,
           note: str = "") -> RenderableType:
    """One frame: a header line, the models table and the routes table."""
    at = datetime.fromtimestamp(snap["time"]).strftime("%H:%M:%S")
    head = Text.assemble(("cachesaver-dist top", "bold"), f"  prefix {snap['prefix']!r}  {at}"
                         f"  queue {snap['queue_depth']}  dead letters {snap['dead_letters']}")
    model_cols = [Col("model", "model", text=True, whole=True), Col("requests", "requests")]
    if rates is not None:
        model_cols.append(Col("req/s", get=lambda r: f"{rates.get(r['model'], 0.0):.1f}",
                              drop=4))
    model_cols += [Col("generated", "samples_generated"), Col("cached", "samples_cached"),
                   Col("dedup", "samples_deduplicated", drop=3),
                   Col("hit %", "hit_ratio", fmt=_pct, drop=2),
                   Col("tokens saved", drop=6,
                       get=lambda r: r["tokens_cached"] + r["tokens_deduplicated"]),
                   Col("$ saved", "dollars_saved", fmt=_dollars, drop=5)]
    route_rows = [{**r, "backlog": snap["queue_depth"] if r["route"] == CACHE_ROUTE
                   else r["lag"], "calls": _calls(r)} for r in snap["routes"]]
    route_cols = [Col("route", "route", text=True, whole=True), Col("workers", "workers"),
                  Col("backlog", "backlog"), Col("in calls", "calls", drop=1)]
    parts: list[RenderableType] = [head]
    if note:
        parts.append(Text(note, style="red"))
    parts.append(fit_table(model_cols, snap["models"], width, title="what the cache saved "
                           "(all runs)") if snap["models"] else Text("no statistics yet"))
    parts.append(fit_table(route_cols, route_rows, width, title="workers and backlog",
                           caption="backlog: cache jobs queued (cache), work entries not "
                                   "finished (models); in calls: read, not yet filled "
                                   "(orphaned: read by a worker no longer alive, taken "
                                   "over when its lease runs out)"))
    return Group(*parts)


async def run_top(url: str, keys: Keys, args: argparse.Namespace) -> int:
    prices = load_prices(args.prices)
    if args.interval <= 0:
        raise ValueError(f"--interval must be > 0 seconds, got {args.interval}")
    redis = connect(url, read_timeout=defaults.READ_TIMEOUT_S)
    try:
        named = [CACHE_ROUTE, *dict.fromkeys(m for m in args.model or [] if m != CACHE_ROUTE)]
        routes = named if args.model else await find_routes(redis, keys)
        found_at = time.monotonic()
        snap = await snapshot(redis, keys, routes, prices)
        if args.json:
            print(json.dumps(snap, indent=2))
            return 0
        console = Console()
        if args.once:
            console.print(render(snap, console.width))
            return 0
        try:
            return await _live(redis, keys, routes, found_at, snap, prices, args, console, url)
        except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels us; quitting is normal
            return 0
    finally:
        await redis.aclose()


async def _live(redis: Any, keys: Keys, routes: list[str], found_at: float,
                snap: dict[str, Any], prices: dict[str, tuple[float, float]],
                args: argparse.Namespace, console: Console, url: str) -> int:
    """Redraw every ``--interval`` on a terminal; elsewhere (a file, a pipe) print one
    frame after another, so the output is there as it comes."""
    from rich.live import Live

    before: dict[str, Any] | None = None
    note, read_at = "", time.strftime("%H:%M:%S")
    first = render(snap, console.width, {})
    live = Live(first, console=console, auto_refresh=False, screen=False, transient=False) \
        if console.is_terminal else None
    if live is None:
        console.print(first)
        console.file.flush()
    with live or contextlib.nullcontext():
        while True:
            await asyncio.sleep(args.interval)
            try:  # bounded: a Redis that stopped answering must not freeze the view
                if not args.model and time.monotonic() - found_at > REDISCOVER_S:
                    routes, found_at = await asyncio.wait_for(
                        find_routes(redis, keys), SNAPSHOT_WAIT_S), time.monotonic()
                snap, before = await asyncio.wait_for(
                    snapshot(redis, keys, routes, prices), SNAPSHOT_WAIT_S), snap
                note, read_at = "", time.strftime("%H:%M:%S")
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                note = (f"Redis at {safe_url(url)} unavailable "
                        f"({str(exc) or type(exc).__name__}); "
                        f"showing what it said at {read_at}")
            frame = render(snap, console.width, _rates(snap, before), note)
            if live is not None:
                live.update(frame, refresh=True)
            else:
                console.print(frame)
                console.file.flush()
