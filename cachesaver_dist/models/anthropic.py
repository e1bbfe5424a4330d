"""Drop-in ``anthropic`` clients: ``from cachesaver_dist.models.anthropic import AsyncAnthropic``.

``client.messages.create(...)`` is cached and returns ``anthropic.types.Message``
(stream events with ``stream=True``). The API has no ``n``: each call in a namespace
gets the next sample. See ``docs/dropin.md``.
"""

from __future__ import annotations

from typing import Any

import anthropic

from .dropin import NOT_IN_KEY, AsyncClient, Metadata, Provider
from .formats import MessagesFormat
from .sync import Client

__all__ = ["ANTHROPIC", "Anthropic", "AsyncAnthropic", "Metadata"]

ANTHROPIC = Provider("anthropic", anthropic.AsyncAnthropic, anthropic.Anthropic,
                     MessagesFormat(NOT_IN_KEY | {
                         "metadata", "service_tier", "cache_control", "inference_geo",
                         "diagnostics", "user_profile_id", "workspace_id"}),
                     default_url="https://api.anthropic.com")


class AsyncAnthropic(AsyncClient):
    """``anthropic.AsyncAnthropic`` with ``messages.create`` served through the cache."""

    provider = ANTHROPIC
    messages: Any


class Anthropic(Client):
    """``anthropic.Anthropic`` with ``messages.create`` served through the cache."""

    provider = ANTHROPIC
    messages: Any
