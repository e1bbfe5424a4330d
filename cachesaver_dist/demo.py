"""The demo: a tree-of-thought style workload, run as three methods sharing one cache.

It starts the LLM simulator server, a cache worker and a batch worker as separate
processes (the shape of a real deployment; the batch worker talks to the simulator
over HTTP as it would to an OpenAI-compatible provider), then runs the workload
three times. The first pass pays only for samples no method has asked for before; the
second pass (a new run) is served from cache; the third does the same as a direct
client (``OnlineAPI(direct=True)``: it reserves itself, without the cache worker hop).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .connection import connect
from .heartbeat import alive_workers
from .pipelines import OnlineAPI
from .protocol import Keys
from .report import collect
from .server import spawn
from .tables import Col, fit_table
from .typedefs import Request

# Priced like Together's Llama 3.3 70B (prices.json); answered by the local simulator.
PROVIDER_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
MODEL = f"openai:{PROVIDER_MODEL}"
PUZZLES = ["4 4 6 8", "1 2 3 4", "2 3 5 12", "1 1 4 6", "3 3 8 8", "1 5 5 5", "2 7 7 10",
           "4 6 6 9", "1 3 4 6", "5 5 9 9", "2 2 2 9", "3 4 7 8", "1 6 8 9", "2 4 4 10"]


@dataclass(frozen=True)
class ThoughtRequest(Request):
    temperature: float = 0.7
    max_completion_tokens: int = 24


def _step_prompt(puzzle: str, path: str) -> str:
    return f"Game of 24 with {puzzle}. Steps so far: {path or 'none'}. Propose the next step."


async def _tree_search(api: OnlineAPI, puzzle: str, namespace: str, breadth: int) -> int:
    """Breadth-first search: 3 levels, 3 proposals per state, keep ``breadth``."""
    frontier, calls = [""], 0
    for depth in range(3):
        responses = await asyncio.gather(*(
            api.request(ThoughtRequest(prompt=_step_prompt(puzzle, path), n=3,
                                       request_id=f"{puzzle}/{depth}/{i}", namespace=namespace))
            for i, path in enumerate(frontier)))
        calls += len(responses)
        children = sorted(f"{path} > {text.split()[0]}" for path, r in zip(frontier, responses)
                          for text in r.data)
        frontier = children[:breadth]
    return calls


async def _sample_k(api: OnlineAPI, puzzle: str, namespace: str) -> int:
    await api.request(ThoughtRequest(prompt=_step_prompt(puzzle, ""), n=5,
                                     request_id=puzzle, namespace=namespace))
    return 1


METHODS = {
    "tot-bfs": lambda api, p: _tree_search(api, p, "tot-bfs", breadth=2),
    "tot-ablation": lambda api, p: _tree_search(api, p, "tot-ablation", breadth=1),
    "sample-5": lambda api, p: _sample_k(api, p, "sample-5"),
}


async def _run_pass(url: str, keys: Keys, puzzles: list[str], label: str,
                    console: Console, *, direct: bool = False) -> dict[str, float]:
    started = time.monotonic()
    requests = 0
    async with OnlineAPI(MODEL, cache=url, prefix=keys.prefix, batch_size=32,
                         request_timeout=120, direct=direct) as api:
        with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task(label, total=len(puzzles) * len(METHODS))

            async def one(method: str, puzzle: str) -> None:
                nonlocal requests
                made = await METHODS[method](api, puzzle)
                requests += made
                progress.advance(task)

            await asyncio.gather(*(one(m, p) for p in puzzles for m in METHODS))
    seconds = time.monotonic() - started
    row = await _counted(url, keys, api.run, requests)
    return {**row, "pass": label, "requests": requests, "seconds": seconds}


async def _counted(url: str, keys: Keys, run: str, requests: int,
                   wait_s: float = 2.0) -> dict[str, Any]:
    """The run's stats row once it counts all ``requests`` (the workers write their
    accounting within 50 ms of the replies), or as it stands after ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while True:
        rows = [r for r in await collect(url, keys, run) if r["model"] == MODEL]
        if (rows and rows[0]["requests"] >= requests) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.02)
    if not rows:
        raise RuntimeError(f"the stats of run {run} are missing: is another process "
                           "deleting this prefix's keys?")
    return rows[0]


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:.5f}"


_COLUMNS = [Col("pass", "pass", text=True), Col("requests", "requests"),
            Col("generated", "samples_generated"), Col("cached", "samples_cached"),
            Col("dedup", "samples_deduplicated", drop=4),
            Col("tokens paid", "tokens_generated", drop=3),
            Col("$ spent", "dollars_spent", fmt=_money, drop=2),
            Col("$ saved", "dollars_saved", fmt=_money, drop=1),
            Col("seconds", "seconds", fmt=lambda v: f"{v:.2f}", drop=5)]


def _spawn_processes(url: str, keys: Keys, latency: float) -> list[subprocess.Popen]:
    """The simulator (its URL read from its first line), a cache and a batch worker."""
    cli = [sys.executable, "-m", "cachesaver_dist.cli"]
    # Stopped by us, after the workers that call it: a terminal's Ctrl-C does not reach
    # it (its own session); it gets SIGTERM if we die, as the embedded server does.
    simulator = spawn([*cli, "simulator", "--port", "0", "--latency", str(latency)],
                      stdout=subprocess.PIPE, text=True, start_new_session=True)
    line = simulator.stdout.readline() if simulator.stdout else ""
    if "http" not in line:
        simulator.kill()
        raise RuntimeError(f"the simulator did not start: {line!r}")
    base_url = line.strip().split()[-1]
    env = {**os.environ, "REDIS_URL": url}
    common = ["--prefix", keys.prefix]
    return [
        simulator,
        spawn([*cli, "worker", "cache", *common], env=env),
        spawn([*cli, "worker", "batch", *common, "--model", MODEL, "--base-url", base_url],
              env=env),
    ]


def _stop_processes(procs: list[subprocess.Popen]) -> None:
    """Stop the workers, then the simulator: a model call in flight finishes (and is
    stored) instead of being retried against a simulator gone. What does not stop
    within 15 s is killed."""
    simulator, workers = procs[0], procs[1:]
    for group in (workers, [simulator]):
        for p in group:
            p.terminate()
        for p in group:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def _wait_for_workers(url: str, keys: Keys, procs: list[subprocess.Popen]) -> None:
    redis = connect(url)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a process exited at start; see its log above")
            if await alive_workers(redis, keys, "cache") and \
                    await alive_workers(redis, keys, MODEL):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("workers did not come up within 30 s")
    finally:
        await redis.aclose()


async def run_demo(url: str, keys: Keys, puzzles: int = 12, latency: float = 0.05, *,
                   as_json: bool = False) -> int:
    """Start workers, run the workload three times, print what was generated vs cached (the
    rows as JSON on stdout with ``as_json``; everything else then goes to stderr)."""
    console = Console(stderr=as_json)
    chosen = (PUZZLES * (puzzles // len(PUZZLES) + 1))[:puzzles]
    chosen = [f"{p} #{i}" if i >= len(PUZZLES) else p for i, p in enumerate(chosen)]
    console.print(f"[bold]cachesaver-dist demo[/]: {len(chosen)} puzzles x "
                  f"{len(METHODS)} methods ({', '.join(METHODS)}); {PROVIDER_MODEL} played "
                  f"by the local simulator at {latency * 1000:.0f} ms per call")
    procs = _spawn_processes(url, keys, latency)
    try:
        await _wait_for_workers(url, keys, procs)
        rows = [await _run_pass(url, keys, chosen, label, console, direct=direct)
                for label, direct in (("pass 1", False), ("pass 2 (re-run)", False),
                                      ("pass 3 (re-run, direct)", True))]
    finally:
        _stop_processes(procs)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        console.print(fit_table(_COLUMNS, rows, console.width,
                                title="samples per pass: generated (paid) vs served from cache"))
    total = sum(r["samples_generated"] + r["samples_cached"] + r["samples_deduplicated"]
                for r in rows)
    paid = sum(r["samples_generated"] for r in rows)
    console.print(f"{total} samples served, {paid} generated: the cache saved "
                  f"{(1 - paid / total) * 100 if total else 0:.0f}% of model samples. "
                  "Run it again: the data is kept, so every pass is served from cache. "
                  "'cachesaver-dist stats' shows the totals.")
    return 0
