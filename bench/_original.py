"""Driver of the original CacheSaver 0.0.6 (runs in ``bench/.venv-original``).

Reads a JSON spec on stdin, prints one JSON line with the results. Uses only the
original's public API: ``cachesaver.pipelines.OnlineAPI``, ``cachesaver.typedefs``
and a ``diskcache.Cache``; the model is an in-process simulator that sleeps like a
remote API.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from cachesaver.pipelines import OnlineAPI
from cachesaver.typedefs import Request, Response, SingleRequestModel
from diskcache import Cache

from bench import workloads as W


class SimModel(SingleRequestModel):
    """Sleeps ``latency`` per call (as a remote API would), returns ``n`` distinct texts."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.calls = self.samples = self.prompt_tokens = self.completion_tokens = 0
        self.in_flight = self.max_in_flight = 0

    async def request(self, request: Request) -> Response:
        prompt = request.kwargs.get("prompt") or str(request.kwargs["messages"])
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        data = [W.sim_text(prompt) for _ in range(request.n)]
        self.calls += 1
        self.samples += request.n
        self.prompt_tokens += W.words(prompt)
        self.completion_tokens += sum(W.words(t) for t in data)
        return Response(data=data)

    def counters(self) -> dict[str, float]:
        return {"samples": self.samples, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "calls": self.calls}


def asker(api: OnlineAPI) -> W.Ask:
    async def ask(prompt: W.Prompt, n: int, namespace: str, request_id: str) -> W.Answer:
        fields = ({"prompt": prompt, "temperature": 0.7, "max_tokens": 64}
                  if isinstance(prompt, str)
                  else {"messages": prompt, "temperature": 0.7, **W.CHAT_PARAMS})
        r = await api.request(Request(args=(), kwargs=fields, n=n, request_id=request_id,
                                      namespace=namespace))
        return W.Answer(list(r.data), list(r.cached or [False] * n),
                        list(r.duplicated or [False] * n))
    return ask


async def hits(spec: dict[str, Any]) -> dict[str, Any]:
    model = SimModel(0.0)
    out: dict[str, Any] = {"phases": {}}
    async with OnlineAPI(model, Cache(spec["cache_dir"]), batch_size=32, timeout=0.005) as api:
        await W.warm(asker(api), spec["prompts"], workload=spec.get("workload", "short"))
    for ph in spec["phases"]:
        async with OnlineAPI(model, Cache(spec["cache_dir"]), batch_size=ph["batch_size"],
                             timeout=ph["timeout"]) as api:
            out["phases"][ph["name"]] = await W.hit_phase(asker(api), ph, spec)
    return out


async def burst(spec: dict[str, Any]) -> dict[str, Any]:
    rounds = []
    for r in range(spec["rounds"]):
        model = SimModel(spec["latency"])
        async with OnlineAPI(model, Cache(spec["cache_dir"]), batch_size=spec["batch_size"],
                             timeout=spec["timeout"]) as api:
            res = await W.burst(asker(api), spec["count"], f"{spec['tag']}-{r}")
        res.update(model_calls=model.calls, max_in_flight=model.max_in_flight)
        rounds.append(res)
    return {"rounds": rounds}


async def mp_client(spec: dict[str, Any]) -> dict[str, Any]:
    model = SimModel(spec["latency"])
    async with OnlineAPI(model, Cache(spec["cache_dir"]), batch_size=spec["batch_size"],
                         timeout=spec["timeout"]) as api:
        answers = await W.mp_client(asker(api), scenario=spec["scenario"],
                                    prompts=spec["prompts"], n=spec["n"],
                                    namespace=spec["namespace"], seed=spec["seed"],
                                    concurrency=spec["concurrency"], start_at=spec["start_at"])
    return {"answers": answers, "generated": model.samples, "calls": model.calls}


async def savings(spec: dict[str, Any]) -> dict[str, Any]:
    model = SimModel(spec["latency"])

    async def snapshot() -> dict[str, float]:
        return model.counters()

    t0 = time.perf_counter()
    async with OnlineAPI(model, Cache(spec["cache_dir"]), batch_size=32,
                         timeout=spec.get("timeout", 1.0)) as api:
        rows = await W.savings(asker(api), spec["puzzles"], snapshot)
    return {"rows": rows, "seconds": time.perf_counter() - t0}


async def dropin_hits(spec: dict[str, Any]) -> dict[str, Any]:
    """``bench.dropin``: the ``hit_path`` phases through the original's
    ``cachesaver.models.openai.AsyncOpenAI`` at its defaults."""
    from cachesaver.models.openai import AsyncOpenAI

    client = AsyncOpenAI(cachedir=spec["cache_dir"], api_key="bench",
                         base_url=spec["base_url"], max_retries=0)
    return await W.dropin_phases(client.chat.completions.create, spec)


def dropin_sync(spec: dict[str, Any]) -> dict[str, Any]:
    """``bench.dropin``'s sync phase: sequential hits through ``cachesaver.models.openai.
    OpenAI`` at its defaults, no event loop running."""
    from cachesaver.models.openai import OpenAI

    client = OpenAI(cachedir=spec["cache_dir"], api_key="bench", base_url=spec["base_url"],
                    max_retries=0)
    return W.sync_phase(client.chat.completions.create, spec)


MODES = {"hits": hits, "dropin_hits": dropin_hits, "dropin_sync": dropin_sync, "burst": burst,
         "mp_client": mp_client, "savings": savings}


def main() -> None:
    spec = json.loads(sys.stdin.read())
    result = MODES[spec["mode"]](spec)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
