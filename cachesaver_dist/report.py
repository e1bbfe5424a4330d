"""The ``stats`` table: samples and tokens generated vs served from cache, per run."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .connection import connect
from .protocol import Keys
from .stats import list_runs, read_stats

COLUMNS = [
    ("requests", "requests"),
    ("generated", "samples_generated"),
    ("cached", "samples_cached"),
    ("deduplicated", "samples_deduplicated"),
    ("tokens generated", "completion_tokens_generated"),
    ("tokens from cache", "completion_tokens_cached"),
    ("tokens deduplicated", "completion_tokens_deduplicated"),
]


async def print_stats(url: str, keys: Keys, run: str | None = None) -> int:
    redis = connect(url)
    try:
        runs = [run] if run else [r for r, _ in await list_runs(redis, keys)] + [None]
        table = Table(title="cachesaver-dist: what the cache saved")
        table.add_column("run")
        table.add_column("model")
        for title, _ in COLUMNS:
            table.add_column(title, justify="right")
        for r in runs:
            for model_id, counters in sorted((await read_stats(redis, keys, r)).items()):
                table.add_row(r or "[bold]all runs[/]", model_id,
                              *(f"{counters[c]:.0f}" for _, c in COLUMNS))
    finally:
        await redis.aclose()
    if not table.row_count:
        print("no statistics yet" + (f" for run {run!r}" if run else ""))
        return 0 if not run else 1
    Console().print(table)
    return 0
