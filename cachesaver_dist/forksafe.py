"""Thread locks that a forked child gets fresh.

``fork()`` copies a lock in the state it had, but not the thread holding it: a lock some
thread of the parent held at that instant (an embedded server starting, a sample being
remembered) stays held in the child for ever, and the child's first use of it hangs.
These locks are replaced, released, in the child (as ``logging`` does with its own);
what they guard is either per process already (servers, loop threads: the child starts
its own) or a cache that stays valid.
"""

from __future__ import annotations

import os
import threading
import weakref
from types import TracebackType
from typing import Any


class ForkSafeLock:
    """A ``threading.Lock`` (``reentrant``: an ``RLock``) that is released in a forked
    child, whoever held it at the fork."""

    __slots__ = ("__weakref__", "_lock", "_reentrant")

    def __init__(self, *, reentrant: bool = False) -> None:
        self._reentrant = reentrant
        self._lock: Any = threading.RLock() if reentrant else threading.Lock()
        _LOCKS.add(self)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return bool(self._lock.acquire(blocking, timeout))

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return bool(self._lock.acquire())

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release()

    def _renew(self) -> None:
        self._lock = threading.RLock() if self._reentrant else threading.Lock()


_LOCKS: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()


def _renew_all() -> None:
    for lock in list(_LOCKS):
        lock._renew()


os.register_at_fork(after_in_child=_renew_all)
