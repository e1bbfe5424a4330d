"""Shared fixtures: a real Redis server, a per-test key prefix, worker processes.

``REDIS_URL`` names a server to use; without it, the session starts a private one on a
free loopback port and stops it afterwards. Tests only ever delete their own prefix.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from redis.asyncio import Redis

from cachesaver_dist.protocol import Keys
from cachesaver_dist.server import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
# Each test says which path it takes (direct=...): a user's setting must not choose it.
os.environ.pop("CACHESAVER_DIRECT", None)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = EmbeddedServer(tmp_path_factory.mktemp("redis"), persist=False)
    yield server.start()
    server.stop()


@pytest.fixture
def keys(redis_url: str) -> Iterator[Keys]:
    """A fresh key prefix; its keys are deleted after the test."""
    k = Keys(f"t{uuid.uuid4().hex[:10]}:")
    yield k
    client = sync_redis.Redis.from_url(redis_url)
    try:
        batch = list(client.scan_iter(match=f"{k.prefix}*", count=1000))
        for i in range(0, len(batch), 500):
            client.delete(*batch[i:i + 500])
    finally:
        client.close()


@pytest.fixture
def record_decodes(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], list[bytes]]:
    """``record_decodes(module)``: a list of the samples ``module.decode_sample`` decodes
    from then on."""
    def record(module: Any) -> list[bytes]:
        seen: list[bytes] = []
        decode = module.decode_sample

        def recording(raw: bytes) -> dict:
            seen.append(raw)
            return decode(raw)

        monkeypatch.setattr(module, "decode_sample", recording)
        return seen
    return record


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def subprocess_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    env.update(extra)
    return env


class Processes:
    """Worker processes started with the CLI; all are stopped at the end of the test."""

    def __init__(self, redis_url: str, keys: Keys, log_dir: Path) -> None:
        self.redis_url, self.keys, self.log_dir = redis_url, keys, log_dir
        self.procs: list[subprocess.Popen] = []

    def cli(self, *args: str, name: str = "proc", env: dict[str, str] | None = None
            ) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cachesaver_dist.cli", *args, "--prefix", self.keys.prefix],
            env=subprocess_env(self.redis_url, **(env or {})), stdout=log, stderr=subprocess.STDOUT,
            cwd=self.log_dir,
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def wait_alive(self, route: str, count: int = 1, timeout: float = 30) -> None:
        client = sync_redis.Redis.from_url(self.redis_url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                alive = client.zcount(self.keys.workers(route), int(time.time() * 1000), "+inf")
                if alive >= count:
                    return
                dead = [p for p in self.procs if p.poll() is not None]
                if dead:
                    raise AssertionError(f"worker exited: {self.logs(dead[0])}")
                time.sleep(0.05)
            raise AssertionError(f"{count} worker(s) for {route} not alive after {timeout} s")
        finally:
            client.close()

    @staticmethod
    def logs(proc: subprocess.Popen) -> str:
        return Path(proc.log_path).read_text(errors="replace")[-3000:]  # type: ignore[attr-defined]

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def processes(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(redis_url, keys, tmp_path)
    yield procs
    procs.stop_all()
