"""Tests for the local OpenAI-compatible LLM simulator, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import together

from cachesaver_dist.simulator import (
    FaultRule,
    SimulatorConfig,
    add_arguments,
    base_urls,
    config_from_args,
    root_url,
    running_simulator,
    together_base_url,
)
from tests.support import admin

MSGS = [{"role": "user", "content": "Say something nice about caches"}]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
async def sim() -> AsyncIterator[str]:
    async with running_simulator(SimulatorConfig()) as url:
        yield url


def tclient(url: str, **kw: object) -> together.AsyncTogether:
    kw.setdefault("max_retries", 0)
    return together.AsyncTogether(api_key="test", base_url=together_base_url(url), **kw)


async def post(url: str, body: object, timeout: float = 5.0) -> httpx.Response:
    async with httpx.AsyncClient(timeout=timeout) as c:
        return await c.post(f"{url}/chat/completions", json=body)


async def test_together_sdk_n_samples(sim: str) -> None:
    assert sim.endswith("/v1")
    async with tclient(sim) as client:
        resp = await client.chat.completions.create(
            model="m1", messages=MSGS, n=3, max_tokens=5)
    contents = [c.message.content for c in resp.choices]
    assert len(contents) == 3 and len(set(contents)) == 3
    assert all(1 <= len(c.split()) <= 5 for c in contents)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.usage.prompt_tokens == 5
    assert resp.usage.completion_tokens == sum(len(c.split()) for c in contents)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    counters = await admin(sim, "GET", "/admin/counters")
    m1 = counters["models"]["m1"]
    assert (m1["requests"], m1["samples"]) == (1, 3)
    assert len(m1["request_times"]) == 1 and abs(m1["request_times"][0] - time.time()) < 5
    assert counters["total"]["samples"] == 3 and counters["max_in_flight"] == 1
    models = await admin(sim, "GET", "/v1/models")
    assert [m["id"] for m in models["data"]] == ["m1"]
    await admin(sim, "POST", "/admin/reset")
    assert (await admin(sim, "GET", "/admin/counters"))["models"] == {}


async def test_together_sdk_url_forms(sim: str) -> None:
    """together 3.x appends /v1/... itself, so the /v1 form 404s there; raw clients need /v1."""
    async with together.AsyncTogether(api_key="t", base_url=sim, max_retries=0) as client:
        with pytest.raises(together.NotFoundError):
            await client.chat.completions.create(model="m", messages=MSGS)
    r = await post(sim, {"model": "m", "messages": MSGS})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


async def test_samples_stop_length_seed(sim: str) -> None:
    r = (await post(sim, {"model": "m", "messages": MSGS, "n": 20, "max_tokens": 2})).json()
    assert {c["finish_reason"] for c in r["choices"]} == {"length"}
    assert len({c["message"]["content"] for c in r["choices"]}) == 20
    body = {"model": "m", "messages": MSGS, "n": 4, "seed": 7, "max_tokens": 50}
    a, b = (await post(sim, body)).json(), (await post(sim, body)).json()
    assert [c["message"] for c in a["choices"]] == [c["message"] for c in b["choices"]]
    words = a["choices"][0]["message"]["content"].split()
    cut = (await post(sim, {**body, "stop": [" " + words[2]]})).json()["choices"][0]
    assert cut["message"]["content"] == " ".join(words[:2]) and cut["finish_reason"] == "stop"


async def test_rate_limit_429_retry_after() -> None:
    cfg = SimulatorConfig(rate_limit=2, rate_window=0.4)
    async with running_simulator(cfg) as url:
        ok = [await post(url, {"model": "rl", "messages": MSGS}) for _ in range(2)]
        assert [r.status_code for r in ok] == [200, 200]
        r = await post(url, {"model": "rl", "messages": MSGS})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        retry_after = float(r.headers["Retry-After"])
        assert 0 < retry_after <= 0.4
        assert (await post(url, {"model": "other", "messages": MSGS})).status_code == 200
        async with tclient(url) as client:
            with pytest.raises(together.RateLimitError) as ei:
                await client.chat.completions.create(model="rl", messages=MSGS)
            assert float(ei.value.response.headers["retry-after"]) <= 0.4
        # The SDK's own retry honours Retry-After (<= 60 s) when max_retries > 0.
        async with tclient(url, max_retries=1) as client:
            await client.chat.completions.create(model="rl", messages=MSGS)
        counters = await admin(url, "GET", "/admin/counters")
        rl = counters["models"]["rl"]
        assert rl["rate_limited"] == 3 and rl["requests"] == 3
        times = rl["request_times"]
        assert len(times) == 3 and times[2] - times[0] >= 0.4 - 0.01


async def test_faults_status_and_clear(sim: str) -> None:
    await admin(sim, "POST", "/admin/faults", {"faults": [{"status": 500, "count": 2}]})
    async with tclient(sim) as client:
        for _ in range(2):
            with pytest.raises(together.InternalServerError):
                await client.chat.completions.create(model="f", messages=MSGS)
        await client.chat.completions.create(model="f", messages=MSGS)
        faults = await admin(sim, "POST", "/admin/faults",
                             {"faults": [{"status": 400, "count": None, "model": "f"}]})
        assert faults["faults"][0]["count"] is None
        for _ in range(3):
            with pytest.raises(together.BadRequestError):
                await client.chat.completions.create(model="f", messages=MSGS)
        await client.chat.completions.create(model="g", messages=MSGS)  # other model unaffected
        assert (await admin(sim, "DELETE", "/admin/faults")) == {"faults": []}
        await client.chat.completions.create(model="f", messages=MSGS)
    counters = await admin(sim, "GET", "/admin/counters")
    assert counters["models"]["f"]["faults"] == 5
    assert (counters["models"]["f"]["requests"], counters["models"]["f"]["samples"]) == (2, 2)


async def test_fault_429_and_timeout() -> None:
    cfg = SimulatorConfig(faults=[FaultRule(status=429, count=1, retry_after=0.25),
                                  FaultRule.parse("timeout:30:1")])
    async with running_simulator(cfg) as url:
        r = await post(url, {"model": "m", "messages": MSGS})
        assert r.status_code == 429 and r.headers["Retry-After"] == "0.25"
        start = time.monotonic()
        async with tclient(url, timeout=0.3) as client:
            with pytest.raises(together.APITimeoutError):
                await client.chat.completions.create(model="m", messages=MSGS)
        assert time.monotonic() - start < 5
        for _ in range(50):  # the client hung up, so the hanging handler gets cancelled
            if (await admin(url, "GET", "/admin/counters"))["in_flight"] == 0:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("timeout-fault handler still in flight after client disconnect")
        assert (await post(url, {"model": "m", "messages": MSGS})).status_code == 200
        async with httpx.AsyncClient() as c:
            bad = await c.post(f"{root_url(url)}/admin/faults", json={"faults": [{"statuz": 1}]})
        assert bad.status_code == 400 and "statuz" in bad.json()["error"]["message"]
        assert (await admin(url, "GET", "/admin/counters"))["models"]["m"]["faults"] == 2


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"messages": MSGS}, "model", "'model' is required"),
    ({"model": 3, "messages": MSGS}, "model", "'model' is required"),
    ({"model": "m"}, "messages", "'messages' is required"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages", "'role'"),
    ({"model": "m", "messages": MSGS, "n": 0}, "n", "between 1 and 128"),
    ({"model": "m", "messages": MSGS, "n": 129}, "n", "between 1 and 128"),
    ({"model": "m", "messages": MSGS, "n": "3"}, "n", "between 1 and 128"),
    ({"model": "m", "messages": MSGS, "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"model": "m", "messages": MSGS, "stop": 5}, "stop", "'stop'"),
    ([1, 2], None, "JSON object"),
])
async def test_bad_body(sim: str, body: object, param: str | None, needle: str) -> None:
    r = await post(sim, body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"]
    assert err["param"] == param and err["code"]


async def test_bad_json_and_sdk_n0(sim: str) -> None:
    async with httpx.AsyncClient() as c:
        r = await c.post(f"{sim}/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    async with tclient(sim) as client:
        with pytest.raises(together.BadRequestError, match="between 1 and 128"):
            await client.chat.completions.create(model="m", messages=MSGS, n=0)
    counters = await admin(sim, "GET", "/admin/counters")
    assert counters["invalid_requests"] == 2 and counters["total"]["requests"] == 0


async def test_latency_and_in_flight() -> None:
    async with running_simulator(SimulatorConfig(latency=0.2)) as url:
        start = time.monotonic()
        assert (await post(url, {"model": "m", "messages": MSGS})).status_code == 200
        assert time.monotonic() - start >= 0.2
        await asyncio.gather(*(post(url, {"model": "m", "messages": MSGS}) for _ in range(5)))
        assert (await admin(url, "GET", "/admin/counters"))["max_in_flight"] == 5


def test_cli_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert all(a.help for a in parser._actions)
    args = parser.parse_args(["--port", "0", "--latency", "0.2", "--rate-limit", "60",
                              "--fault", "500:2", "--fault", "timeout:1.5:*:m:x",
                              "--latency-dist", "uniform", "--model", "a", "--model", "b"])
    cfg = config_from_args(args)
    assert (cfg.port, cfg.latency, cfg.rate_limit, cfg.rate_window) == (0, 0.2, 60, 60.0)
    assert cfg.faults == [FaultRule(status=500, count=2),
                          FaultRule(kind="timeout", status=504, seconds=1.5, model="m:x")]
    assert cfg.models == ["a", "b"] and cfg.latency_dist == "uniform"
    with pytest.raises(SystemExit):
        parser.parse_args(["--fault", "oops"])


def test_serve_prints_url_and_stops_on_sigterm() -> None:
    code = ("import argparse; from cachesaver_dist import simulator as s; p = argparse."
            "ArgumentParser(); s.add_arguments(p); s.main_from_args(p.parse_args(['--port', '0']))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                          stderr=subprocess.DEVNULL, env=env) as proc:
        try:
            line = proc.stdout.readline()
            assert line.startswith("LLM simulator listening on http://127.0.0.1:"), line
            url = line.split()[-1]
            assert url.endswith("/v1")
            r = httpx.post(f"{url}/chat/completions", json={"model": "m", "messages": MSGS})
            assert r.status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


# --- streaming, tools, logprobs, the Anthropic Messages API ----------------------------

TOOL = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}


async def test_openai_sdk_stream_tools_and_logprobs(sim: str) -> None:
    import openai

    client = openai.AsyncOpenAI(api_key="t", base_url=base_urls(sim)["openai"], max_retries=0)
    whole = await client.chat.completions.create(model="m", messages=MSGS, n=2, seed=4,
                                                 logprobs=True, top_logprobs=2)
    for choice in whole.choices:
        assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    stream = await client.chat.completions.create(model="m", messages=MSGS, n=2, seed=4,
                                                  stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    for i, choice in enumerate(whole.choices):
        assert "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices and c.choices[0].index == i) == choice.message.content
    called = await client.chat.completions.create(model="m", messages=MSGS, tools=[TOOL])
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
    assert set(json.loads(call.function.arguments)) == {"a", "b"}
    answered = await client.chat.completions.create(model="m", tools=[TOOL], messages=[
        *MSGS, called.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "3"}])
    assert answered.choices[0].message.content and not answered.choices[0].message.tool_calls
    none = await client.chat.completions.create(model="m", messages=MSGS, tools=[TOOL],
                                                tool_choice="none")
    assert none.choices[0].finish_reason == "stop"
    await client.close()


async def test_raw_sse_format(sim: str) -> None:
    async with httpx.AsyncClient(timeout=5) as c:
        r = await c.post(f"{sim}/chat/completions",
                         json={"model": "m", "messages": MSGS, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in r.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


async def test_anthropic_sdk_messages(sim: str) -> None:
    import anthropic

    client = anthropic.AsyncAnthropic(api_key="t", base_url=base_urls(sim)["anthropic"],
                                      max_retries=0)
    msg = await client.messages.create(model="claude", max_tokens=2, system="be short",
                                       messages=MSGS)  # samples have at least 3 words
    assert msg.type == "message" and msg.stop_reason == "max_tokens"
    assert len(msg.content[0].text.split()) == 2 and msg.usage.output_tokens == 2
    assert msg.usage.input_tokens == 5 + 2  # the system prompt counts
    tool = {"name": "add", "input_schema": TOOL["function"]["parameters"]}
    called = await client.messages.create(model="claude", max_tokens=50, messages=MSGS,
                                          tools=[tool], tool_choice={"type": "any"})
    assert called.stop_reason == "tool_use" and called.content[0].type == "tool_use"
    async with client.messages.stream(model="claude", max_tokens=50, messages=MSGS,
                                      tools=[tool]) as stream:
        final = await stream.get_final_message()
    assert final.content[0].input.keys() == {"a", "b"}
    events = [e async for e in await client.messages.create(model="claude", max_tokens=50,
                                                            messages=MSGS, stream=True)]
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(model="claude", max_tokens=0, messages=MSGS)
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    counters = await admin(sim, "GET", "/admin/counters")
    assert counters["models"]["claude"]["requests"] == 4 and counters["invalid_requests"] == 1
    await client.close()


async def test_anthropic_needs_version_header_and_faults_use_its_format(sim: str) -> None:
    async with httpx.AsyncClient(timeout=5) as c:
        r = await c.post(f"{root_url(sim)}/v1/messages",
                         json={"model": "c", "max_tokens": 5, "messages": MSGS})
        assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]
        await admin(sim, "POST", "/admin/faults", {"faults": [{"status": 529, "count": 1}]})
        r = await c.post(f"{root_url(sim)}/v1/messages", headers={"anthropic-version": "x"},
                         json={"model": "c", "max_tokens": 5, "messages": MSGS})
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"
    assert r.headers["request-id"] == r.json()["request_id"]


def test_serve_prints_a_base_url_per_sdk() -> None:
    code = ("import argparse; from cachesaver_dist import simulator as s; p = argparse."
            "ArgumentParser(); s.add_arguments(p); s.main_from_args(p.parse_args(['--port', '0']))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                          stderr=subprocess.DEVNULL, env=env) as proc:
        try:
            lines = [proc.stdout.readline().strip() for _ in range(4)]
            urls = dict(line.split(" SDK: base_url=") for line in lines[1:])
            assert urls["openai"] == lines[0].split()[-1] and urls["openai"].endswith("/v1")
            assert urls["together"] == urls["anthropic"] == urls["openai"].removesuffix("/v1")
            with together.Together(api_key="t", base_url=urls["together"], max_retries=0) as c:
                assert c.chat.completions.create(model="m", messages=MSGS).choices
        finally:
            proc.terminate()
            proc.wait(timeout=5)
