"""The pooled connections: hiredis packing and the cheap stale-data check."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
import uuid
from typing import Any

import pytest
from redis._parsers.hiredis import _AsyncHiredisParser

from cachesaver_dist import defaults
from cachesaver_dist.connection import HiredisPackConnection, connect
from cachesaver_dist.heartbeat import heartbeat_loop
from cachesaver_dist.protocol import Keys


async def test_a_pooled_connection_with_an_unread_reply_is_replaced(redis_url):
    client = connect(redis_url)
    pool = client.connection_pool
    assert pool.connection_class is HiredisPackConnection
    conn = await pool.get_connection()
    assert isinstance(conn._parser, _AsyncHiredisParser)  # the buffered check, no read
    assert await conn.can_read_destructive() is False  # clean
    await conn.send_command("PING")  # its reply is never read
    await asyncio.sleep(0.1)  # let the event loop buffer the reply
    assert await conn.can_read_destructive() is True
    await pool.release(conn)
    assert await client.ping() is True  # the pool reconnected instead of reading "PONG" late
    assert await client.echo("x") == b"x"
    await client.aclose()


async def test_a_connection_closed_by_the_server_is_replaced(redis_url):
    client = connect(redis_url)
    pool = client.connection_pool
    conn = await pool.get_connection()
    await conn.send_command("CLIENT", "ID")
    my_id = await conn.read_response()
    killer = connect(redis_url)
    await killer.client_kill_filter(_id=my_id)
    await killer.aclose()
    await asyncio.sleep(0.1)
    assert await conn.can_read_destructive() is True  # end of stream seen
    await pool.release(conn)
    assert await client.get("nothing-here") is None  # served on a fresh connection
    await client.aclose()


async def test_a_redis_that_stays_away_is_retried_once_per_attempt_not_nested(
        redis_url, monkeypatch):
    """A command whose connection breaks reconnects in its retry; ``connect()`` has a retry
    of its own, which must not run inside it: nested, a Redis that stayed away failed a
    command after (retries + 1) x retries connection attempts (13 x 12, about 4 minutes at
    the defaults: a CLI command hung silently), not retries (about 20 s)."""
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    from cachesaver_dist.connection import RetryUnlessRefused

    client = connect(redis_url)
    retries = 3
    client.connection_pool.connection_kwargs["retry"] = RetryUnlessRefused(
        ExponentialBackoff(cap=0.001, base=0.001), retries=retries)
    assert await client.ping() is True  # connected: the next command's write breaks it
    attempts = 0

    async def refused(self: Any) -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionRefusedError(111, "Connection refused")

    async def lost(self: Any, *args: Any, **kwargs: Any) -> None:
        await self.disconnect()
        raise RedisConnectionError("Connection closed by server.")

    monkeypatch.setattr(HiredisPackConnection, "_connect", refused)
    monkeypatch.setattr(HiredisPackConnection, "read_response", lost)
    with pytest.raises(RedisConnectionError):
        await client.get("nothing-here")
    assert attempts == retries  # one connection attempt per retry of the command
    await client.aclose()


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux TCP options")
async def test_a_connection_whose_peer_vanished_is_dropped_in_about_30_s(redis_url):
    """The kernel's defaults would keep a connection to a crashed host for over two
    hours (a worker blocked on it with it): checked on the socket itself."""
    client = connect(redis_url)
    conn = await client.connection_pool.get_connection()
    sock = conn._writer.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    tcp = {name: sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
           for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT")}
    assert tcp == {"TCP_KEEPIDLE": 15, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3,
                   "TCP_USER_TIMEOUT": 30_000}
    await client.connection_pool.release(conn)
    await client.aclose()


async def test_a_heartbeat_redis_does_not_answer_is_cut_off_and_sent_again(monkeypatch):
    """A beat stuck on a frozen primary must not keep the next one from the primary that
    replaced it until the worker's entry there expired (clients would be told that no
    worker is alive)."""
    monkeypatch.setattr(defaults, "HEARTBEAT_S", 0.2)
    sent: list[float] = []

    class Pipeline:
        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

        async def execute(self) -> None:
            sent.append(time.monotonic())
            if len(sent) == 1:
                await asyncio.sleep(3600)  # no answer

    class FrozenOnce:
        def pipeline(self, transaction: bool = False) -> Pipeline:
            return Pipeline()

        async def time(self) -> tuple[int, int]:
            return int(time.time()), 0

    task = heartbeat_loop(FrozenOnce(), Keys("hb:"), "cache", name="w")
    await asyncio.sleep(0.7)
    task.cancel()
    assert len(sent) >= 2 and sent[1] - sent[0] < 0.5, sent


@pytest.mark.parametrize(("reply", "hint"), [
    ("NOPERM this user has no permissions to run the 'xadd' command", "direct-client"),
    ("OOM command not allowed when used memory > 'maxmemory'.", "raise maxmemory"),
    ("READONLY You can't write against a read only replica.", "point the URL at the primary"),
    ("NOSCRIPT No matching script.", "ask again"),
    ("WRONGPASS invalid username-password pair or user is disabled.", "fix REDIS_URL"),
    ("NOAUTH Authentication required.", "put it in the Redis URL"),
    ("WRONGTYPE Operation against a key holding the wrong kind of value", "another --prefix"),
])
def test_a_refusal_says_what_to_do_even_when_redis_py_took_its_code_off(reply, hint):
    """redis-py raises its own class for some codes and drops the code from the
    message: the hint must come all the same (the class tells the code)."""
    from redis._parsers.base import BaseParser

    from cachesaver_dist.errors import refused

    message = str(refused(BaseParser.parse_error(reply), "doing it"))
    assert hint in message, message
    assert message.startswith("Redis refused doing it: ")


@pytest.mark.parametrize("direct", [False, True])
async def test_a_password_set_mid_run_fails_at_once_with_what_to_do(tmp_path, direct):
    """Asking again cannot fix a refused login: the request fails at once, saying so,
    instead of retrying until request_timeout as for a server that is away."""
    import time

    from redis.asyncio import Redis

    from cachesaver_dist import OnlineAPI, Request
    from cachesaver_dist.errors import RedisRefusedError
    from cachesaver_dist.server import EmbeddedServer

    server = EmbeddedServer(tmp_path / "auth", persist=False)
    url = server.start()
    try:
        async with OnlineAPI("sim:nobody", cache=url, direct=direct,
                             request_timeout=20) as api:
            admin = Redis.from_url(url)
            await admin.config_set("requirepass", "now-required")
            await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            started = time.monotonic()
            with pytest.raises(RedisRefusedError, match="put it in the Redis URL"):
                await api.request(Request("anyone?", 1, "q0", "ns"))
            assert time.monotonic() - started < 5
        await admin.config_set("requirepass", "")  # (admin logged in before it was set)
        await admin.aclose()
    finally:
        server.stop()


@pytest.mark.parametrize("direct", [False, True])
async def test_a_redis_that_stops_answering_fails_requests_at_request_timeout(tmp_path,
                                                                           direct):
    """A paused server (SIGSTOP: connections stay open, nothing answers, as in a network
    partition) fails a request at request_timeout with what happened, not never; once
    it answers again the same pipeline works."""
    import os
    import signal
    import time

    from cachesaver_dist import OnlineAPI, Request
    from cachesaver_dist.errors import NoWorkerError, RedisUnavailableError
    from cachesaver_dist.server import EmbeddedServer

    server = EmbeddedServer(tmp_path / "paused", persist=False)
    url = server.start()
    pid = server._proc.pid
    try:
        async with OnlineAPI("sim:none", cache=url, direct=direct, request_timeout=3,
                             reply_timeout=0.5) as api:
            await api.start()
            os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()
            try:
                with pytest.raises(RedisUnavailableError, match="Redis did not answer"):
                    await api.request(Request("anyone?", 1, "q0", "ns"))
                assert time.monotonic() - started < 3 + 2
            finally:
                os.kill(pid, signal.SIGCONT)
            with pytest.raises(NoWorkerError):  # Redis answered: nobody serves sim:none
                await api.request(Request("anyone?", 1, "q1", "ns"))
    finally:
        server.stop()


async def test_a_heartbeat_cancelled_at_any_turn_ends(monkeypatch):
    """A worker's heartbeat stops when cancelled, whatever turn of its beat the
    cancellation comes at (one lost would keep a stopped worker looking alive, and keep
    asyncio.run from ending)."""
    monkeypatch.setattr(defaults, "HEARTBEAT_S", 0.5)

    class Pipeline:
        def __getattr__(self, name: str) -> Any:
            return lambda *args, **kwargs: None

        async def execute(self) -> None:
            for _ in range(3):
                await asyncio.sleep(0)

    class Server:
        def pipeline(self, transaction: bool = False) -> Pipeline:
            return Pipeline()

        async def time(self) -> tuple[int, int]:
            await asyncio.sleep(0)
            return int(time.time()), 0

    for turns in range(10):
        task = heartbeat_loop(Server(), Keys("hb:"), "cache", name="w")
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=0.2)
        assert done and task.cancelled(), f"cancelled after {turns} turns, still beating"


async def test_a_user_refused_time_judges_heartbeats_by_its_own_clock(caplog):
    """An ACL file from before TIME was granted: this host's clock, one warning naming
    the fix, not a failure."""
    from redis.exceptions import NoPermissionError

    from cachesaver_dist import heartbeat

    class Refused:
        async def time(self) -> None:
            raise NoPermissionError("this user has no permissions to run the 'time' command")

    heartbeat._LOCAL_CLOCK["warned"] = False
    with caplog.at_level("WARNING", logger="cachesaver_dist.workers"):
        first = await heartbeat.server_ms(Refused())
        await heartbeat.server_ms(Refused())
    assert abs(first - time.time() * 1000) < 5_000
    warnings = [r.getMessage() for r in caplog.records if "TIME" in r.getMessage()]
    assert len(warnings) == 1 and "+time" in warnings[0], warnings


async def test_a_command_cancelled_at_any_turn_ends_cancelled(redis_url):
    """A cancellation is never lost in a command's write: redis-py 5 wrote it in a task
    of its own under ``asyncio.wait_for``, which returned normally when cancelled after
    that write ended, and the command went on (a worker loop cancelled so never ended)."""
    redis = connect(redis_url, read_timeout=5.0)  # a read timeout: wait_for was used
    try:
        await redis.ping()
        for turns in range(12):
            task = asyncio.create_task(redis.ping())
            for _ in range(turns):
                await asyncio.sleep(0)
            if task.done():
                break
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        await redis.aclose()


async def test_an_enqueue_whose_reply_was_lost_keeps_its_order_and_its_records(
        redis_url, monkeypatch):
    """Redis ran the enqueue but its reply was lost (the connection dropped): the send
    is tried again as the first ask it is, naming the batch before it (a re-ask would
    name none and lose the batch's place), and the batch's reservation records are kept
    (not deleted once answered), since the job enqueued twice may be served late and
    must then get the same indices, not new ones."""
    from redis.asyncio.client import Pipeline

    from cachesaver_dist import OnlineAPI, Request, SimModel
    from cachesaver_dist import client as client_mod

    keys = Keys(f"t{uuid.uuid4().hex[:10]}:")
    sent: list[tuple[str, str]] = []  # (batch, after) per job enqueued
    encode = client_mod.encode_job_and_copy

    def recorded(client_id, items, keep_s, batch, after, stored):  # type: ignore[no-untyped-def]
        sent.append((batch, after))  # (its wake token's copy is the same, slimmer)
        return encode(client_id, items, keep_s, batch, after, stored)

    execute, lose = Pipeline.execute, {"n": 0}

    async def losing(self, *a, **kw):  # type: ignore[no-untyped-def]
        enqueue = any(args[0] == "LPUSH" for args, _ in self.command_stack)
        result = await execute(self, *a, **kw)
        if lose["n"] and enqueue:
            lose["n"] -= 1
            raise ConnectionError("injected: the enqueue's reply was lost")
        return result

    monkeypatch.setattr(client_mod, "encode_job_and_copy", recorded)
    monkeypatch.setattr(Pipeline, "execute", losing)
    try:
        async with OnlineAPI(SimModel("lost-reply"), cache=redis_url, prefix=keys.prefix,
                             batch_size=1, timeout=0.001) as pipe:
            await pipe.request(Request("p", 1, "a", "ns"))
            lose["n"] = 1
            await pipe.request(Request("p", 1, "b", "ns"))
            await pipe.request(Request("p", 1, "c", "ns"))  # its enqueue deletes records
            await asyncio.sleep(0.1)
            assert pipe._client is not None
            client_id = pipe._client.client_id
        (first, _), (second, after_1), (again, after_2), _ = sent
        assert second == again and after_1 == after_2 != "", \
            "the send tried again should name the job before it, as the first did"
        async with connect(redis_url) as redis:
            assert await redis.exists(keys.reservations(client_id, second)), \
                "the records of a batch enqueued twice were deleted once it was answered"
            assert not await redis.exists(keys.reservations(client_id, first))
    finally:
        async with connect(redis_url) as redis:
            found = [k async for k in redis.scan_iter(match=f"{keys.prefix}*")]
            if found:
                await redis.delete(*found)


async def test_within_runs_in_the_calling_task_and_gives_up_on_time():
    from cachesaver_dist.timeouts import within

    async def task_of() -> asyncio.Task | None:
        return asyncio.current_task()

    me = asyncio.current_task()
    ran_in = await within(task_of(), 1.0)
    if sys.version_info >= (3, 11):
        assert ran_in is me  # no task of its own: no loop turns to start and to wake it
    else:
        assert ran_in is not None
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await within(asyncio.sleep(5), 0.05)
    assert time.monotonic() - started < 1.0
    assert await within(asyncio.sleep(0, "done"), 1.0) == "done"


def test_a_cli_command_gives_up_on_a_server_that_stops_answering(tmp_path, monkeypatch,
                                                                  capsys):
    """A server that answers the reachability check, then nothing (writes paused for a
    minute, as a frozen primary answers nothing): the command fails with what happened
    once its reads time out (``READ_TIMEOUT_S``, here 0.2 s) and its retries run out,
    instead of waiting as long as the server does."""
    import redis

    from cachesaver_dist import cli
    from cachesaver_dist.server import EmbeddedServer

    server = EmbeddedServer(tmp_path / "paused", persist=False)
    url = server.start()
    admin = redis.Redis.from_url(url)
    monkeypatch.setattr(defaults, "READ_TIMEOUT_S", 0.2)
    monkeypatch.setenv("REDIS_URL", url)
    try:
        admin.hset("t:u:r1", "k", 1)  # the run's counters: drop-run deletes them (a write)
        admin.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        started = time.monotonic()
        status = cli.main(["drop-run", "r1", "--prefix", "t:"])
        took = time.monotonic() - started
        admin.execute_command("CLIENT", "UNPAUSE")
        assert status == 1
        assert took < 45, took  # the retries' backoff (about 17 s) and 13 reads of 0.2 s
        said = capsys.readouterr().err
        assert "Redis stopped answering during the drop-run command" in said, said
        assert admin.exists("t:u:r1")  # nothing was dropped
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
        server.stop()
