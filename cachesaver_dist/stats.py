"""Accounting: what each run was served from cache, deduplicated or generated.

Counters live in one Redis hash per run (and one over all runs); a field is
``<model_id>|<counter>``. A request is counted once, when it completes.

Lifetime: ``stats:<run>`` expires ``STATS_TTL_S`` (30 days) after the run's last counted
request, and the run index ``runs`` forgets runs unused for as long; the total ``stats``
is kept. The expiry is refreshed at most once a minute per run and process, so the
accounting of a busy run costs no extra command per request.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

from redis.asyncio import Redis

from . import defaults
from .protocol import CACHED, DUPLICATED, GENERATED, Keys

Tally = dict[tuple[str, str], float]  # (run, field) -> increment

KIND_NAMES = {CACHED: "cached", DUPLICATED: "deduplicated", GENERATED: "generated"}
COUNTERS = ("requests", *(
    f"{what}_{kind}"
    for kind in KIND_NAMES.values()
    for what in ("samples", "prompt_tokens", "completion_tokens")
))


def account(tally: Tally, run: str, model_id: str, flags: str,
            usages: list[dict[str, Any] | None]) -> None:
    """Add one completed request to ``tally`` (keyed by ``(run, field)``); ``usages``:
    each sample's token usage."""
    keys = _tally_keys(run, model_id)
    key = keys[""][0]
    tally[key] = tally.get(key, 0) + 1
    for flag, usage in zip(flags, usages):
        samples, prompt, completion = keys[flag]
        tally[samples] = tally.get(samples, 0) + 1
        if isinstance(usage, dict):
            value = usage.get("prompt_tokens")
            if isinstance(value, (int, float)):
                tally[prompt] = tally.get(prompt, 0) + value
            value = usage.get("completion_tokens")
            if isinstance(value, (int, float)):
                tally[completion] = tally.get(completion, 0) + value


def add_tally(into: Tally, tally: Tally) -> None:
    """Add the increments of ``tally`` to ``into``."""
    for key, value in tally.items():
        into[key] = into.get(key, 0) + value


@lru_cache(maxsize=1024)
def _tally_keys(run: str, model_id: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """flag -> the tally keys of the model's samples, prompt and completion token
    counters in ``run``; ``""`` -> its request counter's."""
    keys: dict[str, tuple[tuple[str, str], ...]] = {"": ((run, f"{model_id}|requests"),)}
    for flag, kind in KIND_NAMES.items():
        keys[flag] = tuple((run, f"{model_id}|{what}_{kind}")
                           for what in ("samples", "prompt_tokens", "completion_tokens"))
    return keys


REFRESH_EVERY_S = 60.0
_refreshed: dict[str, float] = {}  # key -> time.monotonic() of its last expiry refresh


def _due(key: str, now: float) -> bool:
    if now - _refreshed.get(key, -REFRESH_EVERY_S) < REFRESH_EVERY_S:
        return False
    if len(_refreshed) > 10_000:
        _refreshed.clear()
    _refreshed[key] = now
    return True


def write_tally(pipe: Any, keys: Keys, tally: Tally,
                ttl_s: int = defaults.STATS_TTL_S) -> None:
    """Queue the increments of ``tally`` on a Redis pipeline (and, once a minute per run,
    the refresh of its stats' lifetime and the trimming of the run index)."""
    for (run, field), value in tally.items():
        incr = pipe.hincrby if isinstance(value, int) else pipe.hincrbyfloat
        incr(keys.stats(run), field, value)
        incr(keys.stats(), field, value)
    runs = {run for run, _ in tally}
    if runs:
        now, mono = time.time(), time.monotonic()
        pipe.zadd(keys.runs, dict.fromkeys(runs, now))
        for run in runs:
            if _due(keys.stats(run), mono):
                pipe.expire(keys.stats(run), ttl_s)
        if _due(keys.runs, mono):
            pipe.zremrangebyscore(keys.runs, "-inf", now - ttl_s)


async def read_stats(
    redis: Redis, keys: Keys, run: str | None = None
) -> dict[str, dict[str, float]]:
    """``{model_id: {counter: value}}`` for one run, or over all runs."""
    raw = await redis.hgetall(keys.stats(run))  # type: ignore[misc]
    out: dict[str, dict[str, float]] = {}
    for field, value in raw.items():
        model_id, counter = field.decode().rsplit("|", 1)
        out.setdefault(model_id, dict.fromkeys(COUNTERS, 0))[counter] = float(value)
    return out


async def list_runs(redis: Redis, keys: Keys) -> list[tuple[str, float]]:
    """Runs with counters, most recently used first."""
    raw = await redis.zrevrange(keys.runs, 0, -1, withscores=True)
    return [(run.decode(), score) for run, score in raw]
