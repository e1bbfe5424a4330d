"""Real LLM backends for the batch workers: ``together:<model>`` and ``openai:<model>``.

Both are ``SingleRequestModel``s; the cache identity of a backend is its full name
(``together:meta-llama/...``), the part after the colon is the provider's model id.
Secrets come only from the environment (``TOGETHER_API_KEY``, ``OPENAI_API_KEY``).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

from ..protocol import Keys

__all__ = ["PROVIDERS", "BackendOptions", "check_setup", "make_backend"]

log = logging.getLogger("cachesaver_dist.backends")

PROVIDERS = {
    "together": "cachesaver_dist.backends.together_backend:TogetherBackend",
    "openai": "cachesaver_dist.backends.openai_compat:OpenAIBackend",
}


@dataclass(frozen=True)
class BackendOptions:
    """How a backend calls its provider.

    ``max_n``: samples per call (a request for more is split and concatenated).
    ``timeout``: seconds per call. ``retry_budget``: attempts per call, backing off
    ``backoff_base * 2**k`` (capped at ``backoff_cap``) s with full jitter.
    ``rpm`` / ``tpm``: requests / estimated tokens per ``rate_window`` seconds
    (a whole number), and ``max_concurrent`` calls, per model across the cluster.
    """

    base_url: str | None = None
    max_n: int = 16
    timeout: float = 120.0
    retry_budget: int = 6
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    rate_window: float = 60.0

    def __post_init__(self) -> None:
        checks: list[tuple[str, int | None, int]] = [
            ("max_n", self.max_n, 1), ("retry_budget", self.retry_budget, 1),
            ("rpm", self.rpm, 1), ("tpm", self.tpm, 1), ("max_concurrent", self.max_concurrent, 1),
        ]
        for name, value, low in checks:
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an int >= {low} (or unset), got {value!r}")
        for name, seconds in (("timeout", self.timeout), ("backoff_base", self.backoff_base),
                              ("backoff_cap", self.backoff_cap)):
            if not seconds > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {seconds!r}")
        if not float(self.rate_window).is_integer() or self.rate_window < 1:
            raise ValueError(f"rate_window must be a whole number of seconds >= 1 (rate limits "
                             f"count in seconds), got {self.rate_window!r}")

    @property
    def limited(self) -> bool:
        """Any cluster-wide limit set."""
        return bool(self.rpm or self.tpm or self.max_concurrent)


def _backend_class(name: str) -> Any:
    """The class serving ``name``'s provider, else None; ``ValueError`` without a model id."""
    provider, _, model = name.partition(":")
    if provider not in PROVIDERS:
        return None
    if not model:
        raise ValueError(f"model name {name!r} names no model: use {provider}:<model id>")
    module, _, cls = PROVIDERS[provider].partition(":")
    return getattr(importlib.import_module(module), cls)


def check_setup(name: str, options: BackendOptions | None = None) -> None:
    """``ValueError`` if ``name`` is a provider model that cannot be built as configured
    (no model id, API key or base URL); builds and connects nothing, so a worker checks
    it before it starts a server."""
    backend_class = _backend_class(name)
    if backend_class is not None:
        backend_class.check_setup(name, options or BackendOptions())


def make_backend(name: str, options: BackendOptions | None = None, redis: Redis | None = None,
                 keys: Keys | None = None) -> Any:
    """The backend serving ``name`` (``together:<model>`` / ``openai:<model>``), else None.

    Limits (``rpm``, ``tpm``, ``max_concurrent``) are shared through ``redis`` under
    ``keys.prefix``. Raises ``ValueError`` for a missing model id, API key or base URL.
    """
    backend_class = _backend_class(name)
    if backend_class is None:
        return None
    options = options or BackendOptions()
    limiter = None
    if options.limited:
        if redis is None:
            raise ValueError("rpm, tpm and max_concurrent are shared through Redis: pass the "
                             "worker's Redis client, or leave them unset")
        from .limiter import ClusterLimiter

        limiter = ClusterLimiter(redis, keys or Keys(), name, rpm=options.rpm, tpm=options.tpm,
                                 max_concurrent=options.max_concurrent,
                                 window=int(options.rate_window), slot_ttl=options.timeout + 10)
    backend = backend_class(name, options, limiter)
    window = int(options.rate_window)
    limits = [text for value, text in (
        (options.rpm, f"{options.rpm} requests / {window} s"),
        (options.tpm, f"{options.tpm} tokens / {window} s"),
        (options.max_concurrent, f"{options.max_concurrent} concurrent calls")) if value]
    log.info("%s via %s (at most %d samples per call; cluster limits: %s)", name,
             _without_credentials(backend.base_url), options.max_n, ", ".join(limits) or "none")
    return backend


def _without_credentials(url: str) -> str:
    """``url`` without user, password and query string, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"
