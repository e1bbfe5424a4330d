"""The ``stats`` table: samples, tokens and dollars generated vs served from cache."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from . import defaults, logs
from .connection import connect
from .protocol import Keys
from .stats import list_runs, read_stats
from .tables import Col, fit_table

DEFAULT_PRICES = Path(__file__).with_name("prices.json")
SAVED_KINDS = ("cached", "deduplicated")


def load_prices(path: str | Path | None = None) -> dict[str, tuple[float, float]]:
    """``{model: (input $/1M tokens, output $/1M tokens)}`` from a JSON file."""
    path = path or os.environ.get("CACHESAVER_PRICES") or DEFAULT_PRICES
    form = '{"model": [input_per_1M, output_per_1M], ...}'
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"price file {path} is not readable as {form}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"price file {path} must hold {form}")
    prices = {}
    for model, pair in raw.items():
        if model.startswith("_"):  # comments
            continue
        if not (isinstance(pair, list) and len(pair) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair)):
            raise ValueError(f"price file {path}: {model!r} must be [input_per_1M, "
                             f"output_per_1M], two numbers of dollars, got {pair!r:.60}")
        prices[model] = (float(pair[0]), float(pair[1]))
    return prices


def price_of(model_id: str, prices: dict[str, tuple[float, float]]) -> tuple[float, float] | None:
    name = model_id.split(":", 1)[1] if model_id.split(":", 1)[0] in ("together", "openai") \
        else model_id
    return prices.get(model_id) or prices.get(name)


def summarize(counters: dict[str, float], price: tuple[float, float] | None) -> dict[str, Any]:
    """One row: samples and tokens by kind, dollars spent and saved (None if unpriced)."""
    row: dict[str, Any] = {"requests": int(counters.get("requests", 0))}
    for kind in ("generated", *SAVED_KINDS):
        row[f"samples_{kind}"] = int(counters.get(f"samples_{kind}", 0))
        row[f"tokens_{kind}"] = round(counters.get(f"prompt_tokens_{kind}", 0)
                                      + counters.get(f"completion_tokens_{kind}", 0))

    def dollars(kind: str) -> float:
        assert price is not None
        return (counters.get(f"prompt_tokens_{kind}", 0) * price[0]
                + counters.get(f"completion_tokens_{kind}", 0) * price[1]) / 1e6

    row["dollars_spent"] = dollars("generated") if price else None
    row["dollars_saved"] = sum(dollars(k) for k in SAVED_KINDS) if price else None
    return row


async def collect(url: str, keys: Keys, run: str | None = None,
                  prices: dict[str, tuple[float, float]] | None = None) -> list[dict[str, Any]]:
    """Rows for one run, or for every run and the total (``run`` None in the last rows)."""
    prices = load_prices() if prices is None else prices
    redis = connect(url, read_timeout=defaults.READ_TIMEOUT_S)
    try:
        runs: list[str | None] = [run] if run else [r for r, _ in await list_runs(redis, keys)]
        if not run:
            runs.append(None)
        rows = []
        for r in runs:
            for model_id, counters in sorted((await read_stats(redis, keys, r)).items()):
                rows.append({"run": r, "model": model_id,
                             **summarize(counters, price_of(model_id, prices))})
        return rows
    finally:
        await redis.aclose()


def _dollars(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# Left out first when the terminal is narrow: tokens, then $ spent, dedup, $ saved.
COLUMNS = [Col("run", get=lambda r: r["run"] or "all runs", text=True, whole=True),
           Col("model", "model", text=True, whole=True),
           Col("requests", "requests"),
           Col("generated", "samples_generated"),
           Col("cached", "samples_cached"),
           Col("dedup", "samples_deduplicated", drop=3),
           Col("tokens generated", "tokens_generated", drop=5),
           Col("tokens cached", "tokens_cached", drop=6),
           Col("tokens dedup", "tokens_deduplicated", drop=7),
           Col("$ spent", "dollars_spent", drop=4, fmt=_dollars),
           Col("$ saved", "dollars_saved", drop=2, fmt=_dollars)]


async def print_stats(url: str, keys: Keys, run: str | None = None, *, as_json: bool = False,
                      prices_path: str | None = None) -> int:
    rows = await collect(url, keys, run, load_prices(prices_path))
    if run and not rows:  # a typo: an error with --json too, not an empty list
        logs.fail(f"cachesaver-dist: no statistics yet for run {run!r} under prefix "
                  f"{keys.prefix!r} ('cachesaver-dist runs' lists the runs)")
        return 1
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no statistics yet under prefix {keys.prefix!r} ('cachesaver-dist runs' lists "
              "the runs)")
        return 0
    console = Console()
    styled = [{**row, "_style": None if row["run"] else "bold"} for row in rows]
    console.print(fit_table(COLUMNS, styled, console.width,
                            title="cachesaver-dist: what the cache saved"))
    return 0
