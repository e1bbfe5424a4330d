"""A drop-in client in its own OS process, for the cross-process test; prints JSON.

Usage: python -m tests.dropin_proc async|sync BASE_URL PREFIX MODEL NAMESPACE N
(the Redis server comes from REDIS_URL).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from cachesaver_dist.models.openai import AsyncOpenAI, OpenAI

MESSAGES = [{"role": "user", "content": "Name three prime numbers"}]


def report(completion, meta) -> None:
    json.dump({"contents": [c.message.content for c in completion.choices],
               "cached": meta.cached, "duplicated": meta.duplicated,
               "usage": completion.usage.model_dump()}, sys.stdout)


async def run_async(base_url: str, prefix: str, model: str, namespace: str, n: int) -> None:
    async with AsyncOpenAI(api_key="test", base_url=base_url, cache=os.environ["REDIS_URL"],
                           prefix=prefix, namespace=namespace) as client:
        report(*await client.chat.completions.create(model=model, messages=MESSAGES, n=n,
                                                     metadata=True))


def run_sync(base_url: str, prefix: str, model: str, namespace: str, n: int) -> None:
    with OpenAI(api_key="test", base_url=base_url, cache=os.environ["REDIS_URL"],
                prefix=prefix, namespace=namespace) as client:
        report(*client.chat.completions.create(model=model, messages=MESSAGES, n=n,
                                               metadata=True))


if __name__ == "__main__":
    kind, base, pre, mod, ns, count = sys.argv[1:7]
    if kind == "async":
        asyncio.run(run_async(base, pre, mod, ns, int(count)))
    else:
        run_sync(base, pre, mod, ns, int(count))
