"""Client-side checks: a request is refused here, with a clear message, or it is sent whole.

Every string anywhere in a request must be encodable as UTF-8 (a lone surrogate such as
``"\\udc80"`` is not); every value must be one msgpack stores as it is (str, int, float,
bool, None, bytes, and lists, tuples and str-keyed dicts of those).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from . import defaults
from .errors import InvalidRequestError
from .protocol import MAX_DEPTH, WorkItem, encode_spec, pack, prompt_key, unique_id
from .typedefs import Request

MAX_N = 10_000
MAX_NAMESPACE_CHARS = 256
DEFAULT_NAMESPACE = "default"
DEFAULT_MAX_PROMPT_BYTES = defaults.MAX_PROMPT_BYTES
_RUN_ID = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")
_INT_RANGE = (-(2**63), 2**64 - 1)
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def check_text(value: Any, what: str) -> str:
    """``value`` if it is a non-empty str encodable as UTF-8, else ``InvalidRequestError``."""
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{what} must be a non-empty str, got "
                                  f"{type(value).__name__} {value!r:.80}")
    _check_utf8(value, what)
    return value


def _check_utf8(value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{what} is not valid text: character {exc.start} ({value[exc.start]!r}) is a lone "
            "surrogate, which UTF-8 cannot encode; decode your input with errors='replace' "
            "or remove it") from None


def check_run(run: Any) -> str:
    if not isinstance(run, str) or not _RUN_ID.match(run):
        raise InvalidRequestError(
            f"run id {run!r:.80} is not valid: use 1-128 characters from letters, digits "
            "and . _ : @ + -"
        )
    return run


def _check_namespace(namespace: Any) -> str:
    if type(namespace) is str:
        return _checked_namespace(namespace)
    if namespace is None:
        return DEFAULT_NAMESPACE
    if not isinstance(namespace, str):
        raise InvalidRequestError(
            f"namespace must be a str, got {type(namespace).__name__} {namespace!r:.80}"
        )
    return _checked_namespace(namespace)


@lru_cache(maxsize=4096)  # namespaces repeat: each is checked once (refusals are not kept)
def _checked_namespace(namespace: str) -> str:
    if not namespace or len(namespace) > MAX_NAMESPACE_CHARS:
        raise InvalidRequestError(
            f"namespace must have 1 to {MAX_NAMESPACE_CHARS} characters, got {len(namespace)}"
        )
    if _CONTROL.search(namespace):
        raise InvalidRequestError(
            f"namespace {namespace!r:.80} contains control characters; use printable text"
        )
    _check_utf8(namespace, "namespace")
    return namespace


def _check_request_id(request_id: Any) -> str:
    if type(request_id) is str and len(request_id) <= 1024 and request_id.isascii():
        return request_id  # the common case: ASCII is valid UTF-8
    if request_id is None:
        return ""
    if not isinstance(request_id, str):
        raise InvalidRequestError(
            f"request_id must be a str (batches are ordered by plain string order), got "
            f"{type(request_id).__name__} {request_id!r:.80}: pass a str, zero-padded for "
            "numbers (f'{i:06d}') so that they sort in numeric order"
        )
    if len(request_id) > 1024:
        raise InvalidRequestError(f"request_id has {len(request_id)} characters; use at "
                                  "most 1024")
    _check_utf8(request_id, "request_id")
    return request_id


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if type(prompt) is list and prompt:  # the common chat prompt, checked at once
        for m in prompt:
            if type(m) is not dict or type(m.get("content")) is not str:
                break
        else:
            return
    which = ""
    if isinstance(prompt, (list, tuple)) and prompt:
        for i, m in enumerate(prompt):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, (str, list)):
                continue
            # an assistant turn that only calls tools has no content (OpenAI's format)
            if isinstance(m, dict) and content is None and \
                    (m.get("tool_calls") or m.get("function_call")):
                continue
            which = (f": prompt[{i}] is a {type(m).__name__}" if not isinstance(m, dict) else
                     f": prompt[{i}] has no 'content'" if "content" not in m else
                     f": prompt[{i}]['content'] is {type(content).__name__} (a str or a list "
                     "of parts; None only beside 'tool_calls')")
            break
        else:
            return
    raise InvalidRequestError(
        f"prompt must be a str or a non-empty list of chat messages "
        f"({{'role': ..., 'content': str}}), got {type(prompt).__name__}{which}"
    )


def prompt_key_of(hash: Callable[[Request], Any], request: Request, model_id: str) -> str:
    """The prompt key from a user's ``hash(request)``.

    ``hash`` must return the same str, bytes or int for requests that must share
    samples, on every machine and in every process: no Python ``hash()`` (salted per
    process), no ids or addresses, nothing that depends on dict order. The model id
    is hashed in as well, so two models never share samples.
    """
    try:
        value = hash(request)
    except Exception as exc:
        raise InvalidRequestError(f"the hash callable failed on this request: "
                                  f"{type(exc).__name__}: {exc}") from exc
    if isinstance(value, bool) or not isinstance(value, (str, bytes, int)):
        raise InvalidRequestError(f"the hash callable must return str, bytes or int, got "
                                  f"{type(value).__name__}")
    if isinstance(value, str):
        _check_utf8(value, "the hash callable's result")
    return prompt_key(model_id, {"user hash": value})


def _check_value(value: Any, path: str, depth: int = 0) -> None:
    """Every value storable as it is; every string valid text; the path names the culprit."""
    if depth > MAX_DEPTH:
        raise InvalidRequestError(f"field {path} nests deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, float, bytes)):
        return
    if isinstance(value, str):
        _check_utf8(value, f"field {path}")
    elif isinstance(value, int):
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            raise InvalidRequestError(f"field {path} is an int outside 64 bits: {value:.3g}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_value(item, f"{path}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise InvalidRequestError(f"field {path} has a key {k!r:.40} of type "
                                          f"{type(k).__name__}; dict keys must be str")
            _check_utf8(k, f"a key of field {path}")
            _check_value(item, f"{path}[{k!r:.40}]", depth + 1)
    else:
        raise InvalidRequestError(
            f"field {path} is a {type(value).__name__}, which cannot be stored; use str, int, "
            "float, bool, None, bytes, or lists and dicts of those")


def _is_request_type(cls: type) -> bool:
    """A ``Request`` dataclass (each type checked once)."""
    known = _REQUEST_TYPES.get(cls)
    if known is None:
        if len(_REQUEST_TYPES) > 1024:
            _REQUEST_TYPES.clear()
        known = _REQUEST_TYPES[cls] = issubclass(cls, Request) and \
            dataclasses.is_dataclass(cls)
    return known


_REQUEST_TYPES: dict[type, bool] = {}


def prepare(
    request: Any,
    *,
    run: str,
    route: str,
    model_id: str,
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
    hash: Callable[[Request], Any] | None = None,
    manifest: bool = False,
) -> WorkItem:
    """Check ``request`` and turn it into what the cache workers reserve; ``hash``
    replaces the prompt key (see ``prompt_key_of``); ``manifest``: record the request's
    range in its run's manifest (requests with a ``request_id`` only)."""
    if not _is_request_type(type(request)):
        raise InvalidRequestError(
            f"expected a cachesaver_dist.Request (or a dataclass subclass of it), got "
            f"{type(request).__name__}"
        )
    n = request.n
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_N:
        raise InvalidRequestError(f"n must be an int from 0 to {MAX_N}, got {n!r:.80}")
    _check_prompt(request.prompt)
    namespace = _check_namespace(request.namespace)
    request_id = _check_request_id(request.request_id)
    fields = request.model_fields()
    try:  # packing and hashing check the fields as they go: the common case
        packed = pack(fields)
        key = prompt_key(model_id, fields, packed) if hash is None else None
        spec = encode_spec(route, model_id, fields, namespace, request.request_id,
                           packed=packed)
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
        for name, value in fields.items():  # names the culprit
            _check_value(value, repr(name))
        raise InvalidRequestError("the request's fields cannot be stored; use str, int, "
                                  "float, bool, None, bytes, and lists and dicts of those"
                                  ) from None
    if key is None:
        for name, value in fields.items():
            _check_value(value, repr(name))
        key = prompt_key_of(hash, request, model_id)  # type: ignore[arg-type]
    if len(spec) > max_prompt_bytes:
        raise InvalidRequestError(
            f"request is {len(spec)} bytes encoded, over the limit of {max_prompt_bytes}; "
            "shorten the prompt or raise max_prompt_bytes"
        )
    return WorkItem(unique_id(), request_id, key, namespace, n, run, route, model_id, spec,
                    manifest)
