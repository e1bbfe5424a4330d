"""Study ``faults``: one fault at a time under steady load, what it cost.

Each fault gets a fresh stack on loopback: a private ``redis-server`` with the shipped
``ops/redis.conf`` (or, for the failover, a primary, a replica and a sentinel as in
``tests/test_urls.py``), CLI worker processes (two cache workers and one batch worker
unless the fault says otherwise; the batch workers' model is the crash tests' counting
simulator, 20 ms a call) and four client processes (``tests/crash_client.py``: two per
namespace in one run, 6 callers each, 8 prompts, n = 1-3, reply_timeout 1 s,
request_timeout 60 s) that send requests without pause and record what they get.
After 40 replies and 0.5 s more, the fault is injected; once it is over, the clients go
on until 40 more requests were answered and 1 s more, then stop (every request they
started is awaited). Per fault:

* **lost**: requests that failed (a ``GenerationError`` from the model itself, in the
  model faults, is counted apart: it is what the contract promises for a failing model)
  or were never answered; must be 0;
* **violations**: sample indices handed out twice in one (run, namespace, prompt key),
  and received samples not stored as received (data, creation time, id) at the end;
  must be 0;
* **served again**: fault → the first reply to a request sent after the fault (any
  reply, and the first one holding a generated sample: a miss served);
* **drained**: fault → the last request that was in flight at the fault answered;
* **worst latency**: the longest request answered after the fault (the baseline before
  the fault for comparison);
* worker processes that died without being told to, dead letters.

Prints a table and writes ``bench/results/faults.json`` (``--only`` runs print, and
write nothing). About three minutes; each fault is bounded (its stack is stopped and the
next one starts whatever happened), the slowest take 40 s: a batch worker's SIGKILL
with the default 30 s lease, the failover (both wait out a lease), and a SIGTERM that
left work leased (see ``docs/reliability.md``).

``--direct``: the clients are ``OnlineAPI(direct=True)`` (they reserve themselves; the
cache workers still run); written to ``bench/results/faults-direct.json``.

Usage: ``.venv/bin/python -m bench.faults [--direct] [--only NAME ...] [--list] [--keep]``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import common as C

C.reexec_in_project_venv()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import msgpack  # noqa: E402
import redis as sync_redis  # noqa: E402
from cachesaver_dist import prompt_key  # noqa: E402
from cachesaver_dist.protocol import CONSUMER_GROUP, Keys, decode_sample  # noqa: E402
from tests.conftest import ROOT, Processes, subprocess_env  # noqa: E402
from tests.crash_client import PROMPTS  # noqa: E402
from tests.support import COUNTER_ENV  # noqa: E402
from tests.test_durability import CrashableRedis, _client  # noqa: E402
from tests.test_urls import PASSWORD, SentinelGroup, Servers  # noqa: E402

STUDY = "faults"
OUT = C.BENCH_HOME / "results" / "faults.json"
DIRECT = False  # --direct: the clients reserve themselves
NAMESPACES = ("a", "a", "b", "b")  # two clients per namespace: shared counters
LOAD_REPLIES = 40  # replies before the fault, and after it is over
SETTLE_S = 0.5  # more load before the fault
AFTER_S = 1.0  # more load after the 40 replies that follow the fault
MODEL_DOWN_S = 3.0  # how long the model fails
RESTART_AFTER_S = 1.0  # a killed worker's replacement starts this long after the kill
REDIS_RESTART_DELAY_S = 0.2  # SIGKILL -> restart, as tests/test_durability.py
CLIENT_MAX_S = 150.0  # a client process sends for at most this long
COLLECT_S = 90.0  # after the stop: requests still waiting (request_timeout 60 s)

DURABLE = "tests.crash_client:durable_counting_model"
FLAKY = "bench.models:flaky_counting_model"
PROVIDER = "openai:faults-sim"


@dataclass
class Setup:
    cache: int = 2  # cache workers
    batch: int = 1  # batch workers
    lease: float = 30.0  # the batch workers' --lease (the default)
    model: str = DURABLE  # DURABLE, FLAKY or PROVIDER (the simulator over HTTP)
    sentinel: bool = False  # primary + replica + sentinel, redis+sentinel:// everywhere
    wait_replicas: int | None = None  # the workers' --wait-replicas (None: their default)


@dataclass
class Fault:
    name: str
    what: str
    how: str
    inject: Callable[[Stage], None]
    setup: Setup = field(default_factory=Setup)
    model_errors_expected: bool = False  # GenerationError from the model: not "lost"
    dead_letters_expected: int = 0


# --- one stack ------------------------------------------------------------------------


class Stage:
    """The servers, workers and clients of one fault, and the moments it went through."""

    def __init__(self, fault: Fault, directory: Path) -> None:
        self.fault, self.setup, self.dir = fault, fault.setup, directory
        self.keys = Keys(f"flt{uuid.uuid4().hex[:8]}:")
        self.route = self.setup.model
        self.counter = f"{self.keys.prefix}generated"
        self.fail_flag = directory / "model-fails"
        self.stop_file = directory / "stop-clients"
        self.redis: CrashableRedis | None = None
        self.servers: Servers | None = None
        self.group: SentinelGroup | None = None
        self.sim: subprocess.Popen | None = None
        self.sim_url = ""
        self.procs: Processes | None = None
        self.cache_procs: list[subprocess.Popen] = []
        self.batch_procs: list[subprocess.Popen] = []
        self.told: set[int] = set()  # pids we killed or stopped on purpose
        self.clients: list[subprocess.Popen] = []
        self.t_fault = 0.0
        self.events: dict[str, float] = {}  # what happened, seconds after the fault

    # -- servers and processes --
    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.setup.sentinel:
            self.servers = Servers(self.dir)
            self.group = SentinelGroup(self.servers, self.dir)
            self.url = self.group.url
        else:
            self.redis = CrashableRedis(self.dir / "redis")
            self.redis.start()
            self.url = self.redis.url
        self.procs = Processes(self.url, self.keys, self.dir)
        if self.setup.model == PROVIDER:
            self.start_simulator()
        for _ in range(self.setup.cache):
            self.start_cache()
        for _ in range(self.setup.batch):
            self.start_batch()
        self.wait_alive("cache", self.setup.cache)
        self.wait_alive(self.route, self.setup.batch)

    def start_simulator(self) -> None:
        self.sim, self.sim_url = C.start_simulator(self.dir / "simulator.log", 0.02,
                                                   env=subprocess_env(self.url))

    def start_cache(self) -> subprocess.Popen:
        assert self.procs is not None
        proc = self.procs.cli("worker", "cache", "--redis-url", self.url, *self._waits(),
                              name="cache")
        self.cache_procs.append(proc)
        return proc

    def _waits(self) -> list[str]:
        w = self.setup.wait_replicas
        return [] if w is None else ["--wait-replicas", str(w)]

    def start_batch(self) -> subprocess.Popen:
        assert self.procs is not None
        args = ["worker", "batch", "--model", self.route, "--redis-url", self.url,
                "--lease", f"{self.setup.lease:g}", *self._waits()]
        if self.setup.model == PROVIDER:
            args += ["--base-url", f"{self.sim_url}/v1"]
        proc = self.procs.cli(*args, name="batch",
                              env={COUNTER_ENV: self.counter,
                                   "BENCH_FAIL_FLAG": str(self.fail_flag)})
        self.batch_procs.append(proc)
        return proc

    def send_signal(self, proc: subprocess.Popen, sig: signal.Signals) -> None:
        self.told.add(proc.pid)
        proc.send_signal(sig)

    def client_env(self) -> dict[str, str]:
        """A direct client reserves itself: it waits for the replicas the workers wait for."""
        if not DIRECT:
            return {}
        w = self.setup.wait_replicas
        return {"CRASH_CLIENT_DIRECT": "1",
                **({"CACHESAVER_WAIT_REPLICAS": str(w)} if w is not None else {})}

    def start_clients(self) -> None:
        for seed, ns in enumerate(NAMESPACES):
            with open(self.dir / f"client-{seed}.log", "wb") as log:
                self.clients.append(subprocess.Popen(
                    [sys.executable, "-m", "tests.crash_client", self.keys.prefix,
                     self.fault.name, self.route, ns, str(seed), str(self.stop_file),
                     str(CLIENT_MAX_S)],
                    env=subprocess_env(self.url, **self.client_env()),
                    stdout=subprocess.PIPE, stderr=log, cwd=ROOT))

    def collect(self) -> tuple[list[dict[str, Any]], list[str]]:
        """What each client received; and the clients that failed (their requests lost)."""
        self.stop_file.touch()
        deadline = time.monotonic() + COLLECT_S
        results, failed = [], []
        for i, proc in enumerate(self.clients):
            try:
                out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                failed.append(f"client {i} still waiting {COLLECT_S:.0f} s after the stop")
                continue
            if proc.returncode != 0:
                failed.append(f"client {i} exited with {proc.returncode}: see "
                              f"{self.dir}/client-{i}.log")
                continue
            results.append(json.loads(out))
        return results, failed

    def stop(self) -> None:
        self.stop_file.touch()
        for proc in self.clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.procs is not None:
            self.procs.stop_all()
        if self.sim is not None:
            C.stop_process(self.sim, timeout=5)
        if self.redis is not None:
            self.redis.stop()
        if self.servers is not None:
            self.servers.stop_all()

    # -- Redis, from the harness --
    def admin(self, timeout: float = 2.0) -> sync_redis.Redis:
        """A plain client of the current primary (no retries, short timeouts)."""
        if self.group is not None:
            port = self.group.primary_port()
            return sync_redis.Redis(port=port, password=PASSWORD, socket_timeout=timeout,
                                    socket_connect_timeout=timeout)
        return _client(self.url, timeout)

    def answered(self) -> int | None:
        """Requests answered so far (the stats counter each reply advances); None while
        Redis cannot be asked."""
        with contextlib.suppress(sync_redis.RedisError, OSError), \
                contextlib.closing(self.admin()) as client:
            return int(client.hget(self.keys.stats(), f"{self.route}|requests") or 0)
        return None

    def wait_answered(self, more: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        base = None
        while time.monotonic() < deadline:
            now = self.answered()
            if now is not None:
                if base is None:
                    base = now
                elif now >= base + more:
                    return
            time.sleep(0.02)
        raise RuntimeError(f"fewer than {more} requests answered in {timeout:.0f} s")

    def wait_alive(self, route: str, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` workers of ``route`` beat (the registry the clients ask)."""
        assert self.procs is not None
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.closing(self.admin()) as client:
                if client.zcount(self.keys.workers(route), int(time.time() * 1000),
                                 "+inf") >= count:
                    return
            dead = [p for p in self.procs.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a worker exited: {self.procs.logs(dead[0])}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} worker(s) for {route} not alive in {timeout} s")
            time.sleep(0.05)

    def wait_subscribed(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.closing(self.admin()) as client:
                if len(client.pubsub_channels(f"{self.keys.prefix}reply:*")) >= len(self.clients):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(self.clients)} clients not subscribed in {timeout} s")
            if any(p.poll() is not None for p in self.clients):
                raise RuntimeError(f"a client exited at start: see {self.dir}/client-*.log")
            time.sleep(0.05)

    # -- the moments of the fault --
    def now_fault(self) -> None:
        self.t_fault = time.time()

    def event(self, name: str) -> None:
        self.events[name] = round(time.time() - self.t_fault, 3)


# --- the faults ---------------------------------------------------------------------------


def _wait_exit(s: Stage, proc: subprocess.Popen, what: str, timeout: float = 15.0) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} still running {timeout:.0f} s after the signal") from None
    s.event(f"{what} exited ({proc.returncode})")


def _left_leased(s: Stage, proc: subprocess.Popen) -> None:
    """Record how many work entries the batch worker ``proc`` (gone) still holds: they
    wait for a live worker's takeover once ``--lease`` has run out."""
    with contextlib.closing(s.admin()) as client:
        summary = client.xpending(s.keys.work_stream(s.route), CONSUMER_GROUP)
    mine = [c for c in summary.get("consumers") or []
            if f"-{proc.pid}-".encode() in c["name"]]
    s.events["entries left leased"] = sum(int(c["pending"]) for c in mine)


def cache_kill_one(s: Stage) -> None:
    s.now_fault()
    s.send_signal(s.cache_procs[0], signal.SIGKILL)


def cache_kill_restart(s: Stage) -> None:
    s.now_fault()
    s.send_signal(s.cache_procs[0], signal.SIGKILL)
    time.sleep(RESTART_AFTER_S)
    s.start_cache()
    s.event("replacement started")


def batch_kill_restart(s: Stage) -> None:
    s.now_fault()
    s.send_signal(s.batch_procs[0], signal.SIGKILL)
    s.batch_procs[0].wait()
    _left_leased(s, s.batch_procs[0])
    time.sleep(RESTART_AFTER_S)
    s.start_batch()
    s.event("replacement started")


def batch_term_one(s: Stage) -> None:
    s.now_fault()
    s.send_signal(s.batch_procs[0], signal.SIGTERM)
    _wait_exit(s, s.batch_procs[0], "batch worker")
    _left_leased(s, s.batch_procs[0])


def batch_term_restart(s: Stage) -> None:
    s.now_fault()
    s.send_signal(s.batch_procs[0], signal.SIGTERM)
    _wait_exit(s, s.batch_procs[0], "batch worker")
    _left_leased(s, s.batch_procs[0])
    s.start_batch()
    s.event("replacement started")


def cache_term_one(s: Stage) -> None:
    s.now_fault()
    s.send_signal(s.cache_procs[0], signal.SIGTERM)
    _wait_exit(s, s.cache_procs[0], "cache worker")


def redis_restart(s: Stage) -> None:
    assert s.redis is not None and s.redis.proc is not None
    s.now_fault()
    with contextlib.closing(_client(s.redis.url, 10.0)) as client:
        client.shutdown()  # saves, then exits; redis-py takes the closed connection as done
    s.redis.proc.wait(timeout=30)
    s.event("redis exited")
    s.redis.start()
    s.event("redis up")


def redis_kill(s: Stage) -> None:
    assert s.redis is not None
    s.now_fault()
    s.redis.kill()
    time.sleep(REDIS_RESTART_DELAY_S)
    s.redis.start()
    s.event("redis up")


def sentinel_failover(s: Stage) -> None:
    g = s.group
    assert g is not None
    old = g.primary_port()
    deadline = time.monotonic() + 20
    while not _sentinel_sees_replica(g):  # SENTINEL FAILOVER needs a replica it knows
        if time.monotonic() > deadline:
            raise RuntimeError("the sentinel never saw the replica")
        time.sleep(0.1)
    s.now_fault()
    g.sentinel.execute_command("SENTINEL", "FAILOVER", "mymaster")
    while g.primary_port() == old:
        if time.monotonic() > deadline + 20:
            raise RuntimeError("the sentinel still names the old primary")
        time.sleep(0.02)
    s.event("sentinel names the new primary")
    g.wait_role(old, "slave")
    s.event("old primary is a replica")


def _sentinel_sees_replica(g: SentinelGroup) -> bool:
    for flat in g.sentinel.execute_command("SENTINEL", "REPLICAS", "mymaster"):
        r = dict(zip(flat[::2], flat[1::2]))
        if r.get("flags") == "slave" and r.get("master-link-status") == "ok":
            return True
    return False


def model_fails(s: Stage) -> None:
    s.now_fault()
    s.fail_flag.touch()
    time.sleep(MODEL_DOWN_S)
    s.fail_flag.unlink()
    s.event("model back")


def provider_fails(s: Stage) -> None:
    s.now_fault()
    r = httpx.post(f"{s.sim_url}/admin/faults", json={"faults": [{"status": 503}]}, timeout=5)
    r.raise_for_status()
    time.sleep(MODEL_DOWN_S)
    httpx.delete(f"{s.sim_url}/admin/faults", timeout=5).raise_for_status()
    s.event("provider back")


POISON_PROMPT = "a prompt nobody asks for"


def poison_entries(s: Stage) -> list[dict[str, Any]]:
    key = prompt_key(s.route, {"prompt": POISON_PROMPT})
    return [
        {"foo": "bar"},  # no fields of ours at all
        {"key": key, "idx": "0", "spec": b"\xc1 not msgpack"},  # names a claim, unreadable
        {"key": key, "idx": "x", "spec": b"\x80"},  # bad indices
        {"key": key, "idx": "1", "spec": b"\xc1" + b"\x00\xff" * 60_000},  # 120 kB garbage
        {"key": key, "idx": "2",  # readable msgpack, another schema version
         "spec": msgpack.packb({"v": 99, "route": s.route, "model_id": s.route,
                                "fields": {"prompt": POISON_PROMPT}})},
    ]


def poison(s: Stage) -> None:
    entries = poison_entries(s)
    with contextlib.closing(s.admin()) as client:
        s.now_fault()
        for fields in entries:
            client.xadd(s.keys.work_stream(s.route), fields)
    s.event(f"{len(entries)} entries added")


FAULTS = [
    Fault("cache-kill", "cache worker SIGKILL (one of two)",
          "SIGKILL of one of two cache workers; no replacement", cache_kill_one),
    Fault("cache-kill-only", "cache worker SIGKILL (the only one, restarted after 1 s)",
          "SIGKILL of the only cache worker, a new one started 1 s later",
          cache_kill_restart, Setup(cache=1)),
    Fault("batch-kill-lease30", "batch worker SIGKILL (the only one, restarted after 1 s), "
          "lease 30 s (default)", "SIGKILL of the only batch worker, a new one started 1 s "
          "later; --lease 30", batch_kill_restart),
    Fault("batch-kill-lease5", "batch worker SIGKILL (the only one, restarted after 1 s), "
          "lease 5 s", "same, both workers with --lease 5", batch_kill_restart,
          Setup(lease=5.0)),
    Fault("batch-term", "batch worker SIGTERM (one of two)",
          "SIGTERM of one of two batch workers under load; no replacement", batch_term_one,
          Setup(batch=2)),
    Fault("batch-term-only", "batch worker SIGTERM (the only one, restarted when it exits)",
          "SIGTERM of the only batch worker; a new one started as soon as it exited (a "
          "stop-then-start restart)", batch_term_restart),
    Fault("cache-term", "cache worker SIGTERM (one of two)",
          "SIGTERM of one of two cache workers under load; no replacement", cache_term_one),
    Fault("redis-restart", "Redis graceful restart (SHUTDOWN + start)",
          "SHUTDOWN (saves), then redis-server started again on the same port and data dir",
          redis_restart),
    Fault("redis-kill", "Redis SIGKILL (shipped config), restarted after 0.2 s",
          "SIGKILL of redis-server, restarted 0.2 s later on the same port and data dir",
          redis_kill),
    Fault("sentinel-failover", "Sentinel failover (SENTINEL FAILOVER)",
          "primary + replica + one sentinel; clients and workers on redis+sentinel://; "
          "SENTINEL FAILOVER under load", sentinel_failover, Setup(sentinel=True)),
    Fault("sentinel-failover-wait", "Sentinel failover, workers with --wait-replicas 1",
          "as sentinel-failover; every reservation and store waits for the replica (WAIT)",
          sentinel_failover, Setup(sentinel=True, wait_replicas=1)),
    Fault("model-fails", "model raising for 3 s (no retries)",
          "the batch worker's model raises on every call for 3 s",
          model_fails, Setup(model=FLAKY), model_errors_expected=True),
    Fault("provider-503", "provider answering HTTP 503 for 3 s (openai: backend, retries)",
          "the simulator (openai:, --retry-budget 6) answers 503 to every call for 3 s",
          provider_fails, Setup(model=PROVIDER), model_errors_expected=True),
    Fault("poison", "poison entries in the work stream",
          "5 unreadable entries (no fields, bad spec, bad indices, 120 kB garbage, schema "
          "v99) added to the work stream under load", poison, dead_letters_expected=5),
]


# --- one fault, measured -----------------------------------------------------------------


def run_fault(fault: Fault, directory: Path) -> dict[str, Any]:
    s = Stage(fault, directory)
    started = time.monotonic()
    try:
        s.start()
        s.start_clients()
        s.wait_subscribed()
        s.wait_answered(LOAD_REPLIES, timeout=30)
        time.sleep(SETTLE_S)
        fault.inject(s)
        s.event("fault over")
        s.wait_answered(LOAD_REPLIES, timeout=s.setup.lease + 30)
        time.sleep(AFTER_S)
        results, failed_clients = s.collect()
        s.event("clients done")
        (directory / "received.json").write_text(json.dumps(
            {"t_fault": s.t_fault, "events_s": s.events, "clients": results}))
        out = measure(s, results, failed_clients)
    finally:
        s.stop()
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


def _error_kind(message: str) -> str:
    return message.split(":", 1)[0]


def measure(s: Stage, results: list[dict[str, Any]], failed_clients: list[str]
            ) -> dict[str, Any]:
    t_fault = s.t_fault
    answers = [a for r in results for a in r["answers"]]
    errors = [e for r in results for e in r["errors"]]
    # The model's own failure, passed on as the contract says: not a lost request.
    said = f"GenerationError: model {s.route!r} failed: "
    model_failed = sum(e["error"].startswith(said) for e in errors) \
        if s.fault.model_errors_expected else 0
    lost = len(errors) - model_failed + len(failed_clients)

    handed: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for a in answers:
        handed[a["ns"], a["prompt"]].update(a["index"])
    twice = {f"{ns}/{p}": sorted(i for i, c in cnt.items() if c > 1)
             for (ns, p), cnt in handed.items() if any(c > 1 for c in cnt.values())}
    with contextlib.closing(s.admin(10.0)) as client:
        stored = {p: {int(i): decode_sample(raw) for i, raw in client.hgetall(
                      s.keys.samples(prompt_key(s.route, {"prompt": p}))).items()}
                  for p in PROMPTS}
        generated = {k.decode(): int(v) for k, v in client.hgetall(s.counter).items()}
        dead_letters = client.xlen(s.keys.dead_letters)
    changed = 0
    for a in answers:
        for i, got in zip(a["index"], a["samples"]):
            mine = stored[a["prompt"]].get(i)
            changed += mine is None or [mine["data"], mine.get("created"), mine.get("id")] != got
    # Samples generated more than once (a model call cut off, or whose store was lost,
    # is made again; late fills are dropped): what the counting model counted, less
    # what is stored.
    regenerated = (sum(generated.get(p, 0) for p in PROMPTS)
                   - sum(len(v) for v in stored.values())) if generated else None

    before = [a["t"] - a["t0"] for a in answers if a["t"] < t_fault]
    after = [a for a in answers if a["t"] >= t_fault]
    sent_after = [a for a in after if a["t0"] >= t_fault]
    worst = max([a["t"] - a["t0"] for a in after] +
                [e["t"] - e["t0"] for e in errors if e["t"] >= t_fault], default=None)
    in_flight = [a for a in after if a["t0"] < t_fault]
    first = min((a["t"] for a in sent_after), default=None)
    first_gen = min((a["t"] for a in sent_after if "generated" in a.get("source", ())),
                    default=None)
    dead_workers = [Path(p.log_path).name for p in s.procs.procs  # type: ignore[union-attr,attr-defined]
                    if p.poll() is not None and p.pid not in s.told]
    rel = lambda t: None if t is None else round(t - t_fault, 3)  # noqa: E731
    return {
        "requests": len(answers) + len(errors),
        "lost": lost,
        "errors": dict(Counter(_error_kind(e["error"]) for e in errors)),
        "error_samples": sorted({e["error"][:300] for e in errors})[:5],
        "failed_clients": failed_clients,
        "model_failed": model_failed,
        "indices_handed_out_twice": sum(len(v) for v in twice.values()),
        "handed_out_twice": twice,
        "samples_changed_or_lost": changed,
        "generated_twice": regenerated,
        "dead_letters": dead_letters,
        "dead_letters_expected": s.fault.dead_letters_expected,
        "workers_died": dead_workers,
        "in_flight_at_fault": len(in_flight),
        "served_again_s": rel(first),
        "miss_served_again_s": rel(first_gen),
        "drained_s": rel(max((a["t"] for a in in_flight), default=None)),
        "worst_latency_s": None if worst is None else round(worst, 3),
        "baseline_latency_s": {"p50": round(C.percentile(before, 50), 4),
                               "p99": round(C.percentile(before, 99), 4),
                               "max": round(max(before), 4)} if before else None,
        "events_s": s.events,
    }


def violations(r: dict[str, Any]) -> int:
    return r["indices_handed_out_twice"] + r["samples_changed_or_lost"]


# --- report -------------------------------------------------------------------------------


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for f in FAULTS:
        r = results.get(f.name)
        if r is None:
            continue
        if "error" in r:
            rows.append([f.name, "harness error: " + r["error"][:70], *[""] * 7])
            continue
        lost = str(r["lost"]) + (f" (+{r['model_failed']} model errors)"
                                 if r["model_failed"] else "")
        base = r["baseline_latency_s"] or {}
        rows.append([f.name, r["requests"], lost,
                     f"{r['indices_handed_out_twice']}/{r['samples_changed_or_lost']}",
                     _s(r["served_again_s"]), _s(r["drained_s"]), _s(r["worst_latency_s"]),
                     _s(base.get("p99")),
                     f"{len(r['workers_died'])}/{r['dead_letters']}"])
    return C.text_table(["fault", "requests", "lost", "twice/changed", "served again s",
                         "drained s", "worst s", "before p99 s", "died/dead letters"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="these faults only (see --list)")
    p.add_argument("--list", action="store_true", help="list the faults and exit")
    p.add_argument("--keep", action="store_true", help="keep logs and data dirs in bench/.work")
    p.add_argument("--direct", action="store_true",
                   help="clients with OnlineAPI(direct=True) (results: faults-direct.json)")
    a = p.parse_args()
    global DIRECT, OUT
    if a.direct:
        DIRECT, OUT = True, OUT.with_name("faults-direct.json")
    if a.list:
        for f in FAULTS:
            print(f"{f.name:20} {f.what}")
        return
    chosen = [f for f in FAULTS if not a.only or f.name in a.only]
    unknown = set(a.only or ()) - {f.name for f in FAULTS}
    if unknown:
        p.error(f"unknown fault(s): {', '.join(sorted(unknown))} (see --list)")
    started = time.monotonic()
    base = C.WORK / f"faults-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:4]}"
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                   text=True).stdout.split()[2].removeprefix("v=")
    env = C.environment(redis_version)
    env.pop("original", None)  # the original CacheSaver plays no part here
    results: dict[str, dict[str, Any]] = {}
    for f in chosen:
        print(f"{f.name}: {f.what}", flush=True)
        try:
            results[f.name] = {"what": f.what, "how": f.how, "setup": vars(f.setup),
                               **run_fault(f, base / f.name)}
        except Exception as exc:  # one broken fault must not hide the others
            results[f.name] = {"what": f.what, "how": f.how, "setup": vars(f.setup),
                               "error": f"{type(exc).__name__}: {exc}"}
        r = results[f.name]
        print("  " + json.dumps({k: r.get(k) for k in (
            "requests", "lost", "errors", "model_failed", "indices_handed_out_twice",
            "samples_changed_or_lost", "served_again_s", "miss_served_again_s", "drained_s",
            "worst_latency_s", "events_s", "workers_died", "dead_letters", "seconds",
            "error")}), flush=True)
    print()
    print(table(results))
    res = {"study": STUDY, "env": env, "seconds": round(time.monotonic() - started, 1),
           "command": ".venv/bin/python -m bench.faults" + (" --direct" if DIRECT else "") +
                      (f" --only {' '.join(a.only)}" if a.only else ""),
           "setup": {"redis": "ops/redis.conf (port, dir, bind overridden); the failover: "
                              "tests/test_urls.py's SentinelGroup",
                     "clients": f"{len(NAMESPACES)} x tests/crash_client.py (6 callers, "
                                "reply_timeout 1 s, request_timeout 60 s"
                                + (", direct=True)" if DIRECT else ")"),
                     "model": f"{DURABLE} (20 ms a call) unless the fault says otherwise",
                     "load_replies": LOAD_REPLIES},
           "faults": results}
    if not a.only:  # a partial run never replaces the results file
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(res, indent=1) + "\n")
        print(f"written to {OUT}")
    else:
        print(json.dumps(res["faults"], indent=1))
    print(f"{res['seconds']:.0f} s in all")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
