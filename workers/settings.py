"""arq settings of the cache workers, for arq's own command line.

    arq --check workers.settings.CacheWorkerSettings

exits 0 while a cache worker of ``$CACHESAVER_PREFIX`` (default ``cachesaver:``) on the
server of ``$REDIS_URL`` (default ``redis://localhost:6379/0``) is running, and 1 when
none is: every cache worker writes arq's health-check key (``<prefix>health:cache``)
every 15 s, with a 16 s lifetime. It is a check of the pool, not of one process: in a
container, use ``cachesaver-dist health cache`` (this host's worker) instead.

The settings describe the worker ``cachesaver-dist worker cache`` runs (queue, health
key, msgpack serializers, the job function). Start workers with that command: arq's
plain ``Worker`` lacks its wake-up list and Redis outage handling.
"""

from __future__ import annotations

from typing import Any

from arq.connections import RedisSettings
from arq.worker import func

from cachesaver_dist import defaults
from cachesaver_dist.protocol import CACHE_JOB, Keys, arq_deserialize_job, arq_serialize
from cachesaver_dist.urls import parse_url

from .cache_worker import HEALTH_CHECK_S, _shutdown, _startup, process_batch

__all__ = ["CacheWorkerSettings", "redis_settings"]

_TLS_OPTIONS = ("ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs",
                "ssl_check_hostname")


def redis_settings(url: str | None = None) -> RedisSettings:
    """arq's ``RedisSettings`` for a Redis URL of any form of docs/redis-urls.md
    (default ``$REDIS_URL``, else arq's default ``localhost:6379``)."""
    url = url or defaults.redis_url()
    if not url:
        return RedisSettings()
    u = parse_url(url)
    o = u.options
    common: dict[str, Any] = {
        "database": int(o.get("db", 0)), "username": o.get("username"),
        "password": o.get("password"), "ssl": u.tls,
        "conn_timeout": max(1, round(float(o.get("socket_connect_timeout", 5)))),
        **{k: o[k] for k in _TLS_OPTIONS if k in o},
    }
    if u.kind == "unix":
        return RedisSettings(unix_socket_path=u.path, **common)
    if u.kind == "sentinel":
        return RedisSettings(host=list(u.addresses), sentinel=True, sentinel_master=u.service,
                             **common)
    (host, port), = u.addresses
    return RedisSettings(host=host, port=port, **common)


_keys = Keys(defaults.prefix())


class CacheWorkerSettings:
    """arq ``WorkerSettings`` of the cache workers (read by ``arq --check``). arq reads a
    settings class's own attributes only: keep them here, not in a base class."""

    redis_settings = redis_settings()
    queue_name = _keys.cache_queue
    health_check_key = _keys.cache_health
    health_check_interval = HEALTH_CHECK_S
    functions = [func(process_batch, name=CACHE_JOB, timeout=defaults.JOB_TIMEOUT_S,
                      max_tries=5, keep_result=0)]
    job_serializer = arq_serialize
    job_deserializer = arq_deserialize_job
    keep_result = 0
    poll_delay = defaults.POLL_DELAY_S
    max_jobs = defaults.MAX_JOBS
    ctx = {"keys": _keys, "run_ttl_s": defaults.RUN_TTL_S}
    on_startup = _startup
    on_shutdown = _shutdown
