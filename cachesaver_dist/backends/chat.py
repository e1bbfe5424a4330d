"""What every chat-completions backend shares: request -> calls -> samples.

A ``Request`` becomes one body per call: messages from ``prompt`` (a str is one user
message, a list of message dicts is sent as is), decoding fields mapped to the
provider's names (``None`` omitted), and ``n`` split into calls of at most ``max_n``
samples. Each call waits for the cluster-wide limits, is retried on transient errors,
and its choices become samples with per-sample usage.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import math
from typing import TYPE_CHECKING, Any

from ..errors import ModelError, ProviderError
from ..typedefs import Request, Response, SingleRequestModel
from . import BackendOptions
from .retry import RetryPolicy, with_retry

if TYPE_CHECKING:
    from .limiter import ClusterLimiter

# Completion tokens assumed per sample when a request sets no max_tokens.
DEFAULT_COMPLETION_ESTIMATE = 512
_NOT_SENT = frozenset({"prompt", "model", "messages", "n", "stream"})


def to_messages(prompt: Any) -> list[dict[str, Any]]:
    """Chat messages for ``prompt``: a str is one user message, a list is used as is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return prompt
    raise ModelError(f"prompt must be a str or a list of chat message dicts, got "
                     f"{type(prompt).__name__}")


def decoding_params(request: Request) -> dict[str, Any]:
    """The request's decoding fields under the provider's names, ``None`` omitted.

    Every field (temperature, top_p, stop, seed, ``max_tokens`` or
    ``max_completion_tokens``, and any a ``Request`` subclass adds) is sent under the
    name the caller used.
    """
    fields = request.model_fields()
    return {k: v for k, v in fields.items() if k not in _NOT_SENT and v is not None}


def split_n(n: int, max_n: int) -> list[int]:
    """Sample counts per call: ``n`` in calls of at most ``max_n``."""
    return [max_n] * (n // max_n) + ([n % max_n] if n % max_n else [])


def estimate_tokens(body: dict[str, Any]) -> int:
    """Tokens a call may use, for the token limit, counted before the call.

    Prompt: characters of the message contents / 4 (the usual rule of thumb for
    English), counted once per call. Completion: ``max_completion_tokens`` or
    ``max_tokens`` (else
    ``DEFAULT_COMPLETION_ESTIMATE``) for each of the call's ``n`` samples.
    """
    chars = 0
    for m in body["messages"]:
        content = m.get("content")
        parts = [content] if isinstance(content, str) else content or []
        chars += sum(len(p if isinstance(p, str) else str(p.get("text", "")))
                     for p in parts if isinstance(p, (str, dict)))
    per_sample = (body.get("max_completion_tokens") or body.get("max_tokens")
                  or DEFAULT_COMPLETION_ESTIMATE)
    return math.ceil(chars / 4) + per_sample * body.get("n", 1)


def samples(provider: str, raw: Any, n: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """Texts and per-sample metadata from a chat-completions response of ``n`` choices.

    Usage per sample: the call's prompt tokens / n; completion tokens of the choice
    if the provider reports them per choice, else the call's / n.
    """
    choices = raw.get("choices") if isinstance(raw, dict) else None
    if not isinstance(choices, list) or len(choices) != n:
        got = len(choices) if isinstance(choices, list) else "no"
        raise ModelError(f"{provider} returned {got} choices where {n} were asked for; if "
                         "the model does not support n > 1, start the worker with --max-n 1")
    usage = raw.get("usage") or {}
    texts, meta = [], []
    for choice in sorted(choices, key=lambda c: c.get("index") or 0):
        message = choice.get("message") or {}
        texts.append(message.get("content") or "")
        own = (choice.get("usage") or {}).get("completion_tokens")
        split = {k: usage[k] / n for k in ("prompt_tokens", "completion_tokens")
                 if usage.get(k) is not None}
        if own is not None:
            split["completion_tokens"] = own
        meta.append({"finish_reason": choice.get("finish_reason"), "usage": split,
                     "id": raw.get("id"), "model": raw.get("model")})
    return texts, meta


class ChatBackend(SingleRequestModel, abc.ABC):
    """A provider's chat completions as a model; subclasses implement ``_post``.

    ``name`` (e.g. ``together:<model>``) is the model's identity in the cache; the
    part after the colon is the model id sent to the provider.
    """

    provider = "chat"

    def __init__(self, name: str, options: BackendOptions | None = None,
                 limiter: ClusterLimiter | None = None) -> None:
        self.model, self.provider_model = name, name.partition(":")[2]
        self.options, self.limiter = options or BackendOptions(), limiter
        opts = self.options
        self.policy = RetryPolicy(opts.retry_budget, opts.backoff_base, opts.backoff_cap)

    @classmethod
    def check_setup(cls, name: str, options: BackendOptions) -> None:
        """``ValueError`` if the environment or ``options`` lack what ``name`` needs (an
        API key, a base URL); called before anything starts."""

    async def request(self, request: Request) -> Response:
        """Exactly ``request.n`` samples, from one call per ``max_n`` of them."""
        params = {"model": self.provider_model, "messages": to_messages(request.prompt),
                  **decoding_params(request)}
        calls = [self._call({**params, "n": k}) for k in split_n(request.n, self.options.max_n)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        data: list[Any] = []
        meta: list[dict[str, Any]] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            data += result[0]
            meta += [{**m, "call_first": i == 0} for i, m in enumerate(result[1])]
        return Response(data=data, metadata=meta)

    async def _call(self, body: dict[str, Any]) -> tuple[list[Any], list[dict[str, Any]]]:
        raw = await with_retry(lambda: self._attempt(body), self.policy, model=self.model)
        return samples(self.provider, raw, body["n"])

    async def _attempt(self, body: dict[str, Any]) -> Any:
        timeout = self.options.timeout
        limited = self.limiter.call(estimate_tokens(body)) if self.limiter \
            else contextlib.nullcontext()
        async with limited:
            try:
                return await asyncio.wait_for(self._post(body), timeout)
            except asyncio.TimeoutError:
                raise ProviderError(self.provider, None, f"no answer within {timeout} s; "
                                    "raise --request-timeout if calls are this slow") from None

    @abc.abstractmethod
    async def _post(self, body: dict[str, Any]) -> Any:
        """One call; the parsed JSON response, or raise ``ProviderError``."""

    async def aclose(self) -> None:
        """Release the HTTP connections."""
