"""Drop-in ``openai`` clients: ``from cachesaver_dist.models.openai import AsyncOpenAI``.

``client.chat.completions.create(...)`` is cached, deduplicated and batched and returns
``openai.types.chat.ChatCompletion`` (chunks with ``stream=True``); everything else is
the SDK's own. See ``docs/dropin.md``.
"""

from __future__ import annotations

from typing import Any

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from .dropin import NOT_IN_KEY, AsyncClient, Metadata, Provider
from .formats import ChatFormat
from .sync import Client

__all__ = ["OPENAI", "AsyncOpenAI", "Metadata", "OpenAI"]

CHAT = ChatFormat(ChatCompletion, ChatCompletionChunk, NOT_IN_KEY | {
    "store", "user", "metadata", "service_tier", "prompt_cache_key", "prompt_cache_retention",
    "prompt_cache_options", "safety_identifier"})

OPENAI = Provider("openai", openai.AsyncOpenAI, openai.OpenAI, CHAT,
                  default_url="https://api.openai.com/v1")


class AsyncOpenAI(AsyncClient):
    """``openai.AsyncOpenAI`` with ``chat.completions.create`` served through the cache."""

    provider = OPENAI
    chat: Any


class OpenAI(Client):
    """``openai.OpenAI`` with ``chat.completions.create`` served through the cache."""

    provider = OPENAI
    chat: Any
