"""The atomic steps, as Redis scripts: reserve, fill and release.

The ``.lua`` files beside this module are the source of truth; these wrappers only
lay out ``KEYS``/``ARGV`` and name the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from .protocol import Keys, ProtocolError, waiter_info

DEFAULT_RUN_TTL_S = 7 * 24 * 3600

_HERE = Path(__file__).parent


@cache
def _source(name: str) -> str:
    return (_HERE / f"{name}.lua").read_text()


def _script(redis: Redis, name: str) -> AsyncScript:
    # register_script keeps the SHA and reloads the source after SCRIPT FLUSH/restart.
    scripts = redis.__dict__.setdefault("_cachesaver_scripts", {})
    if name not in scripts:
        scripts[name] = redis.register_script(_source(name))
    return scripts[name]


@dataclass(frozen=True)
class WorkItem:
    """One request as the cache worker reserves it."""

    uuid: str
    request_id: str
    key: str
    namespace: str
    n: int
    run: str
    route: str
    model_id: str
    spec: bytes

    @classmethod
    def from_wire(cls, fields: list[Any]) -> WorkItem:
        return cls(*fields)

    def to_wire(self) -> list[Any]:
        return [self.uuid, self.request_id, self.key, self.namespace, self.n, self.run,
                self.route, self.model_id, self.spec]


@dataclass(frozen=True)
class Reservation:
    """What reserve decided for one request."""

    item: WorkItem
    complete: bool
    new: bool
    start: int
    flags: str
    samples: list[bytes]


@dataclass(frozen=True)
class Waiter:
    """A request completed (or failed) by a fill or release."""

    waiter_id: str
    start: int
    flags: str
    run: str
    model_id: str
    samples: list[bytes]


async def reserve(
    redis: Redis, keys: Keys, client: str, items: list[WorkItem],
    run_ttl_s: int = DEFAULT_RUN_TTL_S, reservation_ttl_s: int = 3600,
) -> list[Reservation]:
    """Reserve indices for ``items`` in the given order.

    One round trip when every request is a hit or waits on others; a request that
    claims indices needs its spec (its whole prompt), so from the first such request
    on, the rest are sent again with their specs: a second round trip.
    A reservation record lives ``reservation_ttl_s`` (as long as its client may retry).
    """
    out: list[Reservation] = []
    for with_specs in (False, True):
        k: list[str] = []
        argv: list[Any] = [reservation_ttl_s * 1000, run_ttl_s * 1000]
        for it in items:
            k += [keys.samples(it.key), keys.generation(it.key), keys.waiters(it.key),
                  keys.usage(it.run), keys.reservation(it.uuid), keys.work_stream(it.route)]
            argv += [it.key + it.namespace, it.n, f"{client}:{it.uuid}",
                     waiter_info(it.run, it.model_id), it.key, it.spec if with_specs else b""]
        raw, stopped_at = await _script(redis, "reserve")(keys=k, args=argv)
        out += [Reservation(it, bool(r[0]), bool(r[1]), int(r[2]), _text(r[3]), list(r[4:]))
                for it, r in zip(items, raw)]
        if stopped_at < 0:
            return out
        items = items[stopped_at:]
    raise ProtocolError("reserve stopped for a spec it was sent (an empty spec?): specs "
                        "come from prepare(); do not build WorkItems by hand")


async def fill(redis: Redis, keys: Keys, key: str, samples: dict[int, bytes]) -> list[Waiter]:
    """Store samples (set-if-absent); return the waiters they complete."""
    [waiters] = await fill_many(redis, keys, [(key, samples)])
    return waiters


async def fill_many(
    redis: Redis, keys: Keys, fills: list[tuple[str, dict[int, bytes]]]
) -> list[list[Waiter]]:
    """``fill`` for several prompt keys in one round trip; the waiters per key."""
    k: list[str] = []
    argv: list[Any] = []
    for key, samples in fills:
        k += _key_triple(keys, key)
        argv.append(len(samples))
        for idx, sample in samples.items():
            argv += [idx, sample]
    raw = await _script(redis, "fill")(keys=k, args=argv)
    return [[_waiter(r[0], r[1], list(r[2:])) for r in per_key] for per_key in raw]


async def release(redis: Redis, keys: Keys, key: str, indices: list[int]) -> list[Waiter]:
    """Give up claimed indices; return the waiters that were waiting on them."""
    raw = await _script(redis, "release")(keys=_key_triple(keys, key), args=indices)
    return [_waiter(r[0], r[1], []) for r in raw]


def _key_triple(keys: Keys, key: str) -> list[str]:
    return [keys.samples(key), keys.generation(key), keys.waiters(key)]


def _waiter(waiter_id: bytes, record: bytes, samples: list[bytes]) -> Waiter:
    start, flags, run, model_id = _text(record).split("|", 3)
    return Waiter(_text(waiter_id), int(start), flags, run, model_id, samples)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
