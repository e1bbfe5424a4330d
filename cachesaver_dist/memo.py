"""Values remembered by the bytes they were read from.

A stored sample's bytes never change, and the cache's point is to serve one sample
many times over (across namespaces): what a process reads from a sample is read once.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .forksafe import ForkSafeLock

V = TypeVar("V")


class BytesMemo(Generic[V]):
    """A value per ``bytes`` key, for about ``limit`` bytes in all (each entry costs what
    its ``put`` says); emptied when full. An entry over 1/16 of ``limit`` is not kept.
    Safe from several threads (in-process workers and drop-in clients run on threads)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._values: dict[bytes, V] = {}
        self._bytes = 0
        self._lock = ForkSafeLock()

    def get(self, raw: bytes) -> V | None:
        """The value remembered for ``raw``, or None."""
        return self._values.get(raw)

    def put(self, raw: bytes, value: V, cost: int) -> None:
        """Remember ``value`` for ``raw``; ``cost``: its share of ``limit``, in bytes."""
        if cost > self.limit // 16:
            return
        with self._lock:
            if raw in self._values:  # (two threads that read it at once)
                return
            if self._bytes + cost > self.limit:
                self._values.clear()
                self._bytes = 0
            self._values[raw] = value
            self._bytes += cost

    def __len__(self) -> int:
        return len(self._values)
