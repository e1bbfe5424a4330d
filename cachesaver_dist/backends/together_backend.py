"""``together:<model>``: Together AI through the official SDK (``together.AsyncTogether``).

API key: ``TOGETHER_API_KEY`` (required). Base URL: ``BackendOptions.base_url``, else
``TOGETHER_BASE_URL``, else the SDK's default; for together >= 2 it is the server
root *without* ``/v1`` (the SDK appends ``/v1/chat/completions``). The SDK's own
retries are off: ``retry.with_retry`` does them under the cluster-wide limits.
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any

import together

from ..errors import ProviderError
from .chat import ChatBackend
from .retry import status_error

if TYPE_CHECKING:
    from . import BackendOptions
    from .limiter import ClusterLimiter

_SDK_OPTIONS = frozenset({"extra_headers", "extra_query", "extra_body", "timeout", "stream"})


class TogetherBackend(ChatBackend):
    """Chat completions through ``together.AsyncTogether``."""

    provider = "together"

    def __init__(self, name: str, options: BackendOptions | None = None,
                 limiter: ClusterLimiter | None = None) -> None:
        super().__init__(name, options, limiter)
        options = self.options
        key = self._api_key(name)
        self._client = together.AsyncTogether(api_key=key, base_url=options.base_url or None,
                                              max_retries=0, timeout=options.timeout)
        self.base_url = str(self._client.base_url)
        self._create = self._client.chat.completions.create
        # Body fields the SDK takes as arguments; the rest goes in extra_body.
        self._sdk_params = set(inspect.signature(self._create).parameters) - _SDK_OPTIONS

    @classmethod
    def check_setup(cls, name: str, options: BackendOptions) -> None:
        cls._api_key(name)

    @staticmethod
    def _api_key(name: str) -> str:
        key = os.environ.get("TOGETHER_API_KEY")
        if not key:
            raise ValueError(f"model {name!r} needs TOGETHER_API_KEY in the environment: "
                             "export your Together API key (any value for a local simulator)")
        return key

    async def _post(self, body: dict[str, Any]) -> Any:
        known = {k: v for k, v in body.items() if k in self._sdk_params}
        extra = {k: v for k, v in body.items() if k not in self._sdk_params}
        try:
            resp = await self._create(**known, extra_body=extra or None)
        except together.APIStatusError as exc:
            raise status_error(self.provider, exc.status_code, exc.response.headers,
                               exc.body) from exc
        except together.APITimeoutError as exc:
            raise ProviderError(self.provider, None,
                                f"timed out after {self.options.timeout} s") from exc
        except together.APIConnectionError as exc:
            raise ProviderError(self.provider, None,
                                f"cannot reach {self.base_url}: {exc}") from exc
        return resp.model_dump()

    async def aclose(self) -> None:
        await self._client.close()
