"""The wire protocol shared by clients and workers: keys, prompt keys and messages.

Everything stored in or sent through Redis is msgpack with a schema version ``v``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import ProtocolError

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "cachesaver:"
CACHE_JOB = "process_batch"
CONSUMER_GROUP = "batch-workers"

# Sample flags in reservations and replies.
CACHED, DUPLICATED, GENERATED = "c", "d", "g"


@dataclass(frozen=True)
class Keys:
    """Every Redis key and channel of one deployment, under one prefix."""

    prefix: str = DEFAULT_PREFIX

    def samples(self, key: str) -> str:
        """Hash: sample index -> sample payload."""
        return f"{self.prefix}s:{key}"

    def generation(self, key: str) -> str:
        """Hash: ``mark`` (indices claimed so far) and ``x<i>`` (released claims)."""
        return f"{self.prefix}g:{key}"

    def waiters(self, key: str) -> str:
        """Hash: waiter id -> ``start|flags|run|model`` of requests waiting on ``key``."""
        return f"{self.prefix}w:{key}"

    def usage(self, run: str) -> str:
        """Hash per run: ``<key><namespace>`` -> next unused index."""
        return f"{self.prefix}u:{run}"

    def reservation(self, request_uuid: str) -> str:
        """String: ``start|flags`` given to one request, for idempotent retries."""
        return f"{self.prefix}r:{request_uuid}"

    def stats(self, run: str | None = None) -> str:
        """Hash: ``<model>|<counter>`` -> count, per run, or over all runs."""
        return f"{self.prefix}stats" if run is None else f"{self.prefix}stats:{run}"

    @property
    def runs(self) -> str:
        """Sorted set: run -> last time it was used."""
        return f"{self.prefix}runs"

    @property
    def cache_queue(self) -> str:
        """The arq queue of the cache workers."""
        return f"{self.prefix}queue:cache"

    @property
    def cache_wake(self) -> str:
        """List: the id of each enqueued job, newest first, to wake a cache worker."""
        return f"{self.prefix}queue:cache:wake"

    def work_stream(self, route: str) -> str:
        """Stream of generation work for the batch workers serving ``route``."""
        return f"{self.prefix}llm:{route}"

    def worker_beacon(self, route: str, worker: str) -> str:
        """Short-lived key: a batch worker serving ``route`` is alive."""
        return f"{self.prefix}alive:{route}:{worker}"

    def reply_channel(self, client: str, request_uuid: str) -> str:
        return f"{self.prefix}reply:{client}:{request_uuid}"

    def reply_pattern(self, client: str) -> str:
        return f"{self.prefix}reply:{client}:*"


def _new_id_source() -> None:
    global _id_prefix, _id_counter
    _id_prefix, _id_counter = uuid.uuid4().hex[:20], itertools.count()


_new_id_source()
os.register_at_fork(after_in_child=_new_id_source)


def unique_id() -> str:
    """A cluster-unique id: a random per-process prefix (80 bits) and a counter.

    ``uuid4`` reads the OS random source on every call, a costly system call per
    request on some virtual machines; a forked child gets a fresh prefix.
    """
    return f"{_id_prefix}{next(_id_counter):x}"


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


_AS_IS = (str, int, bytes)  # bool is an int


def _canonical(value: Any) -> Any:
    if isinstance(value, _AS_IS):
        return value
    if isinstance(value, dict):
        return [[k, v if isinstance(v, _AS_IS) else _canonical(v)]
                for k, v in sorted(value.items()) if v is not None]
    if isinstance(value, (list, tuple)):
        return [v if isinstance(v, _AS_IS) else _canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def prompt_key(model_id: str, fields: dict[str, Any]) -> str:
    """Stable hash of everything that shapes generation.

    Independent of dict order; a field set to ``None`` equals an omitted one; ``1.0``
    equals ``1``. Raises ``TypeError`` for values msgpack cannot encode.
    """
    blob = msgpack.packb([model_id, _canonical(fields)], use_bin_type=True)
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


# --- messages -----------------------------------------------------------------------


def _check(message: Any, kind: str) -> dict[str, Any]:
    if not isinstance(message, dict) or message.get("v") != SCHEMA_VERSION:
        got = message.get("v") if isinstance(message, dict) else type(message).__name__
        raise ProtocolError(
            f"{kind} has schema version {got!r}, this build speaks {SCHEMA_VERSION}: "
            "run the same cachesaver-dist version on clients and workers"
        )
    return message


def encode_job(client: str, requests: list[list[Any]], keep_s: int) -> bytes:
    """A client batch for the cache workers.

    Each request is ``[uuid, request_id, key, namespace, n, run, route, model_id, spec]``;
    ``keep_s``: how long the reservations must outlive the job (the client's retries).
    """
    return pack({"v": SCHEMA_VERSION, "client": client, "requests": requests,
                 "keep_s": keep_s})


def decode_job(data: bytes) -> dict[str, Any]:
    return _check(unpack(data), "cache job")


def encode_spec(route: str, model_id: str, fields: dict[str, Any]) -> bytes:
    """What a batch worker needs to generate samples of one prompt key."""
    return pack({"v": SCHEMA_VERSION, "route": route, "model_id": model_id, "fields": fields})


def decode_spec(data: bytes) -> dict[str, Any]:
    return _check(unpack(data), "generation spec")


def encode_sample(data: Any, meta: dict[str, Any] | None = None) -> bytes:
    """One stored sample: the model's output plus provider metadata."""
    record = {"v": SCHEMA_VERSION, "data": data, "created": time.time()}
    if meta:
        record.update({k: v for k, v in meta.items() if k not in record})
    return pack(record)


def decode_sample(data: bytes) -> dict[str, Any]:
    return _check(unpack(data), "sample")


def reply(request_uuid: str, start: int, flags: str, samples: list[bytes]) -> dict[str, Any]:
    """Samples ``start, start+1, ...`` of a request, with their flags."""
    return {"id": request_uuid, "start": start, "flags": flags, "samples": samples}


def error_reply(request_uuid: str, kind: str, message: str) -> dict[str, Any]:
    return {"id": request_uuid, "error": {"kind": kind, "message": message}}


def encode_replies(replies: list[dict[str, Any]]) -> bytes:
    """One message with the replies to one client (published on its first request's
    channel: the client's pattern subscription receives every one of them)."""
    return pack({"v": SCHEMA_VERSION, "replies": replies})


def decode_replies(data: bytes) -> list[dict[str, Any]]:
    return _check(unpack(data), "reply")["replies"]


def waiter_info(run: str, model_id: str) -> str:
    """The opaque tail of a waiter record: who to account the request to."""
    return f"{run}|{model_id}"


# arq job (de)serializers: msgpack, never pickle.


def _arq_default(obj: Any) -> Any:
    if isinstance(obj, BaseException):
        return f"{type(obj).__name__}: {obj}"
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    return str(obj)


def arq_serialize(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=_arq_default)


class Payload(bytes):
    """A job's msgpack payload: arq logs ``repr(args)`` for every job, and the repr of
    a large ``bytes`` object costs more than serving the batch."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


def arq_deserialize(data: bytes) -> dict[str, Any]:
    obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if isinstance(obj, dict) and isinstance(obj.get("a"), list):
        obj["a"] = [Payload(a) if isinstance(a, bytes) else a for a in obj["a"]]
    return obj
