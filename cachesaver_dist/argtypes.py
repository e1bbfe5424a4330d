"""argparse types for the CLI's numbers: a value out of range is refused at once, and
argparse names the flag and the range (a worker given ``--max-jobs 0`` would otherwise
start and never run a job; a cache worker given ``--run-ttl 0`` would drop every run's
counters at its first reservation and hand out the same samples again; a value too
large for Redis or for Python's clocks would fail later, mid-run, with a traceback)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

from .defaults import MAX_SECONDS

MAX_COUNT = 2**31 - 1
MAX_DAYS = MAX_SECONDS // (24 * 3600)
# A batch worker's XAUTOCLAIM asks for up to this many entries: Redis allocates COUNT
# entry ids for each call up front, so a huge COUNT could take the server's memory.
MAX_CONCURRENCY = 10_000
# Attempts per provider call: its backoff grows as 2**attempt (a float overflows past 1023).
MAX_RETRY_BUDGET = 1000
_YEARS = f"{MAX_SECONDS} (10 years)"
T = TypeVar("T")


def count(text: str) -> int:
    """An int from 1 to ``MAX_COUNT``."""
    return _int(text, 1, MAX_COUNT)


def count_or_zero(text: str) -> int:
    """An int from 0 to ``MAX_COUNT``."""
    return _int(text, 0, MAX_COUNT)


def count_up_to(most: int) -> Callable[[str], int]:
    """An int from 1 to ``most``: for the counts that need a smaller cap."""

    def check(text: str) -> int:
        return _int(text, 1, most)

    return check


def whole_seconds(text: str) -> int:
    """A whole number of seconds from 1 to ``MAX_SECONDS``."""
    return _int(text, 1, MAX_SECONDS, " of seconds", _YEARS)


def whole_seconds_or_zero(text: str) -> int:
    """A whole number of seconds from 0 to ``MAX_SECONDS``."""
    return _int(text, 0, MAX_SECONDS, " of seconds", _YEARS)


def port(text: str) -> int:
    """A TCP port, 0 to 65535 (0: any free one)."""
    return _int(text, 0, 65535, " (a TCP port)")


class FromEnv(str):
    """A flag's default as read from an environment variable: argparse passes it to the
    flag's type only when the flag is not given, so a value it refuses came from there."""

    env: str

    def __new__(cls, value: str, env: str) -> FromEnv:
        self = super().__new__(cls, value)
        self.env = env
        return self


def env_default(env: str, value: str | None) -> FromEnv | None:
    """``value`` (read from ``env``) as a flag's default, or None when it is unset."""
    return None if value is None else FromEnv(value, env)


def naming_env(check: Callable[[str], T]) -> Callable[[str], T]:
    """``check``, whose refusal of a default read from the environment names the variable
    (the user never typed the flag argparse names)."""

    def checked(text: str) -> T:
        try:
            return check(text)
        except argparse.ArgumentTypeError as exc:
            if isinstance(text, FromEnv):
                raise argparse.ArgumentTypeError(
                    f"{exc} (from ${text.env}: fix it or unset it)") from None
            raise

    return checked


def seconds(text: str) -> float:
    """A number of seconds from 0 to ``MAX_SECONDS``."""
    return _number(text, "seconds", MAX_SECONDS, allow_zero=True, most_text=_YEARS)


def positive_seconds(text: str) -> float:
    """A number of seconds > 0, at most ``MAX_SECONDS``."""
    return _number(text, "seconds", MAX_SECONDS, allow_zero=False, most_text=_YEARS)


def days(text: str) -> float:
    """A number of days from 0 to ``MAX_DAYS``."""
    return _number(text, "days", MAX_DAYS, allow_zero=True, most_text=f"{MAX_DAYS} (10 years)")


def _int(text: str, least: int, most: int, unit: str = "", most_text: str = "") -> int:
    span = f"from {least} to {most_text or most}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number{unit} {span}, got "
                                         f"{text!r}") from None
    if not least <= value <= most:
        raise argparse.ArgumentTypeError(f"must be a whole number{unit} {span}, got {value}")
    return value


def _number(text: str, unit: str, most: float, *, allow_zero: bool, most_text: str) -> float:
    span = f"from 0 to {most_text}" if allow_zero else f"> 0 and at most {most_text}"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of {unit} {span}, got "
                                         f"{text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= most or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"must be a number of {unit} {span}, got {text}")
    return value
