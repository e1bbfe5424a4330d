"""Models for tests, loadable by batch worker processes via ``tests.support:<factory>``."""

from __future__ import annotations

import os

import httpx
from redis.asyncio import Redis

from cachesaver_dist import Request, Response, SimModel
from cachesaver_dist.simulator import root_url

COUNTER_ENV = "CACHESAVER_TEST_COUNTER"


class CountingModel(SimModel):
    """The simulator, plus a Redis hash of samples generated per prompt (across processes)."""

    def __init__(self) -> None:
        super().__init__("counting", latency=float(os.environ.get("TEST_MODEL_LATENCY", "0.02")))
        self.counter_key = os.environ[COUNTER_ENV]
        self._redis: Redis | None = None

    async def request(self, request: Request) -> Response:
        response = await super().request(request)
        if self._redis is None:
            self._redis = Redis.from_url(os.environ["REDIS_URL"])
        pipe = self._redis.pipeline(transaction=False)
        pipe.hincrby(self.counter_key, str(request.prompt), request.n)
        pipe.hincrby(self.counter_key, "__calls__", 1)
        # what each call was asked for: prompt, namespace and request id, in order
        pipe.rpush(self.counter_key + ":calls", f"{request.prompt}|{request.namespace}|"
                   f"{request.request_id}")
        await pipe.execute()
        return response


def counting_model() -> CountingModel:
    return CountingModel()


def not_a_model() -> object:
    return object()


def needs_a_variable() -> CountingModel:
    """A factory that fails, as one reading its configuration from the environment."""
    os.environ["CACHESAVER_TEST_NO_SUCH_VARIABLE"]
    return CountingModel()


async def admin(url: str, method: str, path: str, body: object = None) -> dict:
    """Call one of the simulator's admin endpoints (``url`` is its ``/v1`` base)."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        r = await client.request(method, f"{root_url(url)}{path}", json=body)
        assert r.status_code == 200, r.text
        return r.json()
