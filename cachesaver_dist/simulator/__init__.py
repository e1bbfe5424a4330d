"""Local LLM simulator for tests and benches: OpenAI-compatible ``POST /v1/chat/completions``
(tool calls, logprobs, streaming) and Anthropic's ``POST /v1/messages`` (streaming too).

Samples are fake but distinct: ``<8-hex tag> word word ...`` from a SHA-256 of (model, messages,
temperature, top_p, salt); the salt is a per-server nonce (``rng_seed`` if set) plus a sample
counter, or (``seed``, choice index) when the request has a ``seed`` (then it is reproducible).
Tokens ~= whitespace-separated words, for prompt and completion alike.

Rate limit: per-model *sliding window log* (at most ``rate_limit`` admitted requests in any
``rate_window`` s; rejected ones take no slot); a 429 has ``Retry-After`` (fractional seconds
like ``"0.25"``, or a ceil'd integer with ``retry_after_integer``) and ``retry-after-ms``.

Modules: ``config`` (settings, fault rules), ``wire`` (OpenAI request/response format),
``anthropic_wire`` (Anthropic Messages format),
``state`` (counters, rate windows, samples), ``app`` (routes, serving), ``cli`` (flags).
"""

from .app import (
    STATE,
    anthropic_base_url,
    base_urls,
    build_app,
    root_url,
    running_simulator,
    serve,
    together_base_url,
)
from .cli import add_arguments, config_from_args, main_from_args
from .config import FaultRule, SimulatorConfig
from .state import COUNTER_KEYS, MAX_REQUEST_TIMES

__all__ = [
    "COUNTER_KEYS",
    "MAX_REQUEST_TIMES",
    "STATE",
    "FaultRule",
    "SimulatorConfig",
    "add_arguments",
    "anthropic_base_url",
    "base_urls",
    "build_app",
    "config_from_args",
    "main_from_args",
    "root_url",
    "running_simulator",
    "serve",
    "together_base_url",
]
