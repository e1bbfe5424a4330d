"""Defaults shared by the CLI, ``OnlineAPI`` and the workers, and the environment they read.

Environment: ``REDIS_URL`` (the server; unset: the embedded one), ``CACHESAVER_PREFIX``
(the key prefix), ``CACHESAVER_DATA_DIR`` (the embedded server's data folder),
``CACHESAVER_LOG_FORMAT`` (``text`` or ``json``) and ``CACHESAVER_METRICS_PORT`` (workers
serve Prometheus metrics there).
"""

from __future__ import annotations

import os

PREFIX = "cachesaver:"
DATA_DIR = ".cachesaver"

# Clients
BATCH_SIZE = 32
BATCH_TIMEOUT_S = 0.005
REPLY_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 600.0
MAX_PROMPT_BYTES = 1 << 20
CONNECT_WAIT_S = 10.0

# Cache workers
POLL_DELAY_S = 0.5
MAX_JOBS = 50
JOB_TIMEOUT_S = 10
RUN_TTL_S = 7 * 24 * 3600  # u:<run> and m:<run>, refreshed by each reservation of the run
# The longest duration taken (10 years): in ms, far inside Redis's signed 64-bit
# arithmetic even added to the current time, and inside datetime.timedelta.
MAX_SECONDS = 10 * 365 * 24 * 3600
STATS_TTL_S = 30 * 24 * 3600  # stats:<run> and the run's entry in `runs`, refreshed on use
# A cache worker's accounting of the hits it served (a direct client's, of its own) is
# written this often at most, several batches' in one write.
ACCOUNT_EVERY_S = 0.05

# Batch workers
CONCURRENCY = 32
BATCH_WAIT_S = 0.005
LEASE_S = 30.0

# Workers of every kind
STOP_GRACE_S = 3.0
HEARTBEAT_S = 5.0
DEAD_LETTERS_KEPT = 10_000

# Clients and workers: a reply from Redis that takes longer drops the connection and the
# command is tried again on a new one (so behind Sentinel they leave a primary that froze
# for the one that replaced it); above any blocking command they send.
READ_TIMEOUT_S = 10.0

# Operations
METRICS_HOST = "127.0.0.1"
METRICS_REFRESH_S = 5.0
LOG_FORMATS = ("text", "json")
TOP_INTERVAL_S = 2.0


WAIT_REPLICAS_TIMEOUT_MS = 1000


def wait_replicas(url: str | None) -> int | None:
    """Replicas a worker's atomic steps wait for: ``CACHESAVER_WAIT_REPLICAS`` (anything but
    a whole number raises ``ValueError`` naming it); else, behind
    Sentinel (``redis+sentinel://``), None: decided at start from the primary's replicas
    (``replication.replicas_to_wait``); else 0."""
    value = os.environ.get("CACHESAVER_WAIT_REPLICAS", "").strip()
    if value:
        if not value.isdigit():
            raise ValueError(f"CACHESAVER_WAIT_REPLICAS={value!r}: use a whole number >= 0 "
                             "(replicas each write waits for), or unset it")
        return int(value)
    return None if url and url.split("://", 1)[0].endswith("+sentinel") else 0


def direct() -> bool:
    """``CACHESAVER_DIRECT``: ``1``, ``true`` or ``yes`` make clients reserve themselves
    (``OnlineAPI(direct=True)``); unset, empty, ``0``, ``false`` or ``no``: they do not.
    Anything else raises ``ValueError`` naming the variable."""
    value = os.environ.get("CACHESAVER_DIRECT", "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"CACHESAVER_DIRECT={value!r}: use 1 or 0 (true/false, yes/no)")


def redis_url() -> str | None:
    """``REDIS_URL``, or None (use the embedded server)."""
    return os.environ.get("REDIS_URL") or None


def prefix() -> str:
    """``CACHESAVER_PREFIX``, else ``cachesaver:``."""
    return os.environ.get("CACHESAVER_PREFIX") or PREFIX


def data_dir() -> str:
    """``CACHESAVER_DATA_DIR``, else ``.cachesaver``."""
    return os.environ.get("CACHESAVER_DATA_DIR") or DATA_DIR


def log_format() -> str:
    """``CACHESAVER_LOG_FORMAT`` (``text`` or ``json``), else ``text``."""
    return (os.environ.get("CACHESAVER_LOG_FORMAT") or "text").strip().lower()


def metrics_port() -> str | None:
    """``CACHESAVER_METRICS_PORT`` as written (the CLI parses it), else None (no metrics)."""
    return os.environ.get("CACHESAVER_METRICS_PORT", "").strip() or None
