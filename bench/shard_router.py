"""A prototype of sharding by prompt key across independent Redis primaries
(``docs/scaling.md``, *Beyond one primary*), and the checks that it keeps the contract.

Not part of the package: ``bench/sharding.py`` measures it, ``tests/test_sharding_design.py``
pins it. Every shard is one primary with its own ``OnlineAPI`` (here with an in-process
model, so each brings its own cache and batch workers; in a deployment, its own worker
pool). Everything about a prompt key (samples, generation state, waiters, the usage
counters of its namespaces, its work stream entries) lives on the shard a stable hash of
the key picks, so each atomic step touches one shard; a batch is split by shard and each
sub-batch goes to its shard whole (a cache worker reserves it in ``request_id`` order).

The workload is deterministic by construction: within a round, concurrent batches never
share a prompt key, and the one-at-a-time callers ask for each prompt key once, so the
order of the reservations of every (run, namespace, key) is fixed and the results must
match request by request whatever the number of shards.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cachesaver_dist import Batch, OnlineAPI, Request, Response, SingleRequestModel
from cachesaver_dist.prepare import prepare
from cachesaver_dist.protocol import Keys
from cachesaver_dist.stats import read_stats
from redis.asyncio import Redis

MODEL_ID = "bench:shard-sim"


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping & Veach, 2014): the bucket of a 64-bit ``key`` among
    ``buckets``; going from N to N + 1 buckets moves only 1/(N + 1) of the keys, all of
    them to the new bucket."""
    b, j = -1, 0
    key &= 0xFFFFFFFFFFFFFFFF
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def shard_of_key(prompt_key: str, shards: int) -> int:
    """The shard of a prompt key (hex BLAKE2b-128): jump hash of its first 64 bits."""
    return jump_hash(int(prompt_key[:16], 16), shards)


class DeterministicSim(SingleRequestModel):
    """Sample ``k`` of a prompt is ``"<prompt> #k"``, ``k`` counted per prompt by this
    object: texts are equal across runs exactly when every prompt's samples are
    generated once each, in index order. Records every call."""

    def __init__(self) -> None:
        self.model = MODEL_ID
        self.generated: collections.Counter[str] = collections.Counter()
        self.calls: list[tuple[str, int]] = []

    async def request(self, request: Request) -> Response:
        prompt = str(request.prompt)
        self.calls.append((prompt, request.n))
        first = self.generated[prompt]
        self.generated[prompt] += request.n
        return Response(data=[f"{prompt} #{first + i}" for i in range(request.n)])


class ShardedAPI:
    """``request()`` / ``batch_request()`` over one ``OnlineAPI`` per shard (same run,
    prefix and model id on every shard).

    ``route_by="request_id"`` is the negative control: requests spread over the shards
    by their request id, so one prompt key's state is split, and the checks must fail."""

    def __init__(self, shards: Sequence[OnlineAPI], route_by: str = "key") -> None:
        if not shards:
            raise ValueError("at least one shard")
        if route_by not in ("key", "request_id"):
            raise ValueError(f"route_by: 'key' or 'request_id', not {route_by!r}")
        self.shards, self.route_by = list(shards), route_by
        first = self.shards[0]
        for api in self.shards[1:]:
            if (api.run, api.model_id, api.route) != (first.run, first.model_id, first.route):
                raise ValueError("every shard needs the same run, model id and route")

    def key_of(self, request: Request) -> str:
        api = self.shards[0]
        return prepare(request, run=api.run, route=api.route, model_id=api.model_id).key

    def shard_of(self, request: Request) -> int:
        if self.route_by == "request_id":
            digest = hashlib.blake2b(str(request.request_id).encode(), digest_size=8)
            return jump_hash(int.from_bytes(digest.digest(), "big"), len(self.shards))
        return shard_of_key(self.key_of(request), len(self.shards))

    async def request(self, request: Request) -> Response:
        return await self.shards[self.shard_of(request)].request(request)

    async def batch_request(self, batch: Batch | Sequence[Request]) -> list[Response]:
        requests = list(batch.requests if isinstance(batch, Batch) else batch)
        parts: dict[int, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(requests):
            parts[self.shard_of(r)].append(i)
        # each sub-batch whole, in request_id order (the cache worker orders it anyway)
        for idx in parts.values():
            idx.sort(key=lambda i: str(requests[i].request_id))
        replies = await asyncio.gather(*(
            self.shards[s].batch_request(Batch([requests[i] for i in idx]))
            for s, idx in parts.items()))
        out: list[Response | None] = [None] * len(requests)
        for idx, got in zip(parts.values(), replies):
            for i, resp in zip(idx, got):
                out[i] = resp
        assert all(r is not None for r in out)
        return out  # type: ignore[return-value]


# --- the workload ---------------------------------------------------------------------


@dataclass
class Workload:
    prompts: int = 40
    namespaces: int = 3
    rounds: int = 6
    batch_tasks: int = 4  # concurrent batch_request() calls per round
    single_callers: int = 8  # concurrent request() callers per round


def prompt_text(p: int) -> str:
    return f"Sharding prompt {p}: propose the next step."


def plan(w: Workload) -> list[list[tuple[str, list[Request]]]]:
    """Per round, the concurrent tasks: ``("batch", requests)`` for one batch_request,
    ``("single", requests)`` for requests sent one call each, concurrently.

    The prompts are split into ``batch_tasks + 1`` groups; in round ``r`` task ``t`` takes
    group ``(t + r) % groups`` (the last task, the singles, the last group), so no two
    concurrent tasks share a prompt key, and every group is asked by every task kind over
    the rounds. A batch asks every namespace (2 in 3 of them twice, under two request
    ids: two consecutive ranges of one counter), n from 1 to 3, in an order that is not
    ``request_id`` order; the singles ask each of their prompts once, in one namespace
    that changes with the round."""
    groups = w.batch_tasks + 1
    nss = [f"ns-{chr(97 + i)}" for i in range(w.namespaces)]
    rounds = []
    for r in range(w.rounds):
        tasks: list[tuple[str, list[Request]]] = []
        for t in range(groups):
            g = (t + r) % groups
            members = [p for p in range(w.prompts) if p % groups == g]
            reqs: list[Request] = []
            if t < w.batch_tasks:
                for p in members:
                    for k, ns in enumerate(nss):
                        n = 1 + (p + r + k) % 3
                        reqs.append(Request(prompt=prompt_text(p), n=n, namespace=ns,
                                            request_id=f"r{r}/b{t}/{p:03d}/{ns}/0"))
                        if (p + k + r) % 3:
                            reqs.append(Request(prompt=prompt_text(p), n=1 + (p + k) % 2,
                                                namespace=ns,
                                                request_id=f"r{r}/b{t}/{p:03d}/{ns}/1"))
                reqs.reverse()  # not request_id order: the reservation order must not care
                tasks.append(("batch", reqs))
            else:
                for p in members:
                    ns = nss[(p + r) % len(nss)]
                    reqs.append(Request(prompt=prompt_text(p), n=1 + (p + r) % 3, namespace=ns,
                                        request_id=f"r{r}/s/{p:03d}/{ns}"))
                tasks.append(("single", reqs))
        rounds.append(tasks)
    return rounds


Answer = dict[str, Any]


def answer(r: Request, resp: Response) -> Answer:
    meta = resp.metadata or []
    return {"namespace": r.namespace, "prompt": str(r.prompt), "n": r.n,
            "data": list(resp.data), "cached": list(resp.cached or []),
            "duplicated": list(resp.duplicated or []),
            "index": [m["index"] for m in meta], "source": [m["source"] for m in meta]}


async def run_workload(api: Any, w: Workload) -> tuple[dict[str, Answer], dict[str, float]]:
    """Every round's tasks at once, rounds one after another. Returns the answer per
    request id and timings."""
    out: dict[str, Answer] = {}
    sem = asyncio.Semaphore(w.single_callers)

    async def single(r: Request) -> None:
        async with sem:
            out[str(r.request_id)] = answer(r, await api.request(r))

    async def task(kind: str, reqs: list[Request]) -> None:
        if kind == "batch":
            for r, resp in zip(reqs, await api.batch_request(Batch(reqs))):
                out[str(r.request_id)] = answer(r, resp)
        else:
            await asyncio.gather(*(single(r) for r in reqs))

    t0 = time.perf_counter()
    total = 0
    for tasks in plan(w):
        total += sum(len(reqs) for _, reqs in tasks)
        await asyncio.gather(*(task(kind, reqs) for kind, reqs in tasks))
    wall = time.perf_counter() - t0
    return out, {"requests": total, "wall": wall, "per_s": total / wall}


async def hit_rate(api: Any, w: Workload, count: int, callers: int, tag: str) -> dict[str, float]:
    """``count`` one-sample requests for stored samples (index 0 in fresh namespaces),
    ``callers`` at a time: cache-hit throughput through ``api``."""
    sem = asyncio.Semaphore(callers)

    async def one(i: int) -> bool:
        async with sem:
            r = Request(prompt=prompt_text(i % w.prompts), n=1,
                        namespace=f"{tag}-{i // w.prompts}", request_id=f"{tag}/{i:06d}")
            return all((await api.request(r)).cached)

    t0 = time.perf_counter()
    hits = sum(await asyncio.gather(*(one(i) for i in range(count))))
    wall = time.perf_counter() - t0
    return {"requests": count, "hits": hits, "wall": wall, "per_s": count / wall}


# --- reading the servers back ---------------------------------------------------------


@dataclass
class ShardState:
    """What one primary holds under a prefix, for one run."""

    samples: dict[str, list[int]] = field(default_factory=dict)  # prompt key -> indices
    marks: dict[str, int] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)  # "<key><namespace>" -> next index
    stats: dict[str, float] = field(default_factory=dict)
    waiters: int = 0


async def read_state(url: str, prefix: str, run: str) -> ShardState:
    keys = Keys(prefix)
    redis = Redis.from_url(url)
    st = ShardState()
    try:
        async for name in redis.scan_iter(match=keys.family("s"), count=1000):
            k = name.decode()[len(keys.prefix) + 2:]
            st.samples[k] = sorted(int(i) for i in await redis.hkeys(name))
            st.marks[k] = int(await redis.hget(keys.generation(k), "mark") or 0)
        async for _ in redis.scan_iter(match=keys.family("w"), count=1000):
            st.waiters += 1
        raw = await redis.hgetall(keys.usage(run))
        st.usage = {f.decode(): int(v) for f, v in raw.items()}
        for counters in (await read_stats(redis, keys, run)).values():
            for c, v in counters.items():
                st.stats[c] = st.stats.get(c, 0) + v
    finally:
        await redis.aclose()
    return st


def merge(states: Sequence[ShardState]) -> ShardState:
    """Per-shard state merged on read (keys never overlap; counters add up)."""
    out = ShardState()
    for s in states:
        out.samples.update(s.samples)
        out.marks.update(s.marks)
        out.usage.update(s.usage)
        for c, v in s.stats.items():
            out.stats[c] = out.stats.get(c, 0) + v
        out.waiters += s.waiters
    return out


# --- the checks -----------------------------------------------------------------------


def check(ref: dict[str, Answer], sharded: dict[str, Answer], ref_state: ShardState,
          shard_states: Sequence[ShardState], ref_calls: list[tuple[str, int]],
          shard_calls: list[tuple[str, int]], key_of: dict[str, str]) -> dict[str, Any]:
    """Every invariant, as counts of violations (all 0 when the design holds).
    ``key_of``: prompt text -> prompt key."""
    v: dict[str, Any] = {}
    v["requests"] = len(ref)
    v["missing_answers"] = len(set(ref) ^ set(sharded))
    v["answers_differ"] = sum(ref[rid] != sharded.get(rid) for rid in ref)
    v["answers_differ_examples"] = [rid for rid in sorted(ref) if ref[rid] != sharded.get(rid)][:5]
    for side, answers in (("ref", ref), ("sharded", sharded)):
        seen: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
        for a in answers.values():
            seen[(a["namespace"], a["prompt"])] += a["index"]
        v[f"index_twice_{side}"] = sum(len(ix) - len(set(ix)) for ix in seen.values())
        # u:<run> counters: the next index of (namespace, key) = the samples handed out
        usage = (ref_state if side == "ref" else merge(shard_states)).usage
        want = {key_of[p] + ns: len(ix) for (ns, p), ix in seen.items()}
        v[f"usage_counter_mismatch_{side}"] = sum(usage.get(f) != n for f, n in want.items()) \
            + len(set(usage) - set(want))
    for side, states in (("ref", [ref_state]), ("sharded", list(shard_states))):
        merged = merge(states)
        v[f"keys_{side}"] = len(merged.samples)
        v[f"samples_{side}"] = sum(len(ix) for ix in merged.samples.values())
        v[f"gaps_or_duplicates_{side}"] = sum(ix != list(range(len(ix)))
                                              for ix in merged.samples.values())
        v[f"mark_not_samples_{side}"] = sum(merged.marks[k] != len(ix)
                                            for k, ix in merged.samples.items())
        v[f"waiters_left_{side}"] = merged.waiters
        handed: dict[str, int] = collections.defaultdict(int)
        for a in (ref if side == "ref" else sharded).values():
            k = key_of[a["prompt"]]
            handed[k] = max([handed[k], *(i + 1 for i in a["index"])])
        v[f"generated_not_highest_plus_one_{side}"] = sum(
            len(merged.samples.get(k, [])) != h for k, h in handed.items())
    placed = collections.Counter(k for s in shard_states for k in s.samples)
    v["keys_on_two_shards"] = sum(c > 1 for c in placed.values())
    v["keys_on_wrong_shard"] = sum(
        shard_of_key(k, len(shard_states)) != i
        for i, s in enumerate(shard_states) for k in s.samples)
    v["keys_per_shard"] = [len(s.samples) for s in shard_states]
    v["samples_differ_ref_vs_sharded"] = sum(
        ref_state.samples.get(k) != ix for k, ix in merge(shard_states).samples.items()) + \
        len(set(ref_state.samples) ^ set(merge(shard_states).samples))
    v["model_calls_ref"], v["model_calls_sharded"] = len(ref_calls), len(shard_calls)
    v["model_calls_differ"] = sum((collections.Counter(ref_calls)
                                   - collections.Counter(shard_calls)).values()) + \
        sum((collections.Counter(shard_calls) - collections.Counter(ref_calls)).values())
    v["stats_ref"], v["stats_sharded"] = ref_state.stats, merge(shard_states).stats
    ref_stats, shard_stats = _timing_free(ref_state.stats), _timing_free(v["stats_sharded"])
    v["stats_differ"] = sum(ref_stats.get(c) != shard_stats.get(c)
                            for c in set(ref_stats) | set(shard_stats))
    return v


def _timing_free(stats: dict[str, float]) -> dict[str, float]:
    """``stats`` with each ``*_cached`` counter merged into its ``*_deduplicated``: whether
    a sample another request claimed was already stored when a request reserved it
    (cached) or still being generated (deduplicated) depends on timing, their sum not."""
    out = dict(stats)
    for name in stats:
        if name.endswith("_cached"):
            shared = name[: -len("cached")] + "deduplicated"
            out[shared] = out.get(shared, 0) + out.pop(name)
    return out


VIOLATIONS = ("missing_answers", "answers_differ", "index_twice_ref", "index_twice_sharded",
              "usage_counter_mismatch_ref", "usage_counter_mismatch_sharded",
              "gaps_or_duplicates_ref", "gaps_or_duplicates_sharded", "mark_not_samples_ref",
              "mark_not_samples_sharded", "waiters_left_ref", "waiters_left_sharded",
              "generated_not_highest_plus_one_ref", "generated_not_highest_plus_one_sharded",
              "keys_on_two_shards", "keys_on_wrong_shard", "samples_differ_ref_vs_sharded",
              "model_calls_differ", "stats_differ")


def violations(v: dict[str, Any]) -> dict[str, int]:
    return {k: v[k] for k in VIOLATIONS if v[k]}


# --- one comparison: 1 primary against N shards -----------------------------------------


async def compare(ref_url: str, shard_urls: Sequence[str], prefix: str, w: Workload, *,
                  run: str = "sharding", hit_count: int = 0, hit_callers: int = 64,
                  batch_size: int = 32, timeout: float = 0.005,
                  route_by: str = "key") -> dict[str, Any]:
    """The workload on one primary through a plain ``OnlineAPI``, then on
    ``len(shard_urls)`` shards through ``ShardedAPI``; the checks; throughput."""
    def api(url: str, model: DeterministicSim) -> OnlineAPI:
        return OnlineAPI(model, cache=url, run=run, prefix=prefix, batch_size=batch_size,
                         timeout=timeout)

    ref_model = DeterministicSim()
    async with api(ref_url, ref_model) as ref_api:
        ref, ref_time = await run_workload(ref_api, w)
        ref_hits = await hit_rate(ref_api, w, hit_count, hit_callers, "hits") \
            if hit_count else {}
        key_of = {prompt_text(p): prepare(Request(prompt_text(p), 1, "k", "k"), run=run,
                                          route=ref_api.route, model_id=ref_api.model_id).key
                  for p in range(w.prompts)}
    models = [DeterministicSim() for _ in shard_urls]
    apis = [api(url, m) for url, m in zip(shard_urls, models)]
    try:
        for a in apis:
            await a.start()
        router = ShardedAPI(apis, route_by=route_by)
        sharded, shard_time = await run_workload(router, w)
        shard_hits = await hit_rate(router, w, hit_count, hit_callers, "hits") \
            if hit_count else {}
    finally:
        await asyncio.gather(*(a.close() for a in apis), return_exceptions=True)
    await asyncio.sleep(0.2)  # stats tallies are written within 50 ms of the last replies
    ref_state = await read_state(ref_url, prefix, run)
    shard_states = [await read_state(url, prefix, run) for url in shard_urls]
    # the hit phase's namespaces are not part of the workload's checks (its requests are
    # in the run's stats, on both sides alike)
    for s in (ref_state, *shard_states):
        s.usage = {f: n for f, n in s.usage.items() if "hits-" not in f}
    result = check(ref, sharded, ref_state, shard_states, ref_model.calls,
                   [c for m in models for c in m.calls], key_of)
    result["throughput"] = {"workload": {"1 primary": ref_time, f"{len(shard_urls)} shards":
                                         shard_time}}
    if hit_count:
        result["throughput"]["hits"] = {"1 primary": ref_hits,
                                        f"{len(shard_urls)} shards": shard_hits}
    result["workload"] = w.__dict__
    return result
