"""Migration from the original CacheSaver: its diskcache folders' samples, imported once.

The original stores, in a ``diskcache`` folder, one entry per request key: the list of
samples generated for it. Its key is deepdiff's ``DeepHash`` of the request's fields
without ``request_id``, ``namespace`` and ``n`` (and, in 0.0.6, without a few ``kwargs``
entries that do not shape generation). Here a prompt key's samples are looked up by
that key and written into Redis once, atomically, before any request reserves them
(``lua/import_samples.lua``), so samples already paid for are never generated again.

* Lazily: ``OnlineAPI(model, cache=diskcache.Cache(folder))`` calls ``import_for`` with
  each batch before it is reserved (once per prompt key per process).
* In bulk: ``cachesaver-dist import-cachesaver FOLDER --requests FILE.jsonl --model ID``
  (``import_command``).

Values are read with a restricted unpickler: only plain data (str, numbers, bytes,
None, lists, tuples, dicts, sets) is rebuilt; any other pickled global (an SDK object, a
class of your own, a function) is refused by name, never imported nor called, and the
sample that holds it is reported and skipped (generated again when a request needs it).
``deepdiff`` and ``diskcache`` are the ``[migrate]`` extra, imported only when used.
See ``docs/migrate.md``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import pickle
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from . import defaults
from .errors import CacheSaverError
from .protocol import Keys, WorkItem, encode_sample, prompt_key
from .scripts import MalformedWaiter, Waiter, _malformed, _waiters, script
from .typedefs import ROUTING_FIELDS, Request

log = logging.getLogger("cachesaver_dist.migrate")

#: The ``prompt`` of a request in 0.0.6's args/kwargs form (see ``ArgsRequest``).
ARGS_FORM_PROMPT = "cachesaver:args/kwargs"
FORMS = ("prompt", "args")
SOURCE = "cachesaver"
#: ``kwargs`` entries the original 0.0.6 leaves out of its key (they do not shape
#: generation).
ORIGINAL_UNHASHED_KWARGS = frozenset({
    "prompt_cache_key", "prompt_cache:retention", "safety_identifier", "service_tier",
    "store", "stream", "stream_options"})
_IMPORTED = "imported"
_MAX_ARGV = 4000            # samples per script call
_MAX_ARGV_BYTES = 8 << 20   # bytes of samples per script call
_CHUNK = 256                # requests per round in the bulk import


@dataclass(frozen=True, kw_only=True)
class ArgsRequest(Request):
    """A request in the original 0.0.6's args/kwargs form: ``args`` and ``kwargs`` are
    the arguments of the SDK call, as 0.0.6's ``Request(args=..., kwargs=..., n=...,
    request_id=..., namespace=...)`` had them, and the model reads ``request.args`` and
    ``request.kwargs`` (``args`` reaches it as a list). Looked up in an original folder
    by 0.0.6's key of the same arguments. Subclass it to add fields."""

    prompt: Any = ARGS_FORM_PROMPT
    args: Any = ()
    kwargs: Any = field(default_factory=dict)


# --- the original's key ----------------------------------------------------------------


_NEEDS_EXTRA = ("importing from a CacheSaver folder needs deepdiff and diskcache: "
                "pip install 'cachesaver-dist[migrate]'")


def _deephash(params: dict[str, Any]) -> str:
    try:
        from deepdiff import DeepHash
    except ImportError:
        raise CacheSaverError(_NEEDS_EXTRA) from None
    return str(DeepHash(params)[params])


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple, dict)) and not value)


def candidate_keys(params: dict[str, Any]) -> list[str]:
    """The original's keys a request with these fields (``n``, ``request_id`` and
    ``namespace`` left out) may have been stored under, most likely first.

    ``DeepHash`` tells a tuple from a list, and JSON has no tuples: ``args`` is tried
    as a tuple and as a list. A request without ``args`` and ``kwargs`` (the prompt
    form) is tried as 0.0.6 saw a ``Request`` subclass with a ``prompt`` field and empty
    ``args=()``, ``kwargs={}`` first, then as older versions saw it (no such fields).
    ``kwargs`` entries the original 0.0.6 leaves out of its key are left out.
    """
    variants = [params]
    if "args" not in params and "kwargs" not in params:
        variants = [{**params, "args": (), "kwargs": {}}, params]
    out: list[str] = []
    for p in variants:
        args = p.get("args")
        shapes = ([{**p, "args": tuple(args)}, p] if isinstance(args, list)
                  else [p, {**p, "args": list(args)}] if isinstance(args, tuple) else [p])
        for shape in shapes:
            kwargs = shape.get("kwargs")
            if isinstance(kwargs, dict):
                shape = {**shape, "kwargs": {k: v for k, v in kwargs.items()
                                             if k not in ORIGINAL_UNHASHED_KWARGS}}
            key = _deephash(shape)
            if key not in out:
                out.append(key)
    return out


def original_params(request: Request) -> dict[str, Any]:
    """A request's fields as the original hashed them: every dataclass field (as
    ``dataclasses.asdict`` gives them) but ``n``, ``request_id`` and ``namespace``; in
    the args/kwargs form (``ArgsRequest``), without its ``prompt`` marker too."""
    params = {k: v for k, v in dataclasses.asdict(request).items() if k not in ROUTING_FIELDS}
    if params.get("prompt") == ARGS_FORM_PROMPT:
        del params["prompt"]
    return params


def fields_of_line(obj: Any, form: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(fields here, fields as the original hashed them)`` of one request as the
    original saw it (a JSON object: the dataclass's fields). ``form`` is ``"prompt"``,
    ``"args"``, or ``None``: the prompt form when the request has a ``prompt``.

    The fields here are what ``OnlineAPI`` keys the same request by: in the prompt form
    the fields without empty ``args``/``kwargs`` (a ``Request`` subclass with the same
    decoding fields); in the args/kwargs form those of an ``ArgsRequest``."""
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"a request must be a JSON object of fields, got "
                         f"{type(obj).__name__}")
    if form is None:
        form = "prompt" if "prompt" in obj else "args"
    params = {k: v for k, v in obj.items() if k not in ROUTING_FIELDS}
    if form == "args":
        if "prompt" in params:
            raise ValueError("this request has a 'prompt' field, which the args/kwargs form "
                             "does not take: import it with --form prompt")
        params = {"args": [], "kwargs": {}, **params}
        return {"prompt": ARGS_FORM_PROMPT, **params}, params
    if form != "prompt":
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if "prompt" not in params:
        raise ValueError("a request in the prompt form needs a 'prompt' field")
    ours = dict(params)
    if _empty(ours.get("args")) and _empty(ours.get("kwargs")):
        ours.pop("args", None)
        ours.pop("kwargs", None)
    return ours, params


# --- reading a folder: plain data only ---------------------------------------------------

_ALLOWED_GLOBALS = frozenset({("builtins", "set"), ("builtins", "frozenset"),
                              ("builtins", "bytearray"), ("collections", "OrderedDict")})


class Refused:
    """Stands in for a pickled global the reader does not load: nothing it names is
    imported or called. ``origin`` is ``module.name``."""

    origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Refused:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<refused {self.origin}>"


@cache
def _refused(module: str, name: str) -> type[Refused]:
    return type("Refused", (Refused,), {"origin": f"{module}.{name}"})


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        return _refused(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not supported")


@dataclass(frozen=True)
class Unreadable:
    """A folder entry that could not be read at all."""

    reason: str


def plain_loads(data: bytes) -> Any:
    """Unpickle ``data`` rebuilding only plain data; other globals come back as
    ``Refused`` stand-ins, and a pickle that cannot be rebuilt so as ``Unreadable``."""
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as exc:
        return Unreadable(f"its pickle cannot be read with plain data only "
                          f"({type(exc).__name__}: {str(exc)[:200]})")


@cache
def _disk_class() -> type:
    try:
        import diskcache
        from diskcache.core import MODE_PICKLE
    except ImportError:
        raise CacheSaverError(_NEEDS_EXTRA) from None

    class PlainDisk(diskcache.Disk):
        """diskcache's Disk, reading pickled values with ``plain_loads``."""

        def fetch(self, mode: int, filename: str, value: Any, read: bool) -> Any:
            if mode != MODE_PICKLE:
                return super().fetch(mode, filename, value, read)
            if value is None:
                with open(os.path.join(self._directory, filename), "rb") as reader:
                    return plain_loads(reader.read())
            return plain_loads(bytes(value))

    return PlainDisk


def _refusals(value: Any) -> list[str]:
    """The globals refused anywhere inside ``value``."""
    out: list[str] = []
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, Refused) or (isinstance(v, type) and issubclass(v, Refused)):
            if v.origin not in out:
                out.append(v.origin)
        elif isinstance(v, (list, tuple, set, frozenset, dict)):
            if id(v) in seen:
                continue
            seen.add(id(v))
            stack.extend(v.items() if isinstance(v, dict) else v)
    return out


@dataclass
class Found:
    """One prompt key's entry in the folder: ``samples[i]`` encoded, or ``None`` where
    sample ``i`` was skipped; ``skipped``: ``(index, reason)``."""

    key: str
    origin: str
    samples: list[bytes | None]
    skipped: list[tuple[int, str]]


def _encode_entry(key: str, origin: str, value: Any) -> Found:
    if isinstance(value, Unreadable):
        return Found(key, origin, [], [(-1, value.reason)])
    if not isinstance(value, (list, tuple)):
        kind = (f"a refused pickled object ({value.origin})" if isinstance(value, Refused)
                else f"a {type(value).__name__}")
        return Found(key, origin, [], [(-1, f"the entry is {kind}, not a list of samples")])
    samples: list[bytes | None] = []
    skipped: list[tuple[int, str]] = []
    for i, data in enumerate(value):
        refused = _refusals(data)
        if refused:
            samples.append(None)
            skipped.append((i, f"pickled object refused: {', '.join(refused[:3])} (only plain "
                               "data is imported; nothing was loaded or run)"))
            continue
        try:
            samples.append(encode_sample(data, {"origin": SOURCE}))
        except Exception as exc:  # msgpack: TypeError, ValueError, OverflowError
            samples.append(None)
            skipped.append((i, f"not storable as msgpack ({type(exc).__name__}: "
                               f"{str(exc)[:120]})"))
    return Found(key, origin, samples, skipped)


_MISSING = object()


def lookup(directory: str | Path, wanted: dict[str, Callable[[], list[Any]]]
           ) -> tuple[list[Found], list[tuple[str, str]]]:
    """Read the folder's entry of each prompt key (blocking: run it in a thread).

    ``wanted`` maps a prompt key to a function giving the original's candidate keys.
    Returns the entries found, and ``(prompt key, reason)`` of keys whose candidates
    could not be computed. A folder without a diskcache database, or an empty one, has
    nothing to import."""
    path = Path(directory)
    found: list[Found] = []
    failed: list[tuple[str, str]] = []
    if not (path / "cache.db").is_file():
        return found, failed
    disk = _disk_class()
    import diskcache

    with diskcache.Cache(str(path), disk=disk) as reader:
        if len(reader) == 0:
            return found, failed
        try:
            import deepdiff  # noqa: F401
        except ImportError:
            raise CacheSaverError(_NEEDS_EXTRA) from None
        for key, candidates in wanted.items():
            try:
                originals = candidates()
            except Exception as exc:
                failed.append((key, f"its original key cannot be computed "
                                    f"({type(exc).__name__}: {exc})"))
                continue
            for origin in originals:
                value = reader.get(origin, _MISSING, retry=True)
                if value is not _MISSING:
                    found.append(_encode_entry(key, str(origin)[:200], value))
                    break
    return found, failed


# --- writing into Redis --------------------------------------------------------------------


@dataclass
class Summary:
    """What an import did: ``imported_keys`` were found in the folder and imported
    here, ``already`` had been imported before (by anyone), the others are not in the
    folder."""

    requests: int = 0
    keys: int = 0
    already: int = 0
    imported_keys: int = 0
    samples_imported: int = 0
    samples_present: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def samples_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def not_found(self) -> int:
        return self.keys - self.imported_keys - self.already

    def add(self, other: Summary) -> None:
        for f in dataclasses.fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, int):
                setattr(self, f.name, mine + getattr(other, f.name))
        self.skipped.update(other.skipped)
        self.examples += other.examples[:max(0, 20 - len(self.examples))]
        self.unreadable += other.unreadable

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "keys": self.keys,
                "keys_found": self.imported_keys, "keys_already_imported": self.already,
                "keys_not_found": self.not_found, "samples_imported": self.samples_imported,
                "samples_present": self.samples_present,
                "samples_skipped": self.samples_skipped, "skipped_reasons": dict(self.skipped),
                "skipped_examples": self.examples, "unreadable_requests": self.unreadable}

    def lines(self) -> list[str]:
        out = [f"requests read: {self.requests}" + (f" ({len(self.unreadable)} unreadable)"
                                                    if self.unreadable else ""),
               f"prompt keys: {self.keys}; found in the folder and imported: "
               f"{self.imported_keys}; imported before: {self.already}; not in the folder: "
               f"{self.not_found}",
               f"samples imported: {self.samples_imported}"
               + (f"; already held at their index: {self.samples_present}"
                  if self.samples_present else "")
               + f"; skipped: {self.samples_skipped}"]
        out += [f"  {n} x {reason}" for reason, n in self.skipped.most_common()]
        out += [f"  e.g. {e}" for e in self.examples[:5]]
        out += [f"  unreadable: {u}" for u in self.unreadable[:10]]
        return out


def _reason_kind(reason: str) -> str:
    """A skip reason without its details, to count alike reasons together."""
    return reason.split(" (only plain")[0]


async def _store(redis: Redis, keys: Keys, found: list[Found], summary: Summary) -> None:
    """Import the entries found (``import_samples.lua``) and reply to waiters."""
    calls: list[list[Found]] = [[]]
    size = count = 0
    for f in found:
        n = len(f.samples)
        b = sum(len(s) for s in f.samples if s)
        if calls[-1] and (count + n > _MAX_ARGV or size + b > _MAX_ARGV_BYTES):
            calls.append([])
            size = count = 0
        calls[-1].append(f)
        size, count = size + b, count + n
    for group in calls:
        if not group:
            continue
        k: list[str] = []
        argv: list[Any] = []
        for f in group:
            k += [keys.samples(f.key), keys.generation(f.key), keys.waiters(f.key)]
            argv += [f.origin, len(f.samples), *(s or b"" for s in f.samples)]
        per_key, raw_bad = await script(redis, "import_samples")(keys=k, args=argv)
        bad: list[MalformedWaiter] = _malformed(raw_bad)
        done: list[tuple[str, list[Waiter]]] = []
        for f, r in zip(group, per_key):
            if not int(r[0]):
                summary.already += 1
                continue
            summary.imported_keys += 1
            stored = int(r[1])
            kept = sum(1 for s in f.samples if s)
            summary.samples_imported += stored
            summary.samples_present += kept - stored
            for i, reason in f.skipped:
                summary.skipped[_reason_kind(reason)] += 1
                if len(summary.examples) < 20:
                    where = "the whole entry" if i < 0 else f"sample {i}"
                    summary.examples.append(f"key {f.origin[:16]}…, {where}: {reason}")
                log.warning("CacheSaver folder key %s, %s not imported: %s", f.origin,
                            "entry" if i < 0 else f"sample {i}", reason)
            waiters = _waiters(list(r[2:]), bad, keys)
            if waiters:
                done.append((f.key, waiters))
        if done or bad:
            from .outbox import Outbox

            outbox = Outbox(keys)
            outbox.malformed_waiters(bad)
            for key, waiters in done:
                for w in waiters:
                    outbox.reply(w.waiter_id, key, w.start, w.flags, w.samples, w.run,
                                 w.model_id)
            await outbox.send(redis)


async def _import_keys(redis: Redis, keys: Keys, directory: str | Path,
                       wanted: dict[str, Callable[[], list[Any]]], summary: Summary) -> None:
    """Import every prompt key of ``wanted`` that the folder holds and Redis has not
    imported yet."""
    summary.keys += len(wanted)
    if not wanted:
        return
    pipe = redis.pipeline(transaction=False)
    for key in wanted:
        pipe.hexists(keys.generation(key), _IMPORTED)
    todo = {key: c for (key, c), done in zip(wanted.items(), await pipe.execute()) if not done}
    summary.already += len(wanted) - len(todo)
    if not todo:
        return
    try:
        found, failed = await asyncio.to_thread(lookup, directory, todo)
    except CacheSaverError:
        raise
    except Exception as exc:
        raise CacheSaverError(f"could not read the CacheSaver folder {directory}: "
                              f"{type(exc).__name__}: {exc}") from exc
    for key, reason in failed:
        log.warning("prompt key %s not looked up in %s: %s", key, directory, reason)
    await _store(redis, keys, found, summary)


# --- lazily, from OnlineAPI ----------------------------------------------------------------


@dataclass
class _State:
    done: set[str] = field(default_factory=set)
    busy: dict[str, asyncio.Future[bool]] = field(default_factory=dict)


def _state(redis: Redis, keys: Keys, directory: str) -> _State:
    states = redis.__dict__.setdefault("_cachesaver_migrate", {})
    return states.setdefault((keys.prefix, directory), _State())


def folder_of(cache: Any) -> Any:
    """``cache`` if it is a diskcache folder's cache (something with a ``directory``
    that is not a Redis URL or client), else ``None``."""
    if cache is None or isinstance(cache, (str, Redis)):
        return None
    return cache if getattr(cache, "directory", None) is not None else None


async def import_for(redis: Redis, keys: Keys, cache: Any,
                     items: Iterable[tuple[WorkItem, Request]],
                     hash: Callable[[Request], Any] | None = None) -> Summary:
    """Import the folder's samples of these requests' prompt keys before they are
    reserved: once per key and process (a key imported before, by any process, costs
    one ``HEXISTS``; a key known here costs nothing). ``cache`` is the
    ``diskcache.Cache`` given to ``OnlineAPI``; ``hash`` its ``hash`` callable, which
    then gives the original's key too. Concurrent calls for the same key wait for the
    one importing it. Samples that cannot be imported are logged and skipped."""
    directory = str(cache.directory)
    state = _state(redis, keys, directory)
    todo: dict[str, Request] = {}
    waits: list[asyncio.Future[bool]] = []
    for item, request in items:
        if item.key in state.done or item.key in todo:
            continue
        if item.key in state.busy:
            waits.append(state.busy[item.key])
        else:
            todo[item.key] = request
    summary = Summary(requests=len(todo))
    if todo:
        loop = asyncio.get_running_loop()
        mine = {key: loop.create_future() for key in todo}
        state.busy.update(mine)
        ok = False
        try:
            wanted = {key: _candidates(request, hash) for key, request in todo.items()}
            await _import_keys(redis, keys, directory, wanted, summary)
            state.done.update(todo)
            ok = True
        finally:
            for key, fut in mine.items():
                state.busy.pop(key, None)
                fut.set_result(ok)
        if summary.imported_keys:
            log.info("imported %d sample(s) of %d prompt key(s) from CacheSaver folder %s "
                     "(%d skipped)", summary.samples_imported, summary.imported_keys,
                     directory, summary.samples_skipped)
    if waits and not all(await asyncio.gather(*waits)):
        raise CacheSaverError(f"importing samples from the CacheSaver folder {directory} "
                              "failed (see the error of the request that imported them)")
    return summary


def _candidates(request: Request, hash: Callable[[Request], Any] | None
                ) -> Callable[[], list[Any]]:
    if hash is not None:
        return lambda: [hash(request)]
    return lambda: candidate_keys(original_params(request))


# --- in bulk, from the command line -------------------------------------------------------


async def import_requests(redis: Redis, keys: Keys, directory: str | Path,
                          lines: Iterable[str], model_id: str, form: str | None = None,
                          progress: Callable[[int], None] | None = None) -> Summary:
    """Import the folder's samples of the requests in ``lines`` (JSON objects: each
    request's fields as the original saw them), ``_CHUNK`` requests per round."""
    summary = Summary()
    seen: set[str] = set()
    for chunk in _chunks(enumerate(lines, 1), _CHUNK):
        part = Summary()
        wanted: dict[str, Callable[[], list[Any]]] = {}
        for lineno, line in chunk:
            if not line.strip():
                continue
            part.requests += 1
            try:
                ours, params = fields_of_line(json.loads(line), form)
                key = prompt_key(model_id, ours)
            except (ValueError, TypeError) as exc:
                part.unreadable.append(f"line {lineno}: {exc}")
                continue
            if key not in seen:
                seen.add(key)
                wanted[key] = _bind(candidate_keys, params)
        await _import_keys(redis, keys, directory, wanted, part)
        summary.add(part)
        if progress is not None:
            progress(len(chunk))
    return summary


def _bind(f: Callable[[dict[str, Any]], list[str]], params: dict[str, Any]
          ) -> Callable[[], list[Any]]:
    return lambda: list(f(params))


def _chunks(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _command_inputs(args: Any) -> tuple[Path, Path, str, int]:
    from .prepare import check_text

    folder, requests = Path(args.folder), Path(args.requests)
    if not (folder / "cache.db").is_file():
        raise CacheSaverError(f"{folder} is not a CacheSaver (diskcache) folder: it has no "
                              "cache.db")
    if not requests.is_file():
        raise CacheSaverError(f"no requests file {requests}")
    model_id = check_text(args.model, "--model")
    with requests.open("rb") as f:
        total = sum(1 for line in f if line.strip())
    return folder, requests, model_id, total


def _read_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        yield from f


async def import_command(url: str, keys: Keys, args: Any) -> int:
    """``cachesaver-dist import-cachesaver FOLDER --requests FILE --model ID``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .connection import connect

    folder, requests, model_id, total = _command_inputs(args)
    redis = connect(url, read_timeout=defaults.READ_TIMEOUT_S)
    err = Console(stderr=True)
    try:
        with Progress(TextColumn("importing"), BarColumn(), MofNCompleteColumn(),
                      console=err, transient=not err.is_terminal) as bar:
            task = bar.add_task("import", total=total)
            summary = await import_requests(redis, keys, folder, _read_lines(requests),
                                            model_id, args.form,
                                            lambda n: bar.advance(task, n))
    finally:
        await redis.aclose()
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        for line in summary.lines():
            print(line)
        if summary.keys and not summary.imported_keys and not summary.already:
            print("no request was found in the folder: check --form, that each line has "
                  "every field of the original request (json.dumps(dataclasses.asdict(r))), "
                  "and that the deepdiff version matches the one that wrote the folder",
                  file=sys.stderr)
    return 1 if summary.unreadable else 0
