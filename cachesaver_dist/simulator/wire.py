"""OpenAI chat-completions wire format: request checks, error bodies, token counts, replies."""

from __future__ import annotations

import math
import uuid
from typing import Any

from aiohttp import web

from .config import is_int, is_num

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "invalid_request_error", 429: "requests"}


class Invalid(Exception):
    """A request the API would reject with a 400 (``code``/``param`` as in OpenAI errors)."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def error(status: int, message: str, code: str | None, param: str | None = None,
          headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI-style error response."""
    etype = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def retry_headers(seconds: float, integer: bool) -> dict[str, str]:
    """``Retry-After`` (fractional, or ceil'd with ``integer``) and ``retry-after-ms``."""
    seconds = max(seconds, 0.001)
    value = str(math.ceil(seconds)) if integer else f"{seconds:.3f}".rstrip("0").rstrip(".")
    return {"Retry-After": value, "retry-after-ms": str(math.ceil(seconds * 1000))}


async def read_request(request: web.Request) -> dict[str, Any]:
    """Parse and check a chat-completions body; return normalised params or raise Invalid."""
    try:
        body = await request.json()
    except ValueError:
        raise Invalid("Could not parse the request body as JSON.", "invalid_json") from None
    if not isinstance(body, dict):
        raise Invalid("Request body must be a JSON object.", "invalid_body")
    model, msgs = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model.strip():
        code = "missing_model" if model is None else "invalid_model"
        raise Invalid("'model' is required and must be a non-empty string.", code, "model")
    ok = isinstance(msgs, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in msgs)
    if not ok or not msgs:
        code = "missing_messages" if msgs is None else "invalid_messages"
        raise Invalid("'messages' is required and must be a non-empty array of "
                      "{'role': str, 'content': ...} objects.", code, "messages")
    n = 1 if body.get("n") is None else body["n"]
    if not is_int(n) or not 1 <= n <= 128:
        raise Invalid(f"'n' must be an integer between 1 and 128, got {n!r}.", "invalid_n", "n")
    checks: tuple[tuple[str, Any, float, float], ...] = (
        ("max_tokens", is_int, 1, math.inf), ("temperature", is_num, 0, 2),
        ("top_p", is_num, 0, 1), ("seed", is_int, -math.inf, math.inf))
    for name, ok, lo, hi in checks:
        v = body.get(name)
        if v is not None and (not ok(v) or not lo <= v <= hi):
            raise Invalid(f"'{name}' must be a number in [{lo}, {hi}], got {v!r}.",
                          f"invalid_{name}", name)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise Invalid("'stop' must be a string or an array of strings.", "invalid_stop", "stop")
    if body.get("stream"):
        raise Invalid("stream=true is not supported by the simulator.", "unsupported", "stream")
    return {**body, "n": n, "stop": [s for s in stops if s]}


def count_words(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens ~= whitespace words of string contents and ``text`` parts."""
    total = 0
    for m in messages:
        c = m.get("content")
        for p in [c] if isinstance(c, str) else c if isinstance(c, list) else []:
            text = p if isinstance(p, str) else p.get("text") if isinstance(p, dict) else None
            total += len(text.split()) if isinstance(text, str) else 0
    return total


def finish(text: str, stops: list[str], max_tokens: int | None) -> tuple[str, str]:
    """Cut at the earliest stop string, then truncate to max_tokens words ("length")."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    text = text[: min(cuts)].rstrip() if cuts else text
    words = text.split()
    if max_tokens is not None and len(words) > max_tokens:
        return " ".join(words[:max_tokens]), "length"
    return text, "stop"


def completion(model: str, created: float, texts: list[tuple[str, str]],
               prompt_tokens: int, completion_tokens: int) -> web.Response:
    """A ``chat.completion`` reply; ``texts`` holds (content, finish_reason) per choice."""
    choices = [{"index": i, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": reason}
               for i, (text, reason) in enumerate(texts)]
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return web.json_response({
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
        "created": int(created), "model": model, "system_fingerprint": "cachesaver-simulator",
        "choices": choices, "usage": usage})
