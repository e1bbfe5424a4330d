"""Drop-in Groq clients (``AsyncGroq``, ``Groq``): the openai SDK on Groq's OpenAI-compatible
API. Key: ``api_key=`` or ``GROQ_API_KEY``; URL: ``base_url=``, ``GROQ_BASE_URL`` or
Groq's. Groq serves one choice per call, so ``n`` samples take ``n`` calls (``max_n=1``).
"""

from __future__ import annotations

from .dropin import Metadata
from .openai import OPENAI, AsyncOpenAI, OpenAI

__all__ = ["GROQ", "AsyncGroq", "Groq", "Metadata"]

GROQ = OPENAI.derive(name="groq", default_url="https://api.groq.com/openai/v1",
                     key_env="GROQ_API_KEY", url_env="GROQ_BASE_URL", max_n=1)


class AsyncGroq(AsyncOpenAI):
    provider = GROQ


class Groq(OpenAI):
    provider = GROQ
