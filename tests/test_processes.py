"""Cross-process behaviour: client processes, CLI worker processes, crashes.

Real Redis, real OS processes. Every process is bounded in time and stopped by the
``processes`` fixture.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest
import redis as sync_redis

from cachesaver_dist import prompt_key
from tests.conftest import ROOT, Processes, subprocess_env
from tests.support import COUNTER_ENV

MODEL = "tests.support:counting_model"
pytestmark = pytest.mark.processes


def start_clients(redis_url, keys, run, namespaces, count, seed0=0):
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tests.client_proc", keys.prefix, run, MODEL, ns,
             str(seed0 + i), str(count)],
            env=subprocess_env(redis_url), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=ROOT)
        for i, ns in enumerate(namespaces)
    ]


def collect(clients, timeout=120):
    results = []
    for proc in clients:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err.decode()[-3000:]
        results.append(json.loads(out))
    return results


def start_pool(processes: Processes, cache_workers=2, batch_args=(), counter=""):
    for _ in range(cache_workers):
        processes.cli("worker", "cache", name="cache")
    batch = processes.cli("worker", "batch", "--model", MODEL, *batch_args, name="batch",
                          env={COUNTER_ENV: counter})
    processes.wait_alive("cache", cache_workers)
    processes.wait_alive(MODEL, 1)
    return batch


def check_invariants(results, redis_url, keys, counter):
    """No index twice in one namespace; samples generated == highest index + 1."""
    handed = defaultdict(list)  # (namespace, prompt) -> indices
    texts = {}
    for ns, answers in results:
        for a in answers:
            assert len(a["data"]) == a["n"] == len(a["index"])
            handed[ns, a["prompt"]] += a["index"]
            for i, text in zip(a["index"], a["data"]):
                assert texts.setdefault((a["prompt"], i), text) == text  # never overwritten
    for (ns, prompt), indices in handed.items():
        assert len(indices) == len(set(indices)), f"index handed out twice in {ns}/{prompt}"
    client = sync_redis.Redis.from_url(redis_url)
    try:
        generated = {k.decode(): int(v) for k, v in client.hgetall(counter).items()}
        for prompt in {p for _, p in handed}:
            highest = max(max(ix) for (_, p), ix in handed.items() if p == prompt)
            stored = client.hlen(keys.samples(prompt_key(MODEL, {"prompt": prompt})))
            assert stored == highest + 1, prompt
            assert generated.get(prompt) == highest + 1, (prompt, generated.get(prompt))
    finally:
        client.close()
    return generated


def test_many_clients_many_workers_one_namespace(redis_url, keys, processes):
    counter = f"{keys.prefix}test-counter"
    start_pool(processes, cache_workers=2, counter=counter)
    clients = start_clients(redis_url, keys, "shared-run", ["shared"] * 4, count=60)
    results = collect(clients)
    assert sum(len(r) for r in results) == 240
    check_invariants([("shared", r) for r in results], redis_url, keys, counter)
    # one shared namespace: the indices of a prompt are exactly 0..k-1
    per_prompt = defaultdict(list)
    for answers in results:
        for a in answers:
            per_prompt[a["prompt"]] += a["index"]
    for prompt, indices in per_prompt.items():
        assert sorted(indices) == list(range(len(indices))), prompt


def test_distinct_namespaces_reuse_samples(redis_url, keys, processes):
    counter = f"{keys.prefix}test-counter"
    start_pool(processes, cache_workers=1, counter=counter)
    namespaces = ["m1", "m2", "m3", "m4"]
    results = collect(start_clients(redis_url, keys, "ablation", namespaces, count=40))
    generated = check_invariants(list(zip(namespaces, results)), redis_url, keys, counter)
    # every namespace walks from index 0: generated = the largest need of any namespace
    need = defaultdict(lambda: defaultdict(int))
    for ns, answers in zip(namespaces, results):
        for a in answers:
            need[a["prompt"]][ns] += a["n"]
    for prompt, by_ns in need.items():
        assert generated[prompt] == max(by_ns.values())


def test_killed_batch_worker_work_is_taken_over(redis_url, keys, processes):
    counter = f"{keys.prefix}test-counter"
    slow = processes.cli("worker", "batch", "--model", MODEL, "--lease", "1.5", name="slow",
                         env={COUNTER_ENV: counter, "TEST_MODEL_LATENCY": "30"})
    processes.cli("worker", "cache", name="cache")
    processes.wait_alive("cache")
    processes.wait_alive(MODEL)
    clients = start_clients(redis_url, keys, "crash", ["ns"], count=20)
    client = sync_redis.Redis.from_url(redis_url)
    try:
        stream = keys.work_stream(MODEL)
        deadline = time.monotonic() + 20
        while not client.xpending(stream, "batch-workers")["pending"]:
            assert time.monotonic() < deadline, "slow worker never took the work"
            time.sleep(0.05)
    finally:
        client.close()
    slow.send_signal(signal.SIGKILL)
    slow.wait()
    processes.cli("worker", "batch", "--model", MODEL, "--lease", "1.5", name="rescuer",
                  env={COUNTER_ENV: counter})
    results = collect(clients, timeout=60)
    assert len(results[0]) == 20
    check_invariants([("ns", results[0])], redis_url, keys, counter)


def test_killed_cache_worker_requests_still_complete(redis_url, keys, processes):
    counter = f"{keys.prefix}test-counter"
    start_pool(processes, cache_workers=2, counter=counter)
    clients = start_clients(redis_url, keys, "cache-crash", ["a", "b"], count=80)
    client = sync_redis.Redis.from_url(redis_url)
    try:  # kill while the load is on: once the first requests have been answered
        deadline = time.monotonic() + 30
        while not client.exists(keys.stats()):
            assert time.monotonic() < deadline, "no request answered"
            time.sleep(0.01)
    finally:
        client.close()
    victim = next(p for p in processes.procs if "cache" in p.log_path)
    victim.send_signal(signal.SIGKILL)
    results = collect(clients, timeout=90)
    assert [len(r) for r in results] == [80, 80]
    check_invariants(list(zip(["a", "b"], results)), redis_url, keys, counter)


async def test_hosts_whose_clocks_disagree_agree_on_live_workers(redis_url, keys, processes,
                                                                 monkeypatch):
    """Heartbeats are written and judged by the server's clock: a client host a minute
    ahead still sees a live cache worker process (it would fail every request fast), and a
    worker host a minute behind is still seen alive (its promise would have run out)."""
    from redis.asyncio import Redis

    from cachesaver_dist import cluster, heartbeat

    processes.cli("worker", "cache", name="cache")
    processes.wait_alive("cache")
    real = time.time
    client = Redis.from_url(redis_url)
    try:
        monkeypatch.setattr(heartbeat.time, "time", lambda: real() + 60)
        assert await heartbeat.alive_workers(client, keys, "cache") == 1
        state = await cluster.read_state(client, keys, ["cache"])
        assert state.routes[0].workers == 1
        assert len(await cluster.live_worker_names(client, keys, "cache")) == 1

        monkeypatch.setattr(heartbeat.time, "time", lambda: real() - 60)
        await heartbeat.beat(client, keys, ("sim:late",), "late-host-1-abc")
        monkeypatch.setattr(heartbeat.time, "time", real)
        assert await heartbeat.alive_workers(client, keys, "sim:late") == 1
    finally:
        await client.aclose()


async def test_a_registry_lost_with_redis_data_is_waited_for_not_reported(redis_url, keys,
                                                                          processes):
    """Redis restarted without its data loses the workers' registry too; they register
    again at their next heartbeat. A client they answered lately waits for that instead
    of telling the operator to start workers that are running."""
    from cachesaver_dist import OnlineAPI, Request

    start_pool(processes, cache_workers=1)
    cache_worker = next(p for p in processes.procs if "cache" in p.log_path)
    async with OnlineAPI(MODEL, cache=redis_url, prefix=keys.prefix, reply_timeout=0.3,
                         request_timeout=60) as api:
        first = await api.request(Request("lost registry", 1, "r1", "a"))
        cache_worker.send_signal(signal.SIGSTOP)  # no reply, no heartbeat until resumed
        try:
            client = sync_redis.Redis.from_url(redis_url)
            client.delete(keys.workers("cache"), keys.workers(MODEL))  # as a restart would
            client.close()
            asking = asyncio.ensure_future(api.request(Request("lost registry", 1, "r2", "b")))
            await asyncio.sleep(2.0)  # several re-asks with an empty registry
            assert not asking.done(), asking.exception()
        finally:
            cache_worker.send_signal(signal.SIGCONT)
        again = await asyncio.wait_for(asking, 30)
    assert again.data == first.data and again.cached == [True]


@pytest.mark.processes
@pytest.mark.parametrize("batch_size", [8, 2])
async def test_a_re_run_gets_the_same_samples_per_request_id_with_several_cache_workers(
        redis_url, keys, processes, batch_size):
    """One client with 10 (or 40: more than one enqueue takes) batches in flight at once,
    served by two cache workers that also poll often: every fresh run (run=None) hands
    each request_id the same samples, as the client's batches are reserved in the order
    it sent them."""
    from cachesaver_dist import OnlineAPI, Request

    model = "sim:re-run"
    for _ in range(2):
        processes.cli("worker", "cache", "--poll-delay", "0.02", name="cache")
    processes.cli("worker", "batch", "--model", model, "--sim-latency", "0", name="batch")
    processes.wait_alive("cache", 2)
    processes.wait_alive(model, 1)

    async def one_run() -> dict[str, list[str]]:
        async with OnlineAPI(model, cache=redis_url, prefix=keys.prefix, batch_size=batch_size,
                             request_timeout=60) as api:
            got = await asyncio.gather(*(api.request(Request(f"prompt {i % 10}", 2,
                                                             f"r{i:03d}", "ns"))
                                         for i in range(80)))
        return {f"r{i:03d}": list(r.data) for i, r in enumerate(got)}

    first = await one_run()  # generates: 16 samples of each of the 10 prompts
    assert all(len(set(v)) == 2 for v in first.values())
    for _ in range(4):
        assert await one_run() == first


@pytest.mark.processes
async def test_a_burst_of_batches_from_several_clients_is_served_from_the_wake_up_list(
        redis_url, keys, processes):
    """Four clients send 150 single-request batches each, one client after the other,
    while the cache worker is paused, so 600 jobs wait at once: each is served from the
    wake-up list when the worker resumes, the first client's too; none waits for arq's
    poll (60 s away here) or for a re-ask (30 s)."""
    import os

    from cachesaver_dist import OnlineAPI, Request

    model = "sim:burst"
    worker = processes.cli("worker", "cache", "--poll-delay", "60", name="cache")
    processes.cli("worker", "batch", "--model", model, "--sim-latency", "0", name="batch")
    processes.wait_alive("cache", 1)
    processes.wait_alive(model, 1)
    apis = [OnlineAPI(model, cache=redis_url, prefix=keys.prefix, batch_size=1,
                      reply_timeout=30, request_timeout=60) for _ in range(4)]
    try:
        for api in apis:
            await api.start()
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            bursts = []
            for c, api in enumerate(apis):
                bursts.append(asyncio.gather(*(
                    api.request(Request(f"prompt {i}", 1, f"r{i:03d}", f"ns{c}"))
                    for i in range(150))))
                await asyncio.sleep(0.3)  # its jobs are queued
            burst = asyncio.gather(*bursts)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        done, _ = await asyncio.wait([burst], timeout=20)
        assert done, ("600 single-request batches not served within 20 s: the wake tokens "
                      "of the first client's were dropped, so they wait for arq's poll")
        replies = burst.result()
        assert [len(r) for r in replies] == [150] * 4
        assert all(len(r.data) == 1 for rs in replies for r in rs)
    finally:
        for api in apis:
            await api.close()


async def test_a_stored_prompt_is_left_out_of_the_job_and_rebuilt_for_its_claim(
        redis_url, keys, processes, monkeypatch):
    """A client leaves out of its jobs the prompts of keys it was answered from (their
    spec is stored); a claim hands the model this request's own namespace and request id,
    and a request whose key lost its spec is asked again at once, with its prompt."""
    from cachesaver_dist import OnlineAPI, Request
    from cachesaver_dist import client as client_module
    from cachesaver_dist.protocol import decode_job

    counter = f"{keys.prefix}test-counter"
    start_pool(processes, cache_workers=1, counter=counter)
    sent = []  # per enqueued job: request id -> the spec its body carries

    def spy(*args):
        body, slim = encode_job(*args)
        sent.append({it.request_id: it.spec for it in decode_job(body, keys).items})
        return body, slim

    encode_job = client_module.encode_job_and_copy
    monkeypatch.setattr(client_module, "encode_job_and_copy", spy)
    r = sync_redis.Redis.from_url(redis_url)
    # reply_timeout beyond request_timeout: a request that is not asked again at once
    # times out
    async with OnlineAPI(MODEL, cache=redis_url, prefix=keys.prefix, run="left-out",
                         batch_size=1, reply_timeout=60, request_timeout=20) as api:
        async def ask(rid):
            got = await api.request(Request(prompt="Left out?", n=1, namespace="a",
                                            request_id=rid))
            return got.metadata[0]["index"], got.cached[0]

        assert await ask("1") == (0, False)
        assert sent[-1]["1"] != b""  # not known yet: sent with its prompt
        assert await ask("2") == (1, False)
        assert sent[-1]["2"] == b""  # left out: the claim rebuilt it
        r.hdel(keys.generation(prompt_key(MODEL, {"prompt": "Left out?"})), "spec")
        assert await ask("3") == (2, False)
        assert sent[-2]["3"] == b"" and sent[-1]["3"] != b""  # asked again with it
    calls = [c.decode() for c in r.lrange(counter + ":calls", 0, -1)]
    r.close()
    assert calls == ["Left out?|a|1", "Left out?|a|2", "Left out?|a|3"]
