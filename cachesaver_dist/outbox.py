"""Replies to waiting clients, sent with the run's accounting in one round trip.

Every sample a worker sends is read by it: one that cannot be read is set aside as a
dead letter and removed from the cache (so it is generated again), and its request gets
an error that says so. Workers read before they publish, except a woken job's hits,
which the reserve call publishes itself: their cache worker reads them right after and
sends the error for one it cannot read (its client ignores a reply it cannot read and
waits for that error). A direct-mode client takes its own replies out and sends the
rest (dead letters, accounting).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from . import metrics
from .deadletters import queue_dead_letter
from .errors import ProtocolError
from .memo import BytesMemo
from .protocol import (
    Keys,
    decode_sample,
    encode_replies,
    error_reply,
    reply,
    split_waiter_id,
)
from .scripts import MalformedWaiter, discard, finish_jobs
from .stats import Tally, account, write_tally

USAGES_REMEMBERED_BYTES = 8 << 20  # samples whose usage is remembered, about this much
_ENTRY_BYTES = 200  # what remembering one sample costs beside its bytes, about
_usages: BytesMemo[tuple[dict[str, Any] | None]] = BytesMemo(USAGES_REMEMBERED_BYTES)


def usage_of(raw: bytes) -> dict[str, Any] | None:
    """The token counts of a stored sample (``ProtocolError`` if it cannot be read).

    A sample is served many times over (reused across namespaces, the cache's point);
    its bytes never change, so one that was read before is counted without decoding it
    again: about ``USAGES_REMEMBERED_BYTES`` of samples are remembered, each with its
    prompt and completion token counts only."""
    known = _usages.get(raw)
    if known is not None:
        return known[0]
    found = decode_sample(raw).get("usage")
    usage = {k: found[k] for k in _COUNTED if k in found} if isinstance(found, dict) else None
    _usages.put(raw, (usage,), len(raw) + _ENTRY_BYTES)
    return usage


_COUNTED = ("prompt_tokens", "completion_tokens")


class Outbox:
    """Collects replies, counters and dead letters, then sends them in one pipeline.

    The replies to one client go out as one message: a client batch costs one
    PUBLISH, not one per request.
    """

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.tally: Tally = {}
        self.bad_samples: dict[str, dict[int, bytes]] = defaultdict(dict)
        self.dead: list[tuple[str, str, bytes, str]] = []  # kind, reason, raw, source
        self.finished: list[str] = []  # arq jobs (of the cache queue) to finish, unread
        self.answered = 0  # requests answered from cache (the cache worker counts them)

    def reply(
        self, waiter_id: str, key: str, start: int, flags: str, samples: list[bytes], run: str,
        model_id: str, *, first: bool = True,
    ) -> list[dict[str, Any]] | None:
        """Answer one request; ``first`` is false for a repeat answer (not counted again).
        Returns the decoded samples (fresh dicts), or None when the request got an error."""
        try:
            client, request_uuid = split_waiter_id(waiter_id)
        except ProtocolError as exc:
            self.dead.append(("waiter id", str(exc), waiter_id.encode(errors="replace"),
                              "waiters"))
            return None
        return self.reply_to(client, request_uuid, key, start, flags, samples, run, model_id,
                             first=first)

    def reply_to(
        self, client: str, request_uuid: str, key: str, start: int, flags: str,
        samples: list[bytes], run: str, model_id: str, *, first: bool = True,
    ) -> list[dict[str, Any]] | None:
        """``reply``, to a request named by its client and uuid."""
        answer, records = self.answer(request_uuid, key, start, flags, samples)
        self.replies[client].append(answer)
        if records is not None and first:
            account(self.tally, run, model_id, flags, [r.get("usage") for r in records])
        return records

    def count(self, run: str, model_id: str, flags: str, samples: list[bytes], *,
              first: bool = True) -> bool:
        """Account for a request whose reply went out already (``first``: as ``reply``);
        False, counting nothing, when one of its samples cannot be read: the caller then
        answers it with ``reply_to``, which sets the sample aside and tells the client."""
        try:
            usages = [usage_of(raw) for raw in samples]
        except ProtocolError:
            return False
        if first:
            account(self.tally, run, model_id, flags, usages)
        return True

    def answer(self, request_uuid: str, key: str, start: int, flags: str,
               samples: list[bytes]) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        """The reply to one request and its decoded samples (fresh dicts); an error reply
        and None if a sample cannot be read (it is set aside, to be sent with ``queue``)."""
        records = []
        for i, raw in enumerate(samples):
            try:
                records.append(decode_sample(raw))
            except ProtocolError as exc:
                self.bad_samples[key][start + i] = raw
                where = f"{self.keys.samples(key)}[{start + i}]"
                self.dead.append(("sample", str(exc), raw, where))
        if len(records) < len(samples):
            return error_reply(
                request_uuid, "malformed_sample",
                f"{len(samples) - len(records)} stored sample(s) of this request could not be "
                "read and were set aside (see 'cachesaver-dist dead-letters'); ask again and "
                "they are generated anew"), None
        return reply(request_uuid, start, flags, samples), records

    def take_tally(self) -> Tally:
        """The accounting gathered so far, taken out: its writer sends it later."""
        tally, self.tally = self.tally, {}
        return tally

    def error(self, waiter_id: str, kind: str, message: str) -> None:
        self._add(waiter_id, error_reply, kind, message)

    def malformed_waiters(self, bad: list[MalformedWaiter]) -> None:
        for w in bad:
            self.dead.append(("waiter record", "not 'start|flags|run|model'", w.raw,
                              f"{w.waiters_key}[{w.waiter_id[:80]}]"))

    def _add(self, waiter_id: str, make: Callable[..., dict[str, Any]], *args: Any) -> bool:
        try:
            client, request_uuid = split_waiter_id(waiter_id)
        except ProtocolError as exc:
            self.dead.append(("waiter id", str(exc), waiter_id.encode(errors="replace"),
                              "waiters"))
            return False
        self.replies[client].append(make(request_uuid, *args))
        return True

    async def send(self, redis: Redis, also: Callable[[Any], None] | None = None) -> None:
        """Send everything in one pipeline; ``also`` adds more commands to it."""
        if not (self or also):
            return
        pipe = redis.pipeline(transaction=False)
        tally = await self.queue(redis, pipe)
        if also is not None:
            also(pipe)
        await pipe.execute()
        metrics.count(tally)  # once stats has it: the workers' counters add up to stats

    def __bool__(self) -> bool:
        return bool(self.replies or self.tally or self.dead or self.finished)

    async def queue(self, redis: Redis, pipe: Any) -> Tally:
        """Put everything on ``pipe`` (unreadable samples are discarded first, on
        ``redis``) and empty the outbox; the accounting it queued, for ``metrics.count``
        once the pipeline has run."""
        for key, samples in self.bad_samples.items():  # rare: one script call per key
            await discard(redis, self.keys, key, samples)
        for client, replies in self.replies.items():
            pipe.publish(self.keys.reply_channel(client), encode_replies(replies))
        write_tally(pipe, self.keys, self.tally)
        for kind, reason, raw, source in self.dead:
            queue_dead_letter(pipe, self.keys, kind, reason, raw, source)
        if self.finished:
            finish_jobs(pipe, self.keys, self.finished)
        tally = self.take_tally()
        self.replies.clear()
        self.bad_samples.clear()
        self.dead.clear()
        self.finished.clear()
        return tally
