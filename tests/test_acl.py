"""ACL users per role (``ops/acl.conf`` rendered by ``ops/acl.sh``) on a private Redis server.

Two tenants share one server: the default prefix ``cachesaver:`` and ``other:``, each with
its five users. Every process logs in as its role's user; the whole path must work and no
command may be refused (ACL LOG stays empty), while each user is refused everything of the
other tenant and every server-wide command.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as sync_redis

from cachesaver_dist import OnlineAPI, Request
from cachesaver_dist.errors import GenerationError, NoWorkerError
from cachesaver_dist.protocol import Keys
from cachesaver_dist.server import find_server_binary
from tests.conftest import ROOT, Processes, subprocess_env
from tests.support import admin as sim_admin
from tests.test_rate_limit import simulator_process

pytestmark = pytest.mark.processes

ROLES = {"client": "CLIENT", "cache-worker": "CACHE_WORKER", "batch-worker": "BATCH_WORKER",
         "operator": "OPERATOR", "direct-client": "DIRECT_CLIENT"}
TENANTS = {"cachesaver": "cachesaver:", "other": "other:"}  # user name part -> prefix
ADMIN_PASSWORD = f"admin-{uuid.uuid4().hex}"
LIMITED = "openai:sim-model"  # a provider route: the only kind the cluster limits apply to
# arq's own key kinds: a tenant's are arq:<kind>:<prefix>job:*
ARQ_KINDS = ("job", "in-progress", "retry", "result")


def password(tenant: str, role: str) -> str:
    return f"{tenant}-{role}-{hashlib.sha256(ADMIN_PASSWORD.encode()).hexdigest()[:16]}"


def render(tenant: str) -> str:
    """``ops/acl.sh`` output for one tenant (the default one with the server-wide users)."""
    env = {**os.environ, "CACHESAVER_ACL_ADMIN_PASSWORD": ADMIN_PASSWORD,
           **{f"CACHESAVER_ACL_{var}_PASSWORD": password(tenant, role)
              for role, var in ROLES.items()}}
    args = [] if tenant == "cachesaver" else [TENANTS[tenant], tenant]
    return subprocess.run(["sh", str(ROOT / "ops" / "acl.sh"), *args], env=env, check=True,
                          capture_output=True, text=True).stdout


@dataclass
class AclServer:
    port: int
    log: Path

    def url(self, tenant: str, role: str) -> str:
        return f"redis://{tenant}-{role}:{password(tenant, role)}@127.0.0.1:{self.port}/0"

    @property
    def admin_url(self) -> str:
        return f"redis://admin:{ADMIN_PASSWORD}@127.0.0.1:{self.port}/0"

    def admin(self) -> sync_redis.Redis:
        return sync_redis.Redis.from_url(self.admin_url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    tmp = tmp_path_factory.mktemp("acl")
    aclfile = tmp / "users.acl"
    aclfile.write_text(render("cachesaver") + render("other"))
    port = _free_port()
    log = tmp / "redis.log"
    proc = subprocess.Popen(
        [find_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--aclfile", str(aclfile), "--dir", str(tmp),
         "--enable-debug-command", "yes",  # so that the ACL, not this option, refuses DEBUG
         "--logfile", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = AclServer(port, log)
    try:
        admin = server.admin()
        deadline = time.monotonic() + 10
        while True:
            try:
                admin.ping()
                break
            except sync_redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start: {log.read_text()[-2000:]}"
                                         ) from None
                time.sleep(0.05)
        admin.close()
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def refusals(server: AclServer) -> list[dict]:
    """ACL LOG entries, without redis-py's CLIENT SETINFO at connect (Redis >= 7.2) and the
    workers' eviction check at start (CONFIG GET, refused and logged as skipped), and the
    operator's SCAN (``top`` tries it once, then reads the routes from the stats)."""
    with contextlib.closing(server.admin()) as admin:
        entries = admin.acl_log()
    return [e for e in entries
            if not any(c in str(e.get("object", "")).lower() for c in ("setinfo", "config"))
            and not (_text(e.get("object")) == "scan" and
                     _text(e.get("username")).endswith("-operator"))]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def operator(server: AclServer, tenant: str, *args: str, role: str = "operator"
             ) -> subprocess.Popen:
    url = server.url(tenant, role)
    return subprocess.Popen(
        [sys.executable, "-m", "cachesaver_dist.cli", *args, "--redis-url", url,
         "--prefix", TENANTS[tenant]], env=subprocess_env(url, COLUMNS="200"), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, f"{proc.args[3:5]}: {err[-2000:]}"
    return out


async def miss_then_hit(url: str, prefix: str, model: str) -> None:
    """The same prompt in a second namespace is served from the cache; asked again in the
    first, it claims with its prompt left out of the job (the cache worker rebuilds it
    from the key's spec, with its user's rights); the run keeps a manifest (reserve.lua)
    and is replayed with the client's rights."""
    async with OnlineAPI(model, cache=url, prefix=prefix, run="acl-run", reply_timeout=2,
                         request_timeout=30, manifest=True) as api:
        first = await api.request(Request("What is an ACL?", 2, f"{model}/q1", "ns1"))
        again = await api.request(Request("What is an ACL?", 2, f"{model}/q2", "ns2"))
        more = await api.request(Request("What is an ACL?", 2, f"{model}/q3", "ns1"))
    assert first.cached == [False, False], (prefix, model)
    assert again.cached == [True, True] and again.data == first.data, (prefix, model)
    assert more.cached == [False, False], (prefix, model)
    assert [m["index"] for m in more.metadata] == [2, 3], (prefix, model)
    async with OnlineAPI(model, cache=url, prefix=prefix, replay="acl-run") as api:
        replayed = await api.request(Request("What is an ACL?", 2, f"{model}/q1", "ns1"))
    assert replayed.data == first.data, (prefix, model)


async def direct_miss_then_hit(url: str, prefix: str, model: str) -> None:
    """A direct client (its own user, no cache worker involved): a miss goes to the batch
    worker, the same prompt in another namespace is answered by its own reserve."""
    async with OnlineAPI(model, cache=url, prefix=prefix, run="acl-direct", direct=True,
                         reply_timeout=2, request_timeout=30) as api:
        first = await api.request(Request("Who reserves?", 2, "d/q1", "ns1"))
        again = await api.request(Request("Who reserves?", 2, "d/q2", "ns2"))
    assert first.cached == [False, False] and again.cached == [True, True]
    assert again.data == first.data


async def direct_failure_given_back(url: str, prefix: str, model: str, sim: str) -> None:
    """A direct client's request that failed gives its indices back under the client's
    own user (give_back.lua): asked again it gets index 0, which another namespace then
    reuses."""
    await sim_admin(sim, "POST", "/admin/faults",
                    {"faults": [{"status": 400, "message": "bad request", "count": 1}]})
    async with OnlineAPI(model, cache=url, prefix=prefix, run="acl-give-back", direct=True,
                         reply_timeout=2, request_timeout=30) as api:
        with pytest.raises(GenerationError, match="bad request"):
            await api.request(Request("Fails once", 1, "g/q1", "ns1"))
        again = await api.request(Request("Fails once", 1, "g/q1", "ns1"))
        other = await api.request(Request("Fails once", 1, "g/q2", "ns2"))
    assert again.metadata[0]["index"] == 0 and again.cached == [False]
    assert other.cached == [True] and other.data == again.data


async def no_worker(url: str, prefix: str) -> None:
    """A model nobody serves fails fast: the client reads the heartbeats (ZCOUNT)."""
    async with OnlineAPI("sim:nobody", cache=url, prefix=prefix, reply_timeout=0.5,
                         request_timeout=30) as api:
        with pytest.raises(NoWorkerError):
            await api.request(Request("anyone?", 1, "q0", None))


def start_tenant(server: AclServer, tenant: str, tmp: Path, *batch_args: str,
                 models: tuple[str, ...] = ("sim:x",), env: dict[str, str] | None = None
                 ) -> Processes:
    procs = Processes(server.admin_url, Keys(TENANTS[tenant]), tmp)
    cache_url, batch_url = server.url(tenant, "cache-worker"), server.url(tenant, "batch-worker")
    metrics = ("--metrics-port", "0", "--metrics-refresh", "0.2")  # gauges read under ACLs
    procs.cli("worker", "cache", "--redis-url", cache_url, "--poll-delay", "0.5", *metrics,
              name=f"{tenant}-cache", env={"REDIS_URL": cache_url})
    procs.cli("worker", "batch", *(a for m in models for a in ("--model", m)), *batch_args,
              "--redis-url", batch_url, *metrics, name=f"{tenant}-batch",
              env={"REDIS_URL": batch_url, **(env or {})})
    return procs


async def test_every_role_works_with_its_own_user_alongside_another_tenant(acl_server,
                                                                          tmp_path):
    server = acl_server
    with contextlib.closing(server.admin()) as admin:
        admin.acl_log_reset()
        # Something for the dead-letter path: the cache worker sets it aside (XADD), the
        # operator lists and drops it.
        admin.lpush("cachesaver:queue:cache:wake", b"not a job id")
    (tmp_path / "other").mkdir()
    tenants: list[Processes] = []
    with simulator_process("--latency", "0.01") as sim:
        try:
            tenants.append(start_tenant(
                server, "cachesaver", tmp_path, "--base-url", sim, "--rpm", "1000", "--tpm",
                "100000", "--max-concurrent", "4", models=("sim:x", LIMITED),
                env={"OPENAI_API_KEY": "sk-acl-test"}))
            tenants.append(start_tenant(server, "other", tmp_path / "other"))
            for procs, routes in zip(tenants, (("cache", "sim:x", LIMITED), ("cache", "sim:x"))):
                for route in routes:
                    procs.wait_alive(route)

            # Both tenants' clients at the same time, on the same server.
            await asyncio.gather(
                miss_then_hit(server.url("cachesaver", "client"), "cachesaver:", "sim:x"),
                miss_then_hit(server.url("cachesaver", "client"), "cachesaver:", LIMITED),
                miss_then_hit(server.url("other", "client"), "other:", "sim:x"),
                direct_miss_then_hit(server.url("cachesaver", "direct-client"), "cachesaver:",
                                     "sim:x"),
                no_worker(server.url("cachesaver", "client"), "cachesaver:"))
            await direct_failure_given_back(server.url("cachesaver", "direct-client"),
                                            "cachesaver:", LIMITED, sim)

            stats = [operator(server, t, "stats", "--json") for t in TENANTS]
            dead = operator(server, "cachesaver", "dead-letters", "--json")
            rows = [json.loads(finished(p)) for p in stats]
            letters = [json.loads(line) for line in finished(dead).splitlines()]
            plain = finished(operator(server, "cachesaver", "stats"))
            top = json.loads(finished(operator(server, "cachesaver", "top", "--json")))
            checks = [operator(server, "cachesaver", "health", "--cluster", "cache", "sim:x"),
                      operator(server, "cachesaver", "health", "cache", role="cache-worker"),
                      operator(server, "cachesaver", "health", "sim:x", role="batch-worker")]
            healthy = [finished(p) for p in checks]
            drops = [operator(server, "cachesaver", "dead-letters", "--drop"),
                     operator(server, "cachesaver", "drop-run", "acl-run")]
            dropped = [finished(p) for p in drops]
        finally:
            for procs in tenants:
                procs.stop_all()
            logs = {Path(p.log_path).name: Processes.logs(p) for t in tenants for p in t.procs}

    assert refusals(server) == [], logs
    for procs in tenants:
        assert all(p.returncode == 0 for p in procs.procs), logs
    mine = {(r["run"], r["model"]): r for r in rows[0]}
    for run, model, generated in (("acl-run", "sim:x", 4), ("acl-run", LIMITED, 4),
                                  ("acl-direct", "sim:x", 2)):
        assert mine[run, model]["samples_generated"] == generated
        assert mine[run, model]["samples_cached"] == 2
    assert {r["model"] for r in rows[1]} == {"sim:x"}  # the other tenant's counters only
    assert "sim:x" in plain
    # the operator has no SCAN: top found the routes in the stats
    assert [r["route"] for r in top["routes"]] == ["cache", LIMITED, "sim:x"]
    assert all(r["workers"] == 1 for r in top["routes"]), top
    assert all("live worker" in out for out in healthy)
    assert [d["kind"] for d in letters] == ["wake token"]
    assert dropped[0].startswith("dropped 1 ")
    assert "counters dropped" in dropped[1]

    with contextlib.closing(server.admin()) as admin:
        names = [k.decode() for k in admin.scan_iter(count=1000)]
        assert any(n.startswith("cachesaver:limit:") for n in names), names  # limiter ran
        assert not admin.exists("cachesaver:u:acl-run")  # drop-run
        for name in names:  # nothing outside the tenants' own patterns
            assert any(fnmatch.fnmatchcase(name, p) for prefix in TENANTS.values()
                       for p in (f"{prefix}*", *(f"arq:{k}:{prefix}job:*" for k in ARQ_KINDS))
                       ), name
        for prefix in TENANTS.values():
            for name in admin.scan_iter(match=f"{prefix}*", count=1000):
                admin.delete(name)


# --- isolation -----------------------------------------------------------------------------


def attempt(url: str, *command: str) -> str:
    """Run one command on a fresh connection; the error text, or "" if it succeeded."""
    client = sync_redis.Redis.from_url(url)
    try:
        client.execute_command(*command)
        return ""
    except sync_redis.ResponseError as exc:
        return str(exc)
    finally:
        client.close()


def other_tenant_commands(other: str, sha: str) -> list[tuple[str, ...]]:
    """Reads, writes, scripts and subscriptions on another tenant's keys and channels."""
    return [
        ("GET", f"{other}s:k"), ("SET", f"{other}s:k", "x"), ("HSET", f"{other}g:k", "mark", "9"),
        ("HGETALL", f"{other}stats"), ("DEL", f"{other}u:run"), ("XREVRANGE", f"{other}dead",
                                                                 "+", "-"),
        ("EVALSHA", sha, "1", f"{other}s:k"), ("SUBSCRIBE", f"{other}reply:someone"),
        ("PUBLISH", f"{other}reply:someone", "x"), ("ZCOUNT", f"{other}workers:cache", "0", "1"),
        ("ZADD", f"{other}queue:cache", "1", f"{other}job:x"),
        ("LPUSH", f"{other}queue:cache:wake", "x"),
        ("XREADGROUP", "GROUP", "batch-workers", "w", "COUNT", "1", "STREAMS",
         f"{other}llm:sim:x", ">"),
        *(c for k in ARQ_KINDS for c in (("GET", f"arq:{k}:{other}job:x"),
                                         ("PSETEX", f"arq:{k}:{other}job:x", "1000", "x"))),
    ]


SERVER_WIDE = [("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"), ("CONFIG", "GET", "*"), ("SCAN", "0"),
               ("RANDOMKEY",), ("DBSIZE",), ("INFO",), ("CLIENT", "LIST"), ("PUBSUB", "CHANNELS"),
               ("DEBUG", "SLEEP", "0"), ("SCRIPT", "FLUSH"), ("EVAL", "return 1", "0"),
               ("SELECT", "1"), ("ACL", "LIST"),
               ("PSUBSCRIBE", "*")]


def test_each_role_is_refused_another_tenant_and_server_wide_commands(acl_server):
    server = acl_server
    with contextlib.closing(server.admin()) as admin:
        sha = admin.script_load("return redis.call('GET', KEYS[1])")
        admin.set("other:s:k", "secret")
        admin.set("cachesaver:s:k", "secret")
    try:
        for tenant, other in (("cachesaver", "other:"), ("other", "cachesaver:")):
            for role in ROLES:
                url = server.url(tenant, role)
                assert attempt(url, "PING") == ""
                for command in [*other_tenant_commands(other, sha), *SERVER_WIDE]:
                    error = attempt(url, *command)
                    assert error.startswith("NOPERM") or "no permissions" in error, \
                        (tenant, role, command, error)
        with contextlib.closing(server.admin()) as admin:
            assert admin.get("other:s:k") == admin.get("cachesaver:s:k") == b"secret"
    finally:
        with contextlib.closing(server.admin()) as admin:
            admin.delete("other:s:k", "cachesaver:s:k")


def test_commands_a_role_needs_on_its_own_keys_are_allowed_and_no_more(acl_server):
    """Paths an end-to-end run rarely takes (retries, lease refresh, a rolling rate window,
    unreadable samples), checked with ACL DRYRUN; and a few refusals inside one tenant."""
    p = "cachesaver:"
    allowed = {
        "client": [
            ("PSETEX", f"arq:job:{p}job:x", "1000", "j"),
            ("ZADD", f"{p}queue:cache", "1", "j"),
            ("LPUSH", f"{p}queue:cache:wake", "j"),
            ("LTRIM", f"{p}queue:cache:wake", "0", "63"),
            ("ZCOUNT", f"{p}workers:sim:x", "0", "+inf"),
            ("HLEN", f"{p}m:r"),
            ("HGET", f"{p}m:r", "ns\nq1"),
            ("HMGET", f"{p}s:k", "0", "1"),
            ("SUBSCRIBE", f"{p}reply:abc"),
            ("UNSUBSCRIBE", f"{p}reply:abc"),
            ("TIME",),  # heartbeats are judged by the server's clock
        ],
        "cache-worker": [
            ("TIME",),
            ("ZINCRBY", f"{p}queue:cache", "5", "j"),
            ("ZSCORE", f"{p}queue:cache", "j"),
            ("BRPOP", f"{p}queue:cache:wake", "1"),
            ("SETEX", f"arq:retry:{p}job:x", "10", "2"),
            ("INCRBY", f"arq:retry:{p}job:x", "1"),
            ("DEL", f"arq:result:{p}job:x", f"arq:job:{p}job:x"),
            ("MGET", f"arq:job:{p}job:x", f"arq:job:{p}job:y"),  # specs a token left out
            ("EXISTS", f"arq:in-progress:{p}job:x"),
            ("SET", f"arq:in-progress:{p}job:x", "1", "PX", "10"),
            ("PSETEX", f"{p}health:cache", "100", "x"),
            ("HDEL", f"{p}s:k", "0"),
            ("HSET", f"{p}g:k", "x0", "1"),
            ("HSETNX", f"{p}g:k", "spec", "s"),
            ("SADD", f"{p}keys:sim:x", "k"),
            ("HSETNX", f"{p}m:r", "ns\nq1", "k|0|1"),
            ("PEXPIRE", f"{p}m:r", "1000"),
            ("XADD", f"{p}llm:sim:x", "*", "key", "k"),
            ("XADD", f"{p}dead", "MAXLEN", "~", "100", "*", "kind", "k"),
            ("HINCRBYFLOAT", f"{p}stats:r", "m|x", "1.5"),
            ("ZADD", f"{p}runs", "1", "r"),
            ("PUBLISH", f"{p}reply:abc", "x"),
            ("XLEN", f"{p}dead"),  # metrics gauges, and `health cache`
            ("ZCOUNT", f"{p}workers:cache", "0", "+inf"),
            ("ZRANGEBYSCORE", f"{p}workers:cache", "0", "+inf"),
            ("WAIT", "1", "10"),  # --wait-replicas
        ],
        "batch-worker": [
            ("XGROUP", "CREATE", f"{p}llm:sim:x", "batch-workers", "0", "MKSTREAM"),
            ("XCLAIM", f"{p}llm:sim:x", "batch-workers", "w", "0", "1-0", "JUSTID"),
            ("XAUTOCLAIM", f"{p}llm:sim:x", "batch-workers", "w", "100", "0-0"),
            ("XACK", f"{p}llm:sim:x", "batch-workers", "1-0"),
            ("XDEL", f"{p}llm:sim:x", "1-0"),
            ("RENAME", f"{p}limit:{{tokens/m}}", f"{p}limit:{{tokens/m}}/-1"),
            ("SET", f"{p}limit:{{tokens/m}}", "0", "PX", "100"),
            ("PTTL", f"{p}limit:{{tokens/m}}"),
            ("LINDEX", f"{p}limit:requests/m", "9"),
            ("ZREMRANGEBYSCORE", f"{p}limit:m:concurrent", "-inf", "1"),
            ("TIME",),
            ("HSETNX", f"{p}s:k", "0", "x"),
            ("HSET", f"{p}g:k", "x0", "1"),
            ("HGETALL", f"{p}w:k"),
            ("ZREM", f"{p}workers:sim:x", "w"),
            ("XADD", f"{p}dead", "*", "kind", "k"),
            ("PUBLISH", f"{p}reply:abc", "x"),
            ("ZCARD", f"{p}queue:cache"),  # metrics gauges, and `health MODEL`
            ("XLEN", f"{p}llm:sim:x"),
            ("XINFO", "GROUPS", f"{p}llm:sim:x"),
            ("XINFO", "CONSUMERS", f"{p}llm:sim:x", "batch-workers"),
            ("XLEN", f"{p}dead"),
            ("ZCOUNT", f"{p}workers:cache", "0", "+inf"),
            ("ZRANGEBYSCORE", f"{p}workers:sim:x", "0", "+inf"),
        ],
        # reserve.lua, discard.lua, give_back.lua, accounting, dead letters, fail fast
        "direct-client": [
            ("TIME",),
            ("HMGET", f"{p}s:k", "0", "1"),
            ("HSETNX", f"{p}g:k", "spec", "s"),
            ("HGETALL", f"{p}r:c:b"),
            ("HSET", f"{p}u:r", "ns", "1"),
            ("PEXPIRE", f"{p}u:r", "1000"),
            ("HSETNX", f"{p}m:r", "ns\nq1", "k|0|1"),
            ("SADD", f"{p}keys:sim:x", "k"),
            ("XADD", f"{p}llm:sim:x", "*", "key", "k"),
            ("HDEL", f"{p}s:k", "0"),
            ("XADD", f"{p}dead", "MAXLEN", "~", "100", "*", "kind", "k"),
            ("HINCRBY", f"{p}stats:r", "m|requests", "1"),
            ("HINCRBYFLOAT", f"{p}stats", "m|x", "1.5"),
            ("ZADD", f"{p}runs", "1", "r"),
            ("EXPIRE", f"{p}stats:r", "100"),
            ("ZREMRANGEBYSCORE", f"{p}runs", "-inf", "1"),
            ("DEL", f"{p}r:c:b"),
            ("HGET", f"{p}u:r", "kns"),
            ("HDEL", f"{p}u:r", "kns"),
            ("HDEL", f"{p}r:c:b", "c:u"),
            ("HGET", f"{p}m:r", "ns\nq1"),
            ("HDEL", f"{p}m:r", "ns\nq1"),
            ("ZCOUNT", f"{p}workers:sim:x", "0", "+inf"),
            ("SUBSCRIBE", f"{p}reply:abc"),
            ("WAIT", "1", "10"),
        ],
        "operator": [
            ("TIME",),
            ("HGETALL", f"{p}stats"),
            ("HGETALL", f"{p}stats:r"),
            ("ZREVRANGE", f"{p}runs", "0", "-1"),
            ("DEL", f"{p}u:r"),
            ("XREVRANGE", f"{p}dead", "+", "-"),
            ("XLEN", f"{p}dead"),
            ("XDEL", f"{p}dead", "1-0"),
            ("DEL", f"{p}dead"),
            ("ZCARD", f"{p}queue:cache"),  # top, health --cluster
            ("ZCOUNT", f"{p}workers:sim:x", "0", "+inf"),
            ("ZRANGEBYSCORE", f"{p}workers:cache", "0", "+inf"),
            ("XLEN", f"{p}llm:sim:x"),
            ("XINFO", "GROUPS", f"{p}llm:sim:x"),
            ("XINFO", "CONSUMERS", f"{p}llm:sim:x", "batch-workers"),  # top's orphaned
        ],
    }
    refused = {
        # the selector: queue commands on the queue keys only, PSETEX on job bodies only
        "client": [
            ("PSETEX", f"{p}queue:cache", "1000", "x"),
            ("ZADD", f"arq:job:{p}job:x", "1", "x"),
            ("GET", f"arq:job:{p}job:x"),
            ("ZADD", f"{p}workers:sim:x", "1", "x"),
            ("HGETALL", f"{p}s:k"),
            ("HSET", f"{p}m:r", "ns\nq1", "k|0|1"),
            ("PUBLISH", f"{p}reply:abc", "x"),
            ("PSUBSCRIBE", f"{p}reply:*"),
        ],
        "cache-worker": [
            ("HGETALL", f"{p}limit:x"),
            ("XREADGROUP", "GROUP", "batch-workers", "w", "STREAMS", f"{p}llm:sim:x", ">"),
            ("SUBSCRIBE", f"{p}reply:abc"),
        ],
        "batch-worker": [
            ("GET", f"arq:job:{p}job:x"),
            ("HGETALL", f"{p}u:r"),
            ("ZRANGEBYSCORE", f"{p}queue:cache", "-inf", "+inf"),
            ("ZCOUNT", f"{p}queue:cache", "-inf", "+inf"),
        ],
        "direct-client": [  # no queue, no arq keys, no replies of others, no stream reads
            ("PSETEX", f"arq:job:{p}job:x", "1000", "x"),
            ("ZADD", f"{p}queue:cache", "1", "j"),
            ("LPUSH", f"{p}queue:cache:wake", "j"),
            ("SET", f"arq:in-progress:{p}job:x", "1"),
            ("PUBLISH", f"{p}reply:abc", "x"),
            ("XREVRANGE", f"{p}dead", "+", "-"),
            ("XREADGROUP", "GROUP", "batch-workers", "w", "STREAMS", f"{p}llm:sim:x", ">"),
            ("ZADD", f"{p}workers:cache", "1", "x"),
            ("HGETALL", f"{p}limit:x"),
        ],
        "operator": [
            ("DEL", f"{p}stats"),
            ("HINCRBY", f"{p}stats", "m|x", "1"),
            ("HGETALL", f"{p}u:r"),
            ("GET", f"{p}s:k"),
            ("ZRANGEBYSCORE", f"{p}queue:cache", "-inf", "+inf"),  # sizes, not content
            ("XREVRANGE", f"{p}llm:sim:x", "+", "-"),
            ("XINFO", "STREAM", f"{p}llm:sim:x"),
            ("ZADD", f"{p}workers:cache", "1", "x"),
            ("SCAN", "0"),
        ],
    }
    with contextlib.closing(acl_server.admin()) as admin:
        for role in ROLES:
            user = f"cachesaver-{role}"
            for command in allowed[role]:
                assert admin.execute_command("ACL", "DRYRUN", user, *command) == b"OK", \
                    (role, command)
            for command in refused[role]:
                assert admin.execute_command("ACL", "DRYRUN", user, *command) != b"OK", \
                    (role, command)


async def test_a_direct_client_under_the_plain_client_user_is_told_which_user_to_use(
        acl_server):
    from cachesaver_dist.errors import RedisRefusedError

    async with OnlineAPI("sim:x", cache=acl_server.url("cachesaver", "client"),
                         prefix="cachesaver:", direct=True, request_timeout=10) as api:
        with pytest.raises(RedisRefusedError, match="direct-client user"):
            await api.request(Request("Which user?", 1, "u/q1", "ns"))


async def test_a_user_refused_ping_is_told_what_to_grant(acl_server):
    from cachesaver_dist.connection import check_reachable
    from cachesaver_dist.errors import RedisRefusedError

    with contextlib.closing(acl_server.admin()) as admin:
        admin.execute_command("ACL", "SETUSER", "no-ping", "reset", "on", ">pw", "~x:*",
                              "+get")
    try:  # refused, not unreachable: asking again cannot help
        with pytest.raises(RedisRefusedError, match=r"refused a command.*\+ping"):
            await check_reachable(f"redis://no-ping:pw@127.0.0.1:{acl_server.port}/0")
    finally:
        with contextlib.closing(acl_server.admin()) as admin:
            admin.execute_command("ACL", "DELUSER", "no-ping")


def test_tenant_users_reach_only_their_prefix():
    """Every key and channel pattern of a tenant's users is under its prefix (or arq's keys of
    its job ids); nobody but the administrator gets ~*, &* or a category of commands."""
    with_server = render("cachesaver")
    for line in with_server.splitlines():
        name = line.split()[1]
        if name in ("default", "admin"):
            continue
        assert name.startswith("cachesaver-"), name
        patterns = re.findall(r"(?:%[RW]+)?~(\S+?)\)?(?=\s|$)", line)
        channels = re.findall(r"&(\S+?)\)?(?=\s|$)", line)
        assert patterns, line
        for pattern in patterns:
            assert pattern.startswith("cachesaver:") or any(
                pattern.startswith(f"arq:{k}:cachesaver:job:") for k in ARQ_KINDS), pattern
        assert channels == ([] if name.endswith("-operator") else ["cachesaver:reply:*"]), line
        assert "+@" not in line and "allkeys" not in line and "allcommands" not in line
    assert "user default reset off" in with_server.splitlines()
    # a tenant prefix without its colon would reach other tenants' keys (~team-as:* ...)
    env = {**os.environ, **{f"CACHESAVER_ACL_{var}_PASSWORD": "pw" for var in ROLES.values()}}
    done = subprocess.run(["sh", str(ROOT / "ops" / "acl.sh"), "team-a"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == "" and "use team-a:" in done.stderr


def test_refused_commands_and_workers_end_with_one_line_naming_the_fix(acl_server):
    """A CLI command the user may not run, and a worker whose user's rules do not cover
    its prefix, end with one line saying what to grant (no traceback, no retry loop)."""
    for tenant, role, command, prefix in (
            ("cachesaver", "client", ("runs",), "cachesaver:"),
            ("cachesaver", "client", ("dead-letters",), "cachesaver:"),
            ("cachesaver", "operator", ("usage",), "cachesaver:"),
            ("other", "batch-worker", ("worker", "batch", "--model", "sim:x"), "cachesaver:"),
            ("other", "cache-worker", ("worker", "cache"), "cachesaver:")):
        url = acl_server.url(tenant, role)
        done = subprocess.run(
            [sys.executable, "-m", "cachesaver_dist.cli", *command, "--redis-url", url,
             "--prefix", prefix], env=subprocess_env(url), cwd=ROOT, capture_output=True,
            text=True, timeout=60)
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 1, (command, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (command, done.stderr[-2000:])
        if command[0] == "worker":  # the prefix the user's rules do not cover
            assert "the Redis user lacks a permission" in last, (command, last)
            assert "prefix 'cachesaver:'" in last, last
        else:  # which user runs which command
            assert "may not do this: run stats, top" in last and "as admin" in last, last


def test_workers_whose_password_changed_say_to_fix_the_url(acl_server, tmp_path):
    """The password changes under running workers: they keep trying (it may be changed
    back), and say, as an error, which setting is wrong."""
    user, prefix = f"rotate-{uuid.uuid4().hex[:6]}", "rotate:"
    with contextlib.closing(acl_server.admin()) as admin:
        admin.execute_command("ACL", "SETUSER", user, "reset", "on", ">before", "~*", "&*",
                              "+@all")
    url = f"redis://{user}:before@127.0.0.1:{acl_server.port}/0"
    procs = Processes(url, Keys(prefix), tmp_path)
    try:
        workers = [procs.cli("worker", "cache", name="cache"),
                   procs.cli("worker", "batch", "--model", "sim:x", name="batch")]
        procs.wait_alive("cache")
        procs.wait_alive("sim:x")
        with contextlib.closing(acl_server.admin()) as admin:
            admin.execute_command("ACL", "SETUSER", user, "resetpass", ">after")
            admin.execute_command("CLIENT", "KILL", "USER", user)
        deadline = time.monotonic() + 20
        while not all("fix REDIS_URL" in Processes.logs(w) for w in workers):
            assert time.monotonic() < deadline, [Processes.logs(w)[-1500:] for w in workers]
            assert all(w.poll() is None for w in workers)
            time.sleep(0.2)
    finally:
        procs.stop_all()
        with contextlib.closing(acl_server.admin()) as admin:
            admin.execute_command("ACL", "DELUSER", user)
