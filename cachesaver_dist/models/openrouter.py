"""Drop-in OpenRouter clients (``AsyncOpenRouter``, ``OpenRouter``): the openai SDK on
OpenRouter's API. Key: ``api_key=`` or ``OPENROUTER_API_KEY``; URL: ``base_url=``,
``OPENROUTER_BASE_URL`` or OpenRouter's.
"""

from __future__ import annotations

from .dropin import Metadata
from .openai import OPENAI, AsyncOpenAI, OpenAI

__all__ = ["OPENROUTER", "AsyncOpenRouter", "Metadata", "OpenRouter"]

OPENROUTER = OPENAI.derive(name="openrouter", default_url="https://openrouter.ai/api/v1",
                           key_env="OPENROUTER_API_KEY", url_env="OPENROUTER_BASE_URL")


class AsyncOpenRouter(AsyncOpenAI):
    provider = OPENROUTER


class OpenRouter(OpenAI):
    provider = OPENROUTER
