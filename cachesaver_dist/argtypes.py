"""argparse types for the CLI's numbers: a value out of range is refused at once, and
argparse names the flag (a worker given ``--max-jobs 0`` would otherwise start and
never run a job; a cache worker given ``--run-ttl 0`` would drop every run's counters
at its first reservation and hand out the same samples again)."""

from __future__ import annotations

import argparse
import math


def count(text: str) -> int:
    """An int >= 1."""
    return _int(text, 1)


def count_or_zero(text: str) -> int:
    """An int >= 0."""
    return _int(text, 0)


def seconds(text: str) -> float:
    """A number of seconds >= 0."""
    return _seconds(text, allow_zero=True)


def positive_seconds(text: str) -> float:
    """A number of seconds > 0."""
    return _seconds(text, allow_zero=False)


def _int(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got "
                                         f"{text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def _seconds(text: str, *, allow_zero: bool) -> float:
    bound = ">= 0" if allow_zero else "> 0"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds {bound}, got "
                                         f"{text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"must be a number of seconds {bound}, got {text}")
    return value
