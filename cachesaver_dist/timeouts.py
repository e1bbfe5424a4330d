"""A time limit on an awaitable, without a task of its own where Python allows it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float) -> T:
    """``aw``, cancelled after ``seconds`` (``asyncio.TimeoutError``).

    On Python 3.11+ it runs in the calling task (``asyncio.timeout``): no task to start
    and none to wake the caller, two event-loop turns fewer than ``asyncio.wait_for``."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(max(seconds, 0.0)):
            return await aw
    return await asyncio.wait_for(aw, max(seconds, 0.0))
