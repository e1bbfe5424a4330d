"""cachesaver-dist: a distributed LLM response cache (workers, demo, simulator, stats, ...).

Commands: workers, the demo, the simulator, stats, top, health, dead letters, archives,
runs and retention.

Every command connects to ``--redis-url`` (default: ``REDIS_URL``); with neither, it
uses the embedded server of ``--data-dir`` (started if no live process runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from . import argtypes, defaults, logs, metrics
from .errors import CacheSaverError, refused
from .protocol import Keys

log = logging.getLogger("cachesaver_dist")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=defaults.redis_url(),
                   help="Redis URL: redis://, rediss://, unix:// or redis+sentinel:// "
                        "(default: $REDIS_URL, else the embedded server)")
    p.add_argument("--data-dir", default=defaults.data_dir(),
                   help=f"data folder of the embedded server (default: $CACHESAVER_DATA_DIR, "
                        f"else {defaults.DATA_DIR})")
    p.add_argument("--prefix", default=defaults.prefix(),
                   help=f"key prefix in Redis (default: $CACHESAVER_PREFIX, else "
                        f"{defaults.PREFIX})")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    logs.add_argument(p)


def _wait_replicas(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait-replicas", type=argtypes.count_or_zero, default=None, metavar="N",
                   help="answer a reservation or store only once N replicas hold it, so a "
                        "failover loses nothing (default: $CACHESAVER_WAIT_REPLICAS; else, "
                        "with a redis+sentinel:// URL, 1 when the primary has 2+ replicas; "
                        "else 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cachesaver-dist", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="run a cache or batch worker")
    kinds = worker.add_subparsers(dest="kind", required=True)
    cache = kinds.add_parser("cache", help="bookkeeping worker (arq, fast queue)")
    _common(cache)
    cache.add_argument("--poll-delay", type=argtypes.positive_seconds,
                       default=defaults.POLL_DELAY_S,
                       help="seconds between arq's queue polls; jobs named on the wake-up "
                            f"list start at once (default: {defaults.POLL_DELAY_S})")
    cache.add_argument("--max-jobs", type=argtypes.count, default=defaults.MAX_JOBS,
                       help=f"jobs at once (default: {defaults.MAX_JOBS})")
    cache.add_argument("--run-ttl", type=argtypes.whole_seconds, default=defaults.RUN_TTL_S,
                       help="seconds an idle run's counters are kept (default: 7 days)")
    metrics.add_arguments(cache)
    _wait_replicas(cache)
    batch = kinds.add_parser("batch", help="generation worker: calls the models")
    _common(batch)
    _wait_replicas(batch)
    batch.add_argument("--model", action="append", required=True, metavar="NAME",
                       help="model to serve: sim:<name>, together:<model>, openai:<model>, "
                            "dropin:<provider>:<model> or package.module:factory (repeatable)")
    batch.add_argument("--batch-size", type=argtypes.count, default=defaults.BATCH_SIZE,
                       help=f"entries per read ({defaults.BATCH_SIZE})")
    batch.add_argument("--batch-wait", type=argtypes.seconds, default=defaults.BATCH_WAIT_S,
                       help=f"seconds to wait for a batch to fill ({defaults.BATCH_WAIT_S})")
    batch.add_argument("--concurrency", type=argtypes.count_up_to(argtypes.MAX_CONCURRENCY),
                       default=defaults.CONCURRENCY,
                       help=f"generation work in flight at once ({defaults.CONCURRENCY})")
    batch.add_argument("--lease", type=argtypes.positive_seconds, default=defaults.LEASE_S,
                       help=f"seconds before a dead worker's work is taken over "
                            f"({defaults.LEASE_S:g})")
    batch.add_argument("--sim-latency", type=argtypes.seconds, default=0.05,
                       help="seconds per call of sim: models (0.05)")
    _backend_flags(batch)
    metrics.add_arguments(batch)

    demo = sub.add_parser("demo", help="the main job: a reasoning workload, run three times")
    _common(demo)
    demo.add_argument("--puzzles", type=argtypes.count_up_to(10_000), default=12,
                      help="puzzles per pass (12)")
    demo.add_argument("--latency", type=argtypes.seconds, default=0.05,
                      help="model latency, s (0.05)")
    demo.add_argument("--json", action="store_true", help="print the passes' rows as JSON "
                      "(progress goes to stderr)")

    stats = sub.add_parser("stats", help="what the cache saved, per run and in total")
    _common(stats)
    stats.add_argument("--run", help="one run only (default: every run and the total)")
    stats.add_argument("--json", action="store_true", help="print the rows as JSON")
    stats.add_argument("--prices", default=None,
                       help="JSON price file {model: [input, output] $ per 1M tokens} "
                            "(default: $CACHESAVER_PRICES, else the built-in table)")

    drop = sub.add_parser("drop-run", help="forget a run's namespace counters, so it starts "
                          "again from index 0 (samples, manifest and stats stay)")
    _common(drop)
    drop.add_argument("run", help="the run id")

    dead = sub.add_parser("dead-letters", help="list (or drop) malformed messages set aside")
    _common(dead)
    dead.add_argument("--count", type=argtypes.count, default=50,
                      help="how many, newest first (50)")
    dead.add_argument("--json", action="store_true", help="print them as JSON lines")
    dead.add_argument("--drop", nargs="*", metavar="ID",
                      help="delete these entries (all of them when no id is given)")

    imp = sub.add_parser("import-cachesaver", help="import the samples of an original "
                         "CacheSaver folder (docs/migrate.md)")
    _common(imp)
    imp.add_argument("folder", help="the original's diskcache folder")
    imp.add_argument("--requests", required=True, metavar="FILE.jsonl",
                     help="one request per line: its fields as the original saw them")
    imp.add_argument("--model", required=True, metavar="MODEL_ID",
                     help="the model id the samples are for (OnlineAPI's model_id)")
    imp.add_argument("--form", choices=("prompt", "args"), default=None,
                     help="prompt: Request with a prompt field; args: 0.0.6's args/kwargs "
                          "(default: prompt when a line has a prompt field)")
    imp.add_argument("--json", action="store_true", help="print the summary as JSON")
    imp.set_defaults(data_dir=None)  # the server of OnlineAPI(cache=Cache(FOLDER))

    from . import archive, retention, runs

    for module in (archive, runs, retention):
        module.add_commands(sub, _common)


    from . import cluster, simulator, top

    top_cmd = sub.add_parser("top", help="a live view: savings per model, backlog and workers "
                             "per route, dead letters")
    _common(top_cmd)
    top.add_arguments(top_cmd)

    health = sub.add_parser("health", help="exit 0 if a worker of this host serves each route "
                            "(a container health check)")
    _common(health)
    cluster.add_health_arguments(health)

    sim = sub.add_parser("simulator", help="a local OpenAI-compatible LLM simulator server")
    simulator.add_arguments(sim)
    logs.add_argument(sim)
    return parser


def _backend_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the together:/openai: backends (secrets come only from the environment)."""
    g = p.add_argument_group("provider backends (together:<model>, openai:<model>)")
    g.add_argument("--base-url", help="provider URL (default: $TOGETHER_BASE_URL or the SDK's "
                   "for together:, $OPENAI_BASE_URL for openai:); API keys only from "
                   "$TOGETHER_API_KEY / $OPENAI_API_KEY")
    g.add_argument("--max-n", type=argtypes.count, default=16,
                   help="samples per provider call; larger requests are split (16)")
    g.add_argument("--rpm", type=argtypes.count,
                   help="requests per --rate-window per model, shared by "
                   "all batch workers (default: unlimited)")
    g.add_argument("--tpm", type=argtypes.count,
                   help="estimated tokens (prompt chars/4 + max_tokens x n) "
                   "per --rate-window per model, cluster-wide (default: unlimited)")
    g.add_argument("--max-concurrent", type=argtypes.count,
                   help="calls in flight per model, cluster-wide (default: unlimited)")
    g.add_argument("--rate-window", type=argtypes.whole_seconds, default=60,
                   help="window of --rpm and --tpm, whole seconds (60)")
    g.add_argument("--retry-budget", type=argtypes.count_up_to(argtypes.MAX_RETRY_BUDGET),
                   default=6,
                   help="attempts per call on 429/5xx/timeouts, with backoff (6)")
    g.add_argument("--request-timeout", type=argtypes.positive_seconds, default=120.0,
                   help="seconds per provider call (120)")


def _redis_url(args: argparse.Namespace) -> tuple[str, Any]:
    from .server import resolve_redis_url

    return resolve_redis_url(args.redis_url, args.data_dir)


ROLES = ("the URL's user may not do this: run stats, top, health, drop-run and dead-letters "
         "as the operator user, and export, import, runs, fork, prune and usage (they scan "
         "the prefix's keys) as admin; workers as their own users (docs/acl.md)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulator":
        from . import simulator

        if args.log_format == "json":  # else the simulator's own text format
            logs.configure(0, "json")
        simulator.main_from_args(args)
        return 0
    logs.configure(args.verbose, args.log_format)
    if args.command == "worker" and args.kind == "batch":
        problem = _model_problem(args)
        if problem:  # before any server starts: a missing API key, a bad model name
            logs.fail(f"cachesaver-dist: {problem}")
            return 2
    keys = Keys(args.prefix)
    if args.command == "import-cachesaver" and args.data_dir is None:
        args.data_dir = str(Path(args.folder) / "cachesaver-redis")
    server = None
    from redis.exceptions import AuthenticationError, RedisError, ResponseError

    try:
        url, server = _redis_url(args)
        if args.command == "worker":
            if server is not None:
                log.warning("no --redis-url or REDIS_URL: this worker serves the embedded server "
                            "of %s, which only processes of this machine with the same data "
                            "folder use; set REDIS_URL to serve a cluster", args.data_dir)
            return _run_worker(url, keys, args)
        return asyncio.run(_interruptible(_run_command(url, keys, args)))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout's reader stopped early (| head): quiet, as rich is
        with contextlib.suppress(OSError):  # and no second error when Python flushes it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CacheSaverError, ConnectionError, RuntimeError, ValueError) as exc:
        logs.fail(f"cachesaver-dist: {exc}")
        return 1
    except ResponseError as exc:  # an ACL refusal, a read-only replica, ...
        logs.fail(f"cachesaver-dist: {refused(exc, f'the {args.command} command', noperm=ROLES)}")
        return 1
    except AuthenticationError as exc:  # the password changed mid-command
        logs.fail(f"cachesaver-dist: {refused(exc, f'the {args.command} command')}")
        return 1
    except RedisError as exc:  # the connection was lost mid-command
        logs.fail(f"cachesaver-dist: Redis stopped answering during the {args.command} "
                  f"command ({type(exc).__name__}: {exc}); run it again once Redis is back")
        return 1
    finally:
        if server is not None:
            server.stop()


async def _interruptible(command: Coroutine[Any, Any, int]) -> int:
    """``command``, stopped by Ctrl-C (SIGINT) with status 130, or by SIGTERM (``kill``,
    a batch system's time limit) with status 143, after cleaning up as on an error (an
    export removes its unfinished file; the demo stops its workers and server). Every
    signal cancels it at an await: Python's own handling raises KeyboardInterrupt at a
    second Ctrl-C (an impatient user's, or ``timeout`` passing the signal on) wherever
    the event loop is, which can lose a task's wake-up and leave the process hung; and
    SIGTERM's default ends the process at once, without cleaning up."""
    task = asyncio.current_task()
    status = 0

    def interrupt(code: int) -> None:
        nonlocal status
        status = status or code
        if task is not None:
            task.cancel()

    loop = asyncio.get_running_loop()
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # Windows
            loop.add_signal_handler(signum, interrupt, code)
    try:
        return await command
    except asyncio.CancelledError:
        if status:
            return status
        raise


async def _run_command(url: str, keys: Keys, args: argparse.Namespace) -> int:
    from .connection import check_reachable, connect

    await check_reachable(url)
    if args.command == "demo":
        from .demo import run_demo

        return await run_demo(url, keys, args.puzzles, args.latency, as_json=args.json)
    if args.command == "stats":
        from .report import print_stats

        return await print_stats(url, keys, args.run, as_json=args.json,
                                 prices_path=args.prices)
    if args.command == "import-cachesaver":
        from .migrate import import_command

        return await import_command(url, keys, args)
    if args.command == "top":
        from .top import run_top

        return await run_top(url, keys, args)
    redis = connect(url, read_timeout=defaults.READ_TIMEOUT_S)
    try:
        if args.command == "drop-run":
            from .prepare import check_run

            check_run(args.run)  # errors end in main(): one logs.fail line, status 1
            if not await redis.delete(keys.usage(args.run)):
                raise CacheSaverError(f"run {args.run!r} has no counters under prefix "
                                      f"{keys.prefix!r} ('cachesaver-dist runs' lists them)")
            print(f"run {args.run!r}: counters dropped")
            return 0
        if args.command == "dead-letters":
            return await _dead_letters(redis, keys, args)
        if args.command == "health":
            from .cluster import run_health

            return await run_health(redis, keys, args.routes, cluster=args.cluster)
        from . import archive, retention, runs

        for module in (archive, runs, retention):
            if args.command in module.COMMANDS:
                return await module.run_command(redis, keys, args)
    finally:
        await redis.aclose()
    return 2


async def _dead_letters(redis: Any, keys: Keys, args: argparse.Namespace) -> int:
    import json

    from .deadletters import drop_dead_letters, list_dead_letters

    if args.drop is not None:
        dropped = await drop_dead_letters(redis, keys, args.drop or None)
        print(f"dropped {dropped} dead letter(s)")
        return 0
    letters = await list_dead_letters(redis, keys, args.count)
    rows = [{"id": eid, "kind": d.kind, "reason": d.reason, "source": d.source,
             "bytes": len(d.raw), "at": d.at} for eid, d in letters]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    elif rows:
        from .deadletters import print_table

        print_table(rows)
    else:
        print(f"no dead letters under prefix {keys.prefix!r}")
    return 0


def _backend_options(args: argparse.Namespace) -> Any:
    from .backends import BackendOptions

    return BackendOptions(
        base_url=args.base_url, max_n=args.max_n, timeout=args.request_timeout,
        retry_budget=args.retry_budget, rpm=args.rpm, tpm=args.tpm,
        max_concurrent=args.max_concurrent, rate_window=args.rate_window)


def _model_problem(args: argparse.Namespace) -> str | None:
    """Why a batch worker could not build one of its ``--model``s (checked, not built)."""
    from .models import check_model_setup

    try:
        options = _backend_options(args)
        for name in args.model:
            check_model_setup(name, options)
    except ValueError as exc:
        return str(exc)
    return None


def _run_worker(url: str, keys: Keys, args: argparse.Namespace) -> int:
    from workers import run

    exporter = metrics.options_from_args(args)
    replicas = (defaults.wait_replicas(url) if args.wait_replicas is None
                else args.wait_replicas)
    if args.kind == "cache":
        return run.serve_cache(url, keys, poll_delay=args.poll_delay, max_jobs=args.max_jobs,
                               run_ttl_s=args.run_ttl, metrics=exporter, replicas=replicas)
    from .models import load_model

    if args.verbose < 2:  # one line per HTTP call otherwise
        logging.getLogger("httpx").setLevel(logging.WARNING)

    def models(redis: Any) -> dict[str, Any]:
        options = _backend_options(args)
        return {name: load_model(name, sim_latency=args.sim_latency, options=options,
                                 redis=redis, keys=keys) for name in args.model}

    config = run.BatchWorkerConfig(batch_size=args.batch_size, batch_wait=args.batch_wait,
                                   concurrency=args.concurrency, lease=args.lease,
                                   replicas=replicas)
    return run.serve_batch(url, keys, models, config, metrics=exporter)


if __name__ == "__main__":
    sys.exit(main())
