"""The Redis scripts: one loader for every ``lua/*.lua``, and the atomic steps.

The ``.lua`` files are the source of truth; the wrappers here only lay out
``KEYS``/``ARGV`` and name the results.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from . import defaults
from .deadletters import set_aside_key
from .errors import NotReplicatedError, ProtocolError
from .protocol import (
    ARQ_JOB,
    CONSUMER_GROUP,
    CacheJob,
    Keys,
    MalformedJob,
    WorkItem,
    arq_deserialize_job,
    arq_job_keys,
    decode_job,
    decode_waiter_record,
    manifest_field,
    respec,
    text,
    waiter_id,
    waiter_tail,
)

LUA_DIR = Path(__file__).parent / "lua"
log = logging.getLogger("cachesaver_dist.scripts")


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>.lua``, each ``-- #include <lib>`` line replaced by
    ``lua/lib/<lib>.lua`` (Redis scripts cannot share functions otherwise)."""
    lua = (LUA_DIR / f"{name}.lua").read_text()
    return re.sub(r"^-- #include (\w+)$",
                  lambda m: (LUA_DIR / "lib" / f"{m.group(1)}.lua").read_text(), lua,
                  flags=re.M)


def script(redis: Any, name: str) -> AsyncScript:
    """``lua/<name>.lua`` registered on ``redis`` (once per client object).

    ``register_script`` keeps the SHA and reloads the source after a ``SCRIPT FLUSH``
    or a restart (``NOSCRIPT``).
    """
    scripts = redis.__dict__.setdefault("_cachesaver_scripts", {})
    if name not in scripts:
        scripts[name] = redis.register_script(source(name))
    return scripts[name]


class Reservation(NamedTuple):
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


@dataclass(frozen=True)
class MalformedWaiter:
    """A waiter record a script found unreadable and removed."""

    waiters_key: str
    waiter_id: str
    raw: bytes


async def run_script(redis: Any, name: str, keys: list[str], args: list[Any],
                     replicas: int = 0) -> Any:
    """Run ``lua/<name>.lua``; with ``replicas``, answer only once that many replicas
    hold its writes (``WAIT`` on the same connection), else raise ``NotReplicatedError``.

    Behind Sentinel this is what keeps a failover from handing an index out twice: a
    write the old primary accepted after the promotion is never acknowledged.
    """
    if not replicas:
        return await script(redis, name)(keys=keys, args=args)
    sha = script(redis, name).sha
    try:  # one connection: the script, then WAIT for its writes
        result, acked = await _then_wait(redis, "EVALSHA", sha, keys, args, replicas)
    except NoScriptError:  # a new primary after a failover: send the source this once
        result, acked = await _then_wait(redis, "EVAL", source(name), keys, args, replicas)
    if int(acked) < replicas:
        raise NotReplicatedError(
            f"{name}: {acked} of {replicas} replica(s) confirmed the write within "
            f"{defaults.WAIT_REPLICAS_TIMEOUT_MS} ms (a failover, or a replica down); it is "
            "not acknowledged and will be asked again")
    return result


async def _then_wait(redis: Any, command: str, script_ref: str, keys: list[str],
                     args: list[Any], replicas: int) -> tuple[Any, int]:
    pipe = redis.pipeline(transaction=False)
    pipe.execute_command(command, script_ref, len(keys), *keys, *args)
    pipe.execute_command("WAIT", replicas, defaults.WAIT_REPLICAS_TIMEOUT_MS)
    result, acked = await pipe.execute()
    return result, int(acked)


async def reserve(
    redis: Redis, keys: Keys, client: str, items: list[WorkItem],
    run_ttl_s: int = defaults.RUN_TTL_S, reservation_ttl_s: int = 3600, replicas: int = 0,
    *, batch: str = "",
) -> list[Reservation]:
    """Reserve indices for ``items`` (one batch of ``client``) in the given order."""
    [out] = await reserve_jobs(redis, keys, [CacheJob(client, items, reservation_ttl_s, batch)],
                               run_ttl_s, replicas)
    assert out is not None
    return out


async def reserve_jobs(
    redis: Redis, keys: Keys, jobs: list[CacheJob], run_ttl_s: int = defaults.RUN_TTL_S,
    replicas: int = 0, *, in_progress_ms: int = 60_000, waiting: set[str] | None = None,
    publish: bool = False,
) -> list[list[Reservation] | None]:
    """Reserve indices for the requests of several client batches, each in its order;
    the reservations per job.

    A job with a ``job_id`` is an arq job the caller has not claimed: it is taken in the
    same call (``None`` in its place when arq's poll or another worker has it) and
    finished once all its requests are reserved (see reserve.lua). A job whose ``after``
    job is still queued is not taken either: its id goes into ``waiting``, to be asked
    again (the client's batch before it is reserved first). ``publish``: the script
    also publishes the replies of the complete requests of those jobs to their clients
    (one message per job and call, in the same step), so the caller only accounts for them.

    One round trip when every request is a hit or waits on others; a request that
    claims indices needs its spec (its whole prompt), so from the first such request
    on, the rest are sent again with their specs: a second round trip. Requests read
    from a wake token carry no spec: theirs are read from their job's body first (a job
    whose body is gone gets what the first pass reserved, and is finished: its client
    asks again for the rest).
    A batch's reservation records live its ``keep_s`` (as long as its client may retry).
    Items with ``manifest`` set (and a request id) are recorded in their run's manifest.
    """
    pending = [(job, it) for job in jobs for it in job.items]
    ttl_ms = max(job.keep_s for job in jobs) * 1000
    done: dict[int, list[Reservation]] = {id(job): [] for job in jobs}
    taken: set[int] = {id(job) for job in jobs if not job.job_id}
    dropped: set[int] = set()  # taken, then given up for want of their specs
    arq_jobs = [job for job in jobs if job.job_id]
    for take in (True, False):  # the second pass: with specs, for the jobs held
        number = {id(job): n for n, job in enumerate(arq_jobs, 1)}
        # the queue is only touched with arq jobs: without, a key the call writes anyway
        # (a direct client's user has no rights on the queue)
        first = keys.cache_queue if arq_jobs else keys.reservations(jobs[0].client,
                                                                    jobs[0].batch)
        k = [first, *(key for job in arq_jobs for key in arq_job_keys(job.job_id))]
        argv: list[Any] = [ttl_ms, run_ttl_s * 1000, in_progress_ms, int(take), len(arq_jobs),
                           *(job.job_id for job in arq_jobs), *(job.after for job in arq_jobs),
                           *(keys.reply_channel(job.client) if publish else ""
                             for job in arq_jobs)]
        # per group of requests (one client batch of one run, model and route): its five
        # keys, after the requests' keys (KEYS position, 1-based), and its waiter tail
        groups: dict[tuple[str, str, str, str], tuple[int, str]] = {}
        shared: list[str] = []
        base = len(k) + 3 * len(pending) + 1
        records, job_of = "", None
        s_, g_, w_ = keys.samples(""), keys.generation(""), keys.waiters("")
        for job, (uuid, request_id, key, namespace, n, run, route, model_id, spec,
                  manifest) in pending:
            if job is not job_of:
                job_of, records = job, keys.reservations(job.client, job.batch)
                client, job_number = job.client, number.get(id(job), 0)
            k += (s_ + key, g_ + key, w_ + key)
            found = groups.get((run, model_id, route, records))
            if found is None:
                found = groups[run, model_id, route, records] = (
                    base + len(shared), waiter_tail(run, model_id))
                shared += [keys.usage(run), keys.work_stream(route),
                           keys.model_keys(model_id), keys.manifest(run), records]
            argv += (namespace, n, waiter_id(client, uuid), found[1], key, b"" if take else spec,
                     found[0], manifest_field(namespace, request_id)
                     if manifest and request_id else "", job_number)
        raw, stopped_at, held = await run_script(redis, "reserve", k + shared, argv, replicas)
        taken.update(id(job) for job, h in zip(arq_jobs, held) if h == 1)
        if waiting is not None:
            waiting.update(job.job_id for job, h in zip(arq_jobs, held) if h == 2)
        job_of = None
        for (job, it), r in zip(pending, raw):
            if r is not None:
                if job is not job_of:
                    job_of, reserved = job, done[id(job)]
                reserved.append(Reservation(it, r[0] == 1, r[1] == 1, int(r[2]), text(r[3]),
                                            r[4:]))
        if stopped_at < 0:
            return [done[id(job)] if id(job) in taken or id(job) in dropped else None
                    for job in jobs]
        pending = [(job, it) for job, it in pending[stopped_at:] if id(job) in taken]
        pending = await _with_specs(redis, keys, pending, taken, dropped)
        arq_jobs = [job for job in arq_jobs if id(job) in taken]
    raise ProtocolError("reserve stopped for a spec it was sent (an empty spec?): specs "
                        "come from prepare(); do not build WorkItems by hand", "spec")


def finish_jobs(pipe: Any, keys: Keys, job_ids: list[str]) -> None:
    """Queue on ``pipe`` what finishes arq jobs of the cache queue without a result:
    their queue entries and keys go."""
    pipe.zrem(keys.cache_queue, *job_ids)
    pipe.delete(*(key for job_id in job_ids for key in arq_job_keys(job_id)))


async def _with_specs(redis: Redis, keys: Keys, pending: list[tuple[CacheJob, WorkItem]],
                      taken: set[int], dropped: set[int]) -> list[tuple[CacheJob, WorkItem]]:
    """``pending`` with the specs a wake token left out, read from the arq jobs' bodies in
    one round trip, then those the bodies left out too, rebuilt from the specs stored
    under their prompt keys (``_stored_specs``). A job whose body is gone (expired),
    unreadable or not the token's batch, or a spec neither holds, moves from ``taken``
    to ``dropped``; a woken one is finished as arq finishes an expired job. Its requests
    not reserved yet are left to its client, which asks again with their prompts."""
    jobs = {job.job_id: job for job, it in pending if not it.spec and job.job_id}
    if not jobs:
        return await _stored_specs(redis, keys, pending, taken, dropped)
    specs: dict[tuple[str, str], bytes] = {}
    for job_id, body in zip(jobs, await redis.mget([ARQ_JOB + j for j in jobs])):
        job = jobs[job_id]
        try:
            if body is None:
                raise ProtocolError("gone")
            payload = arq_deserialize_job(body)["a"][0]
            if isinstance(payload, MalformedJob):
                raise ProtocolError(payload.reason)
            full = {it.uuid: it.spec for it in decode_job(payload, keys).items}
            if any(it.uuid not in full for j, it in pending if j is job):
                raise ProtocolError("it is not the batch its wake token named")
        except ProtocolError as exc:
            log.warning("job %s: its requests' prompts could not be read from its body (%s); "
                        "left to its client, which asks again", job_id, exc)
            taken.discard(id(job))
            dropped.add(id(job))
            continue
        specs.update(((job_id, uuid), spec) for uuid, spec in full.items())
    pending = [(job, it._replace(spec=specs.get((job.job_id, it.uuid), b"")) if not it.spec
                else it) for job, it in pending if id(job) in taken]
    pending = await _stored_specs(redis, keys, pending, taken, dropped)
    gone = [job_id for job_id, job in jobs.items() if id(job) in dropped]
    if gone:
        pipe = redis.pipeline(transaction=False)
        finish_jobs(pipe, keys, gone)
        await pipe.execute()
    return pending


async def _stored_specs(redis: Redis, keys: Keys, pending: list[tuple[CacheJob, WorkItem]],
                        taken: set[int], dropped: set[int]
                        ) -> list[tuple[CacheJob, WorkItem]]:
    """``pending`` with the specs their clients left out (``encode_job_and_copy``'s
    ``stored``) rebuilt from the specs their prompt keys' generation hashes keep, in one
    round trip (``respec``); a job with a spec that is not there (the key pruned, or
    imported without one) or cannot be read moves from ``taken`` to ``dropped``."""
    wanted = sorted({it.key for _, it in pending if not it.spec})
    if not wanted:
        return pending
    pipe = redis.pipeline(transaction=False)
    for key in wanted:
        pipe.hget(keys.generation(key), "spec")
    stored = dict(zip(wanted, await pipe.execute()))
    out = []
    for job, it in pending:
        if id(job) not in taken:
            continue
        if not it.spec:
            try:
                raw = stored.get(it.key)
                if raw is None:
                    raise ProtocolError("no spec is stored under its prompt key")
                it = it._replace(spec=respec(raw, it.route, it.model_id, it.namespace,
                                             it.request_id))
            except ProtocolError as exc:
                log.info("batch %s of client %s: the prompt of request %s could not be "
                         "rebuilt (%s); left to its client, which asks again with it",
                         job.batch, job.client, it.uuid, exc)
                taken.discard(id(job))
                dropped.add(id(job))
                continue
        out.append((job, it))
    return [(job, it) for job, it in out if id(job) in taken]


async def fill(redis: Redis, keys: Keys, key: str, samples: dict[int, bytes]) -> list[Waiter]:
    """``fill_many`` for one prompt key; the waiters it completes."""
    [waiters], _ = await fill_many(redis, keys, [(key, samples)])
    return waiters


async def fill_many(
    redis: Redis, keys: Keys, fills: list[tuple[str, dict[int, bytes]]], *,
    set_aside_foreign: bool = True, replicas: int = 0,
) -> tuple[list[list[Waiter]], list[MalformedWaiter]]:
    """Store samples (set-if-absent) for several prompt keys in one round trip.

    Returns the waiters now complete, per key, and the unreadable waiter records found.
    A prompt key whose Redis keys hold another type is set aside (moved to the dead
    letters) and filled again, so samples already paid for are kept.
    """
    k: list[str] = []
    argv: list[Any] = []
    for key, samples in fills:
        k += _key_triple(keys, key)
        argv.append(len(samples))
        for idx, sample in samples.items():
            argv += [idx, sample]
    per_key, malformed, wrongtype = await run_script(redis, "fill", k, argv, replicas)
    waiters, bad = [], _malformed(malformed)
    for entries in per_key:
        waiters.append(_waiters(entries, bad, keys))
    if wrongtype and set_aside_foreign:
        names = {text(name) for name in wrongtype}
        for name in sorted(names):
            await set_aside_key(redis, keys, name, "hash")
        redo = [i for i, (key, _) in enumerate(fills) if names & set(_key_triple(keys, key))]
        again, more_bad = await fill_many(redis, keys, [fills[i] for i in redo],
                                          set_aside_foreign=False, replicas=replicas)
        for i, got in zip(redo, again):
            waiters[i] = got
        bad += more_bad
    return waiters, bad


async def release(
    redis: Redis, keys: Keys, key: str, indices: list[int]
) -> tuple[list[Waiter], list[MalformedWaiter]]:
    """Give up claimed indices; return the waiters that were waiting on them."""
    raw, malformed = await script(redis, "release")(keys=_key_triple(keys, key), args=indices)
    bad = _malformed(malformed)
    return _waiters([[w, rec] for w, rec in raw], bad, keys), bad


async def withdraw(redis: Redis, keys: Keys, route: str, key: str, waiter_ids: list[str],
                   indices: list[int], scan: int = 1000) -> tuple[int, int]:
    """Withdraw the claims of requests that gave up for want of a batch worker (see
    withdraw.lua: entries no batch worker was handed, among the newest ``scan`` of the
    model's stream); ``(stream entries deleted, indices released)``."""
    deleted, released = await script(redis, "withdraw")(
        keys=[keys.work_stream(route), *_key_triple(keys, key)],
        args=[key, scan, CONSUMER_GROUP, len(waiter_ids), *waiter_ids, *indices])
    return int(deleted), int(released)


async def give_back(redis: Redis, keys: Keys, client: str, batch: str,
                    items: list[WorkItem]) -> int:
    """Give back the index ranges of ``items``, requests of ``client``'s ``batch`` that
    failed, when each is the last range its counter handed out (see give_back.lua); how
    many were given back."""
    k: list[str] = []
    argv: list[str] = []
    for it in items:
        k += [keys.usage(it.run), keys.reservations(client, batch), keys.manifest(it.run)]
        argv += [it.key, it.namespace, waiter_id(client, it.uuid),
                 manifest_field(it.namespace, it.request_id)
                 if it.manifest and it.request_id else ""]
    return int(await script(redis, "give_back")(keys=k, args=argv))


async def discard(redis: Redis, keys: Keys, key: str, samples: dict[int, bytes]) -> int:
    """Remove unreadable samples (if unchanged) so they are generated again."""
    argv: list[Any] = []
    for idx, raw in samples.items():
        argv += [idx, raw]
    return int(await script(redis, "discard")(
        keys=[keys.samples(key), keys.generation(key)], args=argv))


def _key_triple(keys: Keys, key: str) -> list[str]:
    return [keys.samples(key), keys.generation(key), keys.waiters(key)]


def _waiters(entries: list[list[bytes]], bad: list[MalformedWaiter], keys: Keys) -> list[Waiter]:
    out = []
    for entry in entries:
        wid, raw = text(entry[0]), entry[1]
        try:
            r = decode_waiter_record(raw)
            out.append(Waiter(wid, r.start, r.flags, r.run, r.model_id, list(entry[2:])))
        except ProtocolError:  # the script's pattern is looser than the decoder
            bad.append(MalformedWaiter(keys.prefix + "w:?", wid, raw))
    return out


def _malformed(flat: list[bytes]) -> list[MalformedWaiter]:
    return [MalformedWaiter(text(flat[i]), text(flat[i + 1]), flat[i + 2])
            for i in range(0, len(flat), 3)]
