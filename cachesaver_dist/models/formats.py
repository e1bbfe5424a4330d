"""How the drop-in clients store a provider's answers and give them back.

A sample is plain msgpack data: what the provider returned, as the SDK's own JSON
(``model_dump(mode="json", exclude_unset=True, by_alias=True)``), so it comes back as
the object the SDK type's ``construct`` (the lenient builder the SDKs use for responses
themselves) makes of it (``build``): tool calls, logprobs, finish reasons, ids and
fields this code does not know survive.

* chat completions (OpenAI, Together and OpenAI-compatible servers): one sample per
  choice, ``{"choice": ..., "completion": <the response without choices and usage>,
  "usage": <this choice's share>}``. A response is rebuilt from its samples: ``id``,
  ``created``, ``model``, ``system_fingerprint`` and other response fields from the
  first sample, its choices renumbered ``0..n-1``.
* Anthropic messages: one sample per message (the API has no ``n``), the message as is.

Usage: a call's usage is split over its samples, every integer count as evenly as
integers allow (the first ``count % n`` samples get one more), floats divided, other
values copied; a response's usage is the sum of its samples' shares. So a response
made of all the samples of one provider call (the usual case) reports exactly the
provider's usage, and one assembled from several calls or from cache reports the sum
of what its samples cost.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from ..errors import CacheSaverError, ModelError
from ..typedefs import Response

_PIECES = re.compile(r"\s*\S+|\s+")


def dump(obj: Any) -> dict[str, Any]:
    """The SDK object as plain JSON data, exactly the fields the provider sent."""
    if not hasattr(obj, "model_dump"):
        raise ModelError(f"the SDK returned a {type(obj).__name__}, not a response object")
    data: dict[str, Any] = obj.model_dump(mode="json", exclude_unset=True, by_alias=True,
                                          warnings=False)
    return data


def split_n(n: int, max_n: int | None) -> list[int]:
    """Sample counts per provider call: ``n`` in calls of at most ``max_n``."""
    size = max_n or n
    return [size] * (n // size) + ([n % size] if n % size else [])


def split_usage(usage: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """``usage`` shared over ``n`` samples (see the module docstring)."""
    shares: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in usage.items():
        parts: list[Any]
        if isinstance(value, dict):
            parts = split_usage(value, n)
        elif isinstance(value, int) and not isinstance(value, bool):
            q, r = divmod(value, n)
            parts = [q + (i < r) for i in range(n)]
        elif isinstance(value, float):
            parts = [value / n] * n
        else:
            parts = [value] * n
        for share, part in zip(shares, parts):
            share[key] = part
    return shares


def sum_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of usage shares: numbers added, nested counts summed, other values the first."""
    out: dict[str, Any] = {}
    for usage in usages:
        for key, value in usage.items():
            have = out.get(key)
            if key not in out or have is None:
                out[key] = value
            elif isinstance(have, dict) and isinstance(value, dict):
                out[key] = sum_usage([have, value])
            elif _number(have) and _number(value):
                out[key] = have + value
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _meta(finish: Any, body: dict[str, Any], prompt: Any, completion: Any) -> dict[str, Any]:
    """Sample metadata for the stats: finish reason, provider id, token share."""
    usage = {k: v for k, v in (("prompt_tokens", prompt), ("completion_tokens", completion))
             if _number(v)}
    return {"finish_reason": finish, "id": body.get("id"), "model": body.get("model"),
            "usage": usage}


def pieces(text: str) -> list[str]:
    """``text`` in whitespace-led words, as streamed (their concatenation is ``text``)."""
    return _PIECES.findall(text)


def build(model: Any, data: dict[str, Any]) -> Any:
    """``model.construct(**data)``, the object the SDK itself makes of a response, about 25
    times faster: pydantic's strict validation gives the same object (types, values, dumps,
    extras) when every value already has its field's type, since it converts nothing; only
    ``model_fields_set`` also lists the extras, as with the SDK's strict response
    validation. Data it refuses (a value of another type, a required field missing,
    pydantic 1) is built by ``construct``, as leniently as the SDK builds it."""
    try:
        return model.model_validate(data, strict=True)
    except (ValueError, TypeError, AttributeError):  # pydantic's ValidationError: a ValueError
        return model.construct(**data)


Create = Callable[..., Awaitable[Any]]


class ChatFormat:
    """Chat completions: ``client.chat.completions.create``; ``n`` samples per call."""

    name = "chat.completions"
    path = ("chat", "completions")
    has_n = True

    def __init__(self, completion: Any, chunk: Any, not_in_key: frozenset[str]) -> None:
        self.completion, self.chunk, self.not_in_key = completion, chunk, not_in_key

    async def generate(self, create: Create, kwargs: dict[str, Any], n: int,
                       max_n: int | None) -> Response:
        """``n`` samples, from calls of at most ``max_n`` choices (``n`` omitted when 1)."""
        sizes = split_n(n, max_n)
        raws = await asyncio.gather(*(create(**kwargs, **({"n": k} if k > 1 else {}))
                                      for k in sizes))
        data: list[Any] = []
        meta: list[dict[str, Any]] = []
        for raw, k in zip(raws, sizes):
            body = dump(raw)
            choices = sorted(body.pop("choices", None) or [], key=lambda c: c.get("index") or 0)
            if len(choices) != k:
                raise ModelError(f"the server returned {len(choices)} choices where {k} were "
                                 f"asked for (n={k}); if it ignores n, create the client "
                                 "with max_n=1")
            usage = body.pop("usage", None)
            shares = split_usage(usage, k) if isinstance(usage, dict) else [None] * k
            for i, (choice, share) in enumerate(zip(choices, shares)):
                sample = {"choice": choice, "completion": body}
                if share is not None:
                    sample["usage"] = share
                data.append(sample)
                share = share or {}
                meta.append({**_meta(choice.get("finish_reason"), body,
                                     share.get("prompt_tokens"), share.get("completion_tokens")),
                             "call_first": i == 0})  # each call paid its prompt
        return Response(data=data, metadata=meta)

    def assemble(self, samples: list[Any]) -> Any:
        """One response with every sample as a choice."""
        if not samples or not all(isinstance(s, dict) and isinstance(s.get("choice"), dict)
                                  and isinstance(s.get("completion"), dict) for s in samples):
            raise CacheSaverError("a stored sample is not a chat completion choice; another kind "
                                  "of client wrote samples under this model id (pass "
                                  "provider_id= to keep them apart)")
        body = dict(samples[0]["completion"])
        body["choices"] = [{**s["choice"], "index": i} for i, s in enumerate(samples)]
        usages = [s.get("usage") for s in samples]
        if all(isinstance(u, dict) for u in usages):
            body["usage"] = sum_usage(usages)
        return build(self.completion, body)

    def stream(self, completion: Any, options: Any) -> Iterator[Any]:
        """``completion`` as chunks, one choice after another: role, text pieces (one per
        logprob token when there are OpenAI-style logprobs), refusal, tool calls, finish;
        a usage chunk last with ``stream_options={"include_usage": True}``."""
        body = dump(completion)
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        base: dict[str, Any] = {k: body[k] for k in ("id", "created", "model", "system_fingerprint",
                                     "service_tier") if k in body}
        base["object"] = "chat.completion.chunk"
        if include_usage:
            base["usage"] = None

        def chunk(index: int, delta: dict[str, Any], logprobs: Any = None,
                  finish: Any = None) -> Any:
            return build(self.chunk, {**base, "choices": [{
                "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        for choice in body.get("choices") or []:
            i, msg = choice.get("index", 0), dict(choice.get("message") or {})
            role, content = msg.pop("role", "assistant"), msg.pop("content", None)
            refusal, calls = msg.pop("refusal", None), msg.pop("tool_calls", None) or []
            function_call = msg.pop("function_call", None)
            texts = {k: v for k, v in msg.items() if isinstance(v, str)}  # reasoning, ...
            others = {k: v for k, v in msg.items() if k not in texts and v is not None}
            first = {"role": role, **({"content": ""} if content is not None else {}), **others}
            yield chunk(i, first)
            for key, text in texts.items():
                yield chunk(i, {key: text})
            logprobs = choice.get("logprobs")
            entries = logprobs.get("content") if isinstance(logprobs, dict) else None
            if content and isinstance(entries, list) and entries and \
                    "".join(str(e.get("token")) for e in entries) == content:
                for e in entries:
                    yield chunk(i, {"content": e.get("token")}, {"content": [e]})
            elif content:
                lp = logprobs if isinstance(entries, list) else None
                for k, piece in enumerate(pieces(content)):
                    yield chunk(i, {"content": piece}, lp if k == 0 else None)
            if refusal:
                yield chunk(i, {"refusal": refusal})
            for j, call in enumerate(calls):
                yield chunk(i, {"tool_calls": [{"index": j, **call}]})
            if function_call:
                yield chunk(i, {"function_call": function_call})
            yield chunk(i, {}, finish=choice.get("finish_reason"))
        if include_usage:
            yield build(self.chunk, {**base, "choices": [], "usage": body.get("usage")})


class MessagesFormat:
    """Anthropic messages: ``client.messages.create``; one message per call."""

    name = "messages"
    path = ("messages",)
    has_n = False

    def __init__(self, not_in_key: frozenset[str]) -> None:
        self.not_in_key = not_in_key

    async def generate(self, create: Create, kwargs: dict[str, Any], n: int,
                       max_n: int | None) -> Response:
        """``n`` messages from ``n`` concurrent calls."""
        data = [dump(raw) for raw in await asyncio.gather(*(create(**kwargs)
                                                            for _ in range(n)))]
        meta = []
        for body in data:
            usage = body.get("usage") or {}
            counts = [usage.get(k) for k in ("input_tokens", "cache_creation_input_tokens",
                                             "cache_read_input_tokens")]
            prompt = sum(v for v in counts if isinstance(v, (int, float)))
            meta.append({**_meta(body.get("stop_reason"), body, prompt,
                                 usage.get("output_tokens")), "call_first": True})  # a call each
        return Response(data=data, metadata=meta)

    def assemble(self, samples: list[Any]) -> Any:
        from anthropic.types import Message

        if len(samples) != 1 or not isinstance(samples[0], dict) or \
                not isinstance(samples[0].get("content"), list):
            raise CacheSaverError("a stored sample is not an Anthropic message; another kind of "
                                  "client wrote samples under this model id (pass provider_id= "
                                  "to keep them apart)")
        return build(Message, samples[0])

    def stream(self, message: Any, options: Any = None) -> Iterator[Any]:
        """``message`` as the Messages API's stream events: ``message_start``, per content
        block ``content_block_start`` / ``_delta`` (text pieces, the tool input as one JSON
        delta, thinking and its signature) / ``_stop``, ``message_delta``, ``message_stop``."""
        from anthropic import types as t

        body = dump(message)
        usage = body.get("usage") or {}
        start = {**body, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {**usage, "output_tokens": 0}}
        yield build(t.RawMessageStartEvent, {"type": "message_start", "message": start})
        for i, block in enumerate(body.get("content") or []):
            kind = block.get("type")
            deltas: list[dict[str, Any]] = []
            if kind == "text":
                first = {**block, "text": ""}
                deltas = [{"type": "text_delta", "text": p} for p in pieces(block.get("text", ""))]
            elif kind in ("tool_use", "server_tool_use"):
                first = {**block, "input": {}}
                deltas = [{"type": "input_json_delta",
                           "partial_json": json.dumps(block.get("input", {}))}]
            elif kind == "thinking":
                first = {**block, "thinking": "", "signature": ""}
                deltas = [{"type": "thinking_delta", "thinking": block.get("thinking", "")},
                          {"type": "signature_delta", "signature": block.get("signature", "")}]
            else:
                first = block
            yield build(t.RawContentBlockStartEvent, {"type": "content_block_start", "index": i,
                                                      "content_block": first})
            for delta in deltas:
                yield build(t.RawContentBlockDeltaEvent, {"type": "content_block_delta",
                                                          "index": i, "delta": delta})
            yield build(t.RawContentBlockStopEvent, {"type": "content_block_stop", "index": i})
        delta = {k: body.get(k) for k in ("stop_reason", "stop_sequence")}
        delta.update({k: body[k] for k in ("stop_details", "container") if k in body})
        fields = t.MessageDeltaUsage.model_fields
        yield build(t.RawMessageDeltaEvent, {
            "type": "message_delta", "delta": delta,
            "usage": {k: v for k, v in usage.items() if k in fields}})
        yield build(t.RawMessageStopEvent, {"type": "message_stop"})
