"""Drop-in vLLM clients (``AsyncVLLM``, ``VLLM``): the openai SDK on a vLLM server (or any
OpenAI-compatible one). URL: ``base_url=`` (e.g. ``http://localhost:8000/v1``) or
``VLLM_BASE_URL``, required; key: ``api_key=``, ``VLLM_API_KEY``, else ``"EMPTY"``.
The cache identity is ``vllm@<host:port/path>:<model>``.
"""

from __future__ import annotations

from .dropin import Metadata
from .openai import OPENAI, AsyncOpenAI, OpenAI

__all__ = ["VLLM", "VLLM_PROVIDER", "AsyncVLLM", "Metadata"]

VLLM_PROVIDER = OPENAI.derive(name="vllm", default_url=None, key_env="VLLM_API_KEY",
                              default_key="EMPTY", url_env="VLLM_BASE_URL")


class AsyncVLLM(AsyncOpenAI):
    provider = VLLM_PROVIDER


class VLLM(OpenAI):
    provider = VLLM_PROVIDER
