"""Drop-in ``together`` clients: ``from cachesaver_dist.models.together import AsyncTogether``.

``client.chat.completions.create(...)`` is cached and returns together's
``ChatCompletion`` (chunks with ``stream=True``). See ``docs/dropin.md``.
"""

from __future__ import annotations

from typing import Any

import together
from together.types.chat import ChatCompletion, ChatCompletionChunk

from .. import defaults
from .dropin import NOT_IN_KEY, AsyncClient, Metadata, Provider
from .formats import ChatFormat
from .sync import Client

__all__ = ["TOGETHER", "AsyncTogether", "Metadata", "Together"]

TOGETHER = Provider("together", together.AsyncTogether, together.Together,
                    ChatFormat(ChatCompletion, ChatCompletionChunk, NOT_IN_KEY),
                    default_url="https://api.together.ai")


class AsyncTogether(AsyncClient):
    """``together.AsyncTogether`` with ``chat.completions.create`` served through the cache."""

    provider = TOGETHER
    chat: Any


class Together(Client):
    """``together.Together`` with ``chat.completions.create`` served through the cache.

    Unlike the other sync clients it takes ``batch_size`` by position too, as the
    original's ``Together(namespace, cachedir, batch_size, timeout)`` did."""

    provider = TOGETHER
    chat: Any

    def __init__(self, namespace: str = "default", cachedir: str | None = None,
                 batch_size: int = defaults.BATCH_SIZE, batch_timeout: float | None = None,
                 **options: Any) -> None:
        super().__init__(namespace, cachedir, batch_timeout, batch_size=batch_size, **options)
