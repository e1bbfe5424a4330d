"""Replies to waiting clients, sent with the run's accounting in one round trip."""

from __future__ import annotations

from collections import Counter

from redis.asyncio import Redis

from cachesaver_dist.protocol import Keys, encode_error_reply, encode_reply
from cachesaver_dist.stats import account, write_tally


class Outbox:
    """Collects replies and counters, then sends them in one pipeline."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.messages: list[tuple[str, bytes]] = []
        self.tally: Counter = Counter()

    def reply(
        self, waiter_id: str, start: int, flags: str, samples: list[bytes], run: str,
        model_id: str, *, first: bool = True,
    ) -> None:
        """Answer one request; ``first`` is false for a repeat answer (not counted again)."""
        client, uuid = waiter_id.split(":", 1)
        self.messages.append(
            (self.keys.reply_channel(client, uuid), encode_reply(uuid, start, flags, samples))
        )
        if first:
            account(self.tally, run, model_id, flags, samples)

    def error(self, waiter_id: str, kind: str, message: str) -> None:
        client, uuid = waiter_id.split(":", 1)
        self.messages.append(
            (self.keys.reply_channel(client, uuid), encode_error_reply(uuid, kind, message))
        )

    async def send(self, redis: Redis) -> None:
        if not self.messages and not self.tally:
            return
        pipe = redis.pipeline(transaction=False)
        for channel, message in self.messages:
            pipe.publish(channel, message)
        write_tally(pipe, self.keys, self.tally)
        await pipe.execute()
        self.messages.clear()
        self.tally.clear()
