"""Client-side checks: a request is refused here, with a clear message, or it is sent whole."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from .errors import InvalidRequestError
from .protocol import encode_spec, prompt_key, unique_id
from .scripts import WorkItem
from .typedefs import Request

MAX_N = 10_000
MAX_NAMESPACE_CHARS = 256
DEFAULT_MAX_PROMPT_BYTES = 1 << 20
DEFAULT_NAMESPACE = "default"
_RUN_ID = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")


def check_run(run: str) -> str:
    if not isinstance(run, str) or not _RUN_ID.match(run):
        raise InvalidRequestError(
            f"run id {run!r} is not valid: use 1-128 characters from letters, digits "
            "and . _ : @ + -"
        )
    return run


def _check_namespace(namespace: Any) -> str:
    if namespace is None:
        return DEFAULT_NAMESPACE
    if not isinstance(namespace, str):
        raise InvalidRequestError(
            f"namespace must be a str, got {type(namespace).__name__} {namespace!r}"
        )
    if not namespace or len(namespace) > MAX_NAMESPACE_CHARS:
        raise InvalidRequestError(
            f"namespace must have 1 to {MAX_NAMESPACE_CHARS} characters, got {len(namespace)}"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in namespace):
        raise InvalidRequestError(
            f"namespace {namespace!r} contains control characters; use printable text"
        )
    return namespace


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt
    ):
        return
    raise InvalidRequestError(
        f"prompt must be a str or a non-empty list of chat messages "
        f"({{'role': ..., 'content': str}}), got {type(prompt).__name__}"
    )


def prepare(
    request: Request,
    *,
    run: str,
    route: str,
    model_id: str,
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
) -> WorkItem:
    """Check ``request`` and turn it into what the cache workers reserve."""
    if not isinstance(request, Request) or not dataclasses.is_dataclass(request):
        raise InvalidRequestError(
            f"expected a cachesaver_dist.Request (or a dataclass subclass of it), got "
            f"{type(request).__name__}"
        )
    n = request.n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise InvalidRequestError(f"n must be an int from 1 to {MAX_N}, got {n!r}")
    _check_prompt(request.prompt)
    namespace = _check_namespace(request.namespace)
    request_id = request.request_id
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequestError(
            f"request_id must be a str (batches are ordered by plain string order), got "
            f"{type(request_id).__name__} {request_id!r}"
        )
    fields = request.model_fields()
    try:
        key = prompt_key(model_id, fields)
        spec = encode_spec(route, model_id, fields)
    except (TypeError, ValueError, OverflowError) as exc:
        bad = _unserialisable_field(fields)
        raise InvalidRequestError(
            f"field {bad!r} of the request cannot be stored ({exc}); use str, int, float, "
            "bool, None, or lists and dicts of those"
        ) from exc
    if len(spec) > max_prompt_bytes:
        raise InvalidRequestError(
            f"request is {len(spec)} bytes encoded, over the limit of {max_prompt_bytes}; "
            "shorten the prompt or raise max_prompt_bytes"
        )
    return WorkItem(unique_id(), request_id or "", key, namespace, n, run, route,
                    model_id, spec)


def _unserialisable_field(fields: dict[str, Any]) -> str:
    for name, value in fields.items():
        try:
            prompt_key("", {name: value})
        except (TypeError, ValueError, OverflowError):
            return name
    return "?"
