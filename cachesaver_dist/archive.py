"""Export and import: samples per prompt key with the spec that made them, and runs.

An archive is a gzip stream of msgpack records: a header, one or more records per
prompt key (its model, spec and samples), the counters and manifest of the selected
runs, and a trailer with the number of records before it and the SHA-256 of their
bytes (docs/archive.md). ``export`` streams it out of Redis with SCAN/HSCAN and
pipelines; ``import`` reads the file twice, verifying everything (hash, count, every
record and sample) before it writes anything, then merges it append-only, a batch of
prompt keys per script call. Memory stays bounded by one batch either way, however many
samples the archive holds (a ``--run``/``--namespace`` export also keeps the run's
prompt keys, 32 characters each, to find each key's highest index).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from . import argtypes, defaults
from .archive_format import (
    FORMAT,
    VERSION,
    ArchiveWriter,
    check_record,
    file_error,
    read_records,
)
from .errors import ArchiveError, CacheSaverError, ProtocolError
from .prepare import check_run
from .protocol import (
    PROMPT_KEY_CHARS,
    SCHEMA_VERSION,
    SPEC_FIELD,
    Keys,
    ManifestEntry,
    decode_manifest_entry,
    decode_sample,
    decode_spec,
    encode_manifest_entry,
    encode_spec,
    is_prompt_key,
    manifest_field,
    split_manifest_field,
)
from .retention import require_model
from .runs import scan_names
from .scripts import script

COMMANDS = ("export", "import")
SAMPLES_PER_RECORD = 1000
BYTES_PER_RECORD = 4 << 20
ENTRIES_PER_RECORD = 1000
KEYS_PER_BATCH = 100
SHOWN_DISAGREEMENTS = 20


# --- selection ------------------------------------------------------------------------------


@dataclass
class Selection:
    """What to export. Prompt keys come from the most specific selector given: the
    counters and manifests of ``runs`` (all runs if only ``namespaces``), else ``keys``,
    else the index of each of ``models``, else every key; every other selector given then
    filters them. With runs or namespaces, a key's samples below the highest index those
    runs reached are exported (the samples they were handed); otherwise all of them."""

    models: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    run_state: bool = True  # the selected runs' counters and manifests

    def describe(self) -> dict[str, Any]:
        return {"models": self.models, "runs": self.runs, "namespaces": self.namespaces,
                "keys": self.keys, "run_state": self.run_state and bool(self.runs)}


async def _run_bounds(redis: Redis, keys: Keys, sel: Selection) -> dict[str, int]:
    """prompt key -> highest index (exclusive) the selected runs/namespaces reached."""
    bounds: dict[str, int] = {}
    wanted_ns = set(sel.namespaces)
    wanted_keys = set(sel.keys)
    runs = sel.runs or sorted(set(await scan_names(redis, keys, "u"))
                              | set(await scan_names(redis, keys, "m")))
    for run in runs:
        found = False
        async for raw, value in redis.hscan_iter(keys.usage(run), count=1000):
            found = True
            text = raw.decode(errors="replace")
            key, ns = text[:PROMPT_KEY_CHARS], text[PROMPT_KEY_CHARS:]
            if (wanted_ns and ns not in wanted_ns) or (wanted_keys and key not in wanted_keys):
                continue
            bounds[key] = max(bounds.get(key, 0), int(value))
        async for raw, value in redis.hscan_iter(keys.manifest(run), count=1000):
            found = True
            try:
                ns, _ = split_manifest_field(raw)
                entry = decode_manifest_entry(value)
            except (ProtocolError, UnicodeDecodeError):
                continue
            if (wanted_ns and ns not in wanted_ns) or (wanted_keys and entry.key not in
                                                       wanted_keys):
                continue
            bounds[entry.key] = max(bounds.get(entry.key, 0), entry.start + entry.n)
        if not found and sel.runs:
            raise CacheSaverError(f"run {run!r} has no counters and no manifest under prefix "
                                  f"{keys.prefix!r} (see 'cachesaver-dist runs')")
    return bounds


async def _candidates(redis: Redis, keys: Keys, sel: Selection
                      ) -> AsyncIterator[list[tuple[str, int | None]]]:
    """Batches of (prompt key, index bound or None for all samples)."""
    batch: list[tuple[str, int | None]] = []

    async def names() -> AsyncIterator[tuple[str, int | None]]:
        if sel.runs or sel.namespaces:
            for item in sorted((await _run_bounds(redis, keys, sel)).items()):
                yield item
        elif sel.keys:
            for key in dict.fromkeys(sel.keys):
                yield key, None
        elif sel.models:
            for model in sel.models:
                async for raw in redis.sscan_iter(keys.model_keys(model), count=1000):
                    yield raw.decode(errors="replace"), None
        else:
            start = len(keys.prefix) + 2
            async for raw in redis.scan_iter(match=keys.family("s"), count=1000):
                yield raw.decode(errors="replace")[start:], None

    async for item in names():
        batch.append(item)
        if len(batch) >= KEYS_PER_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


# --- writing --------------------------------------------------------------------------------


async def _samples_of(redis: Redis, keys: Keys, key: str, bound: int | None
                      ) -> AsyncIterator[list[tuple[int, bytes]]]:
    """A key's samples (below ``bound`` if given), in chunks, in index order per chunk."""
    if bound is not None:
        for lo in range(0, bound, SAMPLES_PER_RECORD):
            idx = list(range(lo, min(bound, lo + SAMPLES_PER_RECORD)))
            got = await redis.hmget(keys.samples(key), idx)  # type: ignore[misc]
            chunk = [(i, s) for i, s in zip(idx, got) if s is not None]
            if chunk:
                yield chunk
        return
    chunk = []
    async for idx, sample in redis.hscan_iter(keys.samples(key), count=SAMPLES_PER_RECORD):
        chunk.append((int(idx), sample))
        if len(chunk) >= SAMPLES_PER_RECORD:
            yield sorted(chunk)
            chunk = []
    if chunk:
        yield sorted(chunk)


@dataclass
class ExportResult:
    path: str
    keys: int = 0
    samples: int = 0
    unreadable: int = 0  # samples that do not decode: left out
    # indices below a run's bound without a sample (being generated, failed or given up):
    # the archive cannot replay the requests that were handed them
    missing: int = 0
    runs: int = 0
    counters: int = 0
    manifest: int = 0
    bytes: int = 0
    sha256: str = ""


async def export(redis: Redis, keys: Keys, path: str | Path, sel: Selection,
                 progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Write the selected samples (and runs) to ``path``; ``progress(keys, samples)``."""
    from . import __version__

    for run in sel.runs:
        check_run(run)
    path = Path(path)
    result = ExportResult(str(path))
    writer = ArchiveWriter(path)
    try:
        writer.write({"t": "header", "format": FORMAT, "version": VERSION,
                      "created": time.time(), "selection": sel.describe(),
                      "prefix": keys.prefix, "producer": f"cachesaver-dist {__version__}",
                      "sample_schema": SCHEMA_VERSION})
        wanted_models = set(sel.models)
        async for batch in _candidates(redis, keys, sel):
            pipe = redis.pipeline(transaction=False)
            for key, _ in batch:
                pipe.hget(keys.generation(key), SPEC_FIELD)
            specs = await pipe.execute()
            for (key, bound), raw_spec in zip(batch, specs):
                if not is_prompt_key(key):
                    continue  # not a key this package made
                spec = None
                if raw_spec:
                    with contextlib.suppress(ProtocolError):
                        spec = decode_spec(raw_spec)
                model_id = spec.model_id if spec else None
                if wanted_models and model_id not in wanted_models:
                    continue
                spec_map = asdict(spec) if spec else None
                wrote, seen = False, 0
                async for chunk in _samples_of(redis, keys, key, bound):
                    seen += len(chunk)
                    samples: dict[int, bytes] = {}
                    size = 0
                    for idx, sample in chunk:
                        try:
                            decode_sample(sample)
                        except ProtocolError:
                            result.unreadable += 1
                            continue
                        samples[idx] = sample
                        size += len(sample)
                        if size >= BYTES_PER_RECORD:
                            writer.write({"t": "key", "key": key, "model_id": model_id,
                                          "spec": spec_map, "samples": samples})
                            writer.samples += len(samples)
                            samples, size, wrote = {}, 0, True
                    if samples:
                        writer.write({"t": "key", "key": key, "model_id": model_id,
                                      "spec": spec_map, "samples": samples})
                        writer.samples += len(samples)
                        wrote = True
                writer.keys += wrote
                if bound is not None:
                    result.missing += bound - seen
                if progress:
                    progress(writer.keys, writer.samples)
        if sel.run_state:
            for run in sel.runs:
                counters, manifest = await _write_run(redis, keys, writer, run,
                                                      set(sel.namespaces))
                result.runs += 1
                result.counters += counters
                result.manifest += manifest
        trailer = writer.finish()
    except BaseException:
        writer.abort()
        raise
    result.keys, result.samples = writer.keys, writer.samples
    result.sha256, result.bytes = trailer["sha256"], path.stat().st_size
    return result


async def _write_run(redis: Redis, keys: Keys, writer: ArchiveWriter, run: str,
                     namespaces: set[str]) -> tuple[int, int]:
    """The run's counters and manifest entries (of ``namespaces`` only, if given)."""
    written = [0, 0]
    for n, (kind, name) in enumerate((("counters", keys.usage(run)),
                                      ("manifest", keys.manifest(run)))):
        entries: list[list[Any]] = []
        async for raw, value in redis.hscan_iter(name, count=ENTRIES_PER_RECORD):
            text = raw.decode(errors="replace")
            if kind == "counters":
                key, ns = text[:PROMPT_KEY_CHARS], text[PROMPT_KEY_CHARS:]
                if not is_prompt_key(key) or not ns:
                    continue
                entry: list[Any] = [key, ns, int(value)]
            else:
                try:
                    ns, rid = split_manifest_field(raw)
                    m = decode_manifest_entry(value)
                except (ProtocolError, UnicodeDecodeError):
                    continue
                entry = [ns, rid, m.key, m.start, m.n, m.ambiguous]
            if namespaces and ns not in namespaces:
                continue
            entries.append(entry)
            if len(entries) >= ENTRIES_PER_RECORD:
                writer.write({"t": kind, "run": run, "entries": entries})
                written[n] += len(entries)
                entries = []
        if entries:
            writer.write({"t": kind, "run": run, "entries": entries})
            written[n] += len(entries)
    return written[0], written[1]


# --- reading --------------------------------------------------------------------------------


@dataclass
class ImportResult:
    path: str
    header: dict[str, Any] = field(default_factory=dict)
    keys: int = 0
    samples: int = 0  # in the archive
    written: int = 0
    present: int = 0  # equal samples already there
    disagreeing: int = 0  # different samples already there: kept, not written
    disagreements: list[dict[str, Any]] = field(default_factory=list)  # the first few
    runs: list[str] = field(default_factory=list)
    counters_written: int = 0
    counters_present: int = 0
    manifest_written: int = 0
    manifest_present: int = 0
    manifest_disagreeing: int = 0
    verified_only: bool = False


def verify(path: str | Path, on_progress: Callable[[int], None] | None = None
           ) -> ImportResult:
    """Read the whole archive and check it: hash, count and every record."""
    result = ImportResult(str(path))
    keys_seen = 0
    last_key = None
    runs: dict[str, None] = {}
    for number, rec in enumerate(read_records(path, on_progress), 1):
        kind = check_record(rec, number)
        if kind == "header":
            result.header = {k: v for k, v in rec.items() if k != "t"}
        elif kind == "key":
            if rec["key"] != last_key:
                keys_seen += 1
                last_key = rec["key"]
            result.samples += len(rec["samples"])
        else:
            runs[rec["run"]] = None
    result.keys, result.runs = keys_seen, list(runs)
    return result


class _Merger:
    """Writes checked records in batches: key records through import.lua, run records
    through import_run.lua."""

    def __init__(self, redis: Redis, keys: Keys, result: ImportResult, run_ttl_s: int) -> None:
        self.redis, self.keys, self.result, self.run_ttl_s = redis, keys, result, run_ttl_s
        self.batch: list[dict[str, Any]] = []
        self.batch_samples = self.batch_bytes = 0

    async def add(self, rec: dict[str, Any]) -> None:
        if rec["t"] == "key":
            self.batch.append(rec)
            self.batch_samples += len(rec["samples"])
            self.batch_bytes += sum(len(s) for s in rec["samples"].values())
            if len(self.batch) >= KEYS_PER_BATCH or self.batch_samples >= SAMPLES_PER_RECORD \
                    or self.batch_bytes >= BYTES_PER_RECORD:
                await self.flush()
        elif rec["t"] in ("counters", "manifest"):
            await self.flush()
            await self._run(rec)

    async def flush(self) -> None:
        if not self.batch:
            return
        k: list[str] = []
        argv: list[Any] = []
        for rec in self.batch:
            key, spec = rec["key"], rec["spec"]
            k += [self.keys.samples(key), self.keys.generation(key),
                  self.keys.model_keys(spec["model_id"]) if spec else
                  self.keys.generation(key)]
            argv += [key, encode_spec(spec["route"], spec["model_id"], spec["fields"],
                                      spec.get("namespace"), spec.get("request_id"))
                     if spec else b"", len(rec["samples"])]
            for idx, sample in sorted(rec["samples"].items()):
                argv += [idx, sample]
        out = await script(self.redis, "import")(keys=k, args=argv)
        for rec, (written, present, differ) in zip(self.batch, out):
            self.result.written += written
            self.result.present += present
            self.result.disagreeing += len(differ)
            for idx in differ[:max(0, SHOWN_DISAGREEMENTS - len(self.result.disagreements))]:
                self.result.disagreements.append({"key": rec["key"], "index": int(idx)})
        self.batch, self.batch_samples, self.batch_bytes = [], 0, 0

    async def _run(self, rec: dict[str, Any]) -> None:
        run, kind = rec["run"], rec["t"]
        argv: list[Any] = ["u" if kind == "counters" else "m", run, time.time(),
                           self.run_ttl_s * 1000]
        for e in rec["entries"]:
            if kind == "counters":
                argv += [e[0] + e[1], e[2]]
            else:
                argv += [manifest_field(e[0], e[1]),
                         encode_manifest_entry(ManifestEntry(e[2], e[3], e[4], e[5]))]
        name = self.keys.usage(run) if kind == "counters" else self.keys.manifest(run)
        written, present, differ = await script(self.redis, "import_run")(
            keys=[name, self.keys.runs], args=argv)
        if kind == "counters":
            self.result.counters_written += written
            self.result.counters_present += present
        else:
            self.result.manifest_written += written
            self.result.manifest_present += present
            self.result.manifest_disagreeing += len(differ)


async def import_archive(redis: Redis, keys: Keys, path: str | Path, *,
                         run_ttl_s: int = defaults.RUN_TTL_S, verify_only: bool = False,
                         progress: Callable[[str, int, int], None] | None = None
                         ) -> ImportResult:
    """Verify the archive whole, then merge it (see the module docstring and
    docs/archive.md); ``progress(phase, bytes read, file size)``."""
    size = _size_of(path, "read")
    tick = (lambda phase: (lambda done: progress(phase, done, size))) if progress else \
        (lambda phase: None)
    result = verify(path, tick("verifying"))
    result.verified_only = verify_only
    if verify_only:
        return result
    merger = _Merger(redis, keys, result, run_ttl_s)
    for number, rec in enumerate(read_records(path, tick("importing")), 1):
        check_record(rec, number)  # the file might have changed since it was verified
        await merger.add(rec)
    await merger.flush()
    return result


# --- CLI ------------------------------------------------------------------------------------


def _check_writable(path: Path) -> None:
    """``ArchiveError`` when ``path`` cannot be where an archive is written."""
    try:
        if path.is_dir():
            raise ArchiveError(f"{path} is a directory: name the archive file to write")
        if path.exists() and not path.is_file():  # renamed over, a device would be replaced
            raise ArchiveError(f"{path} is not a regular file (a device, a pipe, a socket): "
                               "name the archive file to write")
        if not path.parent.is_dir():
            raise ArchiveError(f"{path.parent} is not a directory: create it first, or write "
                               "the archive to an existing one")
    except OSError as exc:  # a name too long, say
        raise file_error(path, exc, "write") from None


def _check_readable(path: str, twice: bool = False) -> None:
    """``ArchiveError`` when ``path`` is not an archive file to read (``twice``: a file that
    can be read twice, not a pipe)."""
    if _size_of(path, "read") < 0:
        raise ArchiveError(f"{path}: no such file")
    if Path(path).is_dir():
        raise ArchiveError(f"{path} is a directory: name the archive file to read")
    if twice and not Path(path).is_file():  # a pipe (/dev/stdin, <(...)) gives its bytes once
        raise ArchiveError(f"{path} is not a regular file (a pipe, a device): import reads "
                           "the archive twice, checking it whole before it writes anything; "
                           "save it to a file first (--verify alone reads it once)")


def _size_of(path: str | Path, doing: str) -> int:
    """The file's size; -1 if there is none; an ``ArchiveError`` for another OS error
    (a part of the path is a file, no permission), ``doing`` "read" or "write" it."""
    try:
        return Path(path).stat().st_size
    except FileNotFoundError:
        return -1
    except OSError as exc:
        raise file_error(path, exc, doing) from None


@contextlib.contextmanager
def progress_bar(label: str, in_bytes: bool) -> Iterator[Callable[..., None] | None]:
    """A rich progress bar on stderr when it is a terminal (None otherwise), updated with
    ``update(phase, done, total=None, note="")``: bytes of the file, or a count."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn()]
    columns += [DownloadColumn(), TimeRemainingColumn()] if in_bytes else \
        [TextColumn("{task.fields[note]}"), TimeElapsedColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int | None = None, note: str = "") -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"{label}: {phase}", total=total, note=note)
            bar.update(tasks[phase], completed=done, note=note)

        yield update


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    e = sub.add_parser("export", help="write samples (with their specs) and runs to an "
                       "archive file")
    common(e)
    e.add_argument("file", help="the archive to write (gzip; see docs/archive.md)")
    e.add_argument("--model", action="append", default=[], help="keys of this model "
                   "(repeatable)")
    e.add_argument("--run", action="append", default=[], help="keys this run used, below "
                   "its highest index, with its counters and manifest (repeatable)")
    e.add_argument("--namespace", action="append", default=[],
                   help="keys used in this namespace (in --run, else in any run; repeatable)")
    e.add_argument("--key", action="append", default=[], help="this prompt key (repeatable)")
    e.add_argument("--no-run-state", action="store_true",
                   help="leave out the runs' counters and manifests")
    e.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    i = sub.add_parser("import", help="merge an archive into this server (append-only, "
                       "idempotent)")
    common(i)
    i.add_argument("file", help="the archive to read")
    i.add_argument("--run-ttl", type=argtypes.whole_seconds_or_zero, default=defaults.RUN_TTL_S,
                   help="seconds the imported runs' counters and manifests are kept idle; "
                        "0 keeps them without expiry (default: 7 days)")
    i.add_argument("--verify", action="store_true", help="only check the archive")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")


async def run_command(redis: Redis, keys: Keys, args: argparse.Namespace) -> int:
    """``export`` / ``import``; a ``CacheSaverError`` ends in the CLI's ``main`` (status 1)."""
    if args.command == "export":
        return await _export_command(redis, keys, args)
    return await _import_command(redis, keys, args)


async def _export_command(redis: Redis, keys: Keys, args: argparse.Namespace) -> int:
    path = Path(args.file)
    _check_writable(path)
    if _size_of(path, "write") >= 0 and not args.force:
        raise ArchiveError(f"{path} exists: pass --force to overwrite it")
    for model in args.model or ():
        await require_model(redis, keys, model)
    for key in args.key:
        if not is_prompt_key(key):
            raise ArchiveError(f"--key {key!r} is not a prompt key (32 hex characters, as in "
                               f"the sample hashes {keys.samples('<key>')})")
    missing = [key for key in dict.fromkeys(args.key)
               if not await redis.exists(keys.samples(key))]
    if missing:  # a typo: nothing to export
        raise ArchiveError(f"--key {', '.join(map(repr, missing))}: no samples under prefix "
                           f"{keys.prefix!r} (redis-cli --scan --pattern "
                           f"'{keys.samples('*')}' lists the keys that have some)")
    sel = Selection(models=args.model, runs=args.run, namespaces=args.namespace, keys=args.key,
                    run_state=not args.no_run_state)
    if sel.namespaces and not await _run_bounds(redis, keys, sel):  # a typo: nothing to export
        raise ArchiveError(f"no run{' of --run' if sel.runs else ''} used namespace(s) "
                           f"{', '.join(map(repr, sel.namespaces))}"
                           f"{' with a --key' if sel.keys else ''} under prefix "
                           f"{keys.prefix!r} ('cachesaver-dist runs' lists the runs)")
    with progress_bar("export", in_bytes=False) as bar:
        result = await export(redis, keys, path, sel, (
            lambda k, s: bar("prompt keys", k, None, f"{k} keys, {s} samples")) if bar
            else None)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"exported {result.samples} sample(s) of {result.keys} prompt key(s)"
              + (f", {result.runs} run(s) ({result.counters} counters, {result.manifest} "
                 "manifest entries)" if result.runs else "")
              + f" to {path} ({result.bytes} bytes, sha256 {result.sha256[:16]}...)"
              + (f"; left out {result.unreadable} unreadable sample(s)"
                 if result.unreadable else ""))
    if result.missing:
        print(f"warning: {result.missing} sample(s) the selected run(s) were handed are not "
              "stored (still being generated, or their generation failed or was given up), "
              "so the archive lacks them: a replay of the requests that got them fails; "
              "export again once the run's requests are all answered", file=sys.stderr)
    return 0


async def _import_command(redis: Redis, keys: Keys, args: argparse.Namespace) -> int:
    _check_readable(args.file, twice=not args.verify)
    with progress_bar("import", in_bytes=True) as bar:
        result = await import_archive(redis, keys, args.file, run_ttl_s=args.run_ttl,
                                      verify_only=args.verify, progress=bar)
    if args.json:
        print(json.dumps(asdict(result), default=str))
        return 0
    if result.verified_only:
        print(f"{args.file}: intact, {result.samples} sample(s) of {result.keys} prompt "
              f"key(s), runs: {', '.join(result.runs) or 'none'}")
        return 0
    print(f"imported {args.file}: {result.written} sample(s) written, {result.present} "
          f"already present, {result.disagreeing} disagreeing (kept as stored) of "
          f"{result.samples} in {result.keys} prompt key(s)"
          + (f"; runs {', '.join(result.runs)}: {result.counters_written} counters raised, "
             f"{result.manifest_written} manifest entries written, {result.manifest_present} "
             f"present, {result.manifest_disagreeing} disagreeing" if result.runs else ""))
    for d in result.disagreements:
        print(f"  disagreeing sample: key {d['key']} index {d['index']} (the stored one kept)")
    if result.disagreeing > len(result.disagreements):
        print(f"  ... and {result.disagreeing - len(result.disagreements)} more")
    if result.disagreeing and result.runs:
        print(f"note: a replay of run(s) {', '.join(result.runs)} here serves the samples "
              "stored here at those indices, not the archive's; to replay the archive exactly, "
              "import it into an empty --prefix", file=sys.stderr)
    return 0
