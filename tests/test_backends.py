"""Provider backends (together:, openai:) against the simulator over real HTTP.

The worker path: CLI batch and cache worker processes on a real Redis, a client
``OnlineAPI("together:sim-model")`` in this process. Retry logic is also unit-tested
with an injected sleep (no real waiting).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as sync_redis

from cachesaver_dist import GenerationError, OnlineAPI, Request, prompt_key
from cachesaver_dist.backends import BackendOptions, make_backend
from cachesaver_dist.backends.chat import decoding_params, estimate_tokens, samples, split_n
from cachesaver_dist.backends.retry import ProviderError, RetryPolicy, retry_after, with_retry
from cachesaver_dist.models import ModelError
from cachesaver_dist.protocol import Keys, decode_sample
from cachesaver_dist.simulator import (
    SimulatorConfig,
    running_simulator,
    together_base_url,
)
from tests.conftest import ROOT, Processes
from tests.support import admin

MODEL = "sim-model"


@dataclass(frozen=True)
class DecodingRequest(Request):
    temperature: float | None = None
    max_completion_tokens: int | None = None


@pytest.fixture
async def sim() -> AsyncIterator[str]:
    async with running_simulator(SimulatorConfig()) as url:
        yield url


async def sim_counters(url: str) -> dict:
    return (await admin(url, "GET", "/admin/counters"))["models"].get(MODEL, {})


def start_workers(processes: Processes, route: str, base_url: str, secret: str,
                  *flags: str, batch_workers: int = 1) -> None:
    """A cache worker and ``batch_workers`` batch workers serving ``route``."""
    env = {"TOGETHER_API_KEY": secret, "OPENAI_API_KEY": secret}
    processes.cli("worker", "cache", name="cache")
    for _ in range(batch_workers):
        processes.cli("worker", "batch", "--model", route, "--base-url", base_url, *flags,
                      name="batch", env=env)
    processes.wait_alive("cache")
    processes.wait_alive(route, batch_workers)


def assert_secret_nowhere(processes: Processes, redis_url: str, keys: Keys, secret: str) -> None:
    """The API key is in no worker log and in no value under our prefix (nor arq's)."""
    for proc in processes.procs:
        assert secret not in Path(proc.log_path).read_text(errors="replace")
    client = sync_redis.Redis.from_url(redis_url)
    needle, seen = secret.encode(), 0
    try:
        for pattern in (f"{keys.prefix}*", "arq:*"):
            for key in client.scan_iter(match=pattern, count=500):
                seen += 1
                assert needle not in key
                kind = client.type(key).decode()
                if kind == "string":
                    values = [client.get(key) or b""]
                elif kind == "hash":
                    values = [b"%s=%s" % kv for kv in client.hgetall(key).items()]
                elif kind == "list":
                    values = client.lrange(key, 0, -1)
                elif kind == "set":
                    values = list(client.smembers(key))
                elif kind == "zset":
                    values = client.zrange(key, 0, -1)
                else:  # stream
                    values = [repr(client.xrange(key)).encode()]
                assert not any(needle in v for v in values), key
    finally:
        client.close()
    assert seen > 0


def pipeline(route: str, redis_url: str, keys: Keys) -> OnlineAPI:
    return OnlineAPI(route, cache=redis_url, prefix=keys.prefix, request_timeout=60)


# --- through the worker processes ----------------------------------------------------


async def test_together_worker_stores_samples_with_usage(sim, redis_url, keys, processes):
    route, secret = f"together:{MODEL}", f"sk-test-{uuid.uuid4().hex}"
    start_workers(processes, route, together_base_url(sim), secret, "--max-n", "2")
    req = DecodingRequest("Name three caches", 2, "a", "ns1", temperature=0.7,
                          max_completion_tokens=6)
    async with pipeline(route, redis_url, keys) as pipe:
        first = await pipe.request(req)
        assert len(first.data) == 2 and len(set(first.data)) == 2
        assert first.cached == [False, False]
        assert all(1 <= len(text.split()) <= 6 for text in first.data)
        for meta in first.metadata:
            assert meta["id"].startswith("chatcmpl-") and meta["model"] == MODEL
            assert meta["finish_reason"] in ("stop", "length")
            assert meta["usage"]["prompt_tokens"] == 3 / 2  # one call of n=2
            assert meta["usage"]["completion_tokens"] > 0
        stored = sync_redis.Redis.from_url(redis_url)
        try:
            raw = stored.hget(keys.samples(prompt_key(route, req.model_fields())), "0")
        finally:
            stored.close()
        sample = decode_sample(raw)
        assert sample["data"] == first.data[0] and sample["usage"] == first.metadata[0]["usage"]
        before = await sim_counters(sim)
        assert (before["requests"], before["samples"]) == (1, 2)

        third = await pipe.request(DecodingRequest(**{**vars(req), "n": 3, "namespace": "ns2"}))
        assert third.data[:2] == first.data and third.cached == [True, True, False]
        after = await sim_counters(sim)
        assert (after["requests"], after["samples"]) == (2, 3)  # exactly the missing one

        five = await pipe.request(Request("Five samples, please", 5, "b", "ns1"))
        assert len(five.data) == 5 and len(set(five.data)) == 5
        last = await sim_counters(sim)
        assert (last["requests"], last["samples"]) == (5, 8)  # split 2 + 2 + 1 (--max-n 2)
        # each of the three calls paid the prompt: only the second sample of a call is not
        assert five.duplicated == [False, True, False, True, False]
    assert_secret_nowhere(processes, redis_url, keys, secret)


async def test_openai_worker_retries_429_500_and_timeouts(sim, redis_url, keys, processes):
    route, secret = f"openai:{MODEL}", f"sk-test-{uuid.uuid4().hex}"
    start_workers(processes, route, sim, secret, "--request-timeout", "1", "--retry-budget", "4")
    async with pipeline(route, redis_url, keys) as pipe:
        await admin(sim, "POST", "/admin/faults",
                    {"faults": [{"status": 429, "count": 2, "retry_after": 0.3}]})
        started = time.monotonic()
        answer = await pipe.request(Request("rate limited", 1, "a", "ns"))
        assert len(answer.data) == 1 and time.monotonic() - started >= 0.6  # 2 x Retry-After
        await admin(sim, "POST", "/admin/faults", {"faults": [{"status": 500, "count": 2}]})
        assert len((await pipe.request(Request("server error", 1, "b", "ns"))).data) == 1
        await admin(sim, "POST", "/admin/faults",
                    {"faults": [{"kind": "timeout", "seconds": 5, "count": 1}]})
        assert len((await pipe.request(Request("slow", 1, "c", "ns"))).data) == 1
        counters = await sim_counters(sim)
        assert counters["faults"] == 5 and counters["requests"] == 3
    assert_secret_nowhere(processes, redis_url, keys, secret)


async def test_permanent_error_reaches_every_waiter_and_releases_claim(
        sim, redis_url, keys, processes):
    route, secret = f"together:{MODEL}", f"sk-test-{uuid.uuid4().hex}"
    start_workers(processes, route, together_base_url(sim), secret)
    await admin(sim, "POST", "/admin/faults",
                {"faults": [{"status": 400, "message": "n must be at most 128"}]})
    async with pipeline(route, redis_url, keys) as pipe:
        results = await asyncio.gather(pipe.request(Request("bad", 1, "a", "ns1")),
                                       pipe.request(Request("bad", 1, "b", "ns2")),
                                       return_exceptions=True)
        for result in results:
            assert isinstance(result, GenerationError), result
            assert "together returned 400 (invalid_request_error): n must be at most 128" \
                in str(result)
        assert (await sim_counters(sim))["faults"] == 1  # a 400 is not retried
        await admin(sim, "DELETE", "/admin/faults")
        later = await pipe.request(Request("bad", 1, "c", "ns3"))
        served = (await sim_counters(sim))["requests"]
        # the failed requests used up nothing: asked again, they get index 0, now stored
        again = await asyncio.gather(pipe.request(Request("bad", 1, "a", "ns1")),
                                     pipe.request(Request("bad", 1, "b", "ns2")))
        assert (await sim_counters(sim))["requests"] == served
    assert len(later.data) == 1 and later.metadata[0]["index"] == 0
    assert later.cached == [False]
    for response in again:
        assert response.data == later.data and response.cached == [True]
        assert response.metadata[0]["index"] == 0


def test_worker_refuses_to_start_without_api_key_or_base_url(processes):
    missing_key = processes.cli("worker", "batch", "--model", f"together:{MODEL}",
                                name="nokey", env={"TOGETHER_API_KEY": ""})
    no_url = processes.cli("worker", "batch", "--model", f"openai:{MODEL}", name="nourl",
                           env={"OPENAI_BASE_URL": ""})
    assert missing_key.wait(timeout=30) == 2 and no_url.wait(timeout=30) == 2
    assert "TOGETHER_API_KEY" in processes.logs(missing_key)
    assert "--base-url" in processes.logs(no_url) and "OPENAI_BASE_URL" in processes.logs(no_url)


@pytest.mark.parametrize(("models", "said"), [
    (["together:x"], "model 'together:x' needs TOGETHER_API_KEY in the environment"),
    (["sim:x", "openai:x"], "model 'openai:x' needs the server's base URL: pass --base-url"),
    (["together:"], "model name 'together:' names no model"),
    (["nonsense"], "model name 'nonsense' is none of"),
    (["sim:"], "model name 'sim:' is none of 'sim:<name>'"),
    (["dropin:openai"], "model name 'dropin:openai' is none of"),
])
def test_worker_checks_its_models_before_starting_the_embedded_server(tmp_path, models, said):
    """Without REDIS_URL a worker starts the embedded server of --data-dir: a model it
    could not build (no API key, no base URL, a bad name) is refused before that."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "TOGETHER_API_KEY",
                                                            "OPENAI_BASE_URL")}
    data = tmp_path / "data"
    done = subprocess.run(
        [sys.executable, "-m", "cachesaver_dist.cli", "worker", "batch",
         *(a for m in models for a in ("--model", m)), "--data-dir", str(data)],
        env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
        cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"cachesaver-dist: {said}"), done.stderr
    assert len(done.stderr.splitlines()) == 1  # no server started, stopped or warned about
    assert not data.exists()


def test_a_model_factory_that_raises_is_one_line_naming_the_model(redis_url):
    """A ``package.module:factory`` whose factory fails (here a KeyError, a variable it
    reads is not set) ends the worker with one line naming the model and the error, not
    a traceback; status 2, as for a factory that cannot be imported."""
    env = {k: v for k, v in os.environ.items() if k != "CACHESAVER_TEST_NO_SUCH_VARIABLE"}
    done = subprocess.run(
        [sys.executable, "-m", "cachesaver_dist.cli", "worker", "batch", "--model",
         "tests.support:needs_a_variable", "--redis-url", redis_url, "--prefix", "factory:"],
        env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
        cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "cachesaver-dist: cannot load model 'tests.support:needs_a_variable': its factory "
        "needs_a_variable() raised KeyError: 'CACHESAVER_TEST_NO_SUCH_VARIABLE'")


# --- in-process pieces ---------------------------------------------------------------


async def test_make_backend_names_and_options(monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", "x")
    assert make_backend("sim:x") is None and make_backend("tests.support:counting_model") is None
    backend = make_backend("together:org/model-1", BackendOptions(base_url="http://h:1"))
    assert (backend.model, backend.provider_model) == ("together:org/model-1", "org/model-1")
    await backend.aclose()
    with pytest.raises(ValueError, match="names no model"):
        make_backend("openai:")
    with pytest.raises(ValueError, match="shared through Redis"):
        make_backend("openai:m", BackendOptions(base_url="http://h", rpm=5))
    with pytest.raises(ValueError, match="whole number of seconds"):
        BackendOptions(rate_window=0.5)
    with pytest.raises(ValueError, match="max_n must be"):
        BackendOptions(max_n=0)


def test_request_mapping_splitting_and_parsing():
    req = DecodingRequest("hi", 3, "r", "ns", temperature=0.5, max_completion_tokens=9)
    assert decoding_params(req) == {"temperature": 0.5, "max_completion_tokens": 9}
    assert decoding_params(Request("hi", 1, None, None)) == {}
    assert split_n(5, 2) == [2, 2, 1] and split_n(4, 2) == [2, 2] and split_n(1, 16) == [1]
    body = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 9, "n": 2}
    assert estimate_tokens(body) == 10 + 18
    raw = {"id": "c1", "model": "m", "usage": {"prompt_tokens": 4, "completion_tokens": 6},
           "choices": [{"index": 1, "message": {"content": "b"}, "finish_reason": "stop"},
                       {"index": 0, "message": {"content": "a"}, "finish_reason": "length",
                        "usage": {"completion_tokens": 5}}]}
    texts, meta = samples("p", raw, 2)
    assert texts == ["a", "b"]
    assert meta[0] == {"finish_reason": "length", "id": "c1", "model": "m",
                       "usage": {"prompt_tokens": 2.0, "completion_tokens": 5}}
    assert meta[1]["usage"] == {"prompt_tokens": 2.0, "completion_tokens": 3.0}
    with pytest.raises(ModelError, match=r"returned 2 choices where 3 were asked for.*--max-n"):
        samples("p", raw, 3)


class FakeSleep:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def failing(*errors: ProviderError):
    """An attempt function raising ``errors`` in turn, then returning "ok"."""
    queue, calls = list(errors), []

    async def attempt() -> str:
        calls.append(1)
        if queue:
            raise queue.pop(0)
        return "ok"

    attempt.calls = calls  # type: ignore[attr-defined]
    return attempt


@pytest.mark.parametrize("status, transient", [
    (429, True), (408, True), (409, True), (500, True), (502, True), (503, True), (None, True),
    (400, False), (401, False), (403, False), (404, False), (422, False),
])
def test_error_classification(status, transient):
    assert ProviderError("p", status, "m").transient is transient


async def test_retry_honours_retry_after_and_backs_off_with_jitter():
    sleep = FakeSleep()
    attempt = failing(ProviderError("p", 429, "slow down", retry_after=2.5),
                      ProviderError("p", 500, "oops"), ProviderError("p", None, "timeout"))
    policy = RetryPolicy(budget=6, base=0.5, cap=1.5)
    assert await with_retry(attempt, policy, sleep=sleep, rand=lambda: 1.0) == "ok"
    assert sleep.waits == [2.5, 1.0, 1.5]  # Retry-After; then min(cap, base * 2**k) * rand
    half = FakeSleep()
    await with_retry(failing(ProviderError("p", 503, "x")), policy, sleep=half, rand=lambda: 0.5)
    assert half.waits == [0.25]  # full jitter: uniform(0, base)


async def test_retry_budget_bounds_attempts_and_permanent_errors_are_not_retried():
    sleep = FakeSleep()
    attempt = failing(*[ProviderError("together", 500, "down", kind="server_error")] * 10)
    with pytest.raises(ProviderError) as info:
        await with_retry(attempt, RetryPolicy(budget=3), sleep=sleep)
    assert len(attempt.calls) == 3 and len(sleep.waits) == 2
    assert str(info.value).startswith("together returned 500 (server_error): down")
    assert "gave up after 3 attempts" in str(info.value)
    assert isinstance(info.value, ModelError)
    bad = failing(ProviderError("openai", 401, "invalid api key"))
    with pytest.raises(ProviderError, match="openai returned 401: invalid api key"):
        await with_retry(bad, RetryPolicy(), sleep=sleep)
    assert len(bad.calls) == 1 and len(sleep.waits) == 2


def test_retry_after_header_forms():
    assert retry_after({"Retry-After": "0.25"}) == 0.25
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after({"Retry-After": "3"}) == 3.0
    assert retry_after({}) is None and retry_after({"Retry-After": "soon"}) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after({"Retry-After": date}) <= 31
