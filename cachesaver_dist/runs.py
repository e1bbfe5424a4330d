"""Runs you can inspect, fork and replay.

A run is the scope of namespace counters (``u:<run>``). It may keep a manifest
(``m:<run>``, ``OnlineAPI(..., manifest=True)``): for each ``(namespace, request_id)``
the prompt key and index range the request got, recorded by reserve.lua in the same
atomic step as the reservation. ``OnlineAPI(..., replay=RUN)`` serves exactly those
samples again to the same request ids, in any process and order, reading them straight
from Redis (``Replayer``): no cache worker, no batch worker, nothing generated.

``cachesaver-dist runs`` lists runs; ``cachesaver-dist fork RUN NEW`` copies a run's
counters so that NEW continues where RUN stands.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from . import argtypes, defaults
from .client import describe
from .errors import CacheSaverError, ProtocolError, ReplayError
from .prepare import check_run
from .protocol import (
    CACHED,
    PROMPT_KEY_CHARS,
    Keys,
    WorkItem,
    decode_manifest_entry,
    manifest_field,
    reply,
)
from .scripts import script

COMMANDS = ("runs", "fork")


# --- replay -------------------------------------------------------------------------------


class Replayer:
    """Serves a recorded run's samples to the same request ids: a stand-in for the
    ``CacheClient`` of an ``OnlineAPI`` created with ``replay=RUN``.

    Two round trips per batch (the manifest entries, then the samples), reads only.
    """

    def __init__(self, redis: Redis, keys: Keys, run: str) -> None:
        self.redis, self.keys, self.run = redis, keys, run
        self.manifest = keys.manifest(run)

    async def start(self) -> None:
        if not await self.redis.hlen(self.manifest):  # type: ignore[misc]
            raise ReplayError(
                f"run {self.run!r} has no manifest under prefix {self.keys.prefix!r}: record "
                "it with OnlineAPI(..., run=RUN, manifest=True), or import an archive that "
                "carries it ('cachesaver-dist import FILE'); see 'cachesaver-dist runs'")

    async def close(self) -> None:
        return None

    async def submit(self, items: list[WorkItem]) -> list[dict[str, Any] | CacheSaverError]:
        """The recorded samples of each item, or a ``ReplayError`` saying why not."""
        out: list[dict[str, Any] | CacheSaverError | None] = [None] * len(items)
        asked = []
        pipe = self.redis.pipeline(transaction=False)
        for i, it in enumerate(items):
            if not it.request_id:
                out[i] = ReplayError(
                    f"a replayed run serves requests by request_id; this request has none "
                    f"({describe(it)}, replay of run {self.run!r})")
                continue
            pipe.hget(self.manifest, manifest_field(it.namespace, it.request_id))
            asked.append(i)
        entries = await pipe.execute() if asked else []
        reads = []
        pipe = self.redis.pipeline(transaction=False)
        for i, raw in zip(asked, entries):
            it = items[i]
            where = f"{describe(it)} in namespace {it.namespace!r}"
            if raw is None:
                out[i] = ReplayError(
                    f"run {self.run!r} holds no {where}: a replay serves only the requests "
                    "the run made, with their request ids and namespaces; nothing is generated")
                continue
            try:
                entry = decode_manifest_entry(raw)
            except ProtocolError as exc:
                out[i] = ReplayError(f"the manifest entry of {where} in run {self.run!r} "
                                     f"cannot be read ({exc})")
                continue
            if entry.ambiguous:
                out[i] = ReplayError(
                    f"run {self.run!r} gave several ranges to {where} (the request id was "
                    "used more than once in that namespace): the manifest cannot tell them "
                    "apart; give requests unique ids per namespace when recording")
            elif entry.key != it.key:
                out[i] = ReplayError(
                    f"{where} changed since run {self.run!r}: its prompt key is {it.key}, the "
                    f"recorded one {entry.key} (the prompt, a decoding field or the model id "
                    "differs); a replay serves the recorded requests unchanged")
            elif entry.n != it.n:
                out[i] = ReplayError(
                    f"{where} asks for n={it.n}; run {self.run!r} recorded n={entry.n} for it")
            else:
                pipe.hmget(self.keys.samples(entry.key),
                           list(range(entry.start, entry.start + entry.n)))
                reads.append((i, entry.start))
        samples = await pipe.execute() if reads else []
        for (i, start), got in zip(reads, samples):
            it = items[i]
            missing = sum(s is None for s in got)
            if missing:
                out[i] = ReplayError(
                    f"{missing} of the {it.n} samples run {self.run!r} gave to {describe(it)} "
                    f"(indices {start}..{start + it.n - 1} of prompt key {it.key}) are not "
                    "in this cache: import the run's archive (samples included) first")
            else:
                out[i] = reply(it.uuid, start, CACHED * it.n, list(got))
        assert all(o is not None for o in out)
        return out  # type: ignore[return-value]


# --- listing ------------------------------------------------------------------------------


async def scan_names(redis: Redis, keys: Keys, family: str) -> list[str]:
    """The names after ``<prefix><family>:`` of every key of that family."""
    start = len(keys.prefix) + len(family) + 1
    return [name.decode(errors="replace")[start:]
            async for name in redis.scan_iter(match=keys.family(family), count=1000)]


async def run_names(redis: Redis, keys: Keys) -> dict[str, float | None]:
    """Every run known by its index entry, counters, manifest or stats -> last use."""
    found: dict[str, float | None] = {
        run.decode(errors="replace"): score
        for run, score in await redis.zrange(keys.runs, 0, -1, withscores=True)}
    for family in ("u", "m", "stats"):
        for run in await scan_names(redis, keys, family):
            found.setdefault(run, None)
    return found


async def run_info(redis: Redis, keys: Keys, run: str, last_used: float | None,
                   now: float | None = None) -> dict[str, Any]:
    """One run: namespaces, prompt keys, samples used, requests, manifest, age, expiry."""
    now = time.time() if now is None else now
    namespaces: dict[str, int] = {}
    prompt_keys: set[str] = set()
    used = 0
    async for field, value in redis.hscan_iter(keys.usage(run), count=1000):
        text = field.decode(errors="replace")
        ns = text[PROMPT_KEY_CHARS:]
        namespaces[ns] = namespaces.get(ns, 0) + int(value)
        prompt_keys.add(text[:PROMPT_KEY_CHARS])
        used += int(value)
    # None: the run has no statistics here (forked, imported, or its stats expired)
    stats = await redis.hgetall(keys.stats(run))  # type: ignore[misc]
    requests = sum(int(float(v)) for f, v in stats.items() if f.endswith(b"|requests")) \
        if stats else None
    generated = sum(int(float(v)) for f, v in stats.items()
                    if f.endswith(b"|samples_generated")) if stats else None
    pttl = await redis.pttl(keys.usage(run))
    return {
        "run": run,
        "namespaces": dict(sorted(namespaces.items())),
        "prompt_keys": len(prompt_keys),
        "samples_used": used,
        "requests": requests,
        "samples_generated": generated,
        "manifest": await redis.hlen(keys.manifest(run)),  # type: ignore[misc]
        "last_used": last_used,
        "age_s": None if last_used is None else max(0.0, now - last_used),
        "expires_in_s": pttl / 1000 if pttl > 0 else None,
    }


async def list_runs(redis: Redis, keys: Keys) -> list[dict[str, Any]]:
    """Every run, most recently used first (runs never used by a request last)."""
    names = await run_names(redis, keys)
    now = time.time()
    infos = [await run_info(redis, keys, run, last, now) for run, last in names.items()]
    infos.sort(key=lambda r: (r["last_used"] is None, -(r["last_used"] or 0), r["run"]))
    return infos


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


async def print_runs(redis: Redis, keys: Keys, as_json: bool) -> int:
    runs = await list_runs(redis, keys)
    if as_json:
        print(json.dumps(runs, indent=2))
        return 0
    if not runs:
        print(f"no runs under prefix {keys.prefix!r}")
        return 0
    from rich.console import Console

    from .tables import Col, fit_table

    def namespaces(r: dict[str, Any]) -> str:
        names = list(r["namespaces"])
        return (", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
                or "-")

    cols = [Col("run", "run", text=True, whole=True),
            Col("namespaces", get=namespaces, text=True, drop=1),
            Col("requests", "requests", fmt=lambda n: "-" if n is None else str(n)),
            Col("samples used", "samples_used"),
            Col("manifest", "manifest", fmt=lambda m: str(m) if m else "-", drop=2),
            Col("last used", "age_s",
                fmt=lambda s: _age(s) + (" ago" if s is not None else ""), drop=3),
            Col("expires", "expires_in_s", fmt=_age, drop=4)]
    console = Console()
    console.print(fit_table(cols, runs, console.width, title="cachesaver-dist runs"))
    return 0


# --- fork ---------------------------------------------------------------------------------


async def fork(redis: Redis, keys: Keys, run: str, new: str,
               run_ttl_s: int = defaults.RUN_TTL_S) -> int:
    """Copy ``run``'s counters to ``new``, kept ``run_ttl_s`` idle (0: without expiry);
    the number of counters copied.

    Raises ``CacheSaverError`` when ``run`` has no counters or ``new`` exists already."""
    check_run(run)
    check_run(new)
    if not isinstance(run_ttl_s, int) or isinstance(run_ttl_s, bool) or run_ttl_s < 0:
        raise CacheSaverError(f"fork: run_ttl_s must be an int >= 0 (0: no expiry), got "
                              f"{run_ttl_s!r}")
    if run == new:
        raise CacheSaverError("fork: the new run must have another name")
    copied = int(await script(redis, "fork")(
        keys=[keys.usage(run), keys.usage(new), keys.manifest(new), keys.stats(new), keys.runs],
        args=[new, time.time(), run_ttl_s * 1000]))
    if copied == -1:
        raise CacheSaverError(f"run {run!r} has no counters under prefix {keys.prefix!r} "
                              "(expired, dropped or never used; see 'cachesaver-dist runs')")
    if copied == -2:
        raise CacheSaverError(f"run {new!r} exists already (counters, manifest, stats or an "
                              "index entry): choose another name, or prune it first")
    return copied


# --- CLI ----------------------------------------------------------------------------------


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    runs = sub.add_parser("runs", help="list runs: namespaces, requests, samples used, age")
    common(runs)
    runs.add_argument("--json", action="store_true", help="print the runs as JSON")
    fork_ = sub.add_parser("fork", help="copy a run's counters to a new run, which continues "
                           "from there")
    common(fork_)
    fork_.add_argument("run", help="the run to copy")
    fork_.add_argument("new", help="the new run (refused if it exists)")
    fork_.add_argument("--run-ttl", type=argtypes.whole_seconds_or_zero, default=defaults.RUN_TTL_S,
                       help="seconds the new run's counters are kept idle; 0 keeps them "
                            "without expiry (default: 7 days)")


async def run_command(redis: Redis, keys: Keys, args: argparse.Namespace) -> int:
    if args.command == "runs":
        return await print_runs(redis, keys, args.json)
    copied = await fork(redis, keys, args.run, args.new, args.run_ttl)  # errors: main(), 1
    print(f"run {args.new!r}: {copied} counter(s) copied from run {args.run!r}")
    return 0
