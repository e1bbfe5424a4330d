"""Samples as a client reads them from its replies: each distinct stored sample is
decoded once per process (``memo.BytesMemo``), then shared by the responses that get it.

What a response shares is never changed by its user: a remembered sample's ``data`` is a
str, number, bool, None or bytes, and each response gets its own metadata dict (with
its own copies of the dicts in it). A sample holding anything else (a list, or a dict in
``data``; lists or deeper nesting in its metadata) is decoded afresh every time.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

from .errors import ProtocolError
from .memo import BytesMemo
from .protocol import decode_sample

SAMPLES_REMEMBERED_BYTES = 16 << 20  # about this much memory for decoded samples
_ENTRY_BYTES = 400  # what remembering a sample costs beside its bytes and data, about
_FIELD_BYTES = 40  # and per field of its metadata (nested fields included), about
_SCALARS = frozenset((str, int, float, bool, type(None), bytes))


class Sample(NamedTuple):
    """One stored sample, decoded. ``meta``: what the model reported with it (shared:
    read it through ``metadata``); ``nested``: the keys of ``meta`` holding dicts."""

    data: Any
    first: bool  # it opened its model call (the prompt was paid for it)
    meta: dict[str, Any]
    nested: tuple[str, ...] = ()

    def metadata(self, index: int, source: str) -> dict[str, Any]:
        """A fresh metadata dict for a response: ``meta``, ``index`` and ``source``."""
        meta = self.meta.copy()
        for name in self.nested:
            meta[name] = meta[name].copy()
        meta["index"], meta["source"] = index, source
        return meta


def as_sample(record: dict[str, Any]) -> Sample:
    """A decoded sample record (``protocol.decode_sample``) as a ``Sample``; takes
    ``record`` over."""
    data = record.pop("data")
    first = record.pop("call_first", True)
    record.pop("v", None)
    nested = tuple(name for name, value in record.items() if type(value) is dict)
    return Sample(data, first, record, nested)


def read_sample(raw: bytes) -> Sample:
    """The sample stored as ``raw`` (``ProtocolError`` if it cannot be read)."""
    if not isinstance(raw, bytes):
        if not isinstance(raw, bytearray):
            raise ProtocolError(f"sample is {type(raw).__name__}, not msgpack bytes")
        raw = bytes(raw)
    known = _read.get(raw)
    if known is not None:
        return known
    sample = as_sample(decode_sample(raw))
    if _shareable(sample):
        fields = len(sample.meta) + sum(len(sample.meta[name]) for name in sample.nested)
        _read.put(raw, sample, len(raw) + sys.getsizeof(sample.data) + _ENTRY_BYTES +
                  _FIELD_BYTES * fields)
    return sample


def _shareable(sample: Sample) -> bool:
    if type(sample.data) not in _SCALARS:
        return False
    for value in sample.meta.values():
        if type(value) is dict:
            if not all(type(v) in _SCALARS for v in value.values()):
                return False
        elif type(value) not in _SCALARS:
            return False
    return True


_read: BytesMemo[Sample] = BytesMemo(SAMPLES_REMEMBERED_BYTES)
