"""``openai:<model>``: any OpenAI-compatible ``POST {base_url}/chat/completions``.

Base URL: ``BackendOptions.base_url`` or ``OPENAI_BASE_URL`` (required, e.g.
``https://api.openai.com/v1``). API key: ``OPENAI_API_KEY`` (optional; sent as a
bearer token, never logged).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import httpx

from ..errors import ModelError, ProviderError
from .chat import ChatBackend
from .retry import status_error

if TYPE_CHECKING:
    from . import BackendOptions
    from .limiter import ClusterLimiter


class OpenAIBackend(ChatBackend):
    """Chat completions over ``httpx.AsyncClient``."""

    provider = "openai"

    def __init__(self, name: str, options: BackendOptions | None = None,
                 limiter: ClusterLimiter | None = None) -> None:
        super().__init__(name, options, limiter)
        options = self.options
        self.base_url = self._base_url(name, options).rstrip("/")
        key = os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                         timeout=options.timeout)

    @classmethod
    def check_setup(cls, name: str, options: BackendOptions) -> None:
        cls._base_url(name, options)

    @staticmethod
    def _base_url(name: str, options: BackendOptions) -> str:
        base_url = options.base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise ValueError(f"model {name!r} needs the server's base URL: pass --base-url or "
                             "set OPENAI_BASE_URL (e.g. https://api.openai.com/v1)")
        return base_url

    async def _post(self, body: dict[str, Any]) -> Any:
        try:
            resp = await self._client.post("/chat/completions", json=body)
        except httpx.TimeoutException as exc:
            raise ProviderError(self.provider, None, f"timed out ({type(exc).__name__})") \
                from exc
        except httpx.TransportError as exc:
            raise ProviderError(self.provider, None,
                                f"cannot reach {self.base_url}: {type(exc).__name__}: {exc}") \
                from exc
        try:
            data = resp.json()
        except ValueError:
            data = resp.text[:500]
        if resp.status_code >= 400:
            raise status_error(self.provider, resp.status_code, resp.headers, data)
        if not isinstance(data, dict):
            raise ModelError(f"{self.provider} answered {resp.status_code} with a body that is "
                             f"not a JSON object: {str(data)[:200]!r}")
        return data

    async def aclose(self) -> None:
        await self._client.aclose()
