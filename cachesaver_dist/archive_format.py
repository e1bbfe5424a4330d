"""The archive file format, in one place: written by ``ArchiveWriter``, read and checked
record by record by ``read_records`` and ``check_record`` (docs/archive.md).

A gzip stream of msgpack records: a header, records per prompt key, run records, and a
trailer with the number of records before it and the SHA-256 of their bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from .errors import ArchiveError, InvalidRequestError, ProtocolError
from .prepare import check_run
from .protocol import (
    decode_sample,
    is_prompt_key,
    pack,
)

FORMAT = "cachesaver-dist-archive"
VERSION = 1
MAX_INDEX = 10_000_000
MAX_RECORD_BYTES = 1 << 30
READ_CHUNK = 1 << 20


def file_error(path: Any, exc: OSError, doing: str) -> ArchiveError:
    """An ``ArchiveError`` for an OS error on the archive file ``path`` (``doing``: "read"
    or "write"), naming the path, the error and what to do."""
    where = f" (at {exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    fix = ("name a file in a directory you can write to, with room for the archive"
           if doing == "write" else "check the path, and that you may read the file")
    return ArchiveError(f"cannot {doing} {path}: {exc.strerror or exc}{where}: {fix}")


class ArchiveWriter:
    """Writes records to ``path`` (through ``<path>.partial``, renamed when complete);
    an OS error (no such directory, permissions, disk full) is an ``ArchiveError``."""

    def __init__(self, path: Path) -> None:
        self.path, self.partial = path, path.with_name(path.name + ".partial")
        try:
            self._raw = open(self.partial, "wb")  # closed in finish() or abort()
        except OSError as exc:
            raise file_error(path, exc, "write") from None
        self._gz = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=6, mtime=0)
        self._hash = hashlib.sha256()
        self.records = self.keys = self.samples = 0

    def write(self, record: dict[str, Any]) -> None:
        data = pack(record)
        self._hash.update(data)
        try:
            self._gz.write(data)
        except OSError as exc:
            raise file_error(self.path, exc, "write") from None
        self.records += 1

    def finish(self) -> dict[str, Any]:
        trailer = {"t": "trailer", "records": self.records, "keys": self.keys,
                   "samples": self.samples, "sha256": self._hash.hexdigest()}
        try:
            self._gz.write(pack(trailer))
            self._gz.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self.partial, self.path)
        except OSError as exc:
            raise file_error(self.path, exc, "write") from None
        return trailer

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._gz.close()
        with contextlib.suppress(OSError):  # a full disk fails the last flush too
            self._raw.close()
        with contextlib.suppress(OSError):
            self.partial.unlink(missing_ok=True)


def _damaged(path: Any, problem: str) -> ArchiveError:
    return ArchiveError(f"{path}: {problem}; copy the archive again, or export it anew")


def read_records(path: str | Path, on_progress: Callable[[int], None] | None = None
                 ) -> Iterator[dict[str, Any]]:
    """Every record before the trailer, checked: then the trailer's count and hash.

    Raises ``ArchiveError`` for a file that is not a complete, intact archive (once its
    end is reached for a bad hash or count). ``on_progress(compressed bytes read)``.
    """
    digest = hashlib.sha256()
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False,
                                max_buffer_size=MAX_RECORD_BYTES)
    pending = bytearray()  # bytes fed to the unpacker and not hashed yet
    offset = 0  # stream offset of pending[0]
    count = 0
    trailer: dict[str, Any] | None = None
    number = 0
    try:
        raw = open(path, "rb")  # closed by the with below
    except OSError as exc:  # not there, a directory, no permission: not a damaged archive
        raise file_error(path, exc, "read") from None
    try:
        with raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            while chunk := gz.read(READ_CHUNK):
                unpacker.feed(chunk)
                pending += chunk
                for obj in unpacker:
                    number += 1
                    end = unpacker.tell()
                    if trailer is not None:
                        raise _damaged(path, f"data after the trailer (record {number})")
                    if isinstance(obj, dict) and obj.get("t") == "trailer":
                        trailer = obj
                    else:
                        digest.update(memoryview(pending)[:end - offset])
                        count += 1
                    del pending[:end - offset]
                    offset = end
                    if trailer is None:
                        if not isinstance(obj, dict):
                            raise _damaged(path, f"record {number} is not a map")
                        yield obj
                if on_progress:
                    on_progress(raw.tell())
    except ArchiveError:
        raise
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise _damaged(path, f"not a readable gzip archive, or corrupt "
                             f"({type(exc).__name__}: {exc})") from None
    except (msgpack.UnpackException, ValueError) as exc:
        raise _damaged(path, f"corrupt record after record {number} "
                             f"({type(exc).__name__}: {exc})") from None
    if trailer is None or pending:
        raise _damaged(path, f"truncated (no trailer after {count} records)")
    if trailer.get("records") != count:
        raise _damaged(path, f"the trailer counts {trailer.get('records')} records, the "
                             f"file holds {count}")
    if trailer.get("sha256") != digest.hexdigest():
        raise _damaged(path, f"SHA-256 mismatch: the trailer says "
                             f"{str(trailer.get('sha256'))[:16]}..., the records hash to "
                             f"{digest.hexdigest()[:16]}...: the file was changed or damaged")


def _bad(number: int, what: str) -> ArchiveError:
    return ArchiveError(f"record {number}: {what}")


def _check_run_name(run: Any, number: int) -> str:
    try:
        return check_run(run)
    except InvalidRequestError as exc:
        raise _bad(number, str(exc)) from None


def _check_namespace(ns: Any, number: int) -> str:
    if not isinstance(ns, str) or not 0 < len(ns) <= 256 or any(
            ord(c) < 32 or ord(c) == 127 for c in ns):
        raise _bad(number, f"namespace {ns!r:.40} is not valid")
    return ns


def check_record(rec: dict[str, Any], number: int) -> str:
    """Validate one record (``number`` from 1); return its type."""
    kind = rec.get("t")
    if number == 1:
        if kind != "header" or rec.get("format") != FORMAT:
            raise _bad(number, f"not a {FORMAT} (no header)")
        version = rec.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise _bad(number, f"archive version {version!r}; this cachesaver-dist reads "
                       f"version {VERSION}: upgrade it")
        return "header"
    if kind == "key":
        key, model_id, spec, samples = (rec.get("key"), rec.get("model_id"), rec.get("spec"),
                                        rec.get("samples"))
        if not is_prompt_key(key):
            raise _bad(number, f"key {key!r:.40} is not a prompt key (32 hex characters)")
        if spec is not None:
            if not isinstance(spec, dict) or not isinstance(spec.get("fields"), dict) or \
                    spec.get("model_id") != model_id or not isinstance(spec.get("route"), str):
                raise _bad(number, f"the spec of key {key} is not a spec of model {model_id!r}")
        elif model_id is not None:
            raise _bad(number, f"key {key} names a model but has no spec")
        if not isinstance(samples, dict) or not samples:
            raise _bad(number, f"key {key} has no samples map")
        for idx, sample in samples.items():
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < MAX_INDEX:
                raise _bad(number, f"key {key}: sample index {idx!r:.20} out of range")
            if not isinstance(sample, bytes):
                raise _bad(number, f"key {key}: sample {idx} is not bytes")
            try:
                decode_sample(sample)
            except ProtocolError as exc:
                raise _bad(number, f"key {key}: sample {idx} cannot be read ({exc})") from None
        return kind
    if kind in ("counters", "manifest"):
        _check_run_name(rec.get("run"), number)
        entries = rec.get("entries")
        if not isinstance(entries, list):
            raise _bad(number, "entries must be a list")
        for e in entries:
            if kind == "counters":
                ok = (isinstance(e, list) and len(e) == 3 and is_prompt_key(e[0])
                      and isinstance(e[2], int) and 0 <= e[2] < MAX_INDEX)
            else:
                ok = (isinstance(e, list) and len(e) == 6 and isinstance(e[1], str)
                      and 0 < len(e[1]) <= 1024 and is_prompt_key(e[2])
                      and all(isinstance(v, int) and 0 <= v < MAX_INDEX for v in e[3:5])
                      and isinstance(e[5], bool))
            if not ok:
                raise _bad(number, f"a {kind} entry is malformed: {str(e)[:80]}")
            _check_namespace(e[1] if kind == "counters" else e[0], number)
        return kind
    raise _bad(number, f"unknown record type {kind!r:.20}")
