"""Prometheus metrics of the worker processes: every metric is defined here.

A worker started with ``--metrics-port`` serves ``/metrics`` (``prometheus-client``'s
HTTP server, in a thread). Nothing is counted in other processes: until ``start``
makes ``active`` a ``WorkerMetrics``, the hooks below return at once, and
``prometheus_client`` is not even imported.

* Counters (``cachesaver_requests_total``, ``..._samples_total``, ``..._tokens_total``,
  ``..._dollars_saved_total``, ``..._dollars_spent_total``) are taken from the same
  tally the outbox writes to the ``stats`` hashes, after that write succeeded, so the
  sum over all workers equals ``cachesaver-dist stats`` (for requests served by worker
  processes). They are added once per outbox send, not per request.
* Gauges (queue depth, stream lag, dead letters, live workers, and the global stats'
  requests and samples, which count direct clients too) are cluster-wide figures read
  from Redis by a periodic task (``refresh_s``): every worker reports the same value,
  so dashboards take ``max`` over instances.
* Histograms: seconds per cache job (``cachesaver_reserve_seconds``) and per model call
  (``cachesaver_model_call_seconds``); provider errors and retries by HTTP status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import argtypes, defaults
from .cluster import CACHE_ROUTE, read_state
from .protocol import Keys

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("cachesaver_dist.metrics")

NAMESPACE = "cachesaver"
KINDS = ("cached", "deduplicated", "generated")  # the stats' sample kinds
SAVED_KINDS = ("cached", "deduplicated")
RESERVE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
MODEL_CALL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                      300.0)
NO_STATUS = "none"  # provider errors without an HTTP status: timeouts, lost connections


class WorkerMetrics:
    """Every metric a worker exports, in a registry of its own."""

    def __init__(self, prices: dict[str, tuple[float, float]] | None = None) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            GCCollector,
            Histogram,
            PlatformCollector,
            ProcessCollector,
        )

        self.prices = prices or {}
        self.registry: CollectorRegistry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        def counter(name: str, text: str, labels: Iterable[str]) -> Counter:
            return Counter(name, text, list(labels), namespace=NAMESPACE, registry=r)

        def gauge(name: str, text: str, labels: Iterable[str] = ()) -> Gauge:
            return Gauge(name, text, list(labels), namespace=NAMESPACE, registry=r)

        # Accounting (equal to `stats` summed over workers).
        self.requests = counter("requests", "Requests completed (answered in full)",
                                ["model"])
        self.samples = counter(
            "samples", "Samples served, by kind: cached = from the store (hits), "
            "deduplicated = generated for another request in flight (shared), "
            "generated = generated for this request (misses = deduplicated + generated)",
            ["model", "kind"])
        self.tokens = counter("tokens", "Tokens of the samples served, by kind "
                              "(saved = cached + deduplicated) and part (prompt, completion)",
                              ["model", "kind", "part"])
        self.dollars_saved = counter("dollars_saved", "Dollars the cached and deduplicated "
                                     "samples would have cost (priced models only)", ["model"])
        self.dollars_spent = counter("dollars_spent", "Dollars the generated samples cost "
                                     "(priced models only)", ["model"])
        # Latency and errors.
        self.reserve_seconds = Histogram(
            "reserve_seconds", "Seconds per cache job (one client batch: reserve, replies)",
            namespace=NAMESPACE, registry=r, buckets=RESERVE_BUCKETS)
        self.model_call_seconds = Histogram(
            "model_call_seconds", "Seconds per model call of a batch worker (retries "
            "included)", ["model"], namespace=NAMESPACE, registry=r, buckets=MODEL_CALL_BUCKETS)
        self.model_failures = counter("model_failures", "Model calls that failed for good "
                                      "(their waiters got an error)", ["model"])
        self.provider_errors = counter("provider_errors", "Failed provider call attempts, by "
                                       f"HTTP status ('{NO_STATUS}': timeout or connection)",
                                       ["model", "status"])
        self.provider_retries = counter("provider_retries", "Provider call attempts retried "
                                        "after a transient error, by HTTP status",
                                        ["model", "status"])
        # Cluster state, refreshed every few seconds (same value on every worker).
        self.queue_depth = gauge("queue_depth", "Cache jobs queued or running")
        self.stream_lag = gauge("stream_lag", "Generation work entries not finished "
                                "(undelivered + pending) in a model's work stream", ["model"])
        self.stream_pending = gauge("stream_pending", "Work entries read by a batch worker "
                                    "and not yet acknowledged (in a model call)", ["model"])
        self.dead_letters = gauge("dead_letters", "Malformed messages set aside (the dead "
                                  "letter stream's length)")
        self.workers_alive = gauge("workers_alive", "Workers whose heartbeat is current, per "
                                   "route ('cache' or a model)", ["route"])
        self.cluster_requests = gauge(
            "cluster_requests", "Requests completed by the whole cluster, as in the global "
            "stats hash: direct clients and in-process workers included (cumulative)",
            ["model"])
        self.cluster_samples = gauge(
            "cluster_samples", "Samples served by the whole cluster, by kind, as in the "
            "global stats hash (cumulative)", ["model", "kind"])
        self.refresh_errors = counter("gauge_refresh_errors", "Gauge refreshes that failed "
                                      "(Redis unavailable)", [])
        self._plans: dict[str, list[tuple[Any, float]]] = {}

    def sample_names(self) -> set[str]:
        """Every sample name this registry can expose (``_total``, ``_bucket``, ...)."""
        suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum",
                    "_count"), "summary": ("", "_sum", "_count"), "info": ("_info",)}
        names = set()
        for family in self.registry.collect():
            names |= {family.name + s for s in suffixes.get(family.type, ("",))}
            names |= {s.name for s in family.samples}
        return names

    # -- accounting -------------------------------------------------------------------

    def count(self, tally: dict[tuple[str, str], float]) -> None:
        """Add an outbox tally (``(run, "<model>|<counter>") -> increment``)."""
        for (_, fld), value in tally.items():
            plan = self._plans.get(fld)
            if plan is None:
                plan = self._plans[fld] = self._plan(fld)
            for child, factor in plan:
                child.inc(value * factor)

    def _plan(self, fld: str) -> list[tuple[Any, float]]:
        """The counters one stats field adds to, and by how much per unit."""
        from .report import price_of

        model, _, counter = fld.rpartition("|")
        if counter == "requests":
            return [(self.requests.labels(model), 1.0)]
        what, _, kind = counter.rpartition("_")
        if kind not in KINDS:
            return []
        if what == "samples":
            return [(self.samples.labels(model, kind), 1.0)]
        if what not in ("prompt_tokens", "completion_tokens"):
            return []
        part = what.split("_")[0]
        plan: list[tuple[Any, float]] = [(self.tokens.labels(model, kind, part), 1.0)]
        price = price_of(model, self.prices)
        if price is not None:
            per_token = (price[0] if part == "prompt" else price[1]) / 1e6
            dollars = self.dollars_saved if kind in SAVED_KINDS else self.dollars_spent
            plan.append((dollars.labels(model), per_token))
        return plan

    # -- gauges -----------------------------------------------------------------------

    async def refresh(self, redis: Any, keys: Keys, routes: tuple[str, ...]) -> None:
        """Read the cluster state once and set the gauges."""
        state = await read_state(redis, keys, routes)
        self.queue_depth.set(state.queue_depth)
        self.dead_letters.set(state.dead_letters)
        for rs in state.routes:
            self.workers_alive.labels(rs.route).set(rs.workers)
            if rs.route != CACHE_ROUTE:
                self.stream_lag.labels(rs.route).set(rs.lag)
                self.stream_pending.labels(rs.route).set(rs.pending)
        for fld, raw in (await redis.hgetall(keys.stats())).items():
            model, _, counter = fld.decode(errors="replace").rpartition("|")
            kind = counter.removeprefix("samples_")
            try:
                value = float(raw)
            except ValueError:  # not a counter of ours: left out
                continue
            if counter == "requests":
                self.cluster_requests.labels(model).set(value)
            elif kind != counter and kind in KINDS:
                self.cluster_samples.labels(model, kind).set(value)


active: WorkerMetrics | None = None


# -- hooks called by the workers (no-ops without an exporter) ------------------------------

def count(tally: dict[tuple[str, str], float]) -> None:
    if active is not None and tally:
        active.count(tally)


def cache_job_done(seconds: float) -> None:
    if active is not None:
        active.reserve_seconds.observe(seconds)


def model_call_done(model: str, seconds: float) -> None:
    if active is not None:
        active.model_call_seconds.labels(model).observe(seconds)


def model_failed(model: str) -> None:
    if active is not None:
        active.model_failures.labels(model).inc()


def provider_error(model: str | None, status: int | None, retried: bool) -> None:
    if active is not None:
        label = NO_STATUS if status is None else str(status)
        active.provider_errors.labels(model or "", label).inc()
        if retried:
            active.provider_retries.labels(model or "", label).inc()


# -- the exporter --------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricsOptions:
    """Where a worker serves ``/metrics`` (``port`` 0: a free one, logged) and how often
    the gauges are read from Redis."""

    port: int
    host: str = defaults.METRICS_HOST
    refresh_s: float = defaults.METRICS_REFRESH_S

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"metrics port must be 0-65535, got {self.port}")
        if not self.refresh_s > 0:
            raise ValueError(f"metrics refresh must be > 0 seconds, got {self.refresh_s}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The workers' ``--metrics-*`` flags."""
    g = p.add_argument_group("Prometheus metrics (see ops/README.md)")
    g.add_argument("--metrics-port", type=argtypes.naming_env(argtypes.port),
                   default=argtypes.env_default("CACHESAVER_METRICS_PORT",
                                                defaults.metrics_port()),
                   help="serve /metrics on this port; 0 picks a free one and logs it "
                        "(default: $CACHESAVER_METRICS_PORT, else no metrics)")
    g.add_argument("--metrics-host", default=defaults.METRICS_HOST,
                   help=f"interface of the metrics endpoint ({defaults.METRICS_HOST}; "
                        "0.0.0.0 in a container)")
    g.add_argument("--metrics-refresh", type=argtypes.positive_seconds,
                   default=defaults.METRICS_REFRESH_S,
                   help="seconds between reads of the gauges (queue depth, stream lag, dead "
                        f"letters, live workers) from Redis ({defaults.METRICS_REFRESH_S:g})")


def options_from_args(args: argparse.Namespace) -> MetricsOptions | None:
    """The ``--metrics-*`` flags as options (None: no metrics)."""
    if args.metrics_port is None:
        return None
    return MetricsOptions(args.metrics_port, args.metrics_host, args.metrics_refresh)


class Exporter:
    """The HTTP server and the gauge refresher of one worker process."""

    def __init__(self, metrics: WorkerMetrics, server: Any, task: asyncio.Task,
                 redis: Any) -> None:
        self.metrics, self._server, self._task, self._redis = metrics, server, task, redis

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    async def stop(self) -> None:
        """Stop serving (within about a second) and forget the metrics."""
        global active
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError, OSError):
            await asyncio.wait_for(asyncio.to_thread(self._server.shutdown), 1.0)
        self._server.server_close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._redis.aclose(), 1.0)
        if active is self.metrics:
            active = None


async def start(options: MetricsOptions | None, url: str, keys: Keys, routes: Iterable[str],
                *, kind: str) -> Exporter | None:
    """Count in this process, serve ``/metrics`` and refresh the gauges until the
    exporter's ``stop`` (nothing, and None, without ``options``). ``routes``: the models
    whose work streams and workers the gauges follow (``cache`` is always followed)."""
    global active
    if options is None:
        return None
    from prometheus_client import disable_created_metrics, start_http_server

    from .connection import connect
    from .errors import CacheSaverError
    from .report import load_prices

    disable_created_metrics()
    metrics = WorkerMetrics(load_prices())
    try:
        server, _ = start_http_server(options.port, addr=options.host, registry=metrics.registry)
    except OSError as exc:
        raise CacheSaverError(f"cannot serve metrics on {options.host}:{options.port}: {exc} "
                              "(choose another --metrics-port, or 0 for a free one)") from exc
    routes = tuple(dict.fromkeys([CACHE_ROUTE, *routes]))
    redis = connect(url, read_timeout=defaults.READ_TIMEOUT_S)
    task = asyncio.create_task(_refresh_loop(metrics, redis, keys, routes, options.refresh_s),
                               name="metrics-refresh")
    active = metrics
    exporter = Exporter(metrics, server, task, redis)
    log.info("%s worker metrics on http://%s:%d/metrics", kind,
             f"[{options.host}]" if ":" in options.host else options.host, exporter.port)
    return exporter


async def _refresh_loop(metrics: WorkerMetrics, redis: Any, keys: Keys,
                        routes: tuple[str, ...], every: float) -> None:
    from redis.exceptions import RedisError

    failing = False
    while True:
        try:
            await metrics.refresh(redis, keys, routes)
            if failing:
                log.info("metrics: gauges read from Redis again")
            failing = False
        except (RedisError, OSError) as exc:
            metrics.refresh_errors.inc()
            if not failing:
                log.warning("metrics: gauges not refreshed (%s); trying again every %g s",
                            exc, every)
            failing = True
        await asyncio.sleep(every)
