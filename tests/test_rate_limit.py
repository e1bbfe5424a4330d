"""Cluster-wide limits: several batch worker processes share one budget through Redis."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from cachesaver_dist import OnlineAPI, Request
from cachesaver_dist.backends.limiter import ClusterLimiter
from cachesaver_dist.errors import ModelError
from cachesaver_dist.simulator import SimulatorConfig, root_url, running_simulator
from tests.support import admin
from tests.test_backends import MODEL, assert_secret_nowhere, start_workers

# The limiter times calls in the workers, the simulator on arrival: the hop between
# the two varies (a worker's first call opens its connection; 2 busy cores add tens of ms).
ARRIVAL_JITTER_S = 0.2


@contextlib.contextmanager
def simulator_process(*flags: str) -> Iterator[str]:
    """The simulator in its own process (like a remote provider); yields its /v1 URL."""
    proc = subprocess.Popen([sys.executable, "-m", "cachesaver_dist.cli", "simulator",
                             "--port", "0", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()  # "LLM simulator listening on URL"
        assert "listening on" in line, f"simulator did not start: {line!r}"
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def most_in_any_window(times: list[float], window: float) -> int:
    """The largest number of ``times`` inside any half-open interval of length ``window``."""
    times = sorted(times)
    return max(sum(1 for u in times[i:] if u < t + window) for i, t in enumerate(times))


async def test_three_workers_share_one_requests_per_window_budget(redis_url, keys, processes):
    rpm, window, prompts = 4, 2, 18
    route, secret = f"openai:{MODEL}", f"sk-test-{uuid.uuid4().hex}"
    with simulator_process("--latency", "0.02") as sim:
        # --concurrency 6: no worker holds more than 6 of the 18, so all three take part.
        start_workers(processes, route, sim, secret, "--rpm", str(rpm),
                      "--rate-window", str(window), "--concurrency", "6", batch_workers=3)
        started = time.monotonic()
        async with OnlineAPI(route, cache=redis_url, prefix=keys.prefix,
                             request_timeout=60) as pipe:
            answers = await asyncio.gather(*(pipe.request(Request(f"prompt {i}", 1, str(i), None))
                                             for i in range(prompts)))
        elapsed = time.monotonic() - started
        async with httpx.AsyncClient(timeout=5) as client:
            counters = (await client.get(f"{root_url(sim)}/admin/counters")).json()
    assert all(len(a.data) == 1 for a in answers)
    times = counters["models"][MODEL]["request_times"]
    assert len(times) == counters["total"]["requests"] == prompts
    assert most_in_any_window(times, window - ARRIVAL_JITTER_S) <= rpm
    # 18 calls at 4 per 2 s: the last 2 cannot start before 8 s (without limits: < 1 s).
    assert elapsed >= (prompts - 1) // rpm * window - ARRIVAL_JITTER_S
    assert_secret_nowhere(processes, redis_url, keys, secret)


async def test_max_concurrent_is_cluster_wide(redis_url, keys, processes):
    route = f"openai:{MODEL}"
    async with running_simulator(SimulatorConfig(latency=0.3)) as sim:
        start_workers(processes, route, sim, "k", "--max-concurrent", "2", batch_workers=3)
        async with OnlineAPI(route, cache=redis_url, prefix=keys.prefix,
                             request_timeout=60) as pipe:
            await asyncio.gather(*(pipe.request(Request(f"p{i}", 1, str(i), None))
                                   for i in range(8)))
        counters = await admin(sim, "GET", "/admin/counters")
    assert counters["models"][MODEL]["requests"] == 8 and counters["max_in_flight"] == 2


async def test_token_budget_waits_and_refuses_calls_that_never_fit(redis, keys):
    limiter = ClusterLimiter(redis, keys, "openai:tok", tpm=100, window=1)
    started = time.monotonic()
    async with limiter.call(60):
        pass
    async with limiter.call(60):  # 120 > 100 in one window: waits for the next one
        pass
    assert time.monotonic() - started >= 0.2
    with pytest.raises(ModelError, match="needs about 500 tokens, over the limit of 100"):
        async with limiter.call(500):
            pass


async def test_slot_of_a_dead_holder_expires(redis, keys):
    limiter = ClusterLimiter(redis, keys, "openai:conc", max_concurrent=1, slot_ttl=0.4)
    await limiter._acquire_slot()  # a worker that died holding its slot
    started = time.monotonic()
    async with limiter.call(1):
        waited = time.monotonic() - started
    assert 0.3 <= waited < 2
    assert await redis.zcard(f"{keys.prefix}limit:openai:conc:concurrent") == 0
