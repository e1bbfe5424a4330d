"""Replies to waiting clients, sent with the run's accounting in one round trip."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from redis.asyncio import Redis

from cachesaver_dist.protocol import Keys, encode_replies, error_reply, reply
from cachesaver_dist.stats import Tally, account, write_tally


class Outbox:
    """Collects replies and counters, then sends them in one pipeline.

    The replies to one client go out as one message: a client batch costs one
    PUBLISH, not one per request.
    """

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.tally: Tally = {}

    def reply(
        self, waiter_id: str, start: int, flags: str, samples: list[bytes], run: str,
        model_id: str, *, first: bool = True,
    ) -> None:
        """Answer one request; ``first`` is false for a repeat answer (not counted again)."""
        client, uuid = waiter_id.split(":", 1)
        self.replies[client].append(reply(uuid, start, flags, samples))
        if first:
            account(self.tally, run, model_id, flags, samples)

    def error(self, waiter_id: str, kind: str, message: str) -> None:
        client, uuid = waiter_id.split(":", 1)
        self.replies[client].append(error_reply(uuid, kind, message))

    async def send(self, redis: Redis) -> None:
        if not self.replies and not self.tally:
            return
        pipe = redis.pipeline(transaction=False)
        self.queue(pipe)
        await pipe.execute()

    def queue(self, pipe: Any) -> None:
        """Queue the replies and counters on ``pipe`` (to share its round trip)."""
        for client, replies in self.replies.items():
            pipe.publish(self.keys.reply_channel(client, replies[0]["id"]),
                         encode_replies(replies))
        write_tally(pipe, self.keys, self.tally)
        self.replies.clear()
        self.tally.clear()
