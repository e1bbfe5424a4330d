"""Prometheus metrics of the workers, ``top``, ``health``, JSON logs and ``arq --check``.

The counters scraped over HTTP from worker processes during and after a load equal what
``cachesaver-dist stats`` reports; the gauges show a paused pool's queue and a slow
model's backlog; ``top`` shows the same figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachesaver_dist import OnlineAPI, Request, metrics
from cachesaver_dist.backends.retry import ProviderError, RetryPolicy, with_retry
from cachesaver_dist.protocol import CACHED, DUPLICATED, GENERATED, Keys
from cachesaver_dist.stats import account
from tests.conftest import ROOT, Processes, subprocess_env
from tests.support import admin
from tests.test_backends import MODEL, sim, sim_counters  # noqa: F401

DASHBOARD = ROOT / "ops" / "grafana" / "cachesaver.json"
ARQ = Path(sys.executable).parent / "arq"


# -- helpers -----------------------------------------------------------------------------

def metrics_url(proc: subprocess.Popen, timeout: float = 30) -> str:
    """The URL a worker started with ``--metrics-port 0`` logged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"metrics on (http://\S+/metrics)", Processes.logs(proc))
        if found:
            return found.group(1)
        assert proc.poll() is None, Processes.logs(proc)
        time.sleep(0.05)
    raise AssertionError(f"no metrics URL logged: {Processes.logs(proc)}")


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    async with httpx.AsyncClient(timeout=5) as client:
        r = await client.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def merged(*scrapes: dict) -> dict:
    out: dict = {}
    for s in scrapes:
        for k, v in s.items():
            out[k] = out.get(k, 0) + v
    return out


def cli(redis_url: str, prefix: str, *args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cachesaver_dist.cli", *args, "--prefix", prefix],
                          env=subprocess_env(redis_url, **(env or {})), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def dashboard_families() -> set[str]:
    """Metric families named in the dashboard's queries (``_bucket`` etc. stripped)."""
    exprs = json.dumps(json.loads(DASHBOARD.read_text()))
    names = set(re.findall(r"\bcachesaver_[a-z_]+", exprs))
    return {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in names}


@pytest.fixture
def active_metrics():
    m = metrics.WorkerMetrics({"priced": (1.0, 2.0)})
    metrics.active = m
    yield m
    metrics.active = None


# -- in-process: the tally -> counters mapping, provider errors ---------------------------

def test_counters_follow_the_stats_tally(active_metrics):
    tally: dict = {}
    usage = {"prompt_tokens": 10, "completion_tokens": 5}
    account(tally, "r1", "priced", CACHED + CACHED + GENERATED, [usage] * 3)
    account(tally, "r2", "priced", DUPLICATED, [usage])
    account(tally, "r2", "free", GENERATED, [{"prompt_tokens": 2.5}])
    metrics.count(tally)
    get = active_metrics.registry.get_sample_value
    assert get("cachesaver_requests_total", {"model": "priced"}) == 2
    assert get("cachesaver_samples_total", {"model": "priced", "kind": "cached"}) == 2
    assert get("cachesaver_samples_total", {"model": "priced", "kind": "deduplicated"}) == 1
    assert get("cachesaver_samples_total", {"model": "priced", "kind": "generated"}) == 1
    assert get("cachesaver_tokens_total",
               {"model": "priced", "kind": "cached", "part": "prompt"}) == 20
    assert get("cachesaver_tokens_total",
               {"model": "free", "kind": "generated", "part": "prompt"}) == 2.5
    saved = (30 * 1.0 + 15 * 2.0) / 1e6  # 2 cached + 1 deduplicated samples
    assert get("cachesaver_dollars_saved_total", {"model": "priced"}) == pytest.approx(saved)
    assert get("cachesaver_dollars_spent_total", {"model": "priced"}) == pytest.approx(20e-6)
    assert get("cachesaver_dollars_saved_total", {"model": "free"}) is None  # unpriced


def test_hooks_do_nothing_without_an_exporter():
    assert metrics.active is None
    metrics.count({("r", "m|requests"): 1})
    metrics.cache_job_done(0.1)
    metrics.model_call_done("m", 0.1)
    metrics.model_failed("m")
    metrics.provider_error("m", 429, True)
    # clients and in-process workers never import prometheus_client
    code = ("import sys, cachesaver_dist.pipelines, cachesaver_dist.outbox, workers.batch_worker, "
            "cachesaver_dist.backends.chat; sys.exit('prometheus_client' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


async def test_provider_errors_and_retries_by_status(active_metrics):
    errors = iter([ProviderError("p", 429, "slow down", retry_after=0),
                   ProviderError("p", None, "timed out", retry_after=0)])

    async def attempt():
        exc = next(errors, None)
        if exc:
            raise exc
        return "ok"

    async def no_sleep(_):
        return None

    assert await with_retry(attempt, RetryPolicy(budget=3), sleep=no_sleep, model="m") == "ok"

    async def bad():
        raise ProviderError("p", 400, "bad request")

    with pytest.raises(ProviderError):
        await with_retry(bad, RetryPolicy(budget=3), sleep=no_sleep, model="m")
    get = active_metrics.registry.get_sample_value
    for status, errs, retries in (("429", 1, 1), ("none", 1, 1), ("400", 1, None)):
        assert get("cachesaver_provider_errors_total", {"model": "m", "status": status}) == errs
        assert get("cachesaver_provider_retries_total",
                   {"model": "m", "status": status}) == retries


# -- worker processes ---------------------------------------------------------------------

@pytest.mark.processes
async def test_scraped_metrics_equal_stats(sim, redis_url, keys, processes, tmp_path):  # noqa: F811
    route = f"openai:{MODEL}"
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({MODEL: [1.0, 2.0]}))
    env = {"OPENAI_API_KEY": "sk-test", "CACHESAVER_PRICES": str(prices)}
    cache = processes.cli("worker", "cache", "--metrics-port", "0", name="cache", env=env)
    batch = processes.cli("worker", "batch", "--model", route, "--base-url", sim,
                          "--metrics-port", "0", "--metrics-refresh", "0.2", "--retry-budget",
                          "4", name="batch", env=env)
    processes.wait_alive("cache")
    processes.wait_alive(route)
    urls = [metrics_url(cache), metrics_url(batch)]
    await admin(sim, "POST", "/admin/faults",
                {"faults": [{"status": 429, "count": 2, "retry_after": 0.05}]})
    prompts = [f"metrics prompt {i}" for i in range(8)]
    during = []
    async with OnlineAPI(route, cache=redis_url, prefix=keys.prefix, run="load") as api:
        async def load():
            # concurrent identical prompts in 3 namespaces: generated + deduplicated
            await asyncio.gather(*(api.request(Request(p, 1 + i % 3, f"{ns}{i}", ns))
                                   for ns in "abc" for i, p in enumerate(prompts)))
            for i, p in enumerate(prompts):  # afterwards, another namespace: cached
                await api.request(Request(p, 2, f"d{i}", "d"))

        task = asyncio.create_task(load())
        while not task.done():  # scrape during the load
            during.append(merged(*[await scrape(u) for u in urls]))
            await asyncio.sleep(0.05)
        await task
    [row] = json.loads(cli(redis_url, keys.prefix, "stats", "--run", "load", "--json",
                           "--prices", str(prices)).stdout)
    assert row["samples_cached"] > 0 and row["samples_deduplicated"] > 0
    assert row["samples_generated"] > 0

    def agrees(m: dict) -> bool:
        return (total(m, "cachesaver_requests_total", model=route) == row["requests"] and all(
            total(m, "cachesaver_samples_total", model=route, kind=k) == row[f"samples_{k}"]
            for k in ("generated", "cached", "deduplicated")))

    deadline = time.monotonic() + 10
    while not agrees(after := merged(*[await scrape(u) for u in urls])):
        assert time.monotonic() < deadline, (after, row)
        await asyncio.sleep(0.1)
    for k in ("generated", "cached", "deduplicated"):
        assert round(total(after, "cachesaver_tokens_total", model=route, kind=k)) == \
            row[f"tokens_{k}"]
    assert total(after, "cachesaver_dollars_saved_total", model=route) == \
        pytest.approx(row["dollars_saved"])
    assert total(after, "cachesaver_dollars_spent_total", model=route) == \
        pytest.approx(row["dollars_spent"])
    # monotonic during the load, and never ahead of stats
    assert len(during) >= 2
    seen = [total(m, "cachesaver_requests_total") for m in during]
    assert seen == sorted(seen) and seen[-1] <= row["requests"]
    # the 429s were counted and retried; the simulator agrees
    assert (await sim_counters(sim))["faults"] == 2
    assert total(after, "cachesaver_provider_errors_total", model=route, status="429") == 2
    assert total(after, "cachesaver_provider_retries_total", model=route, status="429") == 2
    assert total(after, "cachesaver_model_call_seconds_count", model=route) == \
        (await sim_counters(sim))["requests"]
    assert total(after, "cachesaver_reserve_seconds_count") > 0
    # a direct client's hits: in stats and the cluster gauges, in no worker's counters
    async with OnlineAPI(route, cache=redis_url, prefix=keys.prefix, run="direct",
                         direct=True) as api:
        hits = await asyncio.gather(*(api.request(Request(p, 1, f"e{i}", "e"))
                                      for i, p in enumerate(prompts)))
    assert all(r.cached == [True] for r in hits)
    everything = json.loads(cli(redis_url, keys.prefix, "stats", "--json").stdout)
    [overall] = [r for r in everything if not r["run"] and r["model"] == route]  # the total
    assert overall["samples_cached"] == row["samples_cached"] + len(prompts)

    def cluster_agrees(m: dict) -> bool:
        return (total(m, "cachesaver_cluster_requests", model=route) == overall["requests"]
                and all(total(m, "cachesaver_cluster_samples", model=route, kind=k) ==
                        overall[f"samples_{k}"] for k in ("generated", "cached",
                                                          "deduplicated")))

    while not cluster_agrees(batch_only := await scrape(urls[1])):
        assert time.monotonic() < deadline + 10, (batch_only, overall)
        await asyncio.sleep(0.1)
    workers = merged(*[await scrape(u) for u in urls])  # their own counters: no direct hits
    assert total(workers, "cachesaver_samples_total", model=route, kind="cached") == \
        row["samples_cached"]
    assert total(batch_only, "cachesaver_workers_alive", route="cache") == 1
    assert total(batch_only, "cachesaver_workers_alive", route=route) == 1
    assert total(batch_only, "cachesaver_stream_lag", model=route) == 0
    # every family the dashboard queries is announced by the workers
    text = "".join(httpx.get(u, timeout=5).text for u in urls)
    announced = {re.sub(r"_total$", "", n) for n in re.findall(r"^# TYPE (\S+)", text, re.M)}
    assert dashboard_families() <= announced, dashboard_families() - announced


@pytest.mark.processes
async def test_gauges_show_queue_backlog_dead_letters_and_top_agrees(redis_url, keys,
                                                                     processes, redis):
    route = "sim:slow"
    cache = processes.cli("worker", "cache", name="cache")
    batch = processes.cli("worker", "batch", "--model", route, "--sim-latency", "1.5",
                          "--concurrency", "1", "--metrics-port", "0", "--metrics-refresh",
                          "0.1", name="batch")
    processes.wait_alive("cache")
    processes.wait_alive(route)
    url = metrics_url(batch)
    await redis.xadd(keys.dead_letters, {"v": b"1"})

    async def gauge(name: str, at_least: float, **labels: str) -> float:
        deadline = time.monotonic() + 10
        while (value := total(await scrape(url), name, **labels)) < at_least:
            assert time.monotonic() < deadline, (name, labels, value)
            await asyncio.sleep(0.05)
        return value

    assert await gauge("cachesaver_dead_letters", 1) == 1
    os.kill(cache.pid, signal.SIGSTOP)  # paused: client batches wait in the queue
    try:
        async with OnlineAPI(route, cache=redis_url, prefix=keys.prefix,
                             request_timeout=60) as api:
            task = asyncio.gather(*(api.request(Request(f"slow {i}", 1, f"r{i}", "ns"))
                                    for i in range(3)))
            assert await gauge("cachesaver_queue_depth", 1) >= 1
            os.kill(cache.pid, signal.SIGCONT)
            # three keys, one call at a time: one in a call, the others waiting
            assert await gauge("cachesaver_stream_lag", 2, model=route) >= 2
            assert await gauge("cachesaver_stream_pending", 1, model=route) == 1
            snap = json.loads(cli(redis_url, keys.prefix, "top", "--json").stdout)
            routes = {r["route"]: r for r in snap["routes"]}
            assert routes[route]["workers"] == 1 and routes["cache"]["workers"] == 1
            assert routes[route]["lag"] >= 1 and routes[route]["pending"] <= 1
            assert snap["dead_letters"] == 1
            frame = cli(redis_url, keys.prefix, "top", "--once", env={"COLUMNS": "80"})
            assert frame.returncode == 0, frame.stderr
            assert route in frame.stdout and "…" not in frame.stdout
            assert max(map(len, frame.stdout.splitlines())) <= 80
            await task
    finally:
        os.kill(cache.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while total(await scrape(url), "cachesaver_stream_lag", model=route) > 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    snap = json.loads(cli(redis_url, keys.prefix, "top", "--json").stdout)
    [model] = snap["models"]
    assert model["model"] == route and model["requests"] == 3


@pytest.mark.processes
def test_health_and_arq_check_follow_the_cache_worker(redis_url, keys, processes):
    env = subprocess_env(redis_url, CACHESAVER_PREFIX=keys.prefix)

    def arq_check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(ARQ), "--check", "workers.settings.CacheWorkerSettings"],
                              env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)

    def health(*routes: str) -> subprocess.CompletedProcess[str]:
        return cli(redis_url, keys.prefix, "health", *routes)

    assert arq_check().returncode == 1  # no cache worker of this prefix
    assert health("cache").returncode == 1
    processes.cli("worker", "cache", name="cache")
    processes.wait_alive("cache")
    done = arq_check()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "j_complete=" in done.stdout + done.stderr
    ok = health("cache")
    assert ok.returncode == 0 and "1 live worker" in ok.stdout
    assert health("cache", "--cluster").returncode == 0
    missing = health("cache", "sim:nobody")
    assert missing.returncode == 1 and "sim:nobody: no live worker" in missing.stdout


def test_arq_settings_describe_the_cache_worker(redis_url):
    from arq.connections import ArqRedis

    from workers.cache_worker import cache_worker
    from workers.settings import CacheWorkerSettings, redis_settings

    keys = Keys(os.environ.get("CACHESAVER_PREFIX") or "cachesaver:")
    worker = cache_worker(keys, redis_pool=ArqRedis())
    s = CacheWorkerSettings
    assert (s.queue_name, s.health_check_key) == (worker.queue_name, worker.health_check_key)
    assert s.health_check_interval == worker.health_check_interval
    [fn] = s.functions
    assert fn.name in worker.functions and fn.timeout_s == worker.functions[fn.name].timeout_s
    assert fn.max_tries == worker.functions[fn.name].max_tries
    assert s.job_serializer is worker.job_serializer
    assert s.job_deserializer is worker.job_deserializer
    tcp = redis_settings("rediss://u:p%40ss@h.example:6380/3?ssl_cert_reqs=none")
    assert (tcp.host, tcp.port, tcp.database, tcp.username, tcp.password, tcp.ssl,
            tcp.ssl_cert_reqs) == ("h.example", 6380, 3, "u", "p@ss", True, "none")
    unix = redis_settings("unix:///run/redis.sock?db=2")
    assert (unix.unix_socket_path, unix.database) == ("/run/redis.sock", 2)
    sent = redis_settings("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/1")
    assert sent.sentinel and sent.host == [("s1", 26379), ("s2", 26380)]
    assert (sent.sentinel_master, sent.database, sent.password) == ("mymaster", 1, "pw")


@pytest.mark.processes
def test_json_logs_are_one_object_per_line(redis_url, keys, processes):
    worker = processes.cli("worker", "cache", "--log-format", "json", "--metrics-port", "0",
                           name="cache")
    processes.wait_alive("cache")
    metrics_url(worker)
    worker.terminate()
    worker.wait(timeout=15)
    lines = Processes.logs(worker).splitlines()
    records = [json.loads(line) for line in lines]  # every line is a JSON object
    assert len(records) >= 3
    for rec in records:
        assert {"time", "level", "logger", "message"} <= set(rec)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"])
    assert any(r["logger"] == "cachesaver_dist.metrics" for r in records)
    # the environment variable, and a failing command's last word, are JSON too
    refused = "redis://127.0.0.1:1/0"
    done = subprocess.run(
        [sys.executable, "-m", "cachesaver_dist.cli", "stats", "--redis-url", refused],
        env=subprocess_env(redis_url, CACHESAVER_LOG_FORMAT="json"), capture_output=True,
        text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1
    [last] = [json.loads(line) for line in done.stderr.splitlines()]
    assert last["level"] == "ERROR" and last["message"].startswith("cachesaver-dist: ")
    bad = cli(redis_url, keys.prefix, "stats", "--log-format", "xml")
    assert bad.returncode == 2 and "log format must be one of text, json" in bad.stderr


async def test_read_state_counts_lag_pending_and_workers(redis, keys):
    from cachesaver_dist.cluster import discover_routes, read_state
    from cachesaver_dist.heartbeat import beat
    from cachesaver_dist.protocol import CONSUMER_GROUP

    stream = keys.work_stream("m:one")
    await redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    ids = [await redis.xadd(stream, {"i": str(i)}) for i in range(4)]
    await redis.xreadgroup(CONSUMER_GROUP, "w", {stream: ">"}, count=1)  # w: not alive
    await beat(redis, keys, ("cache", "m:one"), "host-1-abc")
    await redis.xreadgroup(CONSUMER_GROUP, "host-1-abc", {stream: ">"}, count=1)
    await redis.zadd(keys.cache_queue, {"job": 1})
    await redis.xadd(keys.work_stream("m:two"), {"i": "0"})  # no group yet: all of it waits

    async def lag() -> dict:
        state = await read_state(redis, keys, ["cache", "m:one", "m:two", "m:none"])
        assert state.queue_depth == 1 and state.dead_letters == 0
        return {r.route: (r.workers, r.lag, r.pending, r.orphaned) for r in state.routes}

    assert await lag() == {"cache": (1, 0, 0, 0), "m:one": (1, 4, 2, 1),
                           "m:two": (0, 1, 0, 0), "m:none": (0, 0, 0, 0)}
    await redis.xack(stream, CONSUMER_GROUP, ids[0])  # w's entry
    await redis.xdel(stream, ids[0], ids[2])  # as the workers do; and a hole ahead
    assert (await lag())["m:one"] == (1, 2, 1, 0)
    assert await discover_routes(redis, keys) == ["cache", "m:one", "m:two"]


async def test_cluster_gauges_read_the_global_stats_and_skip_what_is_not_a_count(redis, keys,
                                                                                 active_metrics):
    await redis.hset(keys.stats(), mapping={
        "m|requests": 7, "m|samples_cached": 5, "m|samples_generated": 3,
        "m|tokens_cached": 9,  # not a figure of these gauges
        "n|samples_deduplicated": "not a number"})  # a stray value must not stop the refresh
    await active_metrics.refresh(redis, keys, ())
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for family in active_metrics.registry.collect() for s in family.samples
           if s.name.startswith("cachesaver_cluster_")}
    assert got == {
        ("cachesaver_cluster_requests", (("model", "m"),)): 7.0,
        ("cachesaver_cluster_samples", (("kind", "cached"), ("model", "m"))): 5.0,
        ("cachesaver_cluster_samples", (("kind", "generated"), ("model", "m"))): 3.0,
    }
