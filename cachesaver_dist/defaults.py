"""Defaults shared by the CLI, ``OnlineAPI`` and the workers, and the environment they read.

Environment: ``REDIS_URL`` (the server; unset: the embedded one), ``CACHESAVER_PREFIX``
(the key prefix) and ``CACHESAVER_DATA_DIR`` (the embedded server's data folder).
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
STATS_TTL_S = 30 * 24 * 3600  # stats:<run> and the run's entry in `runs`, refreshed on use

# Batch workers
CONCURRENCY = 32
BATCH_WAIT_S = 0.005
LEASE_S = 30.0

# Workers of every kind
STOP_GRACE_S = 3.0
HEARTBEAT_S = 5.0
DEAD_LETTERS_KEPT = 10_000


def redis_url() -> str | None:
    """``REDIS_URL``, or None (use the embedded server)."""
    return os.environ.get("REDIS_URL") or None


def prefix() -> str:
    """``CACHESAVER_PREFIX``, else ``cachesaver:``."""
    return os.environ.get("CACHESAVER_PREFIX") or PREFIX


def data_dir() -> str:
    """``CACHESAVER_DATA_DIR``, else ``.cachesaver``."""
    return os.environ.get("CACHESAVER_DATA_DIR") or DATA_DIR
