"""The wire protocol: every key, channel and message that clients and workers share.

Everything stored in or sent through Redis is msgpack with a schema version ``v``
(arq's jobs included). Each message has one encoder and one validating decoder here;
a decoder raises ``ProtocolError`` naming the field that is wrong. The Lua scripts in
``lua/`` read and write the same formats (their headers say which).
"""

from __future__ import annotations

import hashlib
import itertools
import keyword
import os
import threading
import time
import uuid
from collections.abc import Container
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import msgpack

from . import defaults
from .errors import ProtocolError
from .typedefs import ROUTING_FIELDS

SCHEMA_VERSION = 1
DEFAULT_PREFIX = defaults.PREFIX
CACHE_JOB = "process_batch"
CONSUMER_GROUP = "batch-workers"
MAX_ID_CHARS = 200

# Sample flags in reservations and replies, one letter per sample.
CACHED, DUPLICATED, GENERATED = "c", "d", "g"

# Fields of a generation hash g:<key> besides the released marks x<i>.
MARK_FIELD, SPEC_FIELD = "mark", "spec"
PROMPT_KEY_CHARS = 32


@dataclass(frozen=True)
class Keys:
    """Every Redis key and channel of one deployment, under one prefix.

    arq writes its job bodies under keys it names itself (``arq:job:<id>``,
    ``arq:in-progress:<id>``, ``arq:retry:<id>``, ``arq:result:<id>``): job ids begin
    with the prefix, so those keys are confined by ``arq:*:<prefix>*`` ACL patterns.
    """

    prefix: str = DEFAULT_PREFIX

    def samples(self, key: str) -> str:
        """Hash: sample index -> sample payload."""
        return f"{self.prefix}s:{key}"

    def generation(self, key: str) -> str:
        """Hash: ``mark`` (indices claimed so far), ``x<i>`` (released claims) and ``spec``
        (the encoded ``Spec`` of the key's first claim, or of its import)."""
        return f"{self.prefix}g:{key}"

    def waiters(self, key: str) -> str:
        """Hash: waiter id -> waiter record of each request waiting on ``key``."""
        return f"{self.prefix}w:{key}"

    def usage(self, run: str) -> str:
        """Hash per run: ``<key><namespace>`` -> next unused index."""
        return f"{self.prefix}u:{run}"

    def manifest(self, run: str) -> str:
        """Hash per run: ``<namespace>\\n<request_id>`` -> ``<key>|<start>|<n>`` (a
        ``ManifestEntry``): the samples each request of the run got; written by reserve.lua
        for runs that keep a manifest. Expires with the run's counters."""
        return f"{self.prefix}m:{run}"

    def model_keys(self, model_id: str) -> str:
        """Set per model: the prompt keys claimed (or imported) for it (reserve.lua adds a
        key when it first stores the key's spec in ``g:<key>``)."""
        return f"{self.prefix}keys:{model_id}"

    def family(self, family: str) -> str:
        """SCAN MATCH pattern of one key family (``"s"``, ``"u"``, ``"keys"``, ...):
        ``<prefix><family>:*`` with the prefix's glob characters escaped."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return f"{escaped}{family}:*"

    def reservations(self, client: str, batch: str) -> str:
        """Hash per client batch: waiter id -> ``start|flags`` given to each of its
        requests, so a re-ask gets the same indices. The client deletes it once the batch
        is answered without a re-ask; otherwise it expires with the batch's ``keep_s``."""
        return f"{self.prefix}r:{client}:{batch}"

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
        """List of wake tokens (job ids), newest first, to wake a cache worker."""
        return f"{self.prefix}queue:cache:wake"

    @property
    def cache_health(self) -> str:
        """arq's health-check key of the cache workers."""
        return f"{self.prefix}health:cache"

    def new_job_id(self) -> str:
        """A fresh arq job id; it begins with the prefix (see the class docstring)."""
        return f"{self.prefix}job:{unique_id()}"

    def work_stream(self, route: str) -> str:
        """Stream of generation work for the batch workers serving ``route``."""
        return f"{self.prefix}llm:{route}"

    def workers(self, route: str) -> str:
        """Sorted set: worker name -> heartbeat deadline (ms) of workers serving ``route``."""
        return f"{self.prefix}workers:{route}"

    @property
    def dead_letters(self) -> str:
        """Stream of malformed messages set aside, each with its reason."""
        return f"{self.prefix}dead"

    def reply_channel(self, client: str) -> str:
        """Channel of one client process: every reply to it, request ids in the payload."""
        return f"{self.prefix}reply:{client}"


_id_prefix = ""
_id_counter = itertools.count()


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
    """msgpack bytes of ``obj``, with this thread's packer (``packb`` makes one per call,
    which costs more than packing a request)."""
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)  # (a failed pack leaves the packer empty)


_packers = threading.local()


def unpack(data: bytes, kind: str = "message") -> Any:
    """Decode msgpack; ``ProtocolError`` for anything that is not."""
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(f"{kind} is {type(data).__name__}, not msgpack bytes")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"{kind} is not valid msgpack ({type(exc).__name__})") from None


_AS_IS = (str, int, bytes)  # bool is an int
_PLAIN = frozenset((str, int, bytes, bool))  # exact types kept as they are (fast path)
MAX_DEPTH = 32  # levels of lists and dicts in a request's fields


def text(value: Any) -> str:
    """A name or field Redis returned (bytes, or str) as text; bad UTF-8 is replaced."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _canonical(value: Any, depth: int = 0) -> Any:
    # Exact types first (a plain dict or list of str is the common request); subclasses
    # (an IntEnum, an OrderedDict) take the general checks below, to the same result.
    kind = type(value)
    if kind is dict or kind is list or kind is tuple:
        if depth > MAX_DEPTH and value:  # depth 0 is the fields dict itself
            raise ValueError(f"fields nest deeper than {MAX_DEPTH} levels")
        if kind is dict:
            "".join(value)  # TypeError unless every key is a str
            items = sorted(value.items())
            for _, v in items:
                if type(v) not in _PLAIN:
                    break
            else:  # all plain (a chat message): the pairs pack as the lists below would
                return items
            return [[k, v if type(v) in _PLAIN else _canonical(v, depth + 1)]
                    for k, v in items if v is not None]
        return [v if type(v) in _PLAIN else _canonical(v, depth + 1) for v in value]
    if kind is float:
        return int(value) if value.is_integer() else value
    if value is None or isinstance(value, _AS_IS):
        return value
    if isinstance(value, dict):
        return _canonical(dict(value), depth)
    if isinstance(value, (list, tuple)):
        return _canonical(list(value), depth)
    if isinstance(value, float):
        return _canonical(float(value), depth)
    raise TypeError(f"a {type(value).__name__} cannot be stored")


def prompt_key(model_id: str, fields: dict[str, Any], packed: bytes | None = None) -> str:
    """Stable hash of everything that shapes generation.

    Independent of dict order; a field set to ``None`` equals an omitted one; ``1.0``
    equals ``1``. Raises ``TypeError`` (``ValueError``, ``OverflowError``,
    ``UnicodeEncodeError``) for values msgpack cannot store as they are: types other than
    str, int, float, bool, None, bytes, list, tuple and str-keyed dict, ints beyond 64
    bits, text that is not UTF-8, nesting deeper than ``MAX_DEPTH``.

    Up to ``KEYS_REMEMBERED`` keys (``KEYS_REMEMBERED_BYTES`` of fields) are remembered
    by ``pack(fields)`` (``packed``, when the caller has it): a prompt asked again, in
    another namespace say, is looked up, not hashed again. Equal bytes are equal values
    to the canonical form (which reads lists and tuples alike, and subclasses as their
    base type, as msgpack does).
    """
    if packed is None:
        try:
            packed = pack(fields)
        except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
            return _hash_key(model_id, fields)  # refuses it, with the canonical form's words
    global _keys_bytes
    seen = model_id, packed
    key = _keys_seen.get(seen)
    if key is None:
        key = _hash_key(model_id, fields)  # raises for what cannot be stored: not kept
        if len(_keys_seen) >= KEYS_REMEMBERED or \
                _keys_bytes + len(packed) > KEYS_REMEMBERED_BYTES:
            _keys_seen.clear()  # atomic: drop-in clients call this from several threads
            _keys_bytes = 0
        _keys_seen[seen] = key
        _keys_bytes += len(packed)
    return key


def _hash_key(model_id: str, fields: dict[str, Any]) -> str:
    blob = msgpack.packb([model_id, _canonical(fields)], use_bin_type=True)
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


KEYS_REMEMBERED = 4096  # prompt keys kept per process by ``prompt_key``, with
KEYS_REMEMBERED_BYTES = 32 << 20  # at most this many bytes of fields (long prompts)
_keys_seen: dict[tuple[str, bytes], str] = {}
_keys_bytes = 0


# --- validation helpers -----------------------------------------------------------------


def _message(data: bytes, kind: str) -> dict[str, Any]:
    msg = unpack(data, kind)
    if not isinstance(msg, dict):
        raise ProtocolError(f"{kind} is a msgpack {type(msg).__name__}, not a map", "v")
    if msg.get("v") != SCHEMA_VERSION:
        raise ProtocolError(
            f"{kind} has schema version {msg.get('v')!r}, this build speaks {SCHEMA_VERSION}: "
            "run the same cachesaver-dist version on clients and workers", "v")
    return msg


def _get(msg: dict[str, Any], name: str, types: type | tuple[type, ...], kind: str) -> Any:
    value = msg.get(name)
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):
        expected = types.__name__ if isinstance(types, type) else "/".join(
            t.__name__ for t in types)
        raise ProtocolError(f"{kind}: field {name!r} must be {expected}, got "
                            f"{type(value).__name__}", name)
    return value


def _id(value: Any, name: str, kind: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise ProtocolError(f"{kind}: field {name!r} must be a non-empty str of at most "
                            f"{MAX_ID_CHARS} characters", name)
    return value


# --- cache job: one client batch for the cache workers ----------------------------------


class WorkItem(NamedTuple):
    """One request as the cache worker reserves it (a named tuple: made per request on
    both sides, so cheap to build)."""

    uuid: str
    request_id: str
    key: str
    namespace: str
    n: int
    run: str
    route: str
    model_id: str
    spec: bytes
    manifest: bool = False  # record (namespace, request_id) -> range in the run's manifest

    def to_wire(self) -> list[Any]:
        """9 fields, and a 10th (``True``) for a request recorded in its run's manifest."""
        wire = [self.uuid, self.request_id, self.key, self.namespace, self.n, self.run,
                self.route, self.model_id, self.spec]
        return [*wire, True] if self.manifest else wire

    @classmethod
    def from_wire(cls, fields: Any, where: str = "work item") -> WorkItem:
        """One request of a job, checked field by field (``work_items`` reads a job's)."""
        if not isinstance(fields, list) or len(fields) not in (9, 10):
            raise ProtocolError(f"{where} must be a list of 9 or 10 fields", "requests")
        uid, rid, key, ns, n, run, route, model_id, spec = fields[:9]
        manifest = fields[9] if len(fields) == 10 else False
        if not isinstance(manifest, bool):
            raise ProtocolError(f"{where}: manifest must be a bool", "manifest")
        for name, value in (("request_id", rid), ("namespace", ns)):
            if not isinstance(value, str):
                raise ProtocolError(f"{where}: {name} must be a str", name)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ProtocolError(f"{where}: n must be an int >= 0", "n")
        if not isinstance(spec, bytes):
            raise ProtocolError(f"{where}: spec must be bytes", "spec")
        return cls(_id(uid, "uuid", where), rid, _id(key, "key", where), ns, n,
                   _id(run, "run", where), _id(route, "route", where),
                   _id(model_id, "model_id", where), spec, manifest)


@dataclass(frozen=True)
class CacheJob:
    """One client batch: ``batch`` names it across re-asks (its reservation records);
    ``after``: the arq job of the client's batch sent before it, reserved first while it
    is queued (``""``: none, or a re-ask); ``job_id``, not part of the message: the arq
    job it came in, when the worker read it from a wake token and has yet to take it."""

    client: str
    items: list[WorkItem]
    keep_s: int
    batch: str = ""
    job_id: str = ""
    after: str = ""


def encode_job(client: str, items: list[WorkItem], keep_s: int, batch: str = "",
               after: str = "", *, specs: bool = True) -> bytes:
    """A client batch; ``keep_s``: how long reservations must outlive it (re-asks);
    ``batch``: the same id on every re-ask of the batch; ``after``: see ``CacheJob``;
    ``specs=False``: every spec empty (a wake token's copy: see ``encode_wake_token``)."""
    msg = _job_message(client, items, keep_s, batch, after)
    if not specs:
        _drop_specs(msg)
    return pack(msg)


def encode_job_and_copy(client: str, items: list[WorkItem], keep_s: int, batch: str = "",
                        after: str = "", stored: Container[str] = ()) -> tuple[bytes, bytes]:
    """``encode_job`` with specs and without (the wake token's copy), built once; the
    body leaves out the specs of requests whose prompt key is in ``stored`` (keys whose
    spec the generation hash holds: a claim of one rebuilds the request's spec from it,
    ``respec``)."""
    msg = _job_message(client, items, keep_s, batch, after)
    if stored:
        for wire in msg["requests"]:
            if wire[2] in stored:
                wire[8] = b""
    body = pack(msg)
    _drop_specs(msg)
    return body, pack(msg)


def _job_message(client: str, items: list[WorkItem], keep_s: int, batch: str,
                 after: str) -> dict[str, Any]:
    msg = {"v": SCHEMA_VERSION, "client": client, "batch": batch,
           "requests": [it.to_wire() for it in items], "keep_s": keep_s}
    if after:
        msg["after"] = after
    return msg


def _drop_specs(msg: dict[str, Any]) -> None:
    for wire in msg["requests"]:
        wire[8] = b""


def decode_job(data: bytes, keys: Keys | None = None) -> CacheJob:
    """A cache job message, checked; ``after`` must be a job id under ``keys``' prefix."""
    kind = "cache job"
    msg = _message(data, kind)
    client = _id(msg.get("client"), "client", kind)
    requests = _get(msg, "requests", list, kind)
    keep_s = _get(msg, "keep_s", int, kind)
    batch = msg.get("batch", "")
    if batch != "":
        batch = _id(batch, "batch", kind)
    after = msg.get("after", "")
    if after != "" and (keys is None or not is_job_id(after, keys)):
        raise ProtocolError(f"{kind}: 'after' is not a job id under this prefix", "after")
    return CacheJob(client, work_items(requests, f"{kind} request"), keep_s, batch, after=after)


def work_items(requests: list[Any], where: str) -> list[WorkItem]:
    """``WorkItem.from_wire`` of each request (named ``where`` and its position in
    errors), the common case checked inline: a job has many, and a worker decodes each
    job before its reserve call."""
    items: list[WorkItem] = []
    m = MAX_ID_CHARS
    for i, r in enumerate(requests):
        if type(r) is list and len(r) == 9:
            uid, rid, key, ns, n, run, route, model_id, spec = r
            manifest = False
        elif type(r) is list and len(r) == 10 and type(r[9]) is bool:
            uid, rid, key, ns, n, run, route, model_id, spec, manifest = r
        else:
            items.append(WorkItem.from_wire(r, f"{where} {i}"))  # raises
            continue
        if type(n) is int and n >= 0 and type(spec) is bytes and type(rid) is str \
                and type(ns) is str and type(uid) is str and type(key) is str \
                and type(run) is str and type(route) is str and type(model_id) is str \
                and 0 < len(uid) <= m and 0 < len(key) <= m and 0 < len(run) <= m \
                and 0 < len(route) <= m and 0 < len(model_id) <= m:
            items.append(_new_tuple(WorkItem, (uid, rid, key, ns, n, run, route, model_id,
                                               spec, manifest)))
        else:
            items.append(WorkItem.from_wire(r, f"{where} {i}"))  # raises, or a subclass
    return items


_new_tuple = tuple.__new__


def job_waiters(data: bytes) -> list[str]:
    """Best effort, for a job that failed to decode: the waiter ids it names."""
    try:
        msg = unpack(data)
        client = _id(msg["client"], "client", "")
        return [waiter_id(client, _id(r[0], "uuid", "")) for r in msg["requests"]]
    except Exception:
        return []


# --- generation spec and work stream entry ---------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What a batch worker needs to generate samples of one prompt key."""

    route: str
    model_id: str
    fields: dict[str, Any]
    namespace: str | None = None
    request_id: str | None = None


def encode_spec(route: str, model_id: str, fields: dict[str, Any], namespace: str | None = None,
                request_id: str | None = None, *, packed: bytes | None = None) -> bytes:
    """``namespace`` and ``request_id`` are the claiming request's: the model sees them.
    ``packed``: ``pack(fields)``, when the caller has it.

    The bytes of ``pack({"v": ..., "route": route, "model_id": ..., "fields": ...,
    "namespace": ..., "request_id": ...})``, put together from their parts."""
    return b"".join((_spec_head(route, model_id), pack(fields) if packed is None else packed,
                     _namespace_entry(namespace) if type(namespace) is str else
                     _NAMESPACE + pack(namespace), _REQUEST_ID, pack(request_id)))


def respec(stored: bytes, route: str, model_id: str, namespace: str,
           request_id: str) -> bytes:
    """The spec of a request whose job left it out: the fields of ``stored`` (its prompt
    key's spec, as the generation hash keeps it), with this request's own route, model,
    namespace and request id (``""``: none). ``ProtocolError`` if ``stored`` cannot be
    read."""
    return encode_spec(route, model_id, decode_spec(stored).fields, namespace,
                       request_id or None)


@lru_cache(maxsize=256)
def _spec_head(route: str, model_id: str) -> bytes:
    """A spec's map header and its entries before the fields' value."""
    return b"".join((b"\x86", pack("v"), pack(SCHEMA_VERSION), pack("route"), pack(route),
                     pack("model_id"), pack(model_id), pack("fields")))


@lru_cache(maxsize=4096)  # (namespaces repeat)
def _namespace_entry(namespace: str) -> bytes:
    return _NAMESPACE + pack(namespace)


_NAMESPACE, _REQUEST_ID = pack("namespace"), pack("request_id")


def decode_spec(data: bytes) -> Spec:
    kind = "generation spec"
    msg = _message(data, kind)
    fields = _get(msg, "fields", dict, kind)
    if not all(isinstance(k, str) for k in fields):
        raise ProtocolError(f"{kind}: field names must be str", "fields")
    # The batch worker builds a Request from the fields: it needs a prompt, and names
    # that can be dataclass fields other than the routing ones.
    if "prompt" not in fields:
        raise ProtocolError(f"{kind}: field 'prompt' is missing from 'fields'", "fields")
    for name in fields:
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__") \
                or name in ROUTING_FIELDS:
            raise ProtocolError(f"{kind}: field name {name[:40]!r} in 'fields' is not a "
                                "request field name", "fields")
    for name in ("namespace", "request_id"):
        if not isinstance(msg.get(name), (str, type(None))):
            raise ProtocolError(f"{kind}: field {name!r} must be a str or nil", name)
    return Spec(_id(msg.get("route"), "route", kind), _id(msg.get("model_id"), "model_id", kind),
                fields, msg.get("namespace"), msg.get("request_id"))


@dataclass(frozen=True)
class StreamEntry:
    """One claim on a work stream: indices of one prompt key, and how to generate them.

    Written by ``reserve.lua`` as fields ``key``, ``idx`` (comma-separated) and ``spec``.
    """

    key: str
    indices: list[int]
    spec: Spec


def _claim(fields: dict[bytes, bytes], kind: str) -> tuple[str, list[int]]:
    try:
        key = fields[b"key"].decode()
    except (KeyError, UnicodeDecodeError):
        raise ProtocolError(f"{kind}: field 'key' is missing or not UTF-8", "key") from None
    if not 0 < len(key) <= MAX_ID_CHARS:
        raise ProtocolError(f"{kind}: field 'key' has a bad length", "key")
    try:
        indices = [int(i) for i in fields[b"idx"].split(b",")]
    except (KeyError, ValueError):
        raise ProtocolError(f"{kind}: field 'idx' must list indices as '0,1,2'", "idx") from None
    if any(i < 0 for i in indices):
        raise ProtocolError(f"{kind}: field 'idx' has a negative index", "idx")
    return key, indices


def decode_stream_entry(fields: dict[bytes, bytes], route: str) -> StreamEntry:
    """Validate an entry read from ``route``'s work stream."""
    kind = "work stream entry"
    key, indices = _claim(fields, kind)
    if b"spec" not in fields:
        raise ProtocolError(f"{kind}: field 'spec' is missing", "spec")
    spec = decode_spec(fields[b"spec"])
    if spec.route != route:
        raise ProtocolError(f"{kind}: spec is for model {spec.route!r}, the stream serves "
                            f"{route!r}", "spec")
    return StreamEntry(key, indices, spec)


def entry_claim(fields: dict[bytes, bytes]) -> tuple[str, list[int]] | None:
    """Best effort, for an entry that failed to decode: the claim it names."""
    try:
        return _claim(fields, "")
    except ProtocolError:
        return None


# --- run manifests -----------------------------------------------------------------------


def manifest_field(namespace: str, request_id: str) -> str:
    """A manifest's field: namespaces hold no control characters, so the first newline
    splits it."""
    return f"{namespace}\n{request_id}"


def split_manifest_field(field: bytes | str) -> tuple[str, str]:
    text = field.decode() if isinstance(field, bytes) else field
    namespace, sep, request_id = text.partition("\n")
    if not sep or not namespace or not request_id:
        raise ProtocolError(f"manifest field {text[:80]!r} is not '<namespace>\\n<request_id>'",
                            "manifest")
    return namespace, request_id


@dataclass(frozen=True)
class ManifestEntry:
    """``<key>|<start>|<n>``: request got samples ``start .. start+n-1`` of prompt key
    ``key``; ``|*`` appended (``ambiguous``) when a later request of the same run reused
    the namespace and request id for another range (reserve.lua keeps the first)."""

    key: str
    start: int
    n: int
    ambiguous: bool = False


def encode_manifest_entry(entry: ManifestEntry) -> str:
    return f"{entry.key}|{entry.start}|{entry.n}" + ("|*" if entry.ambiguous else "")


def decode_manifest_entry(data: bytes | str) -> ManifestEntry:
    try:
        text = data.decode() if isinstance(data, bytes) else data
        parts = text.split("|")
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "*"):
            raise ValueError
        entry = ManifestEntry(parts[0], int(parts[1]), int(parts[2]), len(parts) == 4)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("manifest entry is not '<key>|<start>|<n>'", "manifest") from None
    if not 0 < len(entry.key) <= MAX_ID_CHARS or entry.start < 0 or entry.n < 0:
        raise ProtocolError("manifest entry has a bad key, start or n", "manifest")
    return entry


def is_prompt_key(key: Any) -> bool:
    """A prompt key as ``prompt_key`` makes them: 32 lowercase hex characters (so a usage
    field ``<key><namespace>`` splits after 32 characters)."""
    return isinstance(key, str) and len(key) == PROMPT_KEY_CHARS and all(c in _HEX for c in key)


_HEX = frozenset("0123456789abcdef")


# --- waiters ---------------------------------------------------------------------------


def waiter_id(client: str, request_uuid: str) -> str:
    """Who to reply to: ``<client>:<request uuid>``."""
    return f"{client}:{request_uuid}"


def split_waiter_id(wid: str) -> tuple[str, str]:
    client, sep, request_uuid = wid.partition(":")
    if not sep or not client or not request_uuid:
        raise ProtocolError(f"waiter id {wid[:80]!r} is not '<client>:<request>'", "waiter")
    return client, request_uuid


def waiter_tail(run: str, model_id: str) -> str:
    """The part of a waiter record the scripts carry untouched: who to account it to."""
    return f"{run}|{model_id}"


@dataclass(frozen=True)
class WaiterRecord:
    """``start|flags|run|model``: what a waiting request was given (set by reserve.lua)."""

    start: int
    flags: str
    run: str
    model_id: str


def decode_waiter_record(data: bytes | str) -> WaiterRecord:
    try:
        text = data.decode() if isinstance(data, bytes) else data
        start, flags, run, model_id = text.split("|", 3)
        record = WaiterRecord(int(start), flags, run, model_id)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("waiter record is not 'start|flags|run|model'", "waiter") from None
    if record.start < 0 or not record.flags.isalpha() or not record.run:
        raise ProtocolError("waiter record has a bad start, flags or run", "waiter")
    return record


def claimed_indices(record: bytes | str) -> list[int]:
    """The indices a request claimed (flag ``g``), from its reservation record
    ``start|flags`` (``Keys.reservations``, set by reserve.lua)."""
    try:
        text = record.decode() if isinstance(record, bytes) else record
        start, flags = text.split("|")
        first = int(start)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("reservation record is not 'start|flags'", "reservation") from None
    if first < 0 or not flags.isalpha():
        raise ProtocolError("reservation record has a bad start or flags", "reservation")
    return [first + i for i, flag in enumerate(flags) if flag == GENERATED]


# --- samples -----------------------------------------------------------------------------


def encode_sample(data: Any, meta: dict[str, Any] | None = None) -> bytes:
    """One stored sample: the model's output plus provider metadata."""
    record = {"v": SCHEMA_VERSION, "data": data, "created": time.time()}
    if meta:
        record.update({k: v for k, v in meta.items() if k not in record})
    return pack(record)


def decode_sample(data: bytes) -> dict[str, Any]:
    msg = _message(data, "sample")
    if "data" not in msg:
        raise ProtocolError("sample has no field 'data'", "data")
    return msg


# --- replies -----------------------------------------------------------------------------


def reply(request_uuid: str, start: int, flags: str, samples: list[bytes]) -> dict[str, Any]:
    """Samples ``start, start+1, ...`` of a request, with their flags."""
    return {"id": request_uuid, "start": start, "flags": flags, "samples": samples}


# The error kind of a reply that is not final: the request was left unreserved (its
# prompt could not be read); its client asks again at once, with the prompt.
ASK_AGAIN = "ask_again"


def error_reply(request_uuid: str, kind: str, message: str) -> dict[str, Any]:
    return {"id": request_uuid, "error": {"kind": kind, "message": message}}


def encode_replies(replies: list[dict[str, Any]]) -> bytes:
    """One message with the replies of one job or store to one client. The reserve
    script writes the same bytes for the hits it publishes (``lua/lib/replies.lua``;
    ``tests/test_scripts.py`` holds the two to each other)."""
    return pack({"v": SCHEMA_VERSION, "replies": replies})


def decode_replies(data: bytes) -> list[dict[str, Any]]:
    kind = "reply"
    replies = _get(_message(data, kind), "replies", list, kind)
    for r in replies:
        if type(r) is dict and len(r) == 4 and type(r.get("id")) is str and \
                type(r.get("start")) is int and type(flags := r.get("flags")) is str and \
                type(samples := r.get("samples")) is list and len(flags) == len(samples):
            for sample in samples:
                if type(sample) is not bytes:
                    break
            else:
                continue  # the common case, checked at once
        if not isinstance(r, dict) or not isinstance(r.get("id"), str):
            raise ProtocolError(f"{kind}: each reply needs a str 'id'", "id")
        r.pop("records", None)  # decoded samples: only a direct-mode reply has them
        if "error" in r:
            err = r["error"]
            if not (isinstance(err, dict) and isinstance(err.get("kind"), str)
                    and isinstance(err.get("message"), str)):
                raise ProtocolError(f"{kind}: 'error' needs str 'kind' and 'message'", "error")
            r.pop("samples", None)  # an error reply has none: nothing to read
            continue
        _get(r, "start", int, kind)
        flags, samples = _get(r, "flags", str, kind), _get(r, "samples", list, kind)
        if len(flags) != len(samples) or not all(isinstance(s, bytes) for s in samples):
            raise ProtocolError(f"{kind}: 'samples' must be one bytes item per flag", "samples")
    return replies


# --- wake tokens -------------------------------------------------------------------------


def encode_wake_token(job_id: str, payload: bytes) -> bytes:
    """A wake token: an enqueued job's id and its cache job message without specs
    (``encode_job(..., specs=False)``), so the worker that pops it needs no round trip to
    read the job: a hit needs no spec; the specs of requests that claim are read from
    the job's body (``scripts.reserve_jobs``), and a token of a few hundred bytes per
    request, whatever the prompt's length, keeps the wake-up list small."""
    return pack([job_id, payload])


def decode_wake_token(data: bytes, keys: Keys) -> tuple[str, bytes]:
    """The job id (checked: ``Keys.new_job_id`` under this prefix) and the payload."""
    msg = unpack(data, "wake token")
    if not (isinstance(msg, list) and len(msg) == 2 and isinstance(msg[1], bytes)):
        raise ProtocolError("wake token is not a [job id, payload] pair", "token")
    job_id = msg[0]
    if not is_job_id(job_id, keys):
        raise ProtocolError(f"wake token is not a job id under prefix {keys.prefix!r}", "token")
    return job_id, msg[1]


def is_job_id(value: Any, keys: Keys) -> bool:
    """``Keys.new_job_id``'s form: the prefix, then a short id (a long prefix is fine)."""
    return isinstance(value, str) and value.startswith(keys.prefix) and \
        len(value) - len(keys.prefix) <= MAX_ID_CHARS


# --- dead letters ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """A malformed message set aside: what it was, why, where it was, and its bytes."""

    kind: str
    reason: str
    source: str
    raw: bytes
    at: float


def encode_dead_letter(letter: DeadLetter) -> dict[str, bytes | str | float]:
    """Stream entry fields of a dead letter."""
    return {"v": SCHEMA_VERSION, "kind": letter.kind, "reason": letter.reason,
            "source": letter.source, "raw": letter.raw, "at": letter.at}


def decode_dead_letter(fields: dict[bytes, bytes]) -> DeadLetter:
    def text(name: str) -> str:
        return fields.get(name.encode(), b"").decode(errors="replace")

    try:
        at = float(fields.get(b"at", b"0"))
    except ValueError:
        at = 0.0
    return DeadLetter(text("kind"), text("reason"), text("source"), fields.get(b"raw", b""), at)


# --- arq jobs: msgpack, never pickle -------------------------------------------------------


def _arq_default(obj: Any) -> Any:
    if isinstance(obj, BaseException):
        return f"{type(obj).__name__}: {obj}"
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    return str(obj)


def arq_serialize(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=_arq_default)


# arq's names for a job's keys (``arq.constants``), here so that clients need not import
# arq; tests/test_scripts.py checks them against arq's.
ARQ_JOB, ARQ_IN_PROGRESS, ARQ_RETRY = "arq:job:", "arq:in-progress:", "arq:retry:"


def arq_job_keys(job_id: str) -> tuple[str, str, str]:
    """arq's keys of a job: in-progress, body and try counter."""
    return ARQ_IN_PROGRESS + job_id, ARQ_JOB + job_id, ARQ_RETRY + job_id


def encode_arq_job(payload: bytes, enqueue_time_ms: int) -> bytes:
    """The body of an arq job calling the cache job with ``payload``, as arq's
    ``serialize_job`` writes it (with ``arq_serialize``; every value here is plain)."""
    return pack({"t": None, "f": CACHE_JOB, "a": [payload], "k": {}, "et": enqueue_time_ms})


class Payload(bytes):
    """A job's msgpack payload: arq logs ``repr(args)`` for every job, and the repr of
    a large ``bytes`` object costs more than serving the batch."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@dataclass(frozen=True)
class MalformedJob:
    """Stands in for the payload of an arq job that could not be read."""

    raw: bytes
    reason: str

    def __repr__(self) -> str:
        return f"<malformed job: {self.reason}>"


def arq_deserialize(data: bytes) -> dict[str, Any]:
    """arq's deserializer, for jobs and results: a result comes back as it is; see
    ``arq_deserialize_job`` for jobs."""
    return _arq_deserialize(data, results=True)


def arq_deserialize_job(data: bytes) -> dict[str, Any]:
    """The cache workers' job deserializer. A job that is not ours (a result, a job
    missing one of arq's fields included) comes back as a call of the cache job with a
    ``MalformedJob`` argument, so the worker sets it aside instead of failing."""
    return _arq_deserialize(data, results=False)


def _arq_deserialize(data: bytes, results: bool) -> dict[str, Any]:
    try:
        obj = unpack(data, "arq job")
        if results and isinstance(obj, dict) and "r" in obj:  # a job result, not a job
            return obj
        if not (isinstance(obj, dict) and obj.get("f") == CACHE_JOB
                and isinstance(obj.get("a"), list) and len(obj["a"]) == 1
                and isinstance(obj["a"][0], bytes) and isinstance(obj.get("k"), dict)
                and isinstance(obj.get("et"), int) and "t" in obj):
            raise ProtocolError(f"arq job is not a {CACHE_JOB!r} call with one bytes argument")
    except ProtocolError as exc:
        return {"t": 1, "f": CACHE_JOB, "a": [MalformedJob(bytes(data), str(exc))], "k": {},
                "et": int(time.time() * 1000)}
    obj["a"] = [Payload(obj["a"][0])]
    return obj
