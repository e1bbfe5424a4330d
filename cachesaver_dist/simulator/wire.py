"""OpenAI chat-completions wire format: request checks, error bodies, token counts, replies.

Beyond plain text: a request with ``tools`` (and ``tool_choice`` other than ``"none"``)
gets a deterministic fake call of the first (or the named) function, unless its last
message is a tool result; ``logprobs: true`` adds per-token log probabilities (tokens
are the whitespace-led words of the content, ``top_logprobs`` alternatives each);
``stream: true`` sends the same completion as ``chat.completion.chunk`` server-sent
events (role, one chunk per token, finish; a usage chunk with
``stream_options.include_usage``), then ``data: [DONE]``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from typing import Any

from aiohttp import web

from .config import is_int, is_num

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "invalid_request_error", 429: "requests"}
_TOKEN = re.compile(r"\s*\S+|\s+")


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


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise Invalid("Could not parse the request body as JSON.", "invalid_json") from None
    if not isinstance(body, dict):
        raise Invalid("Request body must be a JSON object.", "invalid_body")
    return body


def check_numbers(body: dict[str, Any], checks: tuple[tuple[str, Any, float, float], ...]) -> None:
    for name, ok, lo, hi in checks:
        v = body.get(name)
        if v is not None and (not ok(v) or not lo <= v <= hi):
            raise Invalid(f"'{name}' must be a number in [{lo}, {hi}], got {v!r}.",
                          f"invalid_{name}", name)


def check_stops(stop: Any, name: str) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise Invalid(f"'{name}' must be a string or an array of strings.", f"invalid_{name}",
                      name)
    return [s for s in stops if s]


async def read_request(request: web.Request) -> dict[str, Any]:
    """Parse and check a chat-completions body; return normalised params or raise Invalid."""
    body = await json_body(request)
    model, msgs = body.get("model"), body.get("messages")
    if not isinstance(model, str) or not model.strip():
        code = "missing_model" if model is None else "invalid_model"
        raise Invalid("'model' is required and must be a non-empty string.", code, "model")
    ok = isinstance(msgs, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and ("content" in m or m.get("tool_calls") or m.get("function_call")) for m in msgs)
    if not ok or not msgs:
        code = "missing_messages" if msgs is None else "invalid_messages"
        raise Invalid("'messages' is required and must be a non-empty array of "
                      "{'role': str, 'content': ...} objects (an assistant message may have "
                      "'tool_calls' instead of 'content').", code, "messages")
    n = 1 if body.get("n") is None else body["n"]
    if not is_int(n) or not 1 <= n <= 128:
        raise Invalid(f"'n' must be an integer between 1 and 128, got {n!r}.", "invalid_n", "n")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    check_numbers({**body, "max_tokens": limit}, (
        ("max_tokens", is_int, 1, math.inf), ("temperature", is_num, 0, 2),
        ("top_p", is_num, 0, 1), ("seed", is_int, -math.inf, math.inf),
        ("top_logprobs", is_int, 0, 20)))
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise Invalid("'top_logprobs' needs 'logprobs' to be true.", "invalid_top_logprobs",
                      "top_logprobs")
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance((t.get("function") or {}).get("name"), str)
            for t in tools):
        raise Invalid("'tools' must be an array of {'type': 'function', 'function': "
                      "{'name': str, 'parameters': {...}}} objects.", "invalid_tools", "tools")
    if not isinstance(body.get("stream_options") or {}, dict):
        raise Invalid("'stream_options' must be an object.", "invalid_stream_options",
                      "stream_options")
    stops = check_stops(body.get("stop"), "stop")
    return {**body, "n": n, "stop": stops, "max_tokens": limit,
            "tool": pick_tool([t["function"] for t in tools], body.get("tool_choice"), msgs)}


def pick_tool(functions: list[dict[str, Any]], choice: Any, messages: list[Any]
              ) -> dict[str, Any] | None:
    """The function to call: the one ``choice`` names, else the first; None for no call
    (no tools, ``"none"``, or the last message is a tool result)."""
    last = messages[-1] if messages else {}
    content = last.get("content")
    answered = last.get("role") == "tool" or (isinstance(content, list) and any(
        isinstance(p, dict) and p.get("type") == "tool_result" for p in content))
    if not functions or answered or choice == "none" or \
            (isinstance(choice, dict) and choice.get("type") == "none"):
        return None
    name = choice.get("name") or (choice.get("function") or {}).get("name") \
        if isinstance(choice, dict) else None
    return next((f for f in functions if f["name"] == name), functions[0])


def fake_arguments(schema: Any, text: str) -> dict[str, Any]:
    """Arguments for a JSON schema's properties, derived from the sample ``text``."""
    words = text.split() or ["x"]
    values = {"string": lambda i: words[i % len(words)], "integer": lambda i: len(words) + i,
              "number": lambda i: len(words) / (i + 2), "boolean": lambda i: i % 2 == 0,
              "array": lambda i: words[: i + 1], "object": lambda i: {}}
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict):
        return {"input": text}
    out = {}
    for i, (name, spec) in enumerate(props.items()):
        kind = spec.get("type") if isinstance(spec, dict) else None
        enum = spec.get("enum") if isinstance(spec, dict) else None
        out[name] = enum[i % len(enum)] if isinstance(enum, list) and enum else \
            values.get(kind if isinstance(kind, str) else "string", values["string"])(i)
    return out


def call_id(prefix: str, text: str, index: int) -> str:
    return prefix + hashlib.sha256(f"{text}|{index}".encode()).hexdigest()[:24]


def tokens(text: str) -> list[str]:
    """The pieces a completion is counted and streamed in: whitespace-led words."""
    return _TOKEN.findall(text)


def token_logprobs(text: str, top: int) -> list[dict[str, Any]]:
    """Deterministic log probabilities for each token, with ``top`` alternatives."""
    out = []
    for i, tok in enumerate(tokens(text)):
        h = hashlib.sha256(f"{i}|{tok}".encode()).digest()
        lp = -h[0] / 64

        def entry(t: str, p: float) -> dict[str, Any]:
            return {"token": t, "logprob": p, "bytes": list(t.encode())}

        alts = [entry(tok, lp)] + [entry(f" alt{h[k] % 97}", lp - k - 0.5)
                                   for k in range(1, top)]
        out.append({**entry(tok, lp), "top_logprobs": alts[:top]})
    return out


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


def choice(index: int, text: str, reason: str, req: dict[str, Any]) -> dict[str, Any]:
    """One choice: the text, or a call of ``req["tool"]``; logprobs if asked for."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    tool = req.get("tool")
    if tool is not None:
        args = fake_arguments(tool.get("parameters"), text)
        message.update(content=None, tool_calls=[{
            "id": call_id("call_", text, index), "type": "function",
            "function": {"name": tool["name"], "arguments": json.dumps(args)}}])
        reason = "tool_calls"
    logprobs = None
    if req.get("logprobs") and tool is None:
        logprobs = {"content": token_logprobs(text, req.get("top_logprobs") or 0),
                    "refusal": None}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}


def completion(model: str, created: float, choices: list[dict[str, Any]],
               prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A ``chat.completion`` body."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
            "created": int(created), "model": model, "system_fingerprint": "cachesaver-simulator",
            "choices": choices, "usage": usage}


def chunks(body: dict[str, Any], req: dict[str, Any]) -> list[tuple[str | None, Any]]:
    """The completion ``body`` as ``chat.completion.chunk`` events, one choice after another."""
    usage = (req.get("stream_options") or {}).get("include_usage")
    base = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"],
            "model": body["model"], "system_fingerprint": body["system_fingerprint"],
            **({"usage": None} if usage else {})}

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None,
              reason: str | None = None) -> tuple[None, dict[str, Any]]:
        return None, {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                           "finish_reason": reason}]}

    out: list[tuple[str | None, Any]] = []
    for c in body["choices"]:
        i, msg = c["index"], c["message"]
        out.append(chunk(i, {"role": "assistant", "content": "", "refusal": None}))
        for j, call in enumerate(msg.get("tool_calls") or []):
            fn = call["function"]
            out.append(chunk(i, {"tool_calls": [{"index": j, "id": call["id"], "type": "function",
                                                 "function": {"name": fn["name"],
                                                              "arguments": ""}}]}))
            out.append(chunk(i, {"tool_calls": [{"index": j,
                                                 "function": {"arguments": fn["arguments"]}}]}))
        entries = (c.get("logprobs") or {}).get("content") or []
        for k, tok in enumerate(tokens(msg.get("content") or "")):
            lp = {"content": [entries[k]], "refusal": None} if k < len(entries) else None
            out.append(chunk(i, {"content": tok}, lp))
        out.append(chunk(i, {}, reason=c["finish_reason"]))
    if usage:
        out.append((None, {**base, "choices": [], "usage": body["usage"]}))
    out.append((None, "[DONE]"))
    return out
