"""Drop-in provider clients against the simulator (loopback) and a real Redis server.

The simulator runs on its own thread, so a sync client may block the test's event loop
while it waits. Each test uses its own model names: the simulator counts per model.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import multiprocessing
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pydantic
import pytest
import together
from anthropic.types import Message, RawContentBlockDeltaEvent, RawMessageStartEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from together.types.chat import ChatCompletion as TogetherCompletion
from together.types.chat import ChatCompletionChunk as TogetherChunk

from cachesaver_dist import defaults
from cachesaver_dist.errors import InvalidRequestError
from cachesaver_dist.models import derive_seed
from cachesaver_dist.models.anthropic import Anthropic, AsyncAnthropic
from cachesaver_dist.models.dropin import Metadata
from cachesaver_dist.models.formats import build, dump, split_usage, sum_usage
from cachesaver_dist.models.groq import AsyncGroq, Groq
from cachesaver_dist.models.openai import AsyncOpenAI, OpenAI
from cachesaver_dist.models.openrouter import AsyncOpenRouter, OpenRouter
from cachesaver_dist.models.together import AsyncTogether, Together
from cachesaver_dist.models.vllm import VLLM, AsyncVLLM
from cachesaver_dist.simulator import SimulatorConfig, base_urls, root_url, running_simulator
from tests.conftest import ROOT, subprocess_env

MSGS = [{"role": "user", "content": "Tell me about caches"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}]


@dataclass
class Sim:
    url: str  # the /v1 URL

    @property
    def openai(self) -> str:
        return base_urls(self.url)["openai"]

    @property
    def together(self) -> str:
        return base_urls(self.url)["together"]

    @property
    def anthropic(self) -> str:
        return base_urls(self.url)["anthropic"]

    def requests(self, model: str) -> int:
        counters = httpx.get(f"{root_url(self.url)}/admin/counters").json()
        return counters["models"].get(model, {}).get("requests", 0)


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    """The simulator on its own event loop thread."""
    ready, box = threading.Event(), {}

    async def main() -> None:
        box["stop"], box["loop"] = asyncio.Event(), asyncio.get_running_loop()
        async with running_simulator(SimulatorConfig()) as url:
            box["url"] = url
            ready.set()
            await box["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10), "simulator did not start"
    yield Sim(box["url"])
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(10)


@pytest.fixture
def opts(redis_url, keys) -> dict[str, Any]:
    """Our options: the test Redis server and a private prefix."""
    return {"cache": redis_url, "prefix": keys.prefix}


def model_name() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


def texts(completion) -> list[str | None]:
    return [c.message.content for c in completion.choices]


# --- each client: its SDK's type, n choices, cache across namespaces --------------------


@pytest.mark.parametrize("direct", [False, True], ids=["via-cache-worker", "direct"])
async def test_async_openai_cache_across_namespaces(sim, opts, direct):
    model = model_name()
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, direct=direct,
                           **opts) as client:
        first, meta = await client.chat.completions.create(model=model, messages=MSGS, n=3,
                                                           metadata=True)
        assert isinstance(first, ChatCompletion) and len(first.choices) == 3
        assert isinstance(meta, Metadata) and (meta.n, meta.cached) == (3, [False] * 3)
        assert len(meta.duplicated) == 3
        assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts(first))) == 3
        other, meta = await client.chat.completions.create(model=model, messages=MSGS, n=3,
                                                           namespace="other", metadata=True)
        assert meta.cached == [True] * 3
        assert other.model_dump() == first.model_dump()  # ids, usage, everything
        again = await client.chat.completions.create(model=model, messages=MSGS, n=3)
        assert not set(texts(again)) & set(texts(first))  # same namespace: fresh samples
    assert sim.requests(model) == 2


@pytest.mark.parametrize("direct", [False, True], ids=["via-cache-worker", "direct"])
def test_sync_openai_cache_across_namespaces(sim, opts, direct):
    model = model_name()
    with OpenAI(api_key="test", base_url=sim.openai, max_retries=0, namespace="ns1",
                direct=direct, **opts) as client:
        first = client.chat.completions.create(model=model, messages=MSGS, n=2)
        assert isinstance(first, ChatCompletion) and len(first.choices) == 2
        other, meta = client.chat.completions.create(model=model, messages=MSGS, n=2,
                                                     namespace="ns2", metadata=True)
        assert meta.cached == [True, True] and texts(other) == texts(first)
        again = client.chat.completions.create(model=model, messages=MSGS, n=2)
        assert not set(texts(again)) & set(texts(first))
        assert client.models.list().data  # not wrapped: the SDK's own, uncached
    # a closed client opens again if used, in the same run: the namespace goes on
    later = client.chat.completions.create(model=model, messages=MSGS, n=2)
    assert not set(texts(later)) & (set(texts(first)) | set(texts(again)))
    client.close()
    assert sim.requests(model) == 3


def test_the_original_clients_arguments_and_attributes(tmp_path):
    """``cachedir=`` (the original's name for ``data_dir``) is taken, and ``namespace``,
    ``batch_size`` and ``cachedir`` read back, on async and sync clients alike. The
    original's positional arguments keep their places: ``namespace, cachedir, batch_size,
    timeout`` (async and sync ``Together``), ``namespace, cachedir, timeout`` (other sync
    clients), where that ``timeout`` is the batch wait; ``timeout=`` stays the SDK's."""
    from cachesaver_dist.models.together import Together

    for cls in (AsyncOpenAI, OpenAI):
        client = cls(namespace="n1", cachedir=str(tmp_path), batch_size=4, api_key="test")
        assert (client.namespace, client.batch_size, client.cachedir) == (
            "n1", 4, str(tmp_path))
        assert cls(api_key="test").cachedir == str(defaults.data_dir())
        if cls is OpenAI:
            client.close()
    made = [AsyncOpenAI("n2", str(tmp_path), 4, 0.25, api_key="test", timeout=7.0),
            OpenAI("n2", str(tmp_path), 0.25, api_key="test", timeout=7.0),
            Together("n2", str(tmp_path), 4, 0.25, api_key="test", timeout=7.0)]
    for client in made:
        core = client._core
        assert (client.namespace, client.cachedir, core._batch_timeout) == (
            "n2", str(tmp_path), 0.25)
        assert core.sdk.timeout == 7.0  # the SDK's own HTTP timeout
    assert made[0].batch_size == made[2].batch_size == 4
    assert made[1].batch_size == defaults.BATCH_SIZE
    made[1].close()
    made[2].close()
    with pytest.raises(ValueError, match="cachedir='b' name two folders"):
        AsyncOpenAI(data_dir="a", cachedir="b", api_key="test")
    from cachesaver_dist import pipelines
    from cachesaver_dist.local import LocalAPI, OrderedLocalAPI

    assert (pipelines.LocalAPI, pipelines.OrderedLocalAPI) == (LocalAPI, OrderedLocalAPI)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pipelines.Nope  # noqa: B018


async def test_together_clients(sim, opts):
    model = model_name()
    async with AsyncTogether(api_key="test", base_url=sim.together, max_retries=0,
                             **opts) as client:
        first = await client.chat.completions.create(model=model, messages=MSGS, n=2)
        assert isinstance(first, TogetherCompletion) and len(first.choices) == 2
    with Together(api_key="test", base_url=sim.together, max_retries=0, namespace="sync",
                  **opts) as client:
        other, meta = client.chat.completions.create(model=model, messages=MSGS, n=2,
                                                     metadata=True)
        assert isinstance(other, TogetherCompletion) and meta.cached == [True, True]
        assert texts(other) == texts(first)
        again = client.chat.completions.create(model=model, messages=MSGS, n=2)
        assert not set(texts(again)) & set(texts(first))
        chunks = list(client.chat.completions.create(model=model, messages=MSGS, stream=True,
                                                     namespace="stream"))
        assert all(isinstance(c, TogetherChunk) for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            first.choices[0].message.content
    assert sim.requests(model) == 2


async def test_anthropic_clients(sim, opts):
    model = model_name()
    args = {"model": model, "max_tokens": 50, "messages": MSGS, "system": "Be brief."}
    async with AsyncAnthropic(api_key="test", base_url=sim.anthropic, max_retries=0,
                              **opts) as client:
        first, meta = await client.messages.create(**args, metadata=True)
        assert isinstance(first, Message) and (meta.n, meta.cached) == (1, [False])
        assert first.content[0].type == "text" and first.stop_reason == "end_turn"
        with pytest.raises(TypeError, match="'n'"):  # the Messages API has no n
            await client.messages.create(**args, n=2)
    with Anthropic(api_key="test", base_url=sim.anthropic, max_retries=0, namespace="sync",
                   **opts) as client:
        other, meta = client.messages.create(**args, metadata=True)
        assert meta.cached == [True] and other.model_dump() == first.model_dump()
        again = client.messages.create(**args)
        assert again.content[0].text != first.content[0].text
        tool = client.messages.create(**args, tools=[{"name": "lookup", "input_schema": {
            "type": "object", "properties": {"query": {"type": "string"}}}}])
        assert tool.stop_reason == "tool_use" and tool.content[0].name == "lookup"
        assert set(tool.content[0].input) == {"query"}
    assert sim.requests(model) == 3


async def test_openai_compatible_providers(sim, opts, monkeypatch):
    model = model_name()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-be-used")
    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    with pytest.raises(Exception, match="GROQ_API_KEY"):  # never the OpenAI key
        AsyncGroq(base_url=sim.openai, **opts)
    monkeypatch.delenv("VLLM_BASE_URL", raising=False)
    with pytest.raises(Exception, match="base_url"):
        AsyncVLLM(**opts)
    monkeypatch.setenv("GROQ_API_KEY", "gsk-test")
    clients = [AsyncGroq(base_url=sim.openai, **opts),
               AsyncOpenRouter(api_key="or-test", base_url=sim.openai, **opts),
               AsyncVLLM(base_url=sim.openai, **opts)]
    assert clients[0]._core.sdk.api_key == "gsk-test"
    assert clients[2]._core.sdk.api_key == "EMPTY"
    assert repr(AsyncGroq(**opts)).startswith("<AsyncGroq groq namespace")
    for i, client in enumerate(clients):
        async with client:
            completion = await client.chat.completions.create(model=model, messages=MSGS, n=2,
                                                              namespace=f"ns{i}")
            assert isinstance(completion, ChatCompletion) and len(completion.choices) == 2
    # groq serves one choice per call; openrouter and vllm are other endpoints (identity
    # <provider>@<host>) with their own samples: 2 + 1 + 1 calls.
    assert sim.requests(model) == 4
    for cls in (Groq, OpenRouter, VLLM):
        with cls(api_key="k", base_url=sim.openai, namespace="sync", **opts) as client:
            got = client.chat.completions.create(model=model, messages=MSGS)
            assert isinstance(got, ChatCompletion)
    assert sim.requests(model) == 4  # the sync clients reuse their async siblings' samples


# --- two OS processes sharing one Redis -------------------------------------------------


def test_two_processes_share_samples(sim, redis_url, keys):
    model = model_name()

    def run(kind: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.dropin_proc", kind, sim.openai, keys.prefix, model,
             "default", "3"], env=subprocess_env(redis_url), cwd=ROOT, capture_output=True,
            text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    first = run("async")
    assert first["cached"] == [False] * 3 and len(set(first["contents"])) == 3
    second = run("sync")
    assert second["contents"] == first["contents"] and second["usage"] == first["usage"]
    assert second["cached"] == [True] * 3
    assert sim.requests(model) == 1


# --- what the provider returned round-trips exactly -------------------------------------


def _without_call_ids(completion) -> dict[str, Any]:
    return {k: v for k, v in completion.model_dump().items() if k not in ("id", "created")}


async def test_tool_calls_logprobs_usage_round_trip(sim, opts):
    """Each sample equals the direct SDK call that made it: with a fixed seed, sample i
    is generated alone with seed ``derive_seed(seed, i)``; usage is the calls' sum."""
    model = model_name()
    direct = openai.AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0)
    cases = [{"tools": TOOLS, "tool_choice": "auto", "n": 2, "seed": 11},
             {"logprobs": True, "top_logprobs": 3, "n": 3, "seed": 12, "max_tokens": 4},
             {"n": 2, "seed": 13, "stop": ["zzz"], "temperature": 0.5}]
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts) as client:
        for case in cases:
            one = {k: v for k, v in case.items() if k not in ("n", "seed")}
            wants = [await direct.chat.completions.create(
                model=model, messages=MSGS, n=1, seed=derive_seed(case["seed"], i), **one)
                for i in range(case["n"])]
            got = await client.chat.completions.create(model=model, messages=MSGS, **case)
            assert [c.index for c in got.choices] == list(range(case["n"]))
            for g, w in zip(got.choices, wants):
                assert g.model_dump(exclude={"index"}) == \
                    w.choices[0].model_dump(exclude={"index"})
            for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
                assert getattr(got.usage, field) == sum(getattr(w.usage, field) for w in wants)
            assert (got.model, got.system_fingerprint) == (wants[0].model,
                                                           wants[0].system_fingerprint)
            cached, meta = await client.chat.completions.create(
                model=model, messages=MSGS, namespace="again", metadata=True, **case)
            assert all(meta.cached) and cached.model_dump() == got.model_dump()
        assert got.choices[0].finish_reason in ("stop", "length")
        calls = await client.chat.completions.create(model=model, messages=MSGS, **cases[0],
                                                     namespace="x")
    await direct.close()
    assert calls.choices[0].finish_reason == "tool_calls"
    assert json.loads(calls.choices[0].message.tool_calls[0].function.arguments).keys() == \
        {"city", "days", "unit"}


async def test_responses_are_built_as_the_sdks_construct_builds_them(sim):
    """``build`` (strict validation, construct as the fallback) makes the very object the
    SDK's ``construct`` makes: pydantic's ``==`` compares types and values at every level;
    fields set and extras are compared too (an extra is also in ``model_fields_set`` after
    validation, as with the SDK's strict response validation). Data of another type than
    its field's (which validation would convert) is left to ``construct``."""
    model = model_name()
    oa = openai.AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0)
    an = anthropic.AsyncAnthropic(api_key="test", base_url=sim.anthropic, max_retries=0)
    made = [await oa.chat.completions.create(model=model, messages=MSGS, **case) for case in (
        {"tools": TOOLS, "tool_choice": "auto", "n": 2}, {"logprobs": True, "top_logprobs": 2},
        {"n": 3, "stop": ["zzz"]})]
    chunks = [c async for c in await oa.chat.completions.create(
        model=model, messages=MSGS, stream=True, logprobs=True)]
    message = await an.messages.create(model=model, max_tokens=20, messages=MSGS)
    events = [e async for e in await an.messages.create(model=model, max_tokens=20,
                                                        messages=MSGS, stream=True)]
    await oa.close()
    await an.close()

    def fields_set(obj: Any) -> Any:
        if isinstance(obj, list):
            return [fields_set(x) for x in obj]
        if hasattr(obj, "model_fields_set"):
            known = obj.model_fields_set - set(obj.model_extra or ())
            return (type(obj), sorted(known), obj.model_extra,
                    {k: fields_set(getattr(obj, k)) for k in known})
        return obj

    for sdk_object in (*made, *chunks, message, *events):
        data = dump(sdk_object)
        data["extra_field"] = {"kept": [1, 2]}  # fields the SDK does not know are kept
        built, constructed = build(type(sdk_object), data), type(sdk_object).construct(**data)
        assert built == constructed and fields_set(built) == fields_set(constructed)
    odd = {**dump(made[0]), "created": "1733000000"}
    assert build(ChatCompletion, odd).created == "1733000000"  # as construct keeps it
    assert build(ChatCompletion, odd) == ChatCompletion.construct(**odd)



def test_a_set_argument_is_the_same_key_in_every_process(redis_url):
    """``stop={...}``: a set iterates in another order in each process (string hashes are
    salted per process); it is sent and keyed as a sorted list, so a re-run finds its
    samples."""
    code = ("from cachesaver_dist.models.dropin import plain; "
            "print(plain({'stop': {'END', 'STOP', '###', 'Q:', 'A:'}}))")
    seen = {subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, text=True,
                           capture_output=True,
                           env=subprocess_env(redis_url, PYTHONHASHSEED=seed)).stdout
            for seed in ("1", "2", "3")}
    assert seen == {"{'stop': ['###', 'A:', 'END', 'Q:', 'STOP']}\n"}


async def test_int_dict_keys_are_sent_as_the_sdk_sends_them(sim, opts):
    """``logit_bias={token_id: bias}`` with int token ids (as tiktoken gives them): the SDK
    sends them as JSON keys, so the call is taken, and it is the key of the same call
    with str keys."""
    model = model_name()
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts) as client:
        first = await client.chat.completions.create(model=model, messages=MSGS,
                                                     logit_bias={9891: 100, 2201: -100})
        again, meta = await client.chat.completions.create(
            model=model, messages=MSGS, logit_bias={"9891": 100, "2201": -100},
            namespace="other", metadata=True)
    assert texts(again) == texts(first) and meta.cached == [True]
    assert sim.requests(model) == 1

async def test_tool_loop_with_the_sdks_own_message_objects(sim, opts):
    model = model_name()
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, **opts) as client:
        called = await client.chat.completions.create(model=model, messages=MSGS, tools=TOOLS)
        message = called.choices[0].message  # an SDK object, sent back as the SDK allows
        history = [*MSGS, message, {"role": "tool", "tool_call_id": message.tool_calls[0].id,
                                    "content": "sunny"}]
        answer = await client.chat.completions.create(model=model, messages=history,
                                                      tools=TOOLS)
        assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.content
        again, meta = await client.chat.completions.create(
            model=model, messages=[*MSGS, message.model_dump(), history[-1]], tools=TOOLS,
            namespace="b", metadata=True)  # the same history as plain dicts: the same key
        assert meta.cached == [True] and texts(again) == texts(answer)
    assert sim.requests(model) == 2


async def test_usage_of_samples_from_several_calls(sim, opts):
    model = model_name()
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, **opts) as client:
        two = await client.chat.completions.create(model=model, messages=MSGS, n=2)
        # namespace b: samples 0 and 1 are cached (call one), sample 2 is new (call two)
        three, meta = await client.chat.completions.create(model=model, messages=MSGS, n=3,
                                                           namespace="b", metadata=True)
    assert meta.cached == [True, True, False] and texts(three)[:2] == texts(two)
    prompt = two.usage.prompt_tokens
    assert three.usage.prompt_tokens == 2 * prompt  # call one's, all of it; call two's
    assert three.usage.completion_tokens == sum(len(t.split()) for t in texts(three))
    assert three.usage.total_tokens == three.usage.prompt_tokens + three.usage.completion_tokens
    assert sim.requests(model) == 2


def test_usage_shares_add_up():
    usage = {"prompt_tokens": 7, "completion_tokens": 10, "total_tokens": 17, "cost": 0.3,
             "prompt_tokens_details": {"cached_tokens": 5}, "tier": "std"}
    shares = split_usage(usage, 3)
    assert [s["prompt_tokens"] for s in shares] == [3, 2, 2]
    assert all(s["tier"] == "std" for s in shares)
    total = sum_usage(shares)
    assert total == {**usage, "cost": pytest.approx(0.3)}


# --- arguments outside the key ---------------------------------------------------------


async def test_non_generation_arguments_are_not_in_the_key(sim, opts):
    model = model_name()
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts) as client:
        first = await client.chat.completions.create(model=model, messages=MSGS, n=2)
        hit, meta = await client.chat.completions.create(
            model=model, messages=MSGS, n=2, namespace="b", metadata=True, user="alice",
            store=True, extra_headers={"X-Trace": "1"}, timeout=30, service_tier="auto",
            stream_options=None, safety_identifier="s1")
        assert meta.cached == [True, True] and texts(hit) == texts(first)
        hit = await client.chat.completions.create(model=model, messages=MSGS, n=2,
                                                   namespace="c", metadata={"run": "7"})
        assert texts(hit) == texts(first)  # a dict is the SDK's metadata: not in the key
        assert sim.requests(model) == 1
        other = await client.chat.completions.create(model=model, messages=MSGS, n=2,
                                                     namespace="d", temperature=0.3)
        assert not set(texts(other)) & set(texts(first))  # temperature is in the key
        assert sim.requests(model) == 2
        # and arguments outside the key still reach the SDK call that generates
        with pytest.raises(openai.APITimeoutError, match=r"(?i)timed out"):
            await client.chat.completions.create(model=model, messages=MSGS, temperature=0.9,
                                                 timeout=1e-6)
        with pytest.raises(TypeError, match="frobnicate"):
            await client.chat.completions.create(model=model, messages=MSGS, frobnicate=1)


async def test_each_call_of_a_seeded_request_gets_the_callers_arguments(sim, opts):
    """A seed with n=3 is three provider calls (derived seeds): each carries the caller's
    headers and user; a pydantic class as response_format is the SDK's business."""
    seen: list[tuple] = []

    async def hook(request: httpx.Request) -> None:
        body = json.loads(request.content or b"{}")
        seen.append((request.headers.get("x-test"), body.get("seed"), body.get("user")))

    async with AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0,
                           http_client=httpx.AsyncClient(event_hooks={"request": [hook]}),
                           **opts) as client:
        got = await client.chat.completions.create(
            model=model_name(), messages=MSGS, seed=3, n=3, extra_headers={"X-Test": "yes"},
            user="u1")
        assert len(got.choices) == 3 and len(seen) == 3
        assert [(h, u) for h, _, u in seen] == [("yes", "u1")] * 3
        seeds = {s for _, s, _ in seen}
        assert 3 in seeds and len(seeds) == 3  # the caller's, then derived ones

        class Answer(pydantic.BaseModel):
            text: str

        with pytest.raises((TypeError, InvalidRequestError), match="response_format"):
            await client.chat.completions.create(model=model_name(), messages=MSGS,
                                                 response_format=Answer)


async def test_concurrent_identical_calls_share_one_provider_call(sim, opts):
    model = model_name()
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, **opts) as client:
        await client.chat.completions.create(model=model, messages=[{"role": "user",
                                                                      "content": "warm up"}])
        got = await asyncio.gather(*(client.chat.completions.create(
            model=model, messages=MSGS, n=2, request_id=f"r{i}") for i in range(3)))
    contents = [t for completion in got for t in texts(completion)]
    assert len(set(contents)) == 6  # one namespace: every request its own samples
    assert sim.requests(model) == 2  # the warm-up, and one call with n=6


# --- streaming --------------------------------------------------------------------------


def _streamed(chunks) -> dict[int, str]:
    out: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            out[c.index] = out.get(c.index, "") + (c.delta.content or "")
    return out


async def test_streaming_fresh_and_cached(sim, opts):
    model = model_name()
    args = {"model": model, "messages": MSGS, "n": 2, "logprobs": True}
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, **opts) as client:
        stream, meta = await client.chat.completions.create(
            **args, stream=True, stream_options={"include_usage": True}, metadata=True)
        assert meta.cached == [False, False]
        fresh = [c async for c in stream]
        assert all(isinstance(c, ChatCompletionChunk) for c in fresh)
        assert fresh[0].choices[0].delta.role == "assistant"
        whole = await client.chat.completions.create(**args, namespace="b")
        assert _streamed(fresh) == {i: t for i, t in enumerate(texts(whole))}
        assert fresh[-1].choices == [] and fresh[-1].usage == whole.usage
        assert [c.choices[0].finish_reason for c in fresh if c.choices][-1] == "stop"
        tokens = [lp.token for c in fresh if c.choices and c.choices[0].index == 0
                  and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
        assert tokens == [lp.token for lp in whole.choices[0].logprobs.content]
        async with await client.chat.completions.create(**args, namespace="c",
                                                        stream=True) as stream:
            cached = [c async for c in stream]
        assert _streamed(cached) == _streamed(fresh)
        assert all(c.usage is None for c in cached)  # no include_usage: no usage chunk
        tools = await client.chat.completions.create(model=model, messages=MSGS, tools=TOOLS,
                                                     stream=True)
        calls = [tc for c in [c async for c in tools] if c.choices
                 for tc in c.choices[0].delta.tool_calls or []]
        assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments)
    with OpenAI(api_key="test", base_url=sim.openai, namespace="d", **opts) as client:
        chunks = list(client.chat.completions.create(**args, stream=True))
        assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
        assert _streamed(chunks) == _streamed(fresh)
    assert sim.requests(model) == 2


async def test_anthropic_streaming(sim, opts):
    model = model_name()
    args = {"model": model, "max_tokens": 30, "messages": MSGS}
    async with AsyncAnthropic(api_key="test", base_url=sim.anthropic, **opts) as client:
        events = [e async for e in await client.messages.create(**args, stream=True)]
        message = await client.messages.create(**args, namespace="b")
    assert isinstance(events[0], RawMessageStartEvent)
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]
    text = "".join(e.delta.text for e in events if isinstance(e, RawContentBlockDeltaEvent))
    assert text == message.content[0].text
    assert events[-2].delta.stop_reason == message.stop_reason
    assert events[-2].usage.output_tokens == message.usage.output_tokens
    with Anthropic(api_key="test", base_url=sim.anthropic, namespace="c", **opts) as client:
        cached, meta = client.messages.create(**args, stream=True, metadata=True)
        assert meta.cached == [True]
        assert [e.model_dump() for e in cached] == [e.model_dump() for e in events]
    assert sim.requests(model) == 1


# --- sync clients inside a running event loop; errors ----------------------------------


async def test_sync_client_inside_a_running_event_loop(sim, opts):
    asyncio.get_running_loop()  # as in a notebook cell
    model = model_name()
    with OpenAI(api_key="test", base_url=sim.openai, **opts) as client:
        first = client.chat.completions.create(model=model, messages=MSGS, n=2)
        other = client.chat.completions.create(model=model, messages=MSGS, n=2, namespace="b")
    assert isinstance(first, ChatCompletion) and texts(other) == texts(first)
    with Anthropic(api_key="test", base_url=sim.anthropic, **opts) as client:
        message = client.messages.create(model=model, max_tokens=10, messages=MSGS)
    assert isinstance(message, Message)
    # the clients' loop threads are gone (the embedded server's spawner lives with the process)
    assert not [t for t in threading.enumerate()
                if t.name.startswith("cachesaver-") and t.name != "cachesaver-spawner"]


@pytest.mark.timeout(60)
def test_an_async_client_reused_on_a_second_event_loop_says_nothing(sim, opts, caplog):
    """The SDK client of a closed loop is left behind without a close scheduled on the
    next loop (it would fail there with a traceback)."""
    client = AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts)

    async def one(i: int) -> str:
        got = await client.chat.completions.create(model=model_name(), messages=[
            {"role": "user", "content": f"loop {i}"}])
        gc.collect()
        return got.choices[0].message.content

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert asyncio.run(one(1)) and asyncio.run(one(2))
        gc.collect()
        asyncio.run(client.close())
        gc.collect()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def test_a_sync_client_used_without_a_name(sim, opts):
    """``OpenAI(...).chat.completions.create(...)``: nothing names the client, and the
    garbage collector may finalize it in any thread while the call runs, or later in
    its own loop thread. Every call is answered, and a collected client is closed."""
    model = model_name()
    stop = threading.Event()

    def collect() -> None:  # a collection in another thread, at any moment
        while not stop.is_set():
            gc.collect()
            time.sleep(0.005)

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    try:
        answers = [OpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts)
                   .chat.completions.create(model=model, messages=MSGS, namespace=f"n{i}")
                   for i in range(4)]
    finally:
        stop.set()
        collector.join(5)
    assert len({tuple(texts(a)) for a in answers}) == 1  # one sample, reused

    client = OpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts)
    client.chat.completions.create(model=model, messages=MSGS)
    runner, core = client._runner, client._core
    loop, thread = runner._loop, runner._thread
    del client  # in a reference cycle: only a collection finds it
    collected = threading.Event()
    loop.call_soon_threadsafe(lambda: (gc.collect(), collected.set()))  # in its loop thread
    assert collected.wait(10)
    thread.join(10)
    assert not thread.is_alive() and not core._pipelines  # closed, then stopped



@pytest.mark.timeout(60)
def test_a_sync_client_used_before_a_fork_works_in_the_child(sim, opts):
    """A client made and used at module level, then used by forked workers
    (``multiprocessing.Pool``): its loop thread is not in the child, which starts its own."""
    model = model_name()
    client = OpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts)
    first = client.chat.completions.create(model=model, messages=MSGS)
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()

    def child() -> None:
        got = client.chat.completions.create(model=model, messages=MSGS, namespace="child")
        client.close()
        results.put(texts(got))

    proc = fork.Process(target=child, daemon=True)
    proc.start()
    try:
        assert results.get(timeout=20) == texts(first)  # the child found the sample
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    again = client.chat.completions.create(model=model, messages=MSGS)  # the parent's too
    assert texts(again) != texts(first)
    client.close()


@pytest.mark.timeout(60)
async def test_an_async_client_forked_from_its_running_loop_works_in_the_child(sim, opts):
    """Forked from inside the loop the client runs on, a child's ``asyncio.run`` uses it
    on a loop of its own (the parent's loop is not running there)."""
    model = model_name()
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0,
                           **opts) as client:
        first = await client.chat.completions.create(model=model, messages=MSGS)
        fork = multiprocessing.get_context("fork")
        results = fork.Queue()

        def child() -> None:
            async def ask() -> list[str | None]:
                async with client:
                    return texts(await client.chat.completions.create(
                        model=model, messages=MSGS, namespace="child"))

            try:
                results.put(asyncio.run(ask()))
            except Exception as exc:
                results.put(repr(exc))

        proc = fork.Process(target=child, daemon=True)
        proc.start()
        try:
            got = await asyncio.to_thread(results.get, timeout=20)
        finally:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        assert got == texts(first)
        assert texts(await client.chat.completions.create(model=model, messages=MSGS)) \
            != texts(first)

async def test_an_async_client_made_per_call_is_closed_when_collected(sim, opts, redis):
    """``await AsyncOpenAI(...).chat.completions.create(...)`` in a helper called per
    question: each client opens pipelines, in-process workers and connections, which
    close once the garbage collector finds the client (here: collections forced)."""
    model = model_name()

    async def connections() -> int:
        return len(await redis.client_list())

    async def ask(i: int) -> ChatCompletion:
        client = AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts)
        return await client.chat.completions.create(model=model, messages=MSGS,
                                                    namespace=f"n{i}")

    base = await connections()
    first = await ask(0)
    gc.collect()
    for _ in range(100):  # the close runs as a task of this loop
        if await connections() <= base:
            break
        await asyncio.sleep(0.05)
    assert await connections() <= base
    for i in range(1, 6):
        assert texts(await ask(i)) == texts(first)  # one sample, reused: the cache works
        gc.collect()
    for _ in range(100):
        if await connections() <= base:
            break
        await asyncio.sleep(0.05)
    assert await connections() <= base, "collected clients left connections open"


@pytest.mark.parametrize("client_type", [OpenAI, AsyncOpenAI])
@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"cache": "notaurl"}, ValueError, r"invalid Redis URL 'notaurl': no scheme"),
    ({"cache": "redis://h:99999"}, ValueError, r"not a number from 1 to 65535"),
    ({"cache": 123}, TypeError, r"cache must be a Redis URL"),
    ({"prefix": 1}, InvalidRequestError, r"prefix must be a non-empty str"),
    ({"batch_size": 0}, InvalidRequestError, r"batch_size must be a positive int, got 0"),
    ({"max_prompt_bytes": -1}, InvalidRequestError, r"max_prompt_bytes must be a positive"),
    ({"batch_timeout": -1}, InvalidRequestError, r"batch_timeout must be a number of seconds"),
    ({"request_timeout": "1h"}, InvalidRequestError, r"request_timeout must be a number"),
    ({"max_n": 0}, InvalidRequestError, r"max_n must be a positive int, got 0"),
    ({"max_n": -1}, InvalidRequestError, r"max_n must be a positive int, got -1"),
    ({"max_n": "2"}, InvalidRequestError, r"max_n must be a positive int, got '2'"),
])
def test_client_options_are_checked_by_the_constructor(client_type, kwargs, error, pattern):
    """The pipelines start at the first call; what they will use is checked before."""
    with pytest.raises(error, match=pattern):
        client_type(api_key="test", **kwargs)


async def test_call_mistakes_are_refused_at_once_and_named(sim, opts):
    model = model_name()
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts) as client:
        create = client.chat.completions.create
        with pytest.raises(TypeError, match=r"^chat\.completions\.create\(\) takes 0 positional"):
            await create(model, MSGS)
        with pytest.raises(InvalidRequestError, match="namespace must have 1 to 256"):
            await create(model=model, messages=MSGS, namespace="")
        for bad in (1, "yes"):
            with pytest.raises(TypeError, match=r"metadata=.* neither a bool nor a dict"):
                await create(model=model, messages=MSGS, metadata=bad)
        ok = await create(model=model, messages=MSGS, metadata={"team": "a"})  # the SDK's own
        assert isinstance(ok, ChatCompletion)
    assert sim.requests(model) == 1



@pytest.mark.parametrize("outside_key", [{}, {"timeout": 30}, {"user": "u"}],
                         ids=["plain", "timeout", "user"])
async def test_values_that_cannot_be_stored_are_named_with_any_arguments(sim, opts,
                                                                         outside_key):
    """A value that cannot be stored is refused naming its field, also in a call with
    arguments outside the key (``timeout=``, ``user=``, ...)."""
    model = model_name()
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts) as client:
        for bad, why in ((object(), "is a object, which cannot be stored"),
                         ("\ud800", "is a lone surrogate"), (2**70, "outside 64 bits")):
            with pytest.raises(InvalidRequestError,
                               match=rf"field 'messages'\[0\]\['content'\] .*{why}"):
                await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": bad}], **outside_key)
        assert client._core.lent == {}
    assert sim.requests(model) == 0

async def test_provider_errors_surface(sim, opts, caplog):
    """A provider's error reaches the caller as the SDK raises it without the cache (code
    that catches ``openai.BadRequestError`` keeps working), every waiting caller's."""
    caplog.set_level(logging.INFO, logger="cachesaver_dist")
    model = model_name()
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts) as client:
        both = await asyncio.gather(*(
            client.chat.completions.create(model=model, messages=MSGS, n=200, namespace=ns)
            for ns in ("a", "b")), return_exceptions=True)
        assert [type(e) for e in both] == [openai.BadRequestError] * 2, both
        assert both[0].status_code == 400 and "between 1 and 128" in str(both[0])
        assert both[0] is both[1]  # the one call's error, for each caller
        for n, refused in ((0, r"n=0 asks for no choices.*pass n >= 1"),
                           (-1, r"n must be an int from 0"), ("2", r"n must be an int")):
            with pytest.raises(InvalidRequestError, match=refused):  # refused at once
                await client.chat.completions.create(model=model, messages=MSGS, n=n)
    with Anthropic(api_key="test", base_url=sim.anthropic, max_retries=0, **opts) as client:
        with pytest.raises(anthropic.BadRequestError, match=r"temperature"):
            client.messages.create(model=model, max_tokens=10, messages=MSGS,
                                   extra_body={"temperature": 3})
        with pytest.raises(TypeError, match="max_tokens"):  # missing: refused at once
            client.messages.create(model=model, messages=MSGS)
    with pytest.raises(openai.BadRequestError):  # what the SDK itself raises
        await openai.AsyncOpenAI(api_key="t", base_url=sim.openai, max_retries=0) \
            .chat.completions.create(model=model, messages=MSGS, n=200)
    assert anthropic and together  # the SDKs the clients wrap are installed
    # raised to the caller, and not printed again: the in-process worker logs it at INFO
    failures = [r for r in caplog.records if "returned 400" in r.getMessage()]
    assert failures and all(r.levelno == logging.INFO for r in failures)



async def test_an_sdk_error_surfaces_when_several_calls_of_a_request_fail(sim, opts):
    """n=2 with max_n=1 (Groq's setting) is two provider calls; both fail, with two
    messages (rate limits name their waits): the caller gets the SDK's error still."""
    from tests.support import admin

    model = model_name()
    await admin(sim.url, "POST", "/admin/faults", {"faults": [
        {"status": 429, "count": 1, "model": model, "message": "Rate limit: retry in 1.2s"},
        {"status": 429, "count": 1, "model": model, "message": "Rate limit: retry in 0.7s"}]})
    try:
        async with AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, max_n=1,
                               **opts) as client:
            with pytest.raises(openai.RateLimitError, match="Rate limit: retry in"):
                await client.chat.completions.create(model=model, messages=MSGS, n=2)
    finally:
        await admin(sim.url, "DELETE", "/admin/faults")

def test_importing_the_package_does_not_import_provider_sdks():
    code = ("import sys, cachesaver_dist, cachesaver_dist.models; "
            "assert not {'openai', 'anthropic'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


async def test_flags_are_the_originals(sim, opts):
    """n=2 in one call: the second sample is duplicated (its prompt was paid once); the
    same call in another namespace: all cached, none duplicated."""
    model = model_name()
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts) as client:
        _, fresh = await client.chat.completions.create(model=model, messages=MSGS, n=2,
                                                        metadata=True)
        _, again = await client.chat.completions.create(model=model, messages=MSGS, n=2,
                                                        namespace="other", metadata=True)
    assert fresh == Metadata(2, [False, False], [False, True])
    assert again == Metadata(2, [True, True], [False, False])
    assert sim.requests(model) == 1
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, max_n=2,
                           **opts) as client:  # n=5 in calls of 2, 2 and 1
        fresh_model = model_name()
        _, split = await client.chat.completions.create(model=fresh_model, messages=MSGS, n=5,
                                                        metadata=True)
    assert split.duplicated == [False, True, False, True, False]  # each call paid its prompt
    assert sim.requests(fresh_model) == 3


async def test_a_worker_pool_can_call_the_provider_instead(sim, opts, processes):
    """workers="pool": this process only enqueues; a batch worker process started with
    --model dropin:openai:<model> calls the provider. The samples are the ones an
    in-process client of the same provider and URL reads."""
    model = model_name()
    route = f"dropin:openai:{model}"
    processes.cli("worker", "cache", name="cache")
    processes.cli("worker", "batch", "--model", route, "--base-url", sim.openai, name="batch",
                  env={"OPENAI_API_KEY": "test"})
    processes.wait_alive("cache")
    processes.wait_alive(route)
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, workers="pool", **opts) as pool:
        got, meta = await pool.chat.completions.create(model=model, messages=MSGS, n=2,
                                                       metadata=True)
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, **opts) as local:
        again, shared = await local.chat.completions.create(model=model, messages=MSGS, n=2,
                                                            namespace="other", metadata=True)
    assert isinstance(got, openai.types.chat.ChatCompletion) and len(got.choices) == 2
    assert meta == Metadata(2, [False, False], [False, True])
    assert shared.cached == [True, True]
    assert [c.message.content for c in again.choices] == [c.message.content for c in got.choices]
    assert sim.requests(model) == 1
    with pytest.raises(ValueError, match="workers must be 'local'"):
        AsyncOpenAI(api_key="test", workers="remote")


async def test_a_pool_worker_on_another_base_url_makes_no_samples_for_the_client(
        sim, opts, processes, redis):
    """A pool client on a server of its own (the simulator) is told to give its batch
    workers that --base-url; a worker started without it (calling the provider's default
    URL) fails the client's work at once and stores nothing under the client's keys."""
    from cachesaver_dist.errors import GenerationError, NoWorkerError

    model = model_name()
    route = f"dropin:openai:{model}"
    processes.cli("worker", "cache", name="cache")
    processes.wait_alive("cache")
    async with AsyncOpenAI(api_key="test", base_url=sim.openai, workers="pool",
                           request_timeout=30, **opts) as pool:
        with pytest.raises(NoWorkerError) as err:
            await pool.chat.completions.create(model=model, messages=MSGS)
        assert f"--model {route}" in str(err.value)
        assert f"give the worker --base-url {sim.openai}" in str(err.value)
        processes.cli("worker", "batch", "--model", route, name="batch",
                      env={"OPENAI_API_KEY": "test"})
        processes.wait_alive(route)
        with pytest.raises(GenerationError) as err:
            await pool.chat.completions.create(model=model, messages=MSGS, request_id="b")
        assert not isinstance(err.value, NoWorkerError)
        assert "this batch worker makes samples of 'openai" in str(err.value)
        assert f":{model}', not of 'openai@127.0.0.1:{sim.openai.split(':')[2]}" in \
            str(err.value)
        assert "--base-url of the client's server" in str(err.value)
    assert sim.requests(model) == 0
    assert not [k async for k in redis.scan_iter(match=f"{opts['prefix']}s:*")]


def test_a_pool_model_refuses_only_its_providers_work_from_another_url(monkeypatch):
    """What the batch worker asks: same provider, another URL is refused; a client's own
    ``provider_id`` (an identity it chose) is served."""
    from cachesaver_dist.models.dropin import pool_model

    monkeypatch.setenv("OPENAI_API_KEY", "test")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    default, local = pool_model("dropin:openai:zz"), \
        pool_model("dropin:openai:zz", "http://127.0.0.1:9/v1")
    assert default.refuses("openai:zz") is None and local.refuses("openai@127.0.0.1:9/v1:zz") \
        is None
    assert default.refuses("my-openai:zz") is None
    assert "of 'openai:zz', not of 'openai@127.0.0.1:9/v1:zz'" in \
        (default.refuses("openai@127.0.0.1:9/v1:zz") or "")
    assert "of 'openai@127.0.0.1:9/v1:zz', not of 'openai:zz'" in \
        (local.refuses("openai:zz") or "")


async def test_async_with_left_by_a_cancellation_gives_up_calls_in_flight(sim, opts):
    """Cancelled inside ``async with`` (as Ctrl-C cancels ``asyncio.run``'s task), the
    client closes without waiting for its provider call in flight (hung for 30 s here):
    it gives it the in-process workers' grace (3 s), not its whole time."""
    from tests.support import admin

    model = model_name()
    await admin(sim.url, "POST", "/admin/faults",
                {"faults": [{"kind": "timeout", "seconds": 30, "model": model}]})
    try:
        client = AsyncOpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts)

        async def body() -> None:
            async with client:
                await client.chat.completions.create(model=model, messages=MSGS)

        task = asyncio.create_task(body())
        await asyncio.sleep(1.0)  # the call hangs at the provider
        started = time.monotonic()
        task.cancel()
        await asyncio.wait([task], timeout=20)
        assert task.cancelled(), "still closing 20 s after the cancellation"
        assert time.monotonic() - started < 5.0
    finally:
        await admin(sim.url, "DELETE", "/admin/faults")


@pytest.mark.timeout(60)
def test_a_sync_client_closed_under_a_long_call_fails_it_instead_of_hanging(
        sim, opts, monkeypatch):
    """``close()`` waits a while for the calls in flight (here 0.5 s), then stops the
    client's loop thread: a call still running then fails with an error that says so;
    the thread that made it does not wait forever."""
    from cachesaver_dist.models import sync
    from tests.support import admin

    monkeypatch.setattr(sync, "CLOSE_WAIT_S", 0.5)
    model = model_name()
    asyncio.run(admin(sim.url, "POST", "/admin/faults",
                      {"faults": [{"kind": "timeout", "seconds": 30, "model": model}]}))
    try:
        client = OpenAI(api_key="test", base_url=sim.openai, max_retries=0, **opts)
        got: list[BaseException] = []

        def call() -> None:
            try:
                client.chat.completions.create(model=model, messages=MSGS)
            except BaseException as exc:  # what the caller gets
                got.append(exc)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        time.sleep(1.0)  # the call hangs at the provider
        client.close()
        caller.join(10)
        assert not caller.is_alive(), "the call waits forever on a closed client"
        assert len(got) == 1 and "closed while this call was in flight" in str(got[0])
    finally:
        asyncio.run(admin(sim.url, "DELETE", "/admin/faults"))
