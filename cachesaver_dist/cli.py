"""``cachesaver-dist``: workers, the demo, the simulator and the stats table.

Every command connects to ``--redis-url`` (default: ``REDIS_URL``); with neither, it
uses the embedded server of ``--data-dir`` (started if no live process runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

from .connection import safe_url
from .protocol import DEFAULT_PREFIX, Keys
from .scripts import DEFAULT_RUN_TTL_S

log = logging.getLogger("cachesaver_dist")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="Redis URL (default: $REDIS_URL, else the embedded server)")
    p.add_argument("--data-dir", default=os.environ.get("CACHESAVER_DATA_DIR", ".cachesaver"),
                   help="data folder of the embedded server (default: .cachesaver)")
    p.add_argument("--prefix", default=os.environ.get("CACHESAVER_PREFIX", DEFAULT_PREFIX),
                   help=f"key prefix in Redis (default: {DEFAULT_PREFIX})")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cachesaver-dist", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="run a cache or batch worker")
    kinds = worker.add_subparsers(dest="kind", required=True)
    cache = kinds.add_parser("cache", help="bookkeeping worker (arq, fast queue)")
    _common(cache)
    cache.add_argument("--poll-delay", type=float, default=0.5,
                       help="seconds between arq's queue polls; jobs named on the wake-up "
                            "list start at once (default: 0.5)")
    cache.add_argument("--max-jobs", type=int, default=50, help="jobs at once (default: 50)")
    cache.add_argument("--run-ttl", type=int, default=DEFAULT_RUN_TTL_S,
                       help="seconds an idle run's counters are kept (default: 7 days)")
    batch = kinds.add_parser("batch", help="generation worker: calls the models")
    _common(batch)
    batch.add_argument("--model", action="append", required=True, metavar="NAME",
                       help="model to serve: sim:<name>, together:<model>, openai:<model> or "
                            "package.module:factory (repeatable)")
    batch.add_argument("--batch-size", type=int, default=32, help="entries per read (32)")
    batch.add_argument("--batch-wait", type=float, default=0.005,
                       help="seconds to wait for a batch to fill (0.005)")
    batch.add_argument("--concurrency", type=int, default=32,
                       help="generation work in flight at once (32)")
    batch.add_argument("--lease", type=float, default=30.0,
                       help="seconds before a dead worker's work is taken over (30)")
    batch.add_argument("--sim-latency", type=float, default=0.05,
                       help="seconds per call of sim: models (0.05)")
    _backend_flags(batch)

    demo = sub.add_parser("demo", help="the main job: a reasoning workload, run twice")
    _common(demo)
    demo.add_argument("--puzzles", type=int, default=12, help="puzzles per pass (12)")
    demo.add_argument("--latency", type=float, default=0.05, help="model latency, s (0.05)")

    stats = sub.add_parser("stats", help="what the cache saved, per run and in total")
    _common(stats)
    stats.add_argument("--run", help="one run only (default: every run and the total)")
    stats.add_argument("--json", action="store_true", help="print the rows as JSON")
    stats.add_argument("--prices", default=None,
                       help="JSON price file {model: [input, output] $ per 1M tokens} "
                            "(default: $CACHESAVER_PRICES, else the built-in table)")

    drop = sub.add_parser("drop-run", help="forget a run's namespace counters (samples stay)")
    _common(drop)
    drop.add_argument("run", help="the run id")

    from . import simulator

    sim = sub.add_parser("simulator", help="a local OpenAI-compatible LLM simulator server")
    simulator.add_arguments(sim)
    return parser


def _backend_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the together:/openai: backends (secrets come only from the environment)."""
    g = p.add_argument_group("provider backends (together:<model>, openai:<model>)")
    g.add_argument("--base-url", help="provider URL (default: $TOGETHER_BASE_URL or the SDK's "
                   "for together:, $OPENAI_BASE_URL for openai:); API keys only from "
                   "$TOGETHER_API_KEY / $OPENAI_API_KEY")
    g.add_argument("--max-n", type=int, default=16,
                   help="samples per provider call; larger requests are split (16)")
    g.add_argument("--rpm", type=int, help="requests per --rate-window per model, shared by "
                   "all batch workers (default: unlimited)")
    g.add_argument("--tpm", type=int, help="estimated tokens (prompt chars/4 + max_tokens x n) "
                   "per --rate-window per model, cluster-wide (default: unlimited)")
    g.add_argument("--max-concurrent", type=int,
                   help="calls in flight per model, cluster-wide (default: unlimited)")
    g.add_argument("--rate-window", type=float, default=60.0,
                   help="window of --rpm and --tpm, whole seconds (60)")
    g.add_argument("--retry-budget", type=int, default=6,
                   help="attempts per call on 429/5xx/timeouts, with backoff (6)")
    g.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds per provider call (120)")


def _logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 1:
        logging.getLogger("arq").setLevel(logging.WARNING)


def _redis_url(args: argparse.Namespace) -> tuple[str, Any]:
    from .server import resolve_redis_url

    return resolve_redis_url(args.redis_url, args.data_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulator":
        from . import simulator

        simulator.main_from_args(args)
        return 0
    _logging(args.verbose)
    url, server = _redis_url(args)
    keys = Keys(args.prefix)
    try:
        if args.command == "worker" and args.kind == "cache":
            return _run_cache_worker(url, keys, args)
        if args.command == "worker":
            return asyncio.run(_run_batch_worker(url, keys, args))
        if args.command == "demo":
            from .demo import run_demo

            return asyncio.run(run_demo(url, keys, args.puzzles, args.latency))
        if args.command == "stats":
            from .report import print_stats

            return asyncio.run(print_stats(url, keys, args.run, as_json=args.json,
                                           prices_path=args.prices))
        if args.command == "drop-run":
            return asyncio.run(_drop_run(url, keys, args.run))
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            server.stop()
    return 2


def _run_cache_worker(url: str, keys: Keys, args: argparse.Namespace) -> int:
    from arq.connections import ArqRedis
    from redis.exceptions import ConnectionError as RedisConnectionError

    from workers.cache_worker import cache_worker

    from .connection import connection_pool

    log.info("cache worker on %s (queue %s)", safe_url(url), keys.cache_queue)
    while True:  # Redis gone for longer than the connection retries: start over
        asyncio.set_event_loop(asyncio.new_event_loop())
        worker = cache_worker(keys, redis_pool=ArqRedis(connection_pool(url)),
                              poll_delay=args.poll_delay, max_jobs=args.max_jobs,
                              run_ttl_s=args.run_ttl)
        try:
            worker.run()
            return 0
        except (RedisConnectionError, OSError) as exc:
            log.warning("lost Redis (%s); restarting the worker in 2 s", exc)
            time.sleep(2)


async def _run_batch_worker(url: str, keys: Keys, args: argparse.Namespace) -> int:
    from workers.batch_worker import BatchWorker, BatchWorkerConfig

    from .backends import BackendOptions
    from .connection import connect
    from .models import load_model

    if args.verbose < 2:  # one line per HTTP call otherwise
        logging.getLogger("httpx").setLevel(logging.WARNING)
    redis = connect(url)
    try:
        options = BackendOptions(
            base_url=args.base_url, max_n=args.max_n, timeout=args.request_timeout,
            retry_budget=args.retry_budget, rpm=args.rpm, tpm=args.tpm,
            max_concurrent=args.max_concurrent, rate_window=args.rate_window)
        models = {name: load_model(name, sim_latency=args.sim_latency, options=options,
                                   redis=redis, keys=keys) for name in args.model}
    except (ValueError, TypeError) as exc:
        await redis.aclose()
        print(f"cachesaver-dist: {exc}", file=sys.stderr)
        return 2
    worker = BatchWorker(redis, keys, models, BatchWorkerConfig(
        batch_size=args.batch_size, batch_wait=args.batch_wait,
        concurrency=args.concurrency, lease=args.lease))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stop)
    log.info("batch worker on %s", safe_url(url))
    try:
        await worker.run()
    finally:
        for model in models.values():
            if callable(getattr(model, "aclose", None)):
                await model.aclose()
        await redis.aclose()
    return 0


async def _drop_run(url: str, keys: Keys, run: str) -> int:
    from .connection import connect

    redis = connect(url)
    try:
        dropped = await redis.delete(keys.usage(run))
    finally:
        await redis.aclose()
    print(f"run {run!r}: " + ("counters dropped" if dropped else "no counters found"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
