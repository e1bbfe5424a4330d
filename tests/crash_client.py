"""A client OS process for crash tests: sends requests until told to stop, records all it got.

Usage: python -m tests.crash_client PREFIX RUN MODEL NAMESPACE SEED STOP_FILE [MAX_SECONDS]

``CALLERS`` coroutines each send one request at a time (one of ``PROMPTS``, n in 1..3,
a fresh request id) until STOP_FILE exists, MAX_SECONDS have passed or
``MAX_REQUESTS`` were sent; every request started is awaited. Prints one JSON object:
``{"answers": [...], "errors": [...]}``. An answer holds the namespace, prompt,
indices, each sample as received (data, created, id), where each came from
(``source``: stored, shared or generated) and the wall-clock times the request was sent
(``t0``) and answered (``t``).

``durable_counting_model`` is the batch workers' model for these tests: the simulator,
counting the samples it generates per prompt through a client that rides out a restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from cachesaver_dist import OnlineAPI, Request, Response, SimModel
from cachesaver_dist.connection import connect
from tests.support import COUNTER_ENV

PROMPTS = [f"crash prompt {i}" for i in range(8)]
CALLERS = 6
MAX_REQUESTS = 20_000
COUNT_ATTEMPTS = 200  # 0.1 s apart: the model rides out a 20 s outage


class DurableCountingModel(SimModel):
    """The simulator, plus a Redis hash: prompt -> samples generated (and ``__calls__``).

    A call returns without waiting for Redis, as a real model would (so a crash can cut
    off the store of its samples); the count is written in the background, again until
    Redis takes it. A count acknowledged just before a kill may be counted twice.
    """

    def __init__(self) -> None:
        super().__init__("durable", latency=float(os.environ.get("TEST_MODEL_LATENCY", "0.02")))
        self.counter_key = os.environ[COUNTER_ENV]
        self._redis = connect(os.environ["REDIS_URL"])
        self._counting: set[asyncio.Task] = set()

    async def request(self, request: Request) -> Response:
        response = await super().request(request)
        task = asyncio.create_task(self._count(str(request.prompt), request.n))
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)
        return response

    async def _count(self, prompt: str, n: int) -> None:
        for _ in range(COUNT_ATTEMPTS):
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.hincrby(self.counter_key, prompt, n)
                pipe.hincrby(self.counter_key, "__calls__", 1)
                await pipe.execute()
                return
            except RedisError:
                await asyncio.sleep(0.1)


def durable_counting_model() -> DurableCountingModel:
    return DurableCountingModel()


def _answer(namespace: str, request: Request, response: Response, sent: float
            ) -> dict[str, Any]:
    return {"ns": namespace, "prompt": request.prompt, "n": request.n,
            "rid": request.request_id, "t0": sent, "t": time.time(),
            "index": [m["index"] for m in response.metadata],
            "source": [m.get("source") for m in response.metadata],
            "samples": [[d, m.get("created"), m.get("id")]
                        for d, m in zip(response.data, response.metadata)]}


async def main(prefix: str, run: str, model: str, namespace: str, seed: int,
               stop_file: Path, max_seconds: float) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(seed)
    deadline = time.monotonic() + max_seconds
    answers: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    sent = 0

    async def caller(api: OnlineAPI) -> None:
        nonlocal sent
        while sent < MAX_REQUESTS and time.monotonic() < deadline and not stop_file.exists():
            request = Request(rng.choice(PROMPTS), rng.randint(1, 3), f"{seed}-{sent:06d}",
                              namespace)
            sent += 1
            t0 = time.time()
            try:
                answers.append(_answer(namespace, request, await api.request(request), t0))
            except Exception as exc:  # a lost request: recorded, never hidden
                errors.append({"rid": request.request_id, "t0": t0, "t": time.time(),
                               "error": f"{type(exc).__name__}: {exc}"})

    async with OnlineAPI(model, cache=os.environ["REDIS_URL"], prefix=prefix, run=run,
                         batch_size=8, timeout=0.002, reply_timeout=1.0,
                         request_timeout=60,
                         direct=os.environ.get("CRASH_CLIENT_DIRECT") == "1") as api:
        await asyncio.gather(*(caller(api) for _ in range(CALLERS)))
    return {"answers": answers, "errors": errors}


if __name__ == "__main__":
    p, run, model, ns, seed, stop = sys.argv[1:7]
    limit = float(sys.argv[7]) if len(sys.argv) > 7 else 60.0
    json.dump(asyncio.run(main(p, run, model, ns, int(seed), Path(stop), limit)), sys.stdout)
