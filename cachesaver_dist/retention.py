"""Retention that never surprises: no silent eviction, explicit deletion, memory by owner.

* ``check_eviction_policy``: workers ask Redis for its ``maxmemory-policy`` at start and
  warn unless it is ``noeviction`` (any other policy lets Redis delete samples, counters
  or manifests on its own when it reaches ``maxmemory``).
* ``prune``: ``cachesaver-dist prune`` deletes what one selector names, never a prompt key
  that is being generated, and says how many samples and bytes (``--dry-run``: only says).
* ``usage``: ``cachesaver-dist usage``, memory by model and by run.

What each prune selector deletes:

``--run R``
    the run's counters ``u:R``, manifest ``m:R``, stats ``stats:R`` and its entry in the
    run index. Samples stay. With ``--namespace NS``: only NS's counters and manifest
    entries in run R.
``--namespace NS``
    NS's counters and manifest entries in every run (requests in NS start again from
    index 0 and so get the same samples again). Samples stay.
``--model M``
    every sample of M's prompt keys (the keys in ``keys:M``), with their generation
    hashes (mark, spec) and index entries. Counters stay: a later request claims its
    indices again and they are generated anew.
``--older-than DAYS``
    every sample whose ``created`` time is older (samples without one are kept), their
    indices marked released so they are generated again when asked for; a key left
    without samples goes whole as with ``--model``. With ``--model M``: M's keys only.

A prompt key that is being generated (a request waits on it, or an index below its mark
is claimed and not yet filled) is skipped whole and counted as ``skipped_busy``.
``bytes`` is ``MEMORY USAGE`` of every Redis key deleted whole plus the size of the fields
deleted from keys that stay.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from . import argtypes, logs
from .errors import CacheSaverError, ProtocolError
from .prepare import check_run
from .protocol import (
    PROMPT_KEY_CHARS,
    SPEC_FIELD,
    Keys,
    decode_spec,
    text,
    unpack,
)
from .runs import run_names, scan_names
from .scripts import script

log = logging.getLogger("cachesaver_dist.retention")

COMMANDS = ("prune", "usage")
BATCH = 200


# --- eviction -------------------------------------------------------------------------------


async def check_eviction_policy(redis: Redis) -> str:
    """Warn (log) unless the server's ``maxmemory-policy`` is ``noeviction``; return what
    was found, in one line. ``CONFIG GET`` refused (ACLs, a managed service): the check is
    skipped, and that is logged too."""
    try:
        config = {text(k): text(v) for k, v in (await redis.config_get("maxmemory*")).items()}
    except ResponseError as exc:
        message = (f"eviction check skipped: Redis refused CONFIG GET maxmemory-policy "
                   f"({str(exc)[:120]}); make sure the server runs with "
                   "'maxmemory-policy noeviction', or samples may be evicted silently")
        log.warning(message)
        return message
    policy = config.get("maxmemory-policy", "")
    if policy == "noeviction":
        message = "maxmemory-policy is noeviction: Redis never deletes samples on its own"
        log.info(message)
        return message
    limit = int(config.get("maxmemory") or 0)
    message = (f"Redis's maxmemory-policy is {policy!r}, not 'noeviction': when it reaches "
               f"maxmemory ({f'{limit} bytes' if limit else '0 = no limit, for now'}) it "
               "deletes keys on its own, and samples (or run counters and manifests) vanish "
               "silently and are generated, and paid for, again. Set 'maxmemory-policy "
               "noeviction' (ops/redis.conf) and delete explicitly with 'cachesaver-dist "
               "prune'")
    log.warning(message)
    return message


# --- prune ----------------------------------------------------------------------------------


@dataclass
class PruneResult:
    """What a prune deleted (or, dry, would delete)."""

    selector: str
    dry_run: bool
    prompt_keys: int = 0  # prompt keys that lost samples
    samples: int = 0
    bytes: int = 0
    redis_keys: int = 0  # Redis keys deleted whole
    fields: int = 0  # counter and manifest entries deleted
    skipped_busy: int = 0  # prompt keys being generated, left alone


async def _memory(redis: Redis, names: list[str]) -> list[int]:
    """``MEMORY USAGE`` of each key (0 if absent); if refused, the size of its ``DUMP``."""
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.memory_usage(name, samples=0)
    try:
        return [int(v or 0) for v in await pipe.execute()]
    except ResponseError:
        pipe = redis.pipeline(transaction=False)
        for name in names:
            pipe.dump(name)
        return [len(v or b"") for v in await pipe.execute()]


async def _batches(items: AsyncIterator[str], size: int = BATCH) -> AsyncIterator[list[str]]:
    batch: list[str] = []
    async for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def _decoded(names: AsyncIterator[bytes]) -> AsyncIterator[str]:
    async for name in names:
        yield name.decode(errors="replace")


def _sample_keys(redis: Redis, keys: Keys) -> AsyncIterator[str]:
    start = len(keys.prefix) + 2

    async def gen() -> AsyncIterator[str]:
        async for name in redis.scan_iter(match=keys.family("s"), count=1000):
            yield name.decode(errors="replace")[start:]
    return gen()


async def _models_of(redis: Redis, keys: Keys, batch: list[str]) -> list[str]:
    """The model id in each key's spec ('' when it has none or it cannot be read)."""
    pipe = redis.pipeline(transaction=False)
    for key in batch:
        pipe.hget(keys.generation(key), SPEC_FIELD)
    out = []
    for raw in await pipe.execute():
        try:
            out.append(decode_spec(raw).model_id if raw else "")
        except ProtocolError:
            out.append("")
    return out


async def _old_samples(redis: Redis, keys: Keys, key: str, cutoff: float
                       ) -> tuple[list[Any], int, int]:
    """``[idx, bytes, ...]`` of the key's samples created before ``cutoff``, their size, and
    how many samples the key has."""
    pairs: list[Any] = []
    size = total = 0
    async for idx, raw in redis.hscan_iter(keys.samples(key), count=1000):
        total += 1
        try:
            created = unpack(raw, "sample").get("created")
        except (ProtocolError, AttributeError):
            continue  # undated: kept
        if isinstance(created, (int, float)) and created < cutoff:
            pairs += [idx, raw]
            size += len(idx) + len(raw)
    return pairs, size, total


async def _prune_keys(redis: Redis, keys: Keys, batch: list[str], models: list[str],
                      result: PruneResult, cutoff: float | None) -> None:
    """Delete (or count) the samples of a batch of prompt keys: all of them, or those
    created before ``cutoff``. One script call per key, pipelined per batch."""
    todo: list[tuple[str, str, list[Any], int]] = []  # key, model, pairs, size of the pairs
    for key, model in zip(batch, models):
        if cutoff is None:
            todo.append((key, model, [], 0))
            continue
        pairs, size, total = await _old_samples(redis, keys, key, cutoff)
        if pairs:  # every sample old: no pairs, the key goes whole
            todo.append((key, model, [] if len(pairs) // 2 == total else pairs, size))
    if not todo:
        return
    sizes = await _memory(redis, [k for key, *_ in todo
                                  for k in (keys.samples(key), keys.generation(key))])
    pipe = redis.pipeline(transaction=False)
    for key, model, pairs, _ in todo:
        pipe.exists(keys.samples(key), keys.generation(key))
        await script(redis, "prune")(  # queued on the pipeline
            keys=[keys.samples(key), keys.generation(key), keys.waiters(key),
                  keys.model_keys(model) if model else keys.generation(key)],
            args=["dry" if result.dry_run else "real", key if model else "", *pairs],
            client=pipe)
    got = await pipe.execute()
    for i, (_, _, _, pairs_size) in enumerate(todo):
        existing, (removed, whole) = got[2 * i], got[2 * i + 1]
        if removed < 0:
            result.skipped_busy += 1
            continue
        if removed == 0 and not whole:
            continue
        result.prompt_keys += 1
        result.samples += int(removed)
        if whole:
            result.bytes += sizes[2 * i] + sizes[2 * i + 1]
            result.redis_keys += int(existing)
        else:
            result.bytes += pairs_size


Progress = Callable[[int, PruneResult], None]  # (prompt keys checked, counts so far)


async def _prune_model(redis: Redis, keys: Keys, model: str, result: PruneResult,
                       cutoff: float | None, progress: Progress | None = None) -> None:
    members = _decoded(redis.sscan_iter(keys.model_keys(model), count=1000))
    checked = 0
    async for batch in _batches(members):
        await _prune_keys(redis, keys, batch, [model] * len(batch), result, cutoff)
        checked += len(batch)
        if progress:
            progress(checked, result)


async def _prune_all(redis: Redis, keys: Keys, result: PruneResult, cutoff: float,
                     progress: Progress | None = None) -> None:
    checked = 0
    async for batch in _batches(_sample_keys(redis, keys)):
        await _prune_keys(redis, keys, batch, await _models_of(redis, keys, batch), result,
                          cutoff)
        checked += len(batch)
        if progress:
            progress(checked, result)


async def _prune_run(redis: Redis, keys: Keys, run: str, result: PruneResult) -> None:
    names = [keys.usage(run), keys.manifest(run), keys.stats(run)]
    sizes = await _memory(redis, names)
    present = [n for n in names if await redis.exists(n)]
    result.bytes += sum(sizes)
    result.redis_keys += len(present)
    if not result.dry_run:
        pipe = redis.pipeline(transaction=True)
        if present:
            pipe.delete(*present)
        pipe.zrem(keys.runs, run)
        await pipe.execute()


async def _prune_namespace(redis: Redis, keys: Keys, namespace: str, runs: list[str],
                           result: PruneResult) -> None:
    """Delete NS's counters and manifest entries in ``runs``."""
    prefix = f"{namespace}\n".encode()
    ns = namespace.encode()
    for run in runs:
        for name, match in ((keys.usage(run), lambda f: f[PROMPT_KEY_CHARS:] == ns),
                            (keys.manifest(run), lambda f: f.startswith(prefix))):
            doomed: list[bytes] = []
            async for field, value in redis.hscan_iter(name, count=1000):
                if match(field):
                    doomed.append(field)
                    result.bytes += len(field) + len(value)
            result.fields += len(doomed)
            if not result.dry_run:
                for i in range(0, len(doomed), 1000):
                    await redis.hdel(name, *doomed[i:i + 1000])  # type: ignore[arg-type,misc]


async def require_model(redis: Redis, keys: Keys, model: str) -> None:
    """``CacheSaverError`` if ``model`` has no prompt keys: a command told to select it
    would select nothing, and a typo would look like success."""
    if not await redis.exists(keys.model_keys(model)):
        raise CacheSaverError(f"no prompt keys of model {model!r} under prefix "
                              f"{keys.prefix!r} ('cachesaver-dist usage' lists the models)")


async def _check_named(redis: Redis, keys: Keys, model: str | None, run: str | None) -> None:
    """A model or run that names nothing is a mistake (a typo would look like success)."""
    if model is not None:
        await require_model(redis, keys, model)
    if run is not None:
        check_run(run)
        names = [keys.usage(run), keys.manifest(run), keys.stats(run)]
        if not await redis.exists(*names) and await redis.zscore(keys.runs, run) is None:
            raise CacheSaverError(f"prune: no run {run!r} under prefix {keys.prefix!r} "
                                  "('cachesaver-dist runs' lists them)")


def check_selectors(model: str | None, run: str | None, namespace: str | None,
                    older_than_days: float | None) -> None:
    """``CacheSaverError`` unless the selectors are a combination ``prune`` takes: one of
    them, ``run`` with ``namespace``, ``model`` with ``older_than_days``."""
    given = [s for s, v in (("--model", model), ("--run", run), ("--namespace", namespace),
                            ("--older-than", older_than_days)) if v is not None]
    if not given or (len(given) > 1 and set(given) not in ({"--run", "--namespace"},
                                                           {"--model", "--older-than"})):
        raise CacheSaverError("prune: give one of --model, --run, --namespace, --older-than "
                              "(or --run with --namespace, or --model with --older-than)")
    if older_than_days is not None and not 0 <= older_than_days <= argtypes.MAX_DAYS:
        raise CacheSaverError(f"prune: --older-than takes a number of days from 0 to "
                              f"{argtypes.MAX_DAYS}, got {older_than_days!r}")


async def prune(redis: Redis, keys: Keys, *, model: str | None = None, run: str | None = None,
                namespace: str | None = None, older_than_days: float | None = None,
                dry_run: bool = False, now: float | None = None,
                progress: Progress | None = None) -> PruneResult:
    """Delete what the selectors name (see the module docstring); with ``dry_run``, only
    count it. Allowed: see ``check_selectors``. ``progress(prompt keys checked, result)``
    after each batch of prompt keys (``--model``, ``--older-than``)."""
    check_selectors(model, run, namespace, older_than_days)
    result = PruneResult(" ".join(f"{s} {v}" for s, v in (
        ("--model", model), ("--run", run), ("--namespace", namespace),
        ("--older-than", older_than_days)) if v is not None), dry_run)
    cutoff = None if older_than_days is None else \
        (time.time() if now is None else now) - older_than_days * 86400
    await _check_named(redis, keys, model, run)
    if namespace is not None:
        runs = [run] if run is not None else sorted(
            set(await scan_names(redis, keys, "u")) | set(await scan_names(redis, keys, "m")))
        await _prune_namespace(redis, keys, namespace, runs, result)
        if not result.fields:  # a typo would look like success
            used = f"run {run!r} did not use" if run is not None else "no run used"
            raise CacheSaverError(f"prune: {used} namespace {namespace!r} under prefix "
                                  f"{keys.prefix!r} ('cachesaver-dist runs' lists the runs)")
    elif run is not None:
        await _prune_run(redis, keys, run, result)
    elif model is not None:
        await _prune_model(redis, keys, model, result, cutoff, progress)
    else:
        assert cutoff is not None
        await _prune_all(redis, keys, result, cutoff, progress)
    return result


# --- usage ----------------------------------------------------------------------------------


async def _key_usage(redis: Redis, keys: Keys, batch: list[str]) -> tuple[int, int]:
    """(samples, bytes) of a batch of prompt keys: their sample and generation hashes."""
    pipe = redis.pipeline(transaction=False)
    for key in batch:
        pipe.hlen(keys.samples(key))
        pipe.memory_usage(keys.samples(key), samples=0)
        pipe.memory_usage(keys.generation(key), samples=0)
    got = await pipe.execute()
    return (sum(int(got[i] or 0) for i in range(0, len(got), 3)),
            sum(int(v or 0) for i, v in enumerate(got) if i % 3))


async def usage(redis: Redis, keys: Keys) -> dict[str, Any]:
    """Memory by model (prompt keys, samples, bytes), by run (its counters, manifest and
    stats) and in total, with the server's own figures where it allows them."""
    models: list[dict[str, Any]] = []
    for model in sorted(await scan_names(redis, keys, "keys")):
        row: dict[str, Any] = {"model": model, "prompt_keys": 0, "samples": 0, "bytes": 0,
                               "index_bytes": (await _memory(redis, [keys.model_keys(model)]))[0]}
        members = _decoded(redis.sscan_iter(keys.model_keys(model), count=1000))
        async for batch in _batches(members, 500):
            samples, size = await _key_usage(redis, keys, batch)
            row["prompt_keys"] += len(batch)
            row["samples"] += samples
            row["bytes"] += size
        models.append(row)
    total = {"prompt_keys": 0, "samples": 0, "bytes": 0}
    async for batch in _batches(_sample_keys(redis, keys), 500):
        samples, size = await _key_usage(redis, keys, batch)
        total["prompt_keys"] += len(batch)
        total["samples"] += samples
        total["bytes"] += size
    rest = {k: total[k] - sum(m[k] for m in models) for k in total}
    if rest["prompt_keys"] > 0:  # keys claimed before specs were recorded
        models.append({"model": None, **{k: max(0, v) for k, v in rest.items()},
                       "index_bytes": 0})
    runs = []
    for run, last in sorted((await run_names(redis, keys)).items()):
        names = [keys.usage(run), keys.manifest(run), keys.stats(run)]
        sizes = await _memory(redis, names)
        pipe = redis.pipeline(transaction=False)
        pipe.hlen(names[0])
        pipe.hlen(names[1])
        counters, manifest = await pipe.execute()
        runs.append({"run": run, "counters": counters, "manifest": manifest,
                     "bytes": sum(sizes), "counters_bytes": sizes[0],
                     "manifest_bytes": sizes[1], "stats_bytes": sizes[2], "last_used": last})
    server: dict[str, Any] = {}
    try:
        info = await redis.info("memory")
        server["used_memory"] = info.get("used_memory")
        server["maxmemory"] = info.get("maxmemory")
        server["maxmemory_policy"] = info.get("maxmemory_policy")
    except ResponseError:
        server["note"] = "INFO refused: server figures unavailable"
    return {"server": server, "samples": total, "models": models, "runs": runs}


def _size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


async def print_usage(redis: Redis, keys: Keys, as_json: bool) -> int:
    report = await usage(redis, keys)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console

    from .tables import Col, fit_table

    console = Console()
    s = report["server"]
    if "used_memory" in s:
        console.print(f"server: {_size(int(s['used_memory'] or 0))} used, maxmemory "
                      f"{_size(int(s['maxmemory'] or 0)) if s['maxmemory'] else 'none'}, "
                      f"policy {s['maxmemory_policy']}")
    t = report["samples"]
    console.print(f"samples: {t['samples']} in {t['prompt_keys']} prompt keys, "
                  f"{_size(t['bytes'])}")
    models = [{**m, "model": m["model"] or "(no spec recorded)",
               "memory": m["bytes"] + m["index_bytes"]} for m in report["models"]]
    console.print(fit_table(
        [Col("model", "model", text=True, whole=True), Col("prompt keys", "prompt_keys"),
         Col("samples", "samples"), Col("memory", "memory", fmt=_size)],
        models, console.width, title="memory by model"))
    console.print(fit_table(
        [Col("run", "run", text=True, whole=True), Col("counters", "counters"),
         Col("manifest", "manifest"), Col("memory", "bytes", fmt=_size)],
        report["runs"], console.width, title="memory by run: counters, manifest, stats"))
    return 0


# --- CLI ------------------------------------------------------------------------------------


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("prune", help="delete samples by model or age, or a run's or "
                       "namespace's counters; --dry-run counts only")
    common(p)
    p.add_argument("--model", help="the samples of this model's prompt keys")
    p.add_argument("--run", help="this run's counters, manifest and stats (samples stay)")
    p.add_argument("--namespace", help="this namespace's counters and manifest entries, in "
                   "every run or in --run (samples stay)")
    p.add_argument("--older-than", type=argtypes.days, metavar="DAYS",
                   help="samples created more than DAYS days ago (of --model only, if given)")
    p.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    u = sub.add_parser("usage", help="memory by model and by run")
    common(u)
    u.add_argument("--json", action="store_true", help="print the figures as JSON")


async def run_command(redis: Redis, keys: Keys, args: argparse.Namespace) -> int:
    if args.command == "usage":
        return await print_usage(redis, keys, args.json)
    try:
        check_selectors(args.model, args.run, args.namespace, args.older_than)
    except CacheSaverError as exc:  # a usage error: status 2, as argparse's own
        logs.fail(f"cachesaver-dist: {exc}")
        return 2
    from .archive import progress_bar

    # A model, run or namespace that selects nothing ends in main(): status 1, as drop-run's
    with progress_bar("prune", in_bytes=False) as bar:
        result = await prune(
            redis, keys, model=args.model, run=args.run, namespace=args.namespace,
            older_than_days=args.older_than, dry_run=args.dry_run,
            progress=(lambda n, r: bar("prompt keys", n, None, f"{n} keys checked, "
                                       f"{r.samples} samples")) if bar else None)
    if args.json:
        print(json.dumps(asdict(result)))
        return 0
    verb = "would delete" if result.dry_run else "deleted"
    print(f"prune {result.selector}: {verb} {result.samples} sample(s) of "
          f"{result.prompt_keys} prompt key(s), {result.fields} counter/manifest entr"
          f"{'y' if result.fields == 1 else 'ies'}, {result.redis_keys} Redis key(s) whole; "
          f"{_size(result.bytes)}" + (f"; skipped {result.skipped_busy} prompt key(s) being "
                                      "generated" if result.skipped_busy else ""))
    return 0
