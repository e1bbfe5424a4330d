"""Anthropic Messages wire format (``POST /v1/messages``): checks, errors, replies, events.

A request needs the ``anthropic-version`` header, ``model``, ``max_tokens`` and
``messages``; ``system`` counts as prompt text. Samples are drawn like chat completions
(``system`` joins the messages in the hash); one message per request. With ``tools``
(and ``tool_choice`` other than ``none``) the reply is a ``tool_use`` block calling the
named (or first) tool, unless the last message holds a ``tool_result``. ``stream: true``
sends ``message_start``, ``content_block_*``, ``message_delta`` and ``message_stop``
events (and a ``ping``).
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

from aiohttp import web

from . import wire
from .config import is_int, is_num

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 529: "overloaded_error"}
_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def error(status: int, message: str, code: str | None = None, param: str | None = None,
          headers: dict[str, str] | None = None) -> web.Response:
    """An Anthropic-style error response (``code``/``param`` are not part of this format)."""
    etype = _ERROR_TYPES.get(status, "api_error")
    request_id = f"req_{uuid.uuid4().hex[:24]}"
    body = {"type": "error", "error": {"type": etype, "message": message},
            "request_id": request_id}
    return web.json_response(body, status=status,
                             headers={**(headers or {}), "request-id": request_id})


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content or []
                    if isinstance(p, dict) and isinstance(p.get("text"), str))


async def read_request(request: web.Request) -> dict[str, Any]:
    """Parse and check a Messages body; return params normalised like chat completions."""
    if not request.headers.get("anthropic-version"):
        raise wire.Invalid("anthropic-version: header is required", "missing_version")
    body = await wire.json_body(request)
    model, msgs, limit = body.get("model"), body.get("messages"), body.get("max_tokens")
    if not isinstance(model, str) or not model.strip():
        raise wire.Invalid("model: Field required", "invalid_model", "model")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise wire.Invalid(f"max_tokens: must be an integer >= 1, got {limit!r}",
                           "invalid_max_tokens", "max_tokens")
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant")
            and isinstance(m.get("content"), (str, list)) for m in msgs):
        raise wire.Invalid("messages: must be a non-empty array of {'role': 'user'|'assistant',"
                           " 'content': str | [blocks]}", "invalid_messages", "messages")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise wire.Invalid("system: must be a string or an array of text blocks",
                           "invalid_system", "system")
    wire.check_numbers(body, (("temperature", is_num, 0, 1), ("top_p", is_num, 0, 1),
                              ("top_k", is_int, 0, math.inf)))
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise wire.Invalid("tools: each tool needs a 'name'", "invalid_tools", "tools")
    functions = [{"name": t["name"], "parameters": t.get("input_schema")} for t in tools]
    messages = ([{"role": "system", "content": _text(system)}] if system else []) + msgs
    return {**body, "n": 1, "messages": messages,
            "stop": wire.check_stops(body.get("stop_sequences"), "stop_sequences"),
            "max_tokens": limit, "tool": wire.pick_tool(functions, body.get("tool_choice"), msgs)}


def message(model: str, raw: str, req: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
    """A ``message`` body for the sample ``raw`` (cut at stop sequences and max_tokens)."""
    text, reason = wire.finish(raw, req["stop"], req["max_tokens"])
    hit = [s for s in req["stop"] if s in raw]
    stop_reason = "stop_sequence" if reason == "stop" and hit else _REASONS[reason]
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    tool = req.get("tool")
    if tool is not None:
        content = [{"type": "tool_use", "id": wire.call_id("toolu_", text, 0),
                    "name": tool["name"], "input": wire.fake_arguments(tool["parameters"], text)}]
        stop_reason = "tool_use"
    return {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": model, "content": content, "stop_reason": stop_reason,
            "stop_sequence": min(hit, key=raw.find) if stop_reason == "stop_sequence" else None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": len(text.split()),
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "service_tier": "standard"}}


def events(body: dict[str, Any]) -> list[tuple[str | None, Any]]:
    """The message ``body`` as Messages streaming events: ``(event name, data)``."""
    usage = body["usage"]
    start = {**body, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 0}}
    out: list[tuple[str | None, Any]] = [("message_start", {"type": "message_start",
                                                            "message": start}),
                                         ("ping", {"type": "ping"})]
    for i, block in enumerate(body["content"]):
        if block["type"] == "tool_use":
            first, deltas = {**block, "input": {}}, [{"type": "input_json_delta",
                                                      "partial_json": json.dumps(block["input"])}]
        else:
            first = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": t} for t in wire.tokens(block["text"])]
        out.append(("content_block_start", {"type": "content_block_start", "index": i,
                                            "content_block": first}))
        out += [("content_block_delta", {"type": "content_block_delta", "index": i,
                                         "delta": d}) for d in deltas]
        out.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    out.append(("message_delta", {"type": "message_delta",
                                  "delta": {"stop_reason": body["stop_reason"],
                                            "stop_sequence": body["stop_sequence"]},
                                  "usage": {"output_tokens": usage["output_tokens"]}}))
    out.append(("message_stop", {"type": "message_stop"}))
    return out
