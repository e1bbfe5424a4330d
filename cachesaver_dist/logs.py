"""Logging of every command: text (default) or JSON lines (``--log-format json``,
``CACHESAVER_LOG_FORMAT=json``).

A JSON line is one object: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
``message``, and ``exc_info`` (the formatted traceback) when an exception is logged.
Python warnings go through logging too, so a JSON log holds nothing else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone

from . import argtypes, defaults

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_format = "text"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def parse_format(value: str) -> str:
    """``--log-format`` / ``CACHESAVER_LOG_FORMAT``: ``text`` or ``json``."""
    value = value.strip().lower()
    if value not in defaults.LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(defaults.LOG_FORMATS)}, "
                         f"got {value!r}")
    return value


def add_argument(p: argparse.ArgumentParser) -> None:
    """``--log-format`` of every command."""
    p.add_argument("--log-format", type=argtypes.naming_env(_format_type),
                   default=argtypes.env_default("CACHESAVER_LOG_FORMAT", defaults.log_format()),
                   metavar="{text,json}", help="log lines as text, or as one JSON object each "
                   "(default: $CACHESAVER_LOG_FORMAT, else text)")


def _format_type(value: str) -> str:
    try:
        return parse_format(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def configure(verbose: int = 0, fmt: str = "text", text_format: str = TEXT_FORMAT) -> None:
    """Log to stderr at INFO (DEBUG with ``verbose`` > 1), as text or JSON lines."""
    global _format
    _format = parse_format(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if _format == "json" else logging.Formatter(text_format))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    logging.captureWarnings(True)
    if verbose < 1:
        logging.getLogger("arq").setLevel(logging.WARNING)


def fail(message: str) -> None:
    """A command's last word on stderr (``cachesaver-dist: ...``): a JSON line in JSON mode."""
    if _format == "json":
        logging.getLogger("cachesaver_dist").error("%s", message)
    else:
        print(message, file=sys.stderr)
