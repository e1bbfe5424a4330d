"""Models for our batch worker processes that count what they generate, across processes.

Loaded by ``worker batch --model bench.models:counting_sim`` (``PYTHONPATH`` = repo).
Environment: ``BENCH_COUNTER_KEY`` (a Redis hash: prompt -> samples generated, and
``__calls__``), ``BENCH_MODEL_LATENCY`` (seconds per call), ``REDIS_URL``.
Texts carry a unique tag, so two samples never share a text by accident.

``bench.models:flaky_counting_model`` (``bench/faults.py``): the crash tests' counting
simulator (``tests.crash_client``), failing every call while the file named by
``BENCH_FAIL_FLAG`` exists.
"""

from __future__ import annotations

import asyncio
import os

from cachesaver_dist import Request, Response, SingleRequestModel
from redis.asyncio import Redis

from bench.workloads import sim_text, words


class CountingSim(SingleRequestModel):
    def __init__(self) -> None:
        self.model = "bench:counting-sim"
        self.latency = float(os.environ.get("BENCH_MODEL_LATENCY", "0"))
        self.counter_key = os.environ["BENCH_COUNTER_KEY"]
        self._redis: Redis | None = None

    async def request(self, request: Request) -> Response:
        if self.latency:
            await asyncio.sleep(self.latency)
        prompt = str(request.prompt)
        data = [sim_text(prompt) for _ in range(request.n)]
        if self._redis is None:
            self._redis = Redis.from_url(os.environ["REDIS_URL"])
        pipe = self._redis.pipeline(transaction=False)
        pipe.hincrby(self.counter_key, prompt, request.n)
        pipe.hincrby(self.counter_key, "__calls__", 1)
        await pipe.execute()
        usage = {"prompt_tokens": words(prompt) / request.n}
        return Response(data=data, metadata=[{"usage": {**usage, "completion_tokens": words(t)}}
                                             for t in data])


def counting_sim() -> CountingSim:
    return CountingSim()


def flaky_counting_model() -> SingleRequestModel:
    from tests.crash_client import DurableCountingModel

    class FlakyCountingModel(DurableCountingModel):
        """Raises (after its latency) while ``BENCH_FAIL_FLAG`` names an existing file."""

        def __init__(self) -> None:
            super().__init__()
            self.flag = os.environ["BENCH_FAIL_FLAG"]

        async def request(self, request: Request) -> Response:
            if os.path.exists(self.flag):  # noqa: ASYNC240 (a stat: microseconds)
                await asyncio.sleep(self.latency)
                raise RuntimeError("injected failure (bench.faults)")
            return await super().request(request)

    return FlakyCountingModel()
