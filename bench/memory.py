"""Study ``memory``: what a cache hit leaves behind in Redis, and what a stored sample costs.

Counted, not timed, so the figures hold on any machine: every key under the study's
prefix (and arq's job keys) is measured with ``MEMORY USAGE key SAMPLES 0`` before and
after each workload, and the difference is split by key family (``s:``, ``u:``,
``r:``, ...). A private Redis (never ``REDIS_URL``), one cache worker and one batch
worker (``sim:bench``) as processes; the client is ``OnlineAPI`` in this process.

Workloads, after the samples are stored (warm-up, not counted):

* ``hits, one namespace``: ``ROUNDS`` passes over ``PROMPTS`` prompts in one namespace,
  ``n=1``, each pass a hit on the next stored sample: the pure cost of a hit (its
  namespace counters already exist after the first pass, which is not counted);
* ``hits, fresh namespace each``: every request in a namespace never used (the
  ``hit_path`` workload): each hit also creates the counter of its (prompt, namespace)
  pair, which the contract needs (the next request there gets the next sample);
* ``stored samples``: what ``s:<K>`` costs per sample, against the sample's payload (the
  model's text) and its encoded record (text + metadata).

Targets (issue #11): memory left per hit ≤ 16 B amortised; per stored sample ≤ payload +
150 B. Writes its section and ``bench/results/memory.json``.

Usage: ``.venv/bin/python -m bench.memory``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import common as C

C.reexec_in_project_venv()

import asyncio  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

STUDY = "memory"
MODEL = "sim:bench"
PROMPTS, SAMPLES, ROUNDS = 256, 8, 6
TARGET_HIT_B, TARGET_SAMPLE_OVER_B = 16, 150


def family(key: str, prefix: str) -> str:
    if key.startswith("arq:"):
        return "arq:" + key.split(":")[1]
    rest = key[len(prefix):]
    return rest.split(":", 1)[0] + (":" if ":" in rest else "")


async def footprint(redis: Any, prefix: str) -> Counter[str]:
    """Bytes per key family under ``prefix`` (and arq's keys of its jobs)."""
    out: Counter[str] = Counter()
    for pattern in (f"{prefix}*", f"arq:*:{prefix}*"):
        async for raw in redis.scan_iter(match=pattern, count=1000):
            key = raw.decode()
            out[family(key, prefix)] += await redis.memory_usage(key, samples=0) or 0
    return out


async def measure(url: str, prefix: str) -> dict[str, Any]:
    from cachesaver_dist import OnlineAPI, Request
    from cachesaver_dist.connection import connect
    from cachesaver_dist.protocol import Keys, decode_sample, prompt_key

    redis = connect(url)
    keys = Keys(prefix)
    prompts = [f"memory study prompt {i:04d}: " + "x" * 100 for i in range(PROMPTS)]
    out: dict[str, Any] = {}

    async def ask(api: OnlineAPI, namespace: str | None, first: int = 0) -> None:
        # namespace None: a fresh one per request
        await asyncio.gather(*(
            api.request(Request(p, 1, f"{i:05d}", namespace or f"fresh-{first + i}"))
            for i, p in enumerate(prompts)))

    async with OnlineAPI(MODEL, cache=url, prefix=prefix, batch_size=32,
                         run="memory-warm") as api:
        for _ in range(SAMPLES):  # one pass per sample index
            await ask(api, "warm")
    async with OnlineAPI(MODEL, cache=url, prefix=prefix, batch_size=32,
                         run="memory-hits") as api:
        await ask(api, "hits")  # creates the namespace's counters: not counted
    before = await footprint(redis, prefix)
    async with OnlineAPI(MODEL, cache=url, prefix=prefix, batch_size=32,
                         run="memory-hits") as api:
        for _ in range(ROUNDS - 1):
            await ask(api, "hits")
    after = await footprint(redis, prefix)
    out["one_namespace"] = _delta(before, after, PROMPTS * (ROUNDS - 1))
    for rnd in range(ROUNDS):  # the same with OnlineAPI(direct=True); its first pass not counted
        if rnd == 1:
            before = await footprint(redis, prefix)
        async with OnlineAPI(MODEL, cache=url, prefix=prefix, batch_size=32,
                             run="memory-hits-direct", direct=True) as api:
            await ask(api, "hits")
    after = await footprint(redis, prefix)
    out["one_namespace_direct"] = _delta(before, after, PROMPTS * (ROUNDS - 1))
    async with OnlineAPI(MODEL, cache=url, prefix=prefix, batch_size=32,
                         run="memory-fresh") as api:
        before = await footprint(redis, prefix)
        await ask(api, None)
        during = await footprint(redis, prefix)
    after = await footprint(redis, prefix)
    out["fresh_namespaces"] = _delta(before, after, PROMPTS)
    out["fresh_namespaces"]["in_flight_records_b"] = round(
        (during["r:"] - before["r:"]) / PROMPTS, 1)

    sample_bytes = stored = payload = encoded = 0
    for p in prompts:
        skey = keys.samples(prompt_key(MODEL, {"prompt": p}))
        sample_bytes += await redis.memory_usage(skey, samples=0) or 0
        for raw in (await redis.hgetall(skey)).values():
            stored += 1
            encoded += len(raw)
            payload += len(str(decode_sample(raw)["data"]).encode())
    out["samples"] = {"count": stored, "bytes_per_sample": round(sample_bytes / stored, 1),
                      "payload_b": round(payload / stored, 1),
                      "encoded_b": round(encoded / stored, 1),
                      "over_text_b": round((sample_bytes - payload) / stored, 1),
                      "over_payload_b": round((sample_bytes - encoded) / stored, 1)}
    await redis.aclose()
    return out


NOT_PER_HIT = ("workers:", "health:")  # worker heartbeats: rewritten whatever the load


def _delta(before: Counter[str], after: Counter[str], hits: int) -> dict[str, Any]:
    fams = sorted((set(before) | set(after)) - set(NOT_PER_HIT))
    by = {f: round((after[f] - before[f]) / hits, 1) for f in fams if after[f] != before[f]}
    return {"hits": hits, "bytes_per_hit": round(sum(by.values()), 1), "by_family": by}


def report(env: dict[str, Any], res: dict[str, Any], seconds: float) -> None:
    one, fresh, smp = res["one_namespace"], res["fresh_namespaces"], res["samples"]
    rows = [["hits, one namespace", one["hits"], C.fmt(one["bytes_per_hit"], 1),
             ", ".join(f"`{k}` {v:g}" for k, v in one["by_family"].items()) or "none"],
            ["hits, one namespace, `direct=True`", res["one_namespace_direct"]["hits"],
             C.fmt(res["one_namespace_direct"]["bytes_per_hit"], 1),
             ", ".join(f"`{k}` {v:g}" for k, v in res["one_namespace_direct"]["by_family"]
                       .items()) or "none"],
            ["hits, fresh namespace each", fresh["hits"], C.fmt(fresh["bytes_per_hit"], 1),
             ", ".join(f"`{k}` {v:g}" for k, v in fresh["by_family"].items()) or "none"]]
    direct = res["one_namespace_direct"]["bytes_per_hit"]
    ok_hit = max(one["bytes_per_hit"], direct) <= TARGET_HIT_B
    ok_smp = smp["over_payload_b"] <= TARGET_SAMPLE_OVER_B
    body = (f"## memory: what a hit leaves in Redis, what a sample costs\n\n"
            f"{C.environment_md(env)}\n"
            f"Command: `.venv/bin/python -m bench.memory` ({seconds:.0f} s). "
            f"{PROMPTS} prompts with {SAMPLES} stored samples each (`sim:bench`); "
            "`MEMORY USAGE key SAMPLES 0` of every key under the prefix (and arq's job "
            "keys), before and after each workload, after the client closed; one cache "
            "worker, one batch worker. Counted, not timed: the same on any machine with "
            "this Redis version.\n\n"
            + C.md_table(["workload", "hits", "bytes left per hit", "by key family (B/hit)"],
                         rows)
            + f"\n\nWhile a batch is in flight its reservation records take "
            f"{fresh['in_flight_records_b']:g} B per request (`r:<client>:<batch>`, one hash "
            "per client batch); the client deletes them with its next enqueue, or when it "
            "closes, once the batch was answered at its first ask.\n\n"
            + C.md_table(["stored samples", "bytes per sample in `s:<K>`",
                          "payload (the stored record)", "of which the text",
                          "over the payload", "over the text"],
                         [[smp["count"], C.fmt(smp["bytes_per_sample"], 1),
                           C.fmt(smp["encoded_b"], 1), C.fmt(smp["payload_b"], 1),
                           C.fmt(smp["over_payload_b"], 1), C.fmt(smp["over_text_b"], 1)]])
            + "\n\n### Targets\n\n"
            f"* memory left per hit ≤ {TARGET_HIT_B} B amortised: **{one['bytes_per_hit']:g} "
            f"B** (`direct=True`: **{direct:g} B**) → {C.verdict(ok_hit)}. A hit in a "
            "namespace never used before also "
            f"creates that (prompt, namespace) counter ({fresh['bytes_per_hit']:g} B): "
            "the state the contract keeps so the next request there gets the next "
            "sample; it lives with the run (`u:<run>`, 7 days idle by default).\n"
            f"* per stored sample ≤ payload + {TARGET_SAMPLE_OVER_B} B: **payload + "
            f"{smp['over_payload_b']:g} B** → {C.verdict(ok_smp)}. The payload is the "
            "sample record DESIGN §3 defines (text, finish reason, token usage, the "
            "provider's id, creation time, msgpack); over the text alone a sample costs "
            f"{smp['over_text_b']:g} B here, {smp['encoded_b'] - smp['payload_b']:.0f} B of "
            "it the record's metadata.\n")
    C.write_section(STUDY, body)
    C.write_json(STUDY, {"env": env, **res})
    print(body)


def main() -> None:
    os.environ.pop("REDIS_URL", None)  # counted on a private server only
    t0 = time.monotonic()
    with C.Stack(STUDY) as st:
        st.start_pool(MODEL)
        env = C.environment(st.redis_version())
        res = asyncio.run(measure(st.url, st.prefix))
    report(env, res, time.monotonic() - t0)


if __name__ == "__main__":
    main()
