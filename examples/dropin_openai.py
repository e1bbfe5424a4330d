"""The drop-in OpenAI client: change one import, and calls are cached, deduplicated and
batched across every process that shares the cache.

Runs offline: the OpenAI-compatible simulator the project ships stands in for the
provider. Against the real one, drop ``running_simulator`` and ``base_url``.

    python examples/dropin_openai.py    # REDIS_URL set: that server; else an embedded one
"""

from __future__ import annotations

import asyncio

from cachesaver_dist.models.openai import AsyncOpenAI  # instead of: from openai import ...
from cachesaver_dist.simulator import running_simulator

QUESTION = [{"role": "user", "content": "Cats or dogs?"}]


async def main() -> None:
    async with running_simulator() as url, \
            AsyncOpenAI(namespace="method-a", api_key="not-needed", base_url=url) as client:
        ask = {"model": "sim-model", "messages": QUESTION, "n": 3, "temperature": 0.7}
        first = await client.chat.completions.create(**ask)
        print("method-a:", [c.message.content for c in first.choices])

        # Another namespace (another method, an ablation) reuses the same samples: free.
        _, meta = await client.chat.completions.create(**ask, namespace="method-b",
                                                       metadata=True)
        print("method-b, cached:", meta.cached)

        # The same namespace again gets samples it has not seen: generated now.
        more, meta = await client.chat.completions.create(**ask, metadata=True)
        print("method-a again, cached:", meta.cached)
        assert not {c.message.content for c in more.choices} & \
            {c.message.content for c in first.choices}


if __name__ == "__main__":
    asyncio.run(main())
