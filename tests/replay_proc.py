"""A client OS process that records or replays a run: prints ``{request_id: samples}`` as JSON.

Usage: python -m tests.replay_proc PREFIX RUN MODEL MODE SHARE SHARES SEED
MODE is ``record`` (``OnlineAPI(..., run=RUN, manifest=True)``) or ``replay``
(``OnlineAPI(..., replay=RUN)``). The process sends its share of ``requests()`` (those
whose position modulo SHARES is SHARE, after a shuffle by SEED) concurrently, each after a
random delay, so requests arrive in another order in every process and run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys

from cachesaver_dist import OnlineAPI, Request

NAMESPACES = ("tot", "cot", "reflect")


def requests() -> list[Request]:
    """36 requests over 3 namespaces sharing 6 prompts; request ids unique per namespace."""
    return [Request(f"round trip prompt {i % 6}", 1 + i % 3, f"q{i:03d}",
                    NAMESPACES[i % 3]) for i in range(36)]


def share(seed: int, part: int, parts: int) -> list[Request]:
    mine = requests()
    random.Random(seed).shuffle(mine)
    return mine[part::parts]


async def main(prefix: str, run: str, model: str, mode: str, part: int, parts: int,
               seed: int) -> None:
    rng = random.Random(seed * 7919 + part)
    mine = share(seed, part, parts)
    options = {"run": run, "manifest": True} if mode == "record" else {"replay": run}

    async def one(api: OnlineAPI, request: Request) -> tuple[str, list]:
        await asyncio.sleep(rng.random() * 0.2)
        response = await api.request(request)
        return f"{request.namespace}/{request.request_id}", response.data

    async with OnlineAPI(model, cache=os.environ["REDIS_URL"], prefix=prefix, batch_size=4,
                         timeout=0.002, reply_timeout=1.0, request_timeout=90,
                         **options) as api:  # type: ignore[arg-type]
        got = await asyncio.gather(*(one(api, r) for r in mine))
    json.dump(dict(got), sys.stdout)


if __name__ == "__main__":
    prefix, run, model, mode, part, parts, seed = sys.argv[1:8]
    asyncio.run(main(prefix, run, model, mode, int(part), int(parts), int(seed)))
