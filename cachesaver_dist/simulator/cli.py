"""The ``cachesaver-dist simulator`` sub-command: flags -> SimulatorConfig -> serve."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from .. import argtypes
from .app import serve
from .config import LATENCY_DISTS, FaultRule, SimulatorConfig

_words = argtypes.count_up_to(100_000)  # per sample: a huge one would take the memory

# (flag, argparse kwargs, help). Defaults not given here are SimulatorConfig's.
_FLAGS: list[tuple[str, dict[str, Any], str]] = [
    ("--host", {}, "interface to bind"),
    ("--port", {"type": argtypes.port, "default": 8000}, "TCP port; 0 picks a free one"),
    ("--latency", {"type": argtypes.seconds},
     "seconds per request (fixed), or the median for --latency-dist lognormal"),
    ("--latency-dist", {"choices": LATENCY_DISTS}, "latency distribution"),
    ("--latency-low", {"type": argtypes.seconds}, "uniform latency lower bound, seconds"),
    ("--latency-high", {"type": argtypes.seconds}, "uniform latency upper bound, seconds"),
    ("--latency-sigma", {"type": float}, "lognormal latency sigma"),
    ("--latency-per-token", {"type": argtypes.seconds},
     "extra seconds per completion token of the longest choice"),
    ("--rate-limit", {"type": argtypes.count},
     "max requests per --rate-window per model (sliding window; default unlimited)"),
    ("--rate-window", {"type": argtypes.positive_seconds}, "rate-limit window, seconds"),
    ("--retry-after-integer", {"action": "store_true"},
     "send Retry-After as a ceil'd integer instead of fractional seconds"),
    ("--fault", {"action": "append", "type": FaultRule.parse, "metavar": "SPEC", "dest": "faults"},
     "fault rule (repeatable): STATUS[:COUNT[:MODEL]] or timeout:SECONDS[:COUNT[:MODEL]]; "
     "COUNT '*' = until cleared; e.g. 500:2, 429:*:my-model, timeout:30:1"),
    ("--fault-retry-after", {"type": argtypes.seconds},
     "Retry-After seconds sent by injected 429 faults"),
    ("--model", {"action": "append", "dest": "models", "metavar": "NAME"},
     "model listed by /v1/models before it is first used (repeatable)"),
    ("--min-words", {"type": _words}, "min words (= tokens) per sample"),
    ("--max-words", {"type": _words}, "max words (= tokens) per sample"),
    ("--rng-seed", {"type": int},
     "seed for latency draws and sample texts (default: random per server start)"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulator`` sub-command flags (defaults are shown in --help)."""
    defaults = SimulatorConfig()
    for flag, kwargs, text in _FLAGS:
        dest = kwargs.get("dest", flag.removeprefix("--").replace("-", "_"))
        default = kwargs.get("default", getattr(defaults, dest))
        shown = f" (default {default})" if default not in (None, [], False) else ""
        parser.add_argument(flag, help=text + shown, **{**kwargs, "default": default})


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Translate parsed ``add_arguments`` flags into a SimulatorConfig."""
    names = {f.name for f in dataclasses.fields(SimulatorConfig)}
    return SimulatorConfig(**{k: v for k, v in vars(args).items() if k in names})


def main_from_args(args: argparse.Namespace) -> None:
    """CLI entry point: build the config from ``args`` and serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(config_from_args(args))
