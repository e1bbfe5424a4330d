"""Retries of provider calls: which errors are transient, how long to back off.

Transient (retried): HTTP 408, 409, 429, 5xx, timeouts and connection errors.
Anything else (400, 401, 403, 404, 422, ...) is permanent and raised at once.
Backoff is exponential with full jitter (``uniform(0, min(cap, base * 2**k))``),
unless the provider sent ``Retry-After`` / ``retry-after-ms``: then that is waited.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import metrics
from ..errors import ProviderError

log = logging.getLogger("cachesaver_dist.backends")

T = TypeVar("T")
@dataclass(frozen=True)
class RetryPolicy:
    """At most ``budget`` attempts; backoff ``base * 2**k`` seconds, capped at ``cap``."""

    budget: int = 6
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, retry_after: float | None,
              rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        if retry_after is not None:
            return max(0.0, retry_after)
        return rand() * min(self.cap, self.base * 2 ** attempt)


async def with_retry(attempt: Callable[[], Awaitable[T]], policy: RetryPolicy, *,
                     sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                     rand: Callable[[], float] = random.random, model: str | None = None) -> T:
    """Run ``attempt()`` until it succeeds, fails permanently or the budget is spent.

    ``attempt`` raises ``ProviderError``; the last one is re-raised with the number
    of attempts added when the budget runs out. Each error and retry is counted in the
    worker's metrics under ``model``.
    """
    for k in range(policy.budget):
        try:
            return await attempt()
        except ProviderError as exc:
            retried = exc.transient and k + 1 < policy.budget
            metrics.provider_error(model, exc.status, retried)
            if not exc.transient:
                raise
            if k + 1 >= policy.budget:
                raise ProviderError(exc.provider, exc.status,
                                    f"{exc.detail} (gave up after {policy.budget} attempts)",
                                    kind=exc.kind) from exc
            wait = policy.delay(k, exc.retry_after, rand)
            log.warning("%s (retry %d/%d in %.2f s)", exc, k + 1, policy.budget - 1, wait)
            await sleep(wait)
    raise ValueError(f"retry budget must be >= 1, got {policy.budget}")


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms``, or ``Retry-After`` (seconds or an HTTP date)."""
    headers = {k.lower(): v for k, v in headers.items()}
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def error_parts(body: Any) -> tuple[str | None, str | None]:
    """``(kind, message)`` from an OpenAI-style error body ``{"error": {...}}``."""
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        kind = err.get("type") or err.get("code")
        message = err.get("message")
        return (str(kind) if kind else None), (str(message) if message else None)
    if isinstance(err, str) and err:
        return None, err
    return None, None


def status_error(provider: str, status: int, headers: Mapping[str, str],
                 body: Any) -> ProviderError:
    """The ``ProviderError`` for an HTTP error answer (body: parsed JSON or text)."""
    kind, message = error_parts(body)
    return ProviderError(provider, status, message or f"HTTP {status} without an error message",
                         kind=kind, retry_after=retry_after(headers))
