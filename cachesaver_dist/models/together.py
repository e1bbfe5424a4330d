"""Drop-in ``together`` clients: ``from cachesaver_dist.models.together import AsyncTogether``.

``client.chat.completions.create(...)`` is cached and returns together's
``ChatCompletion`` (chunks with ``stream=True``). See ``docs/dropin.md``.
"""

from __future__ import annotations

from typing import Any

import together
from together.types.chat import ChatCompletion, ChatCompletionChunk

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
    """``together.Together`` with ``chat.completions.create`` served through the cache."""

    provider = TOGETHER
    chat: Any
