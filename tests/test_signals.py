"""Worker processes stop within 5 s of SIGTERM/SIGINT in every state, and fail fast and
clearly at start-up when Redis cannot be reached or refuses the login; a client (a
script, the demo) stops at once on Ctrl-C, giving up its requests in flight.

Every test runs its own private redis-server on a free port (it stops it, changes its
password, ...), never the session's shared one. Times are measured from the signal to
the process's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as sync_redis

from cachesaver_dist import OnlineAPI, Request
from cachesaver_dist.heartbeat import RESTART_GRACE_S
from cachesaver_dist.protocol import CONSUMER_GROUP, Keys
from cachesaver_dist.server import find_server_binary
from tests.conftest import ROOT, Processes, subprocess_env
from tests.support import COUNTER_ENV

pytestmark = pytest.mark.processes

SLOW_MODEL = "tests.support:counting_model"
STOP_WITHIN_S = 5.0
CONNECT_WAIT_S = 10.0  # defaults.CONNECT_WAIT_S: the bounded wait at start-up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of this test only: it can be stopped, and given a password."""

    def __init__(self, password: str | None = None) -> None:
        self.port, self.password = free_port(), password
        self.proc: subprocess.Popen | None = None

    def url(self, password: str | None = None) -> str:
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def admin_url(self) -> str:
        return self.url(self.password)

    def start(self) -> None:
        args = [find_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                client = sync_redis.Redis.from_url(self.admin_url)
                client.ping()
                client.close()
                return
            except sync_redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    s = PrivateRedis()
    s.start()
    yield s
    s.stop()


@pytest.fixture
def secured() -> Iterator[PrivateRedis]:
    s = PrivateRedis(password="right-pass")
    s.start()
    yield s
    s.stop()


def pool_for(url: str, tmp_path: Path) -> Processes:
    return Processes(url, Keys(f"sig{uuid.uuid4().hex[:8]}:"), tmp_path)


def start_worker(procs: Processes, kind: str, lease: str = "30", **env: str):
    if kind == "cache":
        return procs.cli("worker", "cache", name="cache", env=env)
    return procs.cli("worker", "batch", "--model", SLOW_MODEL, "--lease", lease, name="batch",
                     env={COUNTER_ENV: f"{procs.keys.prefix}counter", **env})


def route(kind: str) -> str:
    return "cache" if kind == "cache" else SLOW_MODEL


def stop_and_time(proc: subprocess.Popen, sig: signal.Signals) -> tuple[float, int]:
    """Send ``sig``; return the seconds until the process exited, and its status."""
    assert proc.poll() is None, Processes.logs(proc)
    started = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=STOP_WITHIN_S + 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running {STOP_WITHIN_S + 5:.0f} s after {sig.name}: "
                    f"{Processes.logs(proc)}")
    return time.monotonic() - started, code


def assert_stopped(proc: subprocess.Popen, sig: signal.Signals, *, clean: bool = True) -> float:
    elapsed, code = stop_and_time(proc, sig)
    log = Processes.logs(proc)
    print(f"{proc.args[3:5]} stopped {elapsed:.2f} s after {sig.name}, status {code}")
    assert elapsed < STOP_WITHIN_S, f"{elapsed:.1f} s after {sig.name}: {log}"
    if clean:
        assert code == 0, f"exit status {code} after {sig.name}: {log}"
        assert "Traceback" not in log, log
    return elapsed


SIGNALS = [signal.SIGTERM, signal.SIGINT]
KINDS = ["cache", "batch"]


# --- idle -------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", KINDS)
def test_idle(server, tmp_path, kind, sig):
    procs = pool_for(server.url(), tmp_path)
    try:
        proc = start_worker(procs, kind)
        procs.wait_alive(route(kind))
        time.sleep(0.5)  # settled: blocked on its queue / stream
        assert_stopped(proc, sig)
        client = sync_redis.Redis.from_url(server.url())
        try:  # a worker leaves the registry as it stops, after a restart's grace
            registry = procs.keys.workers(route(kind))
            beyond_ms = int((time.time() + RESTART_GRACE_S + 1) * 1000)
            assert client.zcount(registry, beyond_ms, "+inf") == 0
            assert client.zcard(registry) == 1
        finally:
            client.close()
    finally:
        procs.stop_all()


# --- busy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
async def test_busy_batch_worker_in_slow_model_calls(server, tmp_path, sig):
    """Model calls of 5 s are in flight: the worker gives them its grace (3 s), then
    stops; their work stays leased for another worker to take over."""
    procs = pool_for(server.url(), tmp_path)
    keys = procs.keys
    try:
        procs.cli("worker", "cache", name="cache")
        batch = start_worker(procs, "batch", TEST_MODEL_LATENCY="5")
        procs.wait_alive("cache")
        procs.wait_alive(SLOW_MODEL)
        async with OnlineAPI(SLOW_MODEL, cache=server.url(), prefix=keys.prefix,
                             reply_timeout=30, request_timeout=60) as pipe:
            waiting = [asyncio.create_task(pipe.request(Request(f"slow {i}", 1, str(i), "ns")))
                       for i in range(4)]
            client = sync_redis.Redis.from_url(server.url())
            try:
                deadline = time.monotonic() + 10
                while not client.xpending(keys.work_stream(SLOW_MODEL), CONSUMER_GROUP)["pending"]:
                    assert time.monotonic() < deadline, "the model calls never started"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)  # inside the model's 5 s sleep
                elapsed = await asyncio.to_thread(assert_stopped, batch, sig)
                assert elapsed >= 2.0, "did not give the calls in flight their grace"
                pending = client.xpending(keys.work_stream(SLOW_MODEL), CONSUMER_GROUP)
                assert pending["pending"] >= 1, "the unfinished work was not left leased"
                assert not any(w.done() for w in waiting)  # nothing was answered wrongly
                # The leased work is taken over by a fast worker once its lease runs out.
                start_worker(procs, "batch", lease="1.5", TEST_MODEL_LATENCY="0.01")
            finally:
                client.close()
            try:
                done = await asyncio.wait_for(asyncio.gather(*waiting), 20)
                assert [len(r.data) for r in done] == [1] * 4
            finally:
                for w in waiting:
                    w.cancel()
                await asyncio.gather(*waiting, return_exceptions=True)
        assert "stopped with" in Processes.logs(batch) and "model call(s) unfinished" in \
            Processes.logs(batch)
    finally:
        procs.stop_all()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
async def test_busy_cache_worker_with_jobs_flowing(server, tmp_path, sig):
    """One of two cache workers is stopped while clients keep sending batches: it stops
    in time, and every request is still answered (by the other one)."""
    procs = pool_for(server.url(), tmp_path)
    keys = procs.keys
    try:
        victim = procs.cli("worker", "cache", name="cache")
        procs.cli("worker", "cache", name="cache")
        procs.cli("worker", "batch", "--model", "sim:busy", "--sim-latency", "0.005",
                  name="batch")
        procs.wait_alive("cache", 2)
        procs.wait_alive("sim:busy")
        answered = 0
        stop_load = asyncio.Event()
        async with OnlineAPI("sim:busy", cache=server.url(), prefix=keys.prefix, batch_size=8,
                             reply_timeout=1.0, request_timeout=30) as pipe:

            async def load(worker: int) -> None:
                nonlocal answered
                i = 0
                while not stop_load.is_set():
                    await pipe.request(Request(f"p{i % 7}", 1 + i % 2, f"{worker}-{i}",
                                               f"ns{i % 3}"))
                    answered += 1
                    i += 1

            loads = [asyncio.create_task(load(w)) for w in range(8)]
            try:
                while answered < 100:  # jobs are flowing through both workers
                    await asyncio.sleep(0.01)
                    assert not any(t.done() for t in loads), [t.exception() for t in loads]
                await asyncio.to_thread(assert_stopped, victim, sig)
                before = answered
                await asyncio.sleep(1.5)
                assert answered > before + 20, "the other cache worker did not go on"
            finally:
                stop_load.set()
                results = await asyncio.wait_for(asyncio.gather(*loads, return_exceptions=True),
                                                 30)
        assert [r for r in results if r is not None] == [], "a request failed"
    finally:
        procs.stop_all()


# --- Redis down, and a password changed under a running worker --------------------------


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", KINDS)
def test_redis_down(tmp_path, kind, sig):
    server = PrivateRedis()
    server.start()
    procs = pool_for(server.url(), tmp_path)
    try:
        proc = start_worker(procs, kind)
        procs.wait_alive(route(kind))
        server.stop()
        time.sleep(2.5)  # in its reconnect loop, retries and backoff
        assert proc.poll() is None, f"exited when Redis went away: {Processes.logs(proc)}"
        assert_stopped(proc, sig, clean=False)
        assert "Traceback" not in Processes.logs(proc), Processes.logs(proc)
    finally:
        procs.stop_all()
        server.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_password_changed_while_running(secured, tmp_path, kind):
    procs = pool_for(secured.url("right-pass"), tmp_path)
    try:
        proc = start_worker(procs, kind)
        procs.wait_alive(route(kind))
        admin = sync_redis.Redis.from_url(secured.admin_url)
        try:
            admin.config_set("requirepass", "changed-pass")
            admin.client_kill_filter(_type="normal", skipme=True)  # log everyone in again
        finally:
            admin.close()
        time.sleep(2.5)  # its reconnects are refused now
        assert proc.poll() is None, f"a running worker gave up: {Processes.logs(proc)}"
        assert_stopped(proc, signal.SIGTERM, clean=False)
        log = Processes.logs(proc)
        assert "Traceback" not in log, log
        assert "right-pass" not in log and "changed-pass" not in log, "a password was logged"
    finally:
        procs.stop_all()


# --- start-up: wrong password, nothing listening, a signal while waiting ------------------


def run_cli(url: str, kind: str) -> subprocess.Popen:
    args = ["worker", "cache"] if kind == "cache" else ["worker", "batch", "--model", "sim:s"]
    return subprocess.Popen(
        [sys.executable, "-m", "cachesaver_dist.cli", *args, "--prefix", "sigstart:"],
        env=subprocess_env(url), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"still running after {timeout:.0f} s")
    return proc.returncode, err.decode(errors="replace"), time.monotonic() - started


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("password, says", [
    ("wrong-pass", r"WRONGPASS|invalid username-password|[Pp]assword"),
    (None, r"NOAUTH|[Aa]uthentication required|[Pp]assword"),
], ids=["wrong-password", "no-password"])
def test_refused_login_at_startup_exits_at_once(secured, kind, password, says):
    import re

    started = time.monotonic()
    code, err, _ = finish(run_cli(secured.url(password), kind), CONNECT_WAIT_S + 10)
    elapsed = time.monotonic() - started
    assert code != 0, err
    assert elapsed < CONNECT_WAIT_S, f"{elapsed:.1f} s: a refused login is not worth waiting for"
    last = err.strip().splitlines()[-1]
    assert last.startswith("cachesaver-dist: "), err
    assert re.search(says, last), last
    assert f"127.0.0.1:{secured.port}" in last, "the message names the server"
    assert "Traceback" not in err, err
    assert "wrong-pass" not in err and "right-pass" not in err, "a password was printed"


def test_redis_that_comes_up_during_the_startup_wait_is_served(tmp_path):
    """A compose stack starts workers and Redis together: the workers wait for it."""
    server = PrivateRedis()
    procs = pool_for(server.url(), tmp_path)
    try:
        workers = [start_worker(procs, kind) for kind in KINDS]
        time.sleep(3.0)  # both in the start-up wait: nothing listens yet
        assert [w.poll() for w in workers] == [None, None], [Processes.logs(w) for w in workers]
        server.start()
        procs.wait_alive("cache", timeout=10)
        procs.wait_alive(SLOW_MODEL, timeout=10)
    finally:
        procs.stop_all()
        server.stop()


def test_nothing_listening_at_startup_exits_after_the_bounded_wait():
    """Both kinds at once (the wait is 10 s each)."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    started = time.monotonic()
    procs = {kind: run_cli(url, kind) for kind in KINDS}
    for kind, proc in procs.items():
        code, err, _ = finish(proc, CONNECT_WAIT_S + 15)
        elapsed = time.monotonic() - started
        assert code != 0, (kind, err)
        assert CONNECT_WAIT_S - 1 <= elapsed < CONNECT_WAIT_S + 8, (kind, elapsed)
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"cachesaver-dist: cannot reach Redis at {url}"), (kind, err)
        assert "Traceback" not in err, (kind, err)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", KINDS)
def test_signal_while_waiting_for_redis_at_startup(kind, sig):
    url = f"redis://127.0.0.1:{free_port()}/0"
    proc = run_cli(url, kind)
    try:
        time.sleep(2.5)  # imported, signal handlers set, in the start-up wait
        assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(sig)
        code, err, _ = finish(proc, STOP_WITHIN_S + 5)
        elapsed = time.monotonic() - started
        assert elapsed < STOP_WITHIN_S, f"{elapsed:.1f} s after {sig.name}"
        assert code == 0, f"asked to stop, it failed instead: {err}"
        assert "Traceback" not in err and "cachesaver-dist: " not in err, err
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


# --- Ctrl-C in a client: requests in flight are given up, not waited for -------------------

CTRL_C_WITHIN_S = 3.0  # from the signal to the exit, everything stopped

CTRL_C_SCRIPT = """
import asyncio, os, sys
from cachesaver_dist import OnlineAPI, Request
async def main():
    async with OnlineAPI(sys.argv[1], cache=os.environ["REDIS_URL"], prefix=sys.argv[2],
                         reply_timeout=30, request_timeout=60) as api:
        await asyncio.gather(*(api.request(Request(f"ctrl-c {i}", 2, str(i), "ns"))
                               for i in range(4)))
try:
    asyncio.run(main())
except KeyboardInterrupt:
    sys.exit(130)
"""


async def wait_model_calls(client, keys: Keys, route_name: str, timeout: float = 30) -> None:
    """Until a batch worker has taken work of ``route_name`` (its model calls started)."""
    from redis.exceptions import ResponseError

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ResponseError):  # no stream (or group) yet
            if (await client.xpending(keys.work_stream(route_name), CONSUMER_GROUP))["pending"]:
                return
        assert time.monotonic() < deadline, "the model calls never started"
        await asyncio.sleep(0.05)


async def test_ctrl_c_in_a_script_leaves_async_with_at_once(server, tmp_path):
    """Ctrl-C while a script's requests wait for slow model calls (10 s) of a worker
    pool: the script exits at once instead of waiting for them, and what it gave up is
    consistent: the calls in flight are stored and served to the next request."""
    from redis.asyncio import Redis

    from cachesaver_dist.protocol import prompt_key

    procs = pool_for(server.url(), tmp_path)
    keys = procs.keys
    client = Redis.from_url(server.url())
    try:
        procs.cli("worker", "cache", name="cache")
        start_worker(procs, "batch", TEST_MODEL_LATENCY="10")
        procs.wait_alive("cache")
        procs.wait_alive(SLOW_MODEL)
        script = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, SLOW_MODEL, keys.prefix],
                                  env=subprocess_env(server.url()), cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            await wait_model_calls(client, keys, SLOW_MODEL)
            await asyncio.sleep(0.5)
            started = time.monotonic()
            script.send_signal(signal.SIGINT)
            _, err = await asyncio.to_thread(script.communicate, timeout=20)
            elapsed = time.monotonic() - started
        finally:
            if script.poll() is None:
                script.kill()
                script.communicate()
        print(f"script exited {elapsed:.2f} s after SIGINT, status {script.returncode}")
        assert elapsed < CTRL_C_WITHIN_S, f"{elapsed:.1f} s after Ctrl-C: {err.decode()}"
        assert script.returncode == 130, err.decode()
        assert "Traceback" not in err.decode(), err.decode()
        # The claims it gave up are generated once and served to the next caller.
        async with OnlineAPI(SLOW_MODEL, cache=server.url(), prefix=keys.prefix,
                             request_timeout=30) as api:
            again = await asyncio.gather(*(api.request(Request(f"ctrl-c {i}", 2, str(i), "ns"))
                                           for i in range(4)))
        assert [[m["index"] for m in r.metadata] for r in again] == [[0, 1]] * 4
        counts = await client.hgetall(f"{keys.prefix}counter")
        assert {k: int(v) for k, v in counts.items() if k != b"__calls__"} == \
            {f"ctrl-c {i}".encode(): 2 for i in range(4)}, "generated twice, or not at all"
        for i in range(4):
            assert not await client.exists(
                keys.waiters(prompt_key(SLOW_MODEL, {"prompt": f"ctrl-c {i}"})))
        assert not (await client.xpending(keys.work_stream(SLOW_MODEL), CONSUMER_GROUP))[
            "pending"]
    finally:
        await client.aclose()
        procs.stop_all()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("to", ["demo", "group", "group-then-demo-twice"])
async def test_ctrl_c_stops_the_demo_at_once(tmp_path, to):
    """Ctrl-C during the demo's first pass (on its embedded server, with a slow model):
    sent to the demo only, or to its process group as a terminal sends it (its workers
    get it too), then twice more to the demo while it stops (an impatient user, or
    ``timeout`` passing the signal on). It exits with 130 at once, quietly, and leaves
    nothing running."""
    from redis.asyncio import Redis

    from cachesaver_dist.demo import MODEL

    env = {k: v for k, v in subprocess_env("").items() if k != "REDIS_URL"}
    data, log_path = tmp_path / "data", tmp_path / "demo.log"
    with open(log_path, "wb") as out:  # a file, not a pipe its children would hold open
        demo = subprocess.Popen(
            [sys.executable, "-m", "cachesaver_dist.cli", "demo", "-v", "--puzzles", "400",
             "--latency", "1", "--data-dir", str(data), "--prefix", "sigdemo:"],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own group, as a terminal's job; SIGINT not ignored
    started_processes: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (data / "server.json").exists():
            assert demo.poll() is None and time.monotonic() < deadline, "no embedded server"
            await asyncio.sleep(0.1)
        port = json.loads((data / "server.json").read_text())["port"]
        client = Redis.from_url(f"redis://127.0.0.1:{port}/0")
        try:
            await wait_model_calls(client, Keys("sigdemo:"), MODEL, timeout=60)
        finally:
            await client.aclose()
        await asyncio.sleep(1.0)  # many batches in flight, each waiting for model calls
        started_processes = _descendants(demo.pid)
        assert len(started_processes) >= 4  # the server, simulator and two workers
        [simulator] = [pid for pid in started_processes
                       if b"simulator" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert os.getsid(simulator) == simulator  # a terminal's Ctrl-C does not reach it
        started = time.monotonic()
        if to == "demo":
            demo.send_signal(signal.SIGINT)
        else:
            os.killpg(demo.pid, signal.SIGINT)
        if to == "group-then-demo-twice":
            for _ in range(2):
                await asyncio.sleep(0.01)
                demo.send_signal(signal.SIGINT)
        await asyncio.to_thread(demo.wait, 60)
        elapsed = time.monotonic() - started
        log = log_path.read_text(errors="replace")
        print(f"demo exited {elapsed:.2f} s after SIGINT to the {to}, status {demo.returncode}")
        assert elapsed < CTRL_C_WITHIN_S, f"{elapsed:.1f} s after Ctrl-C: {log[-3000:]}"
        assert demo.returncode == 130, log[-3000:]
        assert "Traceback" not in log and "withdrawn" not in log, log[-3000:]
        # its workers stopped before the simulator: their calls under way were answered
        assert "call failed" not in log and "unfinished" not in log, log[-3000:]
        await asyncio.sleep(0.5)
        assert [pid for pid in started_processes if _running(pid)] == [], "left running"
        assert not (data / "server.json").exists(), "the embedded server was not stopped"
    finally:  # whatever failed, nothing of it stays running
        started_processes += _descendants(demo.pid)
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid in started_processes:
            if _running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_the_demo_stops_its_workers_before_the_simulator():
    """Their model calls under way are answered, not retried against a simulator gone."""
    from cachesaver_dist.demo import _stop_processes

    events: list[tuple[str, str]] = []

    class Proc:
        def __init__(self, name: str) -> None:
            self.name = name

        def terminate(self) -> None:
            events.append(("terminate", self.name))

        def wait(self, timeout: float | None = None) -> int:
            events.append(("exited", self.name))
            return 0

    _stop_processes([Proc("simulator"), Proc("cache"), Proc("batch")])  # type: ignore[list-item]
    assert events == [("terminate", "cache"), ("terminate", "batch"), ("exited", "cache"),
                      ("exited", "batch"), ("terminate", "simulator"), ("exited", "simulator")]
