"""A client OS process for cross-process tests: sends requests, prints what it got as JSON.

Usage: python -m tests.client_proc PREFIX RUN MODEL NAMESPACE SEED COUNT
(``CLIENT_DIRECT=1``: ``OnlineAPI(direct=True)``)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys

from cachesaver_dist import OnlineAPI, Request

PROMPTS = [f"overlapping prompt {i}" for i in range(12)]


async def main(prefix: str, run: str, model: str, namespace: str, seed: int, count: int) -> None:
    rng = random.Random(seed)
    requests = [Request(rng.choice(PROMPTS), rng.randint(1, 3), f"{seed}-{i:04d}", namespace)
                for i in range(count)]
    async with OnlineAPI(model, cache=os.environ["REDIS_URL"], prefix=prefix, run=run,
                         batch_size=8, timeout=0.002, reply_timeout=1.0,
                         request_timeout=90,
                         direct=os.environ.get("CLIENT_DIRECT") == "1") as api:
        responses = await asyncio.gather(*(api.request(r) for r in requests))
    out = [{"prompt": r.prompt, "n": r.n, "data": resp.data,
            "index": [m["index"] for m in resp.metadata]}
           for r, resp in zip(requests, responses)]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    p, run, model, ns, seed, count = sys.argv[1:7]
    asyncio.run(main(p, run, model, ns, int(seed), int(count)))
