"""The single-process CacheSaver pipeline API with only the import changed: your own
model class behind ``OnlineAPI``, requests in namespaces, a batch ordered by
``request_id``.

Runs offline: the model calls the OpenAI-compatible simulator the project ships,
through the ``openai`` SDK (any client your model already uses works the same).

    python examples/pipeline.py    # REDIS_URL set: that server; else an embedded one
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import openai

from cachesaver_dist.pipelines import OnlineAPI  # instead of: from cachesaver.pipelines ...
from cachesaver_dist.simulator import running_simulator
from cachesaver_dist.typedefs import Batch, BatchRequestModel, Request, Response


class OnlineLLM(BatchRequestModel):
    """Your model, as written for the original: one call per request, n samples each."""

    def __init__(self, client: openai.AsyncOpenAI, model: str) -> None:
        self.client, self.model = client, model

    async def request(self, request: Request) -> Response:
        completion = await self.client.chat.completions.create(
            messages=[{"role": "user", "content": request.prompt}], model=self.model,
            n=request.n, max_tokens=request.max_completion_tokens or None,
            temperature=request.temperature)
        return Response(data=[c.message.content for c in completion.choices])

    async def batch_request(self, batch: Batch) -> list[Response]:
        return list(await asyncio.gather(*(self.request(r) for r in batch.requests)))


@dataclass(frozen=True)
class Request(Request):  # as in the original's notebook: the decoding fields
    temperature: float = 1.0
    max_completion_tokens: int | None = None


async def main() -> None:
    async with running_simulator() as url:
        model = OnlineLLM(openai.AsyncOpenAI(api_key="not-needed", base_url=url), "sim-model")
        life = Request(prompt="What is the meaning of life?", n=2, request_id="sth1",
                       namespace="sth", max_completion_tokens=10)
        pets = Request(prompt="Cats or dogs?", n=1, request_id="sth2", namespace="sth",
                       max_completion_tokens=10)
        async with OnlineAPI(model=model, cache=None, batch_size=2, timeout=0.05) as pipeline:
            first = await pipeline.request(life)
            print("request:", first.data, "cached", first.cached)
            # The same namespace: fresh samples for `life`; the batch is served in
            # request_id order, so re-runs map the same samples to the same requests.
            again, other = await pipeline.batch_request(Batch(requests=[life, pets]))
            print("batch:", again.data, other.data)
            assert not set(again.data) & set(first.data)
            # Another namespace reuses what exists: nothing is generated.
            reused = await pipeline.request(Request(
                prompt="What is the meaning of life?", n=2, request_id="x", namespace="other",
                max_completion_tokens=10))
            print("other namespace, cached:", reused.cached)


if __name__ == "__main__":
    asyncio.run(main())
