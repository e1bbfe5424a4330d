"""A process forked while another thread holds one of the package's locks (an embedded
server starting, a sample being remembered, a sync client starting its loop) can still
take that lock in the child: the child gets it released (``forksafe``). A plain lock,
forked the same way, stays held: the check has teeth."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest

from cachesaver_dist import forksafe, memo, pipelines, samples, server
from cachesaver_dist.models import sync

ACQUIRED, STILL_HELD = 0, 3


def _child_can_take(lock: Any, then: Callable[[], object] = lambda: None) -> int:
    """Fork while another thread holds ``lock``; the child's exit status: ``ACQUIRED``
    when it took the lock within 2 s (and then ran ``then``), ``STILL_HELD`` otherwise."""
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            done.wait(10)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: no pytest teardown here, whatever happens
        signal.alarm(10)  # and killed (SIGALRM) if anything hangs
        status = STILL_HELD
        try:
            if lock.acquire(timeout=2):
                lock.release()
                then()
                status = ACQUIRED
        finally:
            os._exit(status)
    done.set()
    holder.join(5)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.parametrize("name, lock", [
    ("embedded servers' users", server._USERS_LOCK),
    ("the spawner thread", server._SPAWNER_LOCK),
    ("requests held for in-process models", pipelines._HELD_LOCK),
    ("remembered samples", samples._read._lock),
])
def test_a_lock_held_at_fork_is_free_in_the_child(name: str, lock: Any) -> None:
    assert _child_can_take(lock) == ACQUIRED, name


def test_the_memo_works_in_a_child_forked_mid_put() -> None:
    remembered: memo.BytesMemo[str] = memo.BytesMemo(1 << 20)

    def put_and_get() -> None:
        remembered.put(b"sample", "decoded", 10)
        if remembered.get(b"sample") != "decoded":
            os._exit(4)

    assert _child_can_take(remembered._lock, put_and_get) == ACQUIRED


def test_a_sync_clients_loop_lock_is_free_in_the_child() -> None:
    loop_thread = sync._LoopThread("test-loop")
    assert _child_can_take(loop_thread._lock) == ACQUIRED


def test_a_reentrant_lock_is_renewed_as_reentrant() -> None:
    lock = forksafe.ForkSafeLock(reentrant=True)

    def twice() -> None:
        with lock, lock:  # reentrant
            pass

    assert _child_can_take(lock, twice) == ACQUIRED


def test_a_plain_lock_held_at_fork_stays_held_in_the_child() -> None:
    assert _child_can_take(threading.Lock()) == STILL_HELD
