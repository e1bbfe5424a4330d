"""Bad input through ``OnlineAPI``: a table of cases, each refused with a clear
``InvalidRequestError`` (the regex names the field and the problem) or served.

For every case, through both ``request()`` and ``batch_request()``, on a real Redis
with the model in-process:

* a refused request is refused before the pipeline even connects: nothing at all is
  under the test's prefix afterwards;
* a refused request among good ones sent concurrently (one batcher batch) fails only
  itself: the good ones are served, and no key of the refused one is written;
* a refused request in a ``Batch`` refuses that batch before any of it is sent;
* no message anywhere says ``request_id ''``.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from typing import Any

import pytest

from cachesaver_dist import (
    Batch,
    GenerationError,
    InvalidRequestError,
    OnlineAPI,
    Request,
    Response,
    SimModel,
    SingleRequestModel,
)
from cachesaver_dist.prepare import prepare
from cachesaver_dist.protocol import Keys


def note(message: str) -> None:
    """Every error message: it never names a request by an empty id."""
    assert "request_id ''" not in message and 'request_id ""' not in message, message


@dataclass(frozen=True)
class Extra(Request):
    """A subclass with one decoding field, which becomes part of the prompt key."""

    extra: Any = None


def _deep(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def _cycle() -> list:
    value: list = []
    value.append(value)
    return value




def any_of(*patterns: str) -> str:
    """One pattern for messages that differ between request() and a Batch."""
    return "|".join(f"(?:{p})" for p in patterns)


SURROGATE = "lone \udc80 surrogate"
REFUSED = "refused"
SERVED = "served"

# (id, request, expected): a regex the InvalidRequestError message must match, or SERVED.
CASES: list[tuple[str, Any, str]] = [
    # n
    ("n-zero-is-empty", Request("p", 0, "b", "ns"), SERVED),  # as the original: no samples
    ("n-negative", Request("p", -3, "b", "ns"), r"n must be an int from 0 .*got -3"),
    ("n-huge", Request("p", 10**9, "b", "ns"), r"n must be an int from 0 to 10000, got 1000000000"),
    ("n-just-over", Request("p", 10_001, "b", "ns"), r"n must be .*got 10001"),
    ("n-bool", Request("p", True, "b", "ns"), r"n must be an int .*got True"),
    ("n-float", Request("p", 1.0, "b", "ns"), r"n must be an int .*got 1\.0"),
    ("n-str", Request("p", "2", "b", "ns"), r"n must be an int .*got '2'"),
    ("n-none", Request("p", None, "b", "ns"), r"n must be an int .*got None"),
    # prompt
    ("prompt-int", Request(123, 1, "b", "ns"), r"prompt must be a str or .*got int"),
    ("prompt-none", Request(None, 1, "b", "ns"), r"prompt must be .*got NoneType"),
    ("prompt-bytes", Request(b"hi", 1, "b", "ns"), r"prompt must be .*got bytes"),
    ("prompt-empty-list", Request([], 1, "b", "ns"), r"prompt must be .*non-empty list"),
    ("prompt-message-no-content", Request([{"role": "user"}], 1, "b", "ns"),
     r"prompt must be .*chat messages.*: prompt\[0\] has no 'content'"),
    ("prompt-message-int-content", Request([{"role": "user", "content": 5}], 1, "b", "ns"),
     r"prompt must be .*chat messages.*: prompt\[0\]\['content'\] is int"),
    ("prompt-message-none-content",
     Request([{"role": "user", "content": "q"}, {"role": "assistant", "content": None}], 1, "b",
             "ns"), r"prompt\[1\]\['content'\] is NoneType .*None only beside 'tool_calls'"),
    ("prompt-list-of-str", Request(["hi"], 1, "b", "ns"),
     r"prompt must be .*got list: prompt\[0\] is a str"),
    ("prompt-tool-call-turn", Request([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], 1, "b", "ns"), SERVED),
    ("prompt-huge", Request("x" * 2_000_000, 1, "b", "ns"),
     r"request is \d+ bytes encoded, over the limit of 1048576"),
    ("prompt-surrogate", Request(SURROGATE, 1, "b", "ns"),
     r"field 'prompt' is not valid text: character 5 \('\\udc80'\) is a lone surrogate"),
    ("prompt-message-content-surrogate",
     Request([{"role": "user", "content": "ok \ud800"}], 1, "b", "ns"),
     r"field 'prompt'\[0\]\['content'\] is not valid text: character 3"),
    ("prompt-content-part-surrogate",
     Request([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}], 1, "b", "ns"),
     r"field 'prompt'\[0\]\['content'\]\[0\]\['text'\] is not valid text"),
    ("prompt-message-key-surrogate",
     Request([{"role": "user", "content": "x", "\udcff": "y"}], 1, "b", "ns"),
     r"a key of field 'prompt'\[0\] is not valid text"),
    ("prompt-message-int-key", Request([{"role": "user", "content": "x", 1: "y"}], 1, "b", "ns"),
     r"field 'prompt'\[0\] has a key 1 of type int; dict keys must be str"),
    ("prompt-message-role-object", Request([{"role": object(), "content": "x"}], 1, "b", "ns"),
     r"field 'prompt'\[0\]\['role'\] is a object, which cannot be stored"),
    ("prompt-chat", Request([{"role": "user", "content": "chat ok"}], 1, "b", "ns"), SERVED),
    ("prompt-chat-tuple", Request(({"role": "user", "content": "tuple ok"},), 1, "b", "ns"),
     SERVED),
    ("prompt-chat-parts",
     Request([{"role": "user", "content": [{"type": "text", "text": "parts ok"}]}], 1, "b",
             "ns"), SERVED),
    ("prompt-unicode", Request("Grüße, 世界 🚀 \u200b", 1, "b", "ns"), SERVED),
    ("prompt-empty-str", Request("", 1, "b", "ns"), SERVED),
    # namespace
    ("ns-int", Request("p", 1, "b", 5), r"namespace must be a str, got int 5"),
    ("ns-bytes", Request("p", 1, "b", b"ns"), r"namespace must be a str, got bytes"),
    ("ns-empty", Request("p", 1, "b", ""), r"namespace must have 1 to 256 characters, got 0"),
    ("ns-257", Request("p", 1, "b", "n" * 257), r"namespace must have 1 to 256 .*got 257"),
    ("ns-nul", Request("p", 1, "b", "a\x00b"), r"namespace 'a\\x00b' contains control characters"),
    ("ns-newline", Request("p", 1, "b", "bad\nname"), r"namespace .* contains control characters"),
    ("ns-tab", Request("p", 1, "b", "a\tb"), r"contains control characters"),
    ("ns-del", Request("p", 1, "b", "a\x7f"), r"contains control characters"),
    ("ns-surrogate", Request("p", 1, "b", "ns\ud800"),
     r"namespace is not valid text: character 2 \('\\ud800'\) is a lone surrogate"),
    ("ns-256", Request("p", 1, "b", "n" * 256), SERVED),
    ("ns-unicode", Request("p", 1, "b", "名前空間 🚀 ñ"), SERVED),
    ("ns-punctuation", Request("p", 1, "b", "a b/c|d:e*f?"), SERVED),
    ("ns-none-is-default", Request("p", 1, "b", None), SERVED),
    # request_id
    ("rid-int", Request("p", 1, 7, "ns"), r"request_id must be a str .*got int 7"),
    ("rid-float", Request("p", 1, 1.5, "ns"), r"request_id must be a str .*got float 1\.5"),
    ("rid-tuple", Request("p", 1, ("a",), "ns"), r"request_id must be a str .*got tuple"),
    ("rid-bytes", Request("p", 1, b"id", "ns"), r"request_id must be a str .*got bytes"),
    ("rid-surrogate", Request("p", 1, "id\udc80", "ns"),
     r"request_id is not valid text: character 2"),
    ("rid-1025", Request("p", 1, "r" * 1025, "ns"), r"request_id has 1025 characters; use at most"),
    ("rid-1024", Request("p", 1, "r" * 1024, "ns"), SERVED),
    ("rid-empty", Request("p", 1, "", "ns"), SERVED),
    ("rid-none", Request("p", 1, None, "ns"), SERVED),
    ("rid-unicode", Request("p", 1, "ид-✓", "ns"), SERVED),
    # fields of a subclass
    ("field-object", Extra("p", 1, "b", "ns", extra=object()),
     r"field 'extra' is a object, which cannot be stored"),
    ("field-set", Extra("p", 1, "b", "ns", extra={1, 2}), r"field 'extra' is a set"),
    ("field-lambda", Extra("p", 1, "b", "ns", extra=lambda: 1), r"field 'extra' is a function"),
    ("field-complex", Extra("p", 1, "b", "ns", extra=1j), r"field 'extra' is a complex"),
    ("field-bytearray", Extra("p", 1, "b", "ns", extra=bytearray(b"x")),
     r"field 'extra' is a bytearray"),
    ("field-int-over-64-bits", Extra("p", 1, "b", "ns", extra=2**64),
     r"field 'extra' is an int outside 64 bits"),
    ("field-int-under-64-bits", Extra("p", 1, "b", "ns", extra=-(2**63) - 1),
     r"field 'extra' is an int outside 64 bits"),
    ("field-nested-int-too-big", Extra("p", 1, "b", "ns", extra={"a": [1, 2**70]}),
     r"field 'extra'\['a'\]\[1\] is an int outside 64 bits"),
    ("field-too-deep", Extra("p", 1, "b", "ns", extra=_deep(40)),
     r"field 'extra'(\[0\])+ nests deeper than 32 levels"),
    ("field-cycle", Extra("p", 1, "b", "ns", extra=_cycle()), r"nests deeper than 32 levels"),
    ("field-surrogate", Extra("p", 1, "b", "ns", extra="\udfff"),
     r"field 'extra' is not valid text"),
    ("field-nested-surrogate", Extra("p", 1, "b", "ns", extra={"k": ["ok", "x\udc80"]}),
     r"field 'extra'\['k'\]\[1\] is not valid text"),
    ("field-key-surrogate", Extra("p", 1, "b", "ns", extra={"\udc80": 1}),
     r"a key of field 'extra' is not valid text"),
    ("field-key-int", Extra("p", 1, "b", "ns", extra={1: "x"}),
     r"field 'extra' has a key 1 of type int; dict keys must be str"),
    ("field-key-tuple", Extra("p", 1, "b", "ns", extra={("a",): "x"}),
     r"has a key \('a',\) of type tuple"),
    ("field-u64-max", Extra("p", 1, "b", "ns", extra=2**64 - 1), SERVED),
    ("field-i64-min", Extra("p", 1, "b", "ns", extra=-(2**63)), SERVED),
    ("field-nan", Extra("p", 1, "b", "ns", extra=math.nan), SERVED),
    ("field-bytes", Extra("p", 1, "b", "ns", extra=b"\xff\x00"), SERVED),
    ("field-nested-ok", Extra("p", 1, "b", "ns", extra={"a": [1, 2.5, None, True, ("t",)]}),
     SERVED),
    ("field-depth-32", Extra("p", 1, "b", "ns", extra=_deep(32)), SERVED),
    # not a Request at all
    ("not-a-request-str", "just a prompt",
     any_of(r"expected a cachesaver_dist\.Request .*got str",
            r"Batch\.requests\[1\] is a str, not a Request")),
    ("not-a-request-dict", {"prompt": "p", "n": 1},
     any_of(r"expected a cachesaver_dist\.Request .*got dict",
            r"Batch\.requests\[1\] is a dict, not a Request")),
    ("not-a-request-none", None,
     any_of(r"expected a cachesaver_dist\.Request .*got NoneType",
            r"Batch\.requests\[1\] is a NoneType, not a Request")),
]


def api(model: Any, redis_url: str, keys: Keys, **kw: Any) -> OnlineAPI:
    return OnlineAPI(model, cache=redis_url, prefix=keys.prefix, reply_timeout=1.0,
                     request_timeout=15, **kw)


async def all_keys(redis: Any, keys: Keys) -> list[str]:
    return sorted([k.decode() async for k in redis.scan_iter(match=f"{keys.prefix}*", count=1000)])


async def prompt_keys_written(redis: Any, keys: Keys) -> set[str]:
    """The prompt keys that have samples, generation state or waiters under the prefix."""
    found = set()
    for kind in ("s:", "g:", "w:"):
        async for k in redis.scan_iter(match=f"{keys.prefix}{kind}*", count=1000):
            found.add(k.decode()[len(keys.prefix) + len(kind):])
    return found


def key_of(pipe: OnlineAPI, request: Request) -> str:
    return prepare(request, run=pipe.run, route=pipe.route, model_id=pipe.model_id).key


def check_refusal(exc: BaseException, pattern: str) -> None:
    assert isinstance(exc, InvalidRequestError), repr(exc)
    note(str(exc))
    assert re.search(pattern, str(exc)), f"{str(exc)[:300]!r} does not match {pattern!r}"
    assert len(str(exc)) < 600, "the message repeats the whole input"


@pytest.mark.parametrize("case_id, bad, expected", CASES, ids=[c[0] for c in CASES])
async def test_request(redis_url, keys, redis, case_id, bad, expected):
    model = SimModel("bad-input")
    goods = [Request(f"good {case_id} {i}", 1, f"g{i}", "ns") for i in range(2)]
    pipe = api(model, redis_url, keys, batch_size=8, timeout=0.05)
    try:
        if expected != SERVED:
            # Alone, before the pipeline ever connected: refused, nothing written at all.
            with pytest.raises(InvalidRequestError) as info:
                await pipe.request(bad)
            check_refusal(info.value, expected)
            assert await all_keys(redis, keys) == []
        # With good requests in the same batcher batch: only the bad one fails.
        results = await asyncio.wait_for(asyncio.gather(
            pipe.request(goods[0]), pipe.request(bad), pipe.request(goods[1]),
            return_exceptions=True), 20)
        for good, result in zip(goods, (results[0], results[2])):
            assert isinstance(result, Response), f"good request failed: {result!r}"
            assert len(result.data) == 1 and result.cached == [False], good
        expected_keys = {key_of(pipe, g) for g in goods}
        writes = expected == SERVED and bad.n > 0  # n=0 is served with nothing, sends nothing
        if expected == SERVED:
            assert isinstance(results[1], Response), f"should be served: {results[1]!r}"
            assert len(results[1].data) == bad.n
        else:
            check_refusal(results[1], expected)
        if writes:
            expected_keys.add(key_of(pipe, bad))
        assert await prompt_keys_written(redis, keys) == expected_keys
        records = [k async for k in redis.scan_iter(match=f"{keys.prefix}r:*")]
        reserved = sum([await redis.hlen(k) for k in records])
        assert reserved == len(goods) + writes
        prompts = {str(g.prompt) for g in goods}
        if writes:  # an in-process model gets the caller's request, tuples and all
            prompts.add(str(bad.prompt))
        assert {p for p, _ in model.calls} == prompts

        # In a Batch: a refused request refuses the whole batch before any is sent.
        batch_good = Request(f"batch good {case_id}", 1, "bg", "ns")
        before = await prompt_keys_written(redis, keys)
        if expected == SERVED:
            replies = await asyncio.wait_for(pipe.batch_request(Batch([batch_good, bad])), 20)
            assert [len(r.data) for r in replies] == [1, bad.n]
            assert key_of(pipe, batch_good) in await prompt_keys_written(redis, keys)
        else:
            with pytest.raises(InvalidRequestError) as info:
                await pipe.batch_request(Batch([batch_good, bad]))
            check_refusal(info.value, expected)
            assert await prompt_keys_written(redis, keys) == before
            assert f"batch good {case_id}" not in {p for p, _ in model.calls}
    finally:
        await pipe.close()


@pytest.mark.parametrize("case_id, make, pattern", [
    ("none", lambda: Batch(None), r"Batch\(requests\) must be a list of Request objects, "
                                  r"got NoneType"),
    ("str", lambda: Batch("abc"), r"must be a list of Request objects, got str"),
    ("dict", lambda: Batch({"a": Request("p", 1, "a", "ns")}), r"must be a list .*got dict"),
    ("request-not-in-list", lambda: Batch(Request("p", 1, "a", "ns")),
     r"must be a list .*got Request"),
    ("int-item", lambda: Batch([1]), r"Batch\.requests\[0\] is a int, not a Request"),
    ("str-item", lambda: Batch([Request("p", 1, "a", "ns"), "p2"]),
     r"Batch\.requests\[1\] is a str"),
    ("none-item", lambda: Batch([Request("p", 1, "a", "ns"), Request("q", 1, "b", "ns"), None]),
     r"Batch\.requests\[2\] is a NoneType"),
])
def test_batch_must_hold_requests(case_id, make, pattern):
    with pytest.raises(InvalidRequestError, match=pattern) as info:
        make()
    note(str(info.value))


async def test_batch_changed_after_construction_and_mixed(redis_url, keys, redis):
    model = SimModel("batch-edits")
    async with api(model, redis_url, keys) as pipe:
        batch = Batch([Request("b1", 1, "1", "ns")])
        batch.requests.append(42)  # a list can be changed after the check
        with pytest.raises(InvalidRequestError, match=r"expected a cachesaver_dist\.Request"
                                                      r".*got int") as info:
            await pipe.batch_request(batch)
        note(str(info.value))
        mixed = Batch([Request("b2", 1, "1", "ns"), Request("b3", 2, "2", "ns\n"),
                       Request("b4", 1, "3", "ns")])
        with pytest.raises(InvalidRequestError, match="control characters") as info:
            await pipe.batch_request(mixed)
        note(str(info.value))
        assert await prompt_keys_written(redis, keys) == set()
        assert model.calls == []
        assert await pipe.batch_request(Batch([])) == []
        served = await pipe.batch_request(Batch((Request("t1", 1, "1", "ns"),
                                                 Request("t2", 2, "2", "ns"))))
        assert [len(r.data) for r in served] == [1, 2]


@pytest.mark.parametrize("case_id, kwargs, error, pattern", [
    ("batch_size-0", {"batch_size": 0}, InvalidRequestError, r"batch_size must be a positive int"),
    ("batch_size-negative", {"batch_size": -4}, InvalidRequestError, r"batch_size must be"),
    ("batch_size-bool", {"batch_size": True}, InvalidRequestError, r"batch_size must be"),
    ("batch_size-float", {"batch_size": 1.5}, InvalidRequestError, r"batch_size must be"),
    ("batch_size-str", {"batch_size": "32"}, InvalidRequestError, r"batch_size must be"),
    ("concurrency-0", {"concurrency": 0}, InvalidRequestError, r"concurrency must be"),
    ("max_prompt_bytes-0", {"max_prompt_bytes": 0}, InvalidRequestError, r"max_prompt_bytes"),
    ("run_ttl_s-negative", {"run_ttl_s": -1}, InvalidRequestError, r"run_ttl_s must be"),
    ("run_ttl_s-huge", {"run_ttl_s": 10**20}, InvalidRequestError,
     r"run_ttl_s must be at most \d+ seconds \(10 years\), got 10+$"),
    ("run-bad-chars", {"run": "bad id!"}, InvalidRequestError, r"run id 'bad id!' is not valid"),
    ("run-empty", {"run": ""}, InvalidRequestError, r"run id '' is not valid"),
    ("run-int", {"run": 5}, InvalidRequestError, r"run id 5 is not valid"),
    ("run-129", {"run": "r" * 129}, InvalidRequestError, r"1-128 characters"),
    ("run-surrogate", {"run": "r\udc80"}, InvalidRequestError, r"run id .* is not valid"),
    ("prefix-surrogate", {"prefix": "p\udc80:"}, InvalidRequestError,
     r"prefix is not valid text: character 1"),
    ("prefix-empty", {"prefix": ""}, InvalidRequestError, r"prefix must be a non-empty str"),
    ("prefix-int", {"prefix": 5}, InvalidRequestError, r"prefix must be a non-empty str, got int"),
    ("timeout-nan", {"timeout": float("nan")}, InvalidRequestError,
     r"timeout must be a number of seconds >= 0, got nan"),
    ("reply_timeout-negative", {"reply_timeout": -0.5}, InvalidRequestError,
     r"reply_timeout must be"),
    ("request_timeout-negative", {"request_timeout": -5}, InvalidRequestError,
     r"request_timeout must be"),
    ("request_timeout-nan", {"request_timeout": math.nan}, InvalidRequestError,
     r"request_timeout must be .*nan"),
    ("request_timeout-inf", {"request_timeout": math.inf}, InvalidRequestError,
     r"request_timeout must be .*inf"),
    ("timeout-str", {"timeout": "1"}, InvalidRequestError, r"timeout must be a number"),
    ("model-empty", {"model": ""}, InvalidRequestError, r"model must be a non-empty str"),
    ("model-unservable", {"model": "some-model"}, InvalidRequestError,
     r"model name 'some-model' is none of 'sim:<name>'.*so no batch worker can serve it"),
    ("model-sim-unnamed", {"model": "sim:"}, InvalidRequestError,
     r"model name 'sim:' is none of 'sim:<name>'"),
    ("model-dropin-without-model", {"model": "dropin:openai"}, InvalidRequestError,
     r"model name 'dropin:openai' is none of .*'dropin:<provider>:<model>'"),
    ("model-surrogate", {"model": "sim:\udc80"}, InvalidRequestError,
     r"model is not valid text"),
    ("model-none", {"model": None}, TypeError, r"has neither request\(\) nor batch_request\(\)"),
    ("model-object", {"model": object()}, TypeError, r"has neither request\(\)"),
    ("model_id-surrogate", {"model_id": "m\ud800"}, InvalidRequestError,
     r"model_id is not valid text"),
    ("model_id-too-long", {"model_id": "m" * 300}, InvalidRequestError,
     r"model_id has 300 characters; use at most"),
    ("model-name-too-long", {"model": "sim:" + "x" * 300}, InvalidRequestError,
     r"model name has 304 characters; use at most 200"),
])
async def test_bad_arguments(redis_url, keys, redis, case_id, kwargs, error, pattern):
    kwargs = {"model": SimModel("args"), **kwargs}
    kwargs.setdefault("prefix", keys.prefix)
    with pytest.raises(error, match=pattern) as info:
        OnlineAPI(cache=redis_url, **kwargs)
    note(str(info.value))
    assert await all_keys(redis, keys) == []


async def test_longest_allowed_ids_are_served(redis_url, keys):
    """The limits the argument checks enforce are the ones the workers accept."""
    model = SimModel("ids")
    async with api(model, redis_url, keys, model_id="m" * 193) as pipe:
        r = await asyncio.wait_for(pipe.request(Request("long id", 1, "a", "ns")), 20)
    assert len(r.data) == 1


async def test_a_failing_request_fails_alone_and_names_itself(redis_url, keys):
    """A request that passes the checks but whose generation fails for good fails only
    itself in its batcher batch; its message names it, and never as ``request_id ''``."""

    class Picky(SingleRequestModel):
        model = "picky"

        async def request(self, request):
            if "poison" in request.prompt:
                raise ValueError("prompt rejected by the provider")
            return Response(data=["ok"] * request.n)

    async with api(Picky(), redis_url, keys, batch_size=8, timeout=0.05) as pipe:
        results = await asyncio.wait_for(asyncio.gather(
            pipe.request(Request("fine 1", 1, "a", "ns")),
            pipe.request(Request("poison 1", 1, None, "ns")),
            pipe.request(Request("poison 2", 2, "", "ns2")),
            pipe.request(Request("poison 3", 1, "named", "ns")),
            pipe.request(Request("fine 2", 1, "b", "ns")),
            return_exceptions=True), 20)
    assert [type(r).__name__ for r in results] == [
        "Response", "GenerationError", "GenerationError", "GenerationError", "Response"]
    for r in results[1:4]:
        assert isinstance(r, GenerationError)
        note(str(r))
        assert "prompt rejected by the provider" in str(r) and "picky" in str(r)
    assert "request without request_id, namespace 'ns', n=1" in str(results[1])
    assert "request without request_id, namespace 'ns2', n=2" in str(results[2])
    assert "request_id 'named'" in str(results[3])


async def test_a_model_whose_methods_are_not_async_fails_its_requests_at_once(
        redis_url, keys, monkeypatch):
    """A ``def request`` (not ``async def``), one that raises before it could be awaited,
    or a plain ``def batch_request``: the requests fail at once with a GenerationError
    saying what to change, instead of waiting for ``request_timeout``; a model class
    passed for a model object is refused when the pipeline is made."""
    from workers import batch_worker

    class Plain:
        model = "plain"

        def request(self, request):
            return Response(data=["x"] * request.n)

    class RaisesAtOnce:
        model = "raises-at-once"

        def request(self, request):
            raise ValueError("boom")

    class PlainBatch:
        model = "plain-batch"

        def batch_request(self, batch):
            return [Response(data=["x"] * r.n) for r in batch.requests]

    for model, says in ((Plain(), "Plain.request() returned Response, not an awaitable"),
                        (RaisesAtOnce(), "boom"),
                        (PlainBatch(), "PlainBatch.batch_request() returned list")):
        async with OnlineAPI(model, cache=redis_url, prefix=keys.prefix, request_timeout=60,
                             reply_timeout=1.0) as pipe:
            with pytest.raises(GenerationError, match=re.escape(says)):
                await asyncio.wait_for(pipe.request(Request("p", 2, "a", "ns")), 10)
    async def broken(model, jobs):  # a failure of the call machinery itself
        raise RuntimeError("the call broke")

    monkeypatch.setattr(batch_worker, "generate", broken)
    async with OnlineAPI(Plain(), cache=redis_url, prefix=keys.prefix, request_timeout=60,
                         reply_timeout=1.0) as pipe:
        with pytest.raises(GenerationError, match="the model call failed: RuntimeError: the "
                                                  "call broke"):
            await asyncio.wait_for(pipe.request(Request("q", 1, "a", "ns")), 10)
    with pytest.raises(TypeError, match=r"is the class Plain, not a model object: pass an "
                                        r"instance, Plain\(\.\.\.\)"):
        OnlineAPI(Plain, cache=redis_url, prefix=keys.prefix)



@pytest.mark.parametrize("extra", ["L" * 190 + ":", "пространство 🚀:", "with space:"])
async def test_odd_prefixes_are_served_without_dead_letters(redis_url, keys, redis, extra):
    """A long or non-ASCII prefix works like any other: every wake-up token names a job
    under it, so none is set aside."""
    prefixed = Keys(keys.prefix + extra)  # under the test's prefix: cleaned up after
    model = SimModel("prefix")
    async with api(model, redis_url, prefixed) as pipe:
        responses = [await asyncio.wait_for(pipe.request(Request(f"q{i}", 1, "a", "ns")), 20)
                     for i in range(3)]
        deadline = asyncio.get_running_loop().time() + 5
        while await redis.llen(prefixed.cache_wake):  # every token was taken
            assert asyncio.get_running_loop().time() < deadline, "wake tokens left untaken"
            await asyncio.sleep(0.05)
    assert all(len(r.data) == 1 for r in responses)
    letters = await redis.xrange(prefixed.dead_letters)
    assert letters == [], [(f[b"kind"], f[b"reason"]) for _, f in letters]


# --- the CLI's numbers -----------------------------------------------------------------


WORKER_BATCH = ["worker", "batch", "--model", "sim:x"]
HUGE = "99999999999999999999"
ANY_COUNT = "from 1 to 2147483647"
TEN_YEARS = "315360000 (10 years)"


@pytest.mark.parametrize(("argv", "named"), [
    (["worker", "cache", "--run-ttl", "0"], f"--run-ttl: must be a whole number of seconds "
                                            f"from 1 to {TEN_YEARS}, got 0"),
    (["worker", "cache", "--max-jobs", "0"], f"--max-jobs: must be a whole number {ANY_COUNT}, "
                                             "got 0"),
    (["worker", "cache", "--poll-delay", "-1"], "--poll-delay: must be a number of seconds > 0"),
    (["worker", "cache", "--wait-replicas", "-1"], "--wait-replicas: must be a whole number "
                                                   "from 0 to 2147483647, got -1"),
    ([*WORKER_BATCH, "--batch-size", "0"], f"--batch-size: must be a whole number {ANY_COUNT}"),
    ([*WORKER_BATCH, "--concurrency", "0"], "--concurrency: must be a whole number from 1 to"),
    ([*WORKER_BATCH, "--lease", "-1"], "--lease: must be a number"),
    ([*WORKER_BATCH, "--batch-wait", "nan"], "--batch-wait: must be"),
    ([*WORKER_BATCH, "--max-n", "x"], "--max-n: expected a whole number"),
    (["fork", "a", "b", "--run-ttl", "-1"], f"--run-ttl: must be a whole number of seconds from "
                                            f"0 to {TEN_YEARS}, got -1"),
    (["import", "f.gz", "--run-ttl", "-1"], "--run-ttl: must be a whole number of seconds from "
                                            "0 to"),
    (["dead-letters", "--count", "0"], f"--count: must be a whole number {ANY_COUNT}, got 0"),
    (["top", "--interval", "0"], "--interval: must be a number of seconds > 0"),
    # too large: Redis (milliseconds in a signed 64-bit integer, XAUTOCLAIM's COUNT sizing an
    # allocation), Python's timedelta (arq's cron window) or a float (2**attempt) would fail
    # mid-run, or a huge value would be taken silently
    (["worker", "cache", "--run-ttl", HUGE], f"--run-ttl: must be a whole number of seconds "
                                             f"from 1 to {TEN_YEARS}, got {HUGE}"),
    (["worker", "cache", "--run-ttl", "315360001"], f"--run-ttl: must be a whole number of "
                                                    f"seconds from 1 to {TEN_YEARS}"),
    (["fork", "r1", "r2", "--run-ttl", HUGE], "--run-ttl: must be a whole number of seconds "
                                              f"from 0 to {TEN_YEARS}, got {HUGE}"),
    (["import", "f.gz", "--run-ttl", HUGE], f"--run-ttl: must be a whole number of seconds "
                                            f"from 0 to {TEN_YEARS}, got {HUGE}"),
    ([*WORKER_BATCH, "--lease", "1e20"], f"--lease: must be a number of seconds > 0 and at most "
                                         f"{TEN_YEARS}, got 1e20"),
    ([*WORKER_BATCH, "--concurrency", HUGE], f"--concurrency: must be a whole number from 1 to "
                                             f"10000, got {HUGE}"),
    ([*WORKER_BATCH, "--concurrency", "10001"], "--concurrency: must be a whole number from 1 "
                                                "to 10000, got 10001"),
    ([*WORKER_BATCH, "--batch-size", HUGE], f"--batch-size: must be a whole number {ANY_COUNT}"),
    ([*WORKER_BATCH, "--batch-wait", "1e20"], f"--batch-wait: must be a number of seconds from "
                                              f"0 to {TEN_YEARS}, got 1e20"),
    ([*WORKER_BATCH, "--sim-latency", "inf"], "--sim-latency: must be a number of seconds"),
    ([*WORKER_BATCH, "--max-n", HUGE], f"--max-n: must be a whole number {ANY_COUNT}"),
    ([*WORKER_BATCH, "--rpm", HUGE], f"--rpm: must be a whole number {ANY_COUNT}"),
    ([*WORKER_BATCH, "--tpm", "2147483648"], f"--tpm: must be a whole number {ANY_COUNT}"),
    ([*WORKER_BATCH, "--max-concurrent", HUGE], f"--max-concurrent: must be a whole number "
                                                f"{ANY_COUNT}"),
    ([*WORKER_BATCH, "--rate-window", HUGE], f"--rate-window: must be a whole number of "
                                             f"seconds from 1 to {TEN_YEARS}"),
    ([*WORKER_BATCH, "--retry-budget", "1025"], "--retry-budget: must be a whole number from 1 "
                                                "to 1000, got 1025"),
    ([*WORKER_BATCH, "--request-timeout", "1e300"], "--request-timeout: must be a number of "
                                                    "seconds > 0 and at most"),
    ([*WORKER_BATCH, "--wait-replicas", HUGE], "--wait-replicas: must be a whole number from 0 "
                                               "to 2147483647"),
    (["worker", "cache", "--max-jobs", HUGE], f"--max-jobs: must be a whole number {ANY_COUNT}, "
                                              f"got {HUGE}"),
    (["worker", "cache", "--poll-delay", "1e20"], f"--poll-delay: must be a number of seconds > "
                                                  f"0 and at most {TEN_YEARS}, got 1e20"),
    (["worker", "cache", "--metrics-port", "65536"], "--metrics-port: must be a whole number (a "
                                                     "TCP port) from 0 to 65535, got 65536"),
    (["worker", "cache", "--metrics-refresh", "1e20"], "--metrics-refresh: must be a number of "
                                                       "seconds > 0 and at most"),
    (["dead-letters", "--count", HUGE], f"--count: must be a whole number {ANY_COUNT}, "
                                        f"got {HUGE}"),
    (["top", "--interval", "1e20"], f"--interval: must be a number of seconds > 0 and at most "
                                    f"{TEN_YEARS}"),
    (["demo", "--puzzles", HUGE], "--puzzles: must be a whole number from 1 to 10000"),
    (["demo", "--latency", "1e20"], "--latency: must be a number of seconds from 0 to"),
    (["prune", "--older-than", "nan"], "--older-than: must be a number of days from 0 to 3650 "
                                       "(10 years), got nan"),
    (["prune", "--older-than", "inf"], "--older-than: must be a number of days from 0 to 3650"),
    (["prune", "--older-than", "1e400"], "--older-than: must be a number of days from 0 to"),
    (["prune", "--older-than", "-1"], "--older-than: must be a number of days from 0 to 3650"),
    (["prune", "--older-than", "3651"], "--older-than: must be a number of days from 0 to 3650"),
    (["prune", "--older-than", "x"], "--older-than: expected a number of days from 0 to 3650"),
    (["simulator", "--port", "70000"], "--port: must be a whole number (a TCP port) from 0 to "
                                       "65535, got 70000"),
    (["simulator", "--latency", "nan"], f"--latency: must be a number of seconds from 0 to "
                                        f"{TEN_YEARS}, got nan"),
    (["simulator", "--rate-limit", "-5"], f"--rate-limit: must be a whole number {ANY_COUNT}"),
    (["simulator", "--rate-window", "0"], "--rate-window: must be a number of seconds > 0"),
    (["simulator", "--max-words", HUGE], "--max-words: must be a whole number from 1 to 100000"),
])
def test_cli_numbers_out_of_range_are_refused_by_name(argv, named, capsys):
    """A worker given ``--run-ttl 0`` would drop run counters at once (and hand the same
    samples out again); ``--max-jobs 0`` would never run a job; ``--poll-delay 1e20`` would
    end in a traceback (arq's timedelta): each is refused before start, naming its range."""
    from cachesaver_dist.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert named in capsys.readouterr().err


def test_cli_numbers_in_range_are_taken():
    from cachesaver_dist.cli import build_parser

    args = build_parser().parse_args(["worker", "batch", "--model", "sim:x", "--batch-wait",
                                      "0", "--lease", "2.5", "--concurrency", "3"])
    assert (args.batch_wait, args.lease, args.concurrency) == (0.0, 2.5, 3)
    assert build_parser().parse_args(["fork", "a", "b", "--run-ttl", "0"]).run_ttl == 0
    # the largest values are taken
    most = build_parser().parse_args([
        "worker", "batch", "--model", "sim:x", "--lease", "315360000", "--concurrency", "10000",
        "--batch-size", "2147483647", "--retry-budget", "1000", "--metrics-port", "65535"])
    assert (most.lease, most.concurrency, most.batch_size, most.retry_budget,
            most.metrics_port) == (315360000.0, 10000, 2147483647, 1000, 65535)
    cache = build_parser().parse_args(["worker", "cache", "--run-ttl", "315360000",
                                       "--poll-delay", "315360000", "--max-jobs", "2147483647"])
    assert (cache.run_ttl, cache.poll_delay, cache.max_jobs) == (315360000, 315360000.0,
                                                                 2147483647)
    prune = build_parser().parse_args(["prune", "--older-than", "3650"])
    assert prune.older_than == 3650.0
    assert build_parser().parse_args(["prune", "--older-than", "0"]).older_than == 0.0


@pytest.mark.parametrize(("env", "value", "argv", "flag"), [
    ("CACHESAVER_LOG_FORMAT", "xml", ["stats"], "--log-format"),
    ("CACHESAVER_LOG_FORMAT", "xml", ["simulator"], "--log-format"),
    ("CACHESAVER_METRICS_PORT", "abc", ["worker", "cache"], "--metrics-port"),
    ("CACHESAVER_METRICS_PORT", "99999", ["worker", "batch", "--model", "sim:x"],
     "--metrics-port"),
])
def test_a_bad_default_from_the_environment_names_the_variable(env, value, argv, flag,
                                                              monkeypatch, capsys):
    """The user never typed the flag argparse names: the error says where the value came
    from; the same value given as the flag is refused without that note."""
    from cachesaver_dist.cli import build_parser

    monkeypatch.setenv(env, value)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert f"argument {flag}:" in err and f"(from ${env}: fix it or unset it)" in err
    monkeypatch.delenv(env)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and f"${env}" not in err
    # a valid flag wins over the bad variable, which is then never read
    monkeypatch.setenv(env, value)
    good = "json" if flag == "--log-format" else "9100"
    args = build_parser().parse_args([*argv, flag, good])
    assert str(getattr(args, flag[2:].replace("-", "_"))) == good


@pytest.mark.processes
async def test_cli_workers_run_at_the_largest_numbers(redis_url, keys, redis, processes):
    """The upper bounds are values the workers really run with: a cache worker polling
    every 10 years (arq's cron window is a timedelta of twice that) and keeping runs 10
    years, a batch worker with the largest lease and concurrency (XAUTOCLAIM's COUNT)."""
    cache = processes.cli("worker", "cache", "--poll-delay", "315360000", "--run-ttl",
                          "315360000", "--max-jobs", "2147483647", name="cache")
    batch = processes.cli("worker", "batch", "--model", "sim:largest", "--lease", "315360000",
                          "--concurrency", "10000", "--batch-size", "2147483647",
                          "--sim-latency", "0", name="batch")
    processes.wait_alive("cache")
    processes.wait_alive("sim:largest")
    async with OnlineAPI("sim:largest", cache=redis_url, prefix=keys.prefix, run="r1",
                         request_timeout=15) as pipe:
        served = await pipe.request(Request("largest", 2, "a", "ns"))
    assert len(served.data) == 2
    assert await redis.pttl(keys.usage("r1")) > 315_000_000_000  # ms: the 10 years were kept
    for proc in (cache, batch):
        proc.terminate()
        assert proc.wait(timeout=15) == 0, processes.logs(proc)
        assert "Traceback" not in processes.logs(proc)
