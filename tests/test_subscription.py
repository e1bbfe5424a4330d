"""The reply subscription, against a real Redis: how it hands messages over."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from redis.asyncio import Redis

from cachesaver_dist.connection import connect, has_buffered_data
from cachesaver_dist.protocol import encode_replies, error_reply
from cachesaver_dist.subscription import ReplySubscription


async def test_messages_that_arrive_together_are_delivered_a_loop_turn_apart(redis_url):
    """Several batches answered by one reserve call reach the client together. Each
    message's callers must get a loop turn (to make and send their next batch) before the
    next message wakes more callers; handed over all at once, every caller of every
    batch ran before the first new batch could leave."""
    channel = f"test-sub:{uuid.uuid4().hex}"
    events: list[tuple[str, int]] = []
    loop = asyncio.get_running_loop()

    def deliver(replies: list[dict]) -> None:
        n = int(replies[0]["id"])
        events.append(("delivered", n))
        loop.call_soon(events.append, ("next turn", n))

    client = connect(redis_url)
    sub = ReplySubscription(client, channel, deliver)
    await sub.start()
    try:
        async with client.pipeline(transaction=True) as pipe:  # written to us in one go
            for n in range(3):
                pipe.publish(channel, encode_replies([error_reply(str(n), "test", "x")]))
            await pipe.execute()
        await until(lambda: len(events) == 6)
    finally:
        await sub.close()
        await client.aclose()
    assert events == [("delivered", 0), ("next turn", 0), ("delivered", 1), ("next turn", 1),
                      ("delivered", 2), ("next turn", 2)]


async def until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within 5 s"
        await asyncio.sleep(0.01)


async def test_buffered_data_is_told_without_reading_and_only_on_our_connections(redis_url):
    ours = connect(redis_url)
    conn = await ours.connection_pool.get_connection()
    assert has_buffered_data(conn) is False
    await conn.send_command("PING")
    await until(lambda: has_buffered_data(conn))  # the event loop buffers the reply
    assert await conn.read_response() == b"PONG"  # still there: nothing was consumed
    assert has_buffered_data(conn) is False
    await ours.connection_pool.release(conn)
    await ours.aclose()

    plain = Redis.from_url(redis_url)  # a user's own client: not asked, not touched
    conn = await plain.connection_pool.get_connection()
    await conn.send_command("PING")
    await until(lambda: bool(conn._parser._reader.has_data() or conn._parser._stream._buffer))
    assert has_buffered_data(conn) is False  # (the reply is there: above)
    assert await conn.read_response() == b"PONG"
    await plain.connection_pool.release(conn)
    await plain.aclose()
