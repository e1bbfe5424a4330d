"""Redis restarts: samples persist, clients and workers reconnect on their own."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid

import pytest
import redis as sync_redis

from cachesaver_dist import OnlineAPI, Request
from cachesaver_dist.protocol import Keys
from cachesaver_dist.server import find_server_binary
from tests.conftest import Processes

pytestmark = pytest.mark.processes
MODEL = "sim:restart"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PersistentRedis:
    """A redis-server with AOF on a fixed port, which the test can restart."""

    def __init__(self, data_dir) -> None:
        self.port, self.dir = _free_port(), data_dir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [find_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                sync_redis.Redis.from_url(self.url).ping()
                return
            except sync_redis.ConnectionError:
                assert time.monotonic() < deadline, "redis did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes the AOF and exits
            self.proc.wait(timeout=10)


@pytest.fixture
def persistent_redis(tmp_path):
    server = PersistentRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("direct", [False, True], ids=["via-cache-worker", "direct"])
async def test_samples_survive_and_everyone_reconnects(persistent_redis, tmp_path, direct):
    keys = Keys(f"restart{uuid.uuid4().hex[:6]}:")
    procs = Processes(persistent_redis.url, keys, tmp_path)
    try:
        procs.cli("worker", "cache", name="cache")
        procs.cli("worker", "batch", "--model", MODEL, "--sim-latency", "0.01", name="batch")
        procs.wait_alive("cache")
        procs.wait_alive(MODEL)
        async with OnlineAPI(MODEL, cache=persistent_redis.url, prefix=keys.prefix,
                             reply_timeout=1.0, request_timeout=60, direct=direct) as api:
            before = await api.request(Request("persist me", 2, "a", "ns1"))
            persistent_redis.stop()
            time.sleep(0.5)
            persistent_redis.start()
            after = await api.request(Request("persist me", 2, "b", "ns2"))
            fresh = await api.request(Request("a new prompt", 1, "c", "ns1"))
        assert after.data == before.data and after.cached == [True, True]
        assert fresh.cached == [False] and len(fresh.data) == 1
        assert all(p.poll() is None for p in procs.procs), "a worker died with Redis"
    finally:
        procs.stop_all()
