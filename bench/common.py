"""Shared helpers of the studies: environment header, RESULTS.md sections, statistics,
a private Redis with our worker processes, the two drivers, CPU, profiles and plots.

Runs in the project's venv (``/work/main/.venv``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# ROOT: the source tree under test (the repository, or with BENCH_SRC=HEAD an export of
# its committed HEAD); BENCH_HOME: the real bench/ folder (venvs, RESULTS.md, plots).
ROOT = Path(__file__).resolve().parent.parent
BENCH_HOME = Path(os.environ.get("BENCH_HOME") or ROOT / "bench").resolve()
REPO = BENCH_HOME.parent
WORK = BENCH_HOME / ".work"  # logs, data dirs, profiles, exports (git-ignored)
RESULTS = BENCH_HOME / "RESULTS.md"
OURS_PY = REPO / ".venv" / "bin" / "python"
ORIG_PY = BENCH_HOME / ".venv-original" / "bin" / "python"
TOOLS_PY = BENCH_HOME / ".venv-tools" / "bin" / "python"
PYSPY = BENCH_HOME / ".venv-tools" / "bin" / "py-spy"


def reexec_in_project_venv() -> None:
    """Run the study in the project's venv; with ``BENCH_SRC=HEAD``, against an export
    of the committed HEAD (so edits in progress in the work tree cannot break a run)."""
    study = Path(sys.argv[0]).stem
    if os.environ.get("BENCH_SRC", "").upper() == "HEAD" and not os.environ.get("BENCH_SNAPSHOT"):
        rev, src = export_rev("HEAD")
        env = {**os.environ, "BENCH_SNAPSHOT": rev, "BENCH_HOME": str(BENCH_HOME),
               "PYTHONPATH": str(src)}
        os.chdir(src)
        os.execve(str(OURS_PY), [str(OURS_PY), "-m", f"bench.{study}", *sys.argv[1:]], env)
    try:
        import cachesaver_dist  # noqa: F401
        import psutil  # noqa: F401
    except ImportError:
        if OURS_PY.exists() and Path(sys.executable).resolve() != OURS_PY.resolve():
            os.execv(str(OURS_PY), [str(OURS_PY), *sys.argv])
        raise


def export_rev(revision: str) -> tuple[str, Path]:
    """``git archive REVISION`` into ``.work/src-<rev>`` plus the current ``bench/``
    files; returns the short commit id and the folder."""
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", revision],
                         capture_output=True, text=True, check=True).stdout.strip()
    src = WORK / f"src-{rev}"
    if not (src / "cachesaver_dist").exists():
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    (src / "bench").mkdir(exist_ok=True)
    for f in BENCH_HOME.glob("*.py"):
        shutil.copy2(f, src / "bench" / f.name)
    return rev, src


def ensure_envs() -> None:
    from bench import original_env

    original_env.ensure()


# --- environment header ---------------------------------------------------------------


def _versions(python: Path, names: Sequence[str]) -> dict[str, str]:
    code = ("import json, sys\nfrom importlib import metadata\n"
            "out={'python': sys.version.split()[0]}\n"
            f"for n in {list(names)!r}:\n"
            "    try: out[n]=metadata.version(n)\n"
            "    except Exception: out[n]='-'\n"
            "print(json.dumps(out))")
    try:
        res = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
        return json.loads(res.stdout)
    except Exception as exc:  # the header must never kill a study
        return {"error": str(exc)}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _git_rev() -> str:
    if os.environ.get("BENCH_SNAPSHOT"):
        return f"{os.environ['BENCH_SNAPSHOT']} (committed HEAD, exported: BENCH_SRC=HEAD)"
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no", "cachesaver_dist", "workers"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" (package files modified in the work tree)" if dirty else "")
    except Exception:
        return "?"


def environment(redis_version: str) -> dict[str, Any]:
    import psutil

    ours = {"python": sys.version.split()[0]}
    for n in ("cachesaver-dist", "arq", "redis", "hiredis", "msgpack"):
        try:
            ours[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            ours[n] = "-"
    orig = _versions(ORIG_PY, ["cachesaver", "diskcache", "deepdiff"])
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}: {_cpu_model()}, {os.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.system()} "
                   f"{platform.release()}",
        "load": "load average {:.2f} {:.2f} {:.2f} at start".format(*os.getloadavg()),
        "redis": redis_version,
        "ours": ours,
        "original": orig,
        "commit": _git_rev(),
    }


def environment_md(env: dict[str, Any]) -> str:
    ours = ", ".join(f"{k} {v}" for k, v in env["ours"].items())
    orig = ", ".join(f"{k} {v}" for k, v in env["original"].items())
    return (f"*{env['date']}* · {env['machine']} ({env['load']}) · redis-server "
            f"{env['redis']} (private, loopback) · commit {env['commit']}\n\n"
            f"* ours (`.venv`): {ours}\n* original (`bench/.venv-original`): {orig}\n")


# --- RESULTS.md sections --------------------------------------------------------------

_PREAMBLE = """# Benchmarks: cachesaver-dist vs the original CacheSaver 0.0.6

Written by the scripts in `bench/` (issue #4); every section below is rewritten by its
own study, so studies can be re-run one at a time (`bench/run_all.sh` runs them all).
Each study runs both sides in the same run on the same machine: ours in `.venv`
(client process → Redis → our worker processes), the original (`pip install
cachesaver==0.0.6`, single process, `diskcache`) in `bench/.venv-original`. The machine
is a shared, noisy 2-core VM: read ratios and medians, not lone absolute times.

"""


def write_section(study: str, body: str) -> None:
    """Replace (or append) ``<!-- study:NAME -->`` ... ``<!-- /study:NAME -->``."""
    write_block(RESULTS, f"study:{study}", body, _PREAMBLE)


def write_block(path: Path, name: str, body: str, preamble: str = "") -> None:
    """Replace (or append) ``<!-- NAME -->`` ... ``<!-- /NAME -->`` in the file at ``path``
    (a generated part of a hand-written page, e.g. figures in ``docs/``)."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    path.parent.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / "results.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else preamble
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text)
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text if text.endswith("\n") else text + "\n")
        tmp.replace(path)


def write_json(name: str, data: Any) -> Path:
    """``bench/results/NAME.json``: a study's figures, for the docs that quote them."""
    out = BENCH_HOME / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    return out


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def text_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


# --- statistics -----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    return {"n": len(latencies_ms), "p50": percentile(latencies_ms, 50),
            "p90": percentile(latencies_ms, 90), "p99": percentile(latencies_ms, 99),
            "mean": statistics.fmean(latencies_ms) if latencies_ms else math.nan}


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def fmt(x: float, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**MISSED**"


# --- processes ------------------------------------------------------------------------


def _log(name: str) -> Path:
    d = WORK / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{name}-{dt.datetime.now().strftime('%H%M%S')}-{uuid.uuid4().hex[:4]}.log"


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM one process we started, SIGKILL if it does not exit in ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Stack:
    """A private Redis (or ``REDIS_URL``), a unique key prefix, and our worker processes.

    Workers are ``python -m cachesaver_dist.cli worker cache|batch --prefix P`` with
    ``REDIS_URL`` set, as in a deployment; readiness is ``heartbeat.alive_workers``.
    """

    def __init__(self, study: str) -> None:
        self.study = study
        self.prefix = f"bench-{study}-{uuid.uuid4().hex[:8]}:"
        self.server = None
        self.url = os.environ.get("REDIS_URL")
        self.private = self.url is None
        self.workers: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> Stack:
        if self.private:
            from cachesaver_dist.server import EmbeddedServer

            data = WORK / f"redis-{self.study}-{uuid.uuid4().hex[:6]}"
            self.server = EmbeddedServer(data, persist=False)
            self.url = self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for _, proc in self.workers:
            stop_process(proc)
        self.workers.clear()
        if self.server is not None:
            data = self.server.data_dir
            self.server.stop()
            shutil.rmtree(data, ignore_errors=True)
        else:
            self.delete_prefix()

    # -- redis --
    def sync_redis(self):
        import redis

        return redis.Redis.from_url(self.url)

    def redis_version(self) -> str:
        with self.sync_redis() as r:
            info = r.info("server")
        return f"{info.get('redis_version')}"

    def server_pid(self) -> int | None:
        with self.sync_redis() as r:
            return int(r.info("server")["process_id"]) if self.private else None

    def delete_prefix(self) -> None:
        """Only ever our own prefix (a shared server is never flushed)."""
        with self.sync_redis() as r:
            batch = list(r.scan_iter(match=f"{self.prefix}*", count=1000))
            for i in range(0, len(batch), 500):
                r.delete(*batch[i:i + 500])

    def env(self, root: Path | None = None, **extra: str) -> dict[str, str]:
        env = {**os.environ, "REDIS_URL": self.url, "PYTHONPATH": str(root or ROOT)}
        env.update(extra)
        return env

    # -- workers --
    def start_worker(self, kind: str, *args: str, env: dict[str, str] | None = None,
                     wrapper: str | None = None, root: Path | None = None
                     ) -> subprocess.Popen:
        """``kind`` is ``cache`` or ``batch``; ``wrapper`` a module run instead of the CLI
        (it must call ``cachesaver_dist.cli.main`` with the same arguments); ``root``:
        the source tree to run (default: the one under test)."""
        module = wrapper or "cachesaver_dist.cli"
        log = open(_log(f"{self.study}-{kind}"), "wb")
        proc = subprocess.Popen(
            [str(OURS_PY), "-m", module, "worker", kind, "--prefix", self.prefix, *args],
            env=self.env(root, **(env or {})), stdout=log, stderr=subprocess.STDOUT,
            cwd=root or ROOT)
        proc.log_path = log.name  # type: ignore[attr-defined]
        route = "cache" if kind == "cache" else args[list(args).index("--model") + 1]
        self.workers.append((route, proc))
        return proc

    def start_pool(self, model: str) -> tuple[subprocess.Popen, subprocess.Popen]:
        """A batch worker for ``model`` (no model latency) and a cache worker, both at
        their default flags, returned once alive: (batch, cache)."""
        batch = self.start_worker("batch", "--model", model, "--sim-latency", "0")
        cache = self.start_worker("cache")
        self.wait_alive(model)
        self.wait_alive("cache")
        return batch, cache

    def wait_alive(self, route: str, count: int = 1, timeout: float = 30.0) -> None:
        from cachesaver_dist.heartbeat import alive_workers
        from cachesaver_dist.pipelines import connect
        from cachesaver_dist.protocol import Keys

        async def wait() -> None:
            redis = connect(self.url)
            try:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    for _, p in self.workers:
                        if p.poll() is not None:
                            raise RuntimeError(f"worker exited ({p.returncode}): see "
                                               f"{p.log_path}")
                    if await alive_workers(redis, Keys(self.prefix), route) >= count:
                        return
                    await asyncio.sleep(0.05)
                raise RuntimeError(f"{count} worker(s) for {route} not alive in {timeout} s")
            finally:
                await redis.aclose()

        asyncio.run(wait())

    def stop_worker(self, proc: subprocess.Popen) -> None:
        """Stop one worker and drop its heartbeat (so a successor's readiness counts)."""
        stop_process(proc)
        self.workers = [(r, p) for r, p in self.workers if p is not proc]
        with self.sync_redis() as r:
            for key in r.scan_iter(match=f"{self.prefix}workers:*", count=1000):
                gone = [m for m in r.zrange(key, 0, -1) if f"-{proc.pid}-".encode() in m]
                if gone:
                    r.zrem(key, *gone)

    def stop_workers(self) -> None:
        for _, p in list(self.workers):
            self.stop_worker(p)

    # -- server statistics (private server only: the deltas are then ours alone) --
    def own_cost(self) -> dict[str, Any]:
        """Reads/commands that a pair of snapshots adds by itself (measured with no load;
        the smallest of 3 tries)."""
        best = None
        for _ in range(3):
            a = self.info_snapshot()
            d = raw_delta(a, self.info_snapshot())
            if best is None or d["reads"] < best["reads"]:
                best = d
        return best

    def info_snapshot(self) -> dict[str, Any]:
        with self.sync_redis() as r:
            stats = r.info("stats")
            cmds = r.info("commandstats")
            mem = r.info("memory")["used_memory"]
            keys = r.dbsize()
        return {"reads": stats["total_reads_processed"], "writes": stats["total_writes_processed"],
                "memory": mem, "keys": keys,
                "commands": stats["total_commands_processed"],
                "cmd": {k.removeprefix("cmdstat_"): v["calls"] for k, v in cmds.items()},
                "usec": {k.removeprefix("cmdstat_"): v["usec"] for k, v in cmds.items()},
                "t": time.monotonic()}


def raw_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    cmd = {k: v - a["cmd"].get(k, 0) for k, v in b["cmd"].items()}
    usec = {k: v - a.get("usec", {}).get(k, 0) for k, v in b.get("usec", {}).items()}
    return {"reads": b["reads"] - a["reads"], "writes": b["writes"] - a["writes"],
            "memory": b["memory"] - a["memory"], "keys": b["keys"] - a["keys"],
            "commands": b["commands"] - a["commands"], "cmd": cmd, "usec": usec,
            "seconds": b["t"] - a["t"]}


def info_delta(a: dict[str, Any], b: dict[str, Any],
               own: dict[str, Any] | None = None) -> dict[str, Any]:
    """b - a, less ``own``: what two snapshots cost by themselves (``Stack.own_cost``)."""
    d = raw_delta(a, b)
    if own:
        for k in ("reads", "writes", "commands"):
            d[k] -= own[k]
        d["cmd"] = {k: v - own["cmd"].get(k, 0) for k, v in d["cmd"].items()}
        d["usec"] = {k: v - own.get("usec", {}).get(k, 0) for k, v in d["usec"].items()}
    d["cmd"] = {k: v for k, v in d["cmd"].items() if v}
    d["usec"] = {k: v for k, v in d["usec"].items() if k in d["cmd"]}
    return d


# --- drivers --------------------------------------------------------------------------


def start_simulator(log: Path, latency: float, env: dict[str, str] | None = None
                    ) -> tuple[subprocess.Popen, str]:
    """The package's LLM simulator (``cachesaver-dist simulator``) on a free loopback port,
    ready; its root URL (OpenAI SDKs: ``<url>/v1``). Output goes to ``log``."""
    import httpx
    from cachesaver_dist.server import _free_port

    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cachesaver_dist.cli", "simulator", "--port", str(port),
             "--latency", str(latency)], env=env, cwd=ROOT, stdout=out,
            stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"the simulator did not start: see {log}")
        time.sleep(0.1)


def run_driver(side: str, spec: dict[str, Any], *, env: dict[str, str] | None = None,
               timeout: float = 120.0, root: Path | None = None) -> dict[str, Any]:
    """Run ``bench._ours`` (ours) or ``bench._original`` in its venv; return its JSON."""
    proc = start_driver(side, spec, env=env, root=root)
    return finish_driver(proc, timeout=timeout)


def start_driver(side: str, spec: dict[str, Any], *, env: dict[str, str] | None = None,
                 root: Path | None = None) -> subprocess.Popen:
    python, module = (OURS_PY, "bench._ours") if side == "ours" else (ORIG_PY, "bench._original")
    log = open(_log(f"driver-{side}"), "wb")
    root = root or ROOT
    proc = subprocess.Popen([str(python), "-m", module], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, cwd=root,
                            env={**os.environ, **(env or {}), "PYTHONPATH": str(root)})
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    proc.log_path = log.name  # type: ignore[attr-defined]
    return proc


def finish_driver(proc: subprocess.Popen, timeout: float = 120.0) -> dict[str, Any]:
    try:
        out = proc.stdout.read() if timeout is None else _read_with_timeout(proc, timeout)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"driver timed out after {timeout} s; log {proc.log_path}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"driver failed ({proc.returncode}): "
                           f"{Path(proc.log_path).read_text()[-3000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


def _read_with_timeout(proc: subprocess.Popen, timeout: float) -> bytes:
    import threading

    chunks: list[bytes] = []
    t = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise subprocess.TimeoutExpired(proc.args, timeout)
    return chunks[0] if chunks else b""


# --- placement on the cores -------------------------------------------------------------


def server_core() -> int | None:
    """The CPU the studies place Redis and the cache worker on when they place them (the
    last one this process may use), or None where that cannot be done (no
    ``os.sched_setaffinity``, one CPU)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[-1] if len(cpus) > 1 else None


@contextlib.contextmanager
def placed(pids: Iterable[int], cpus: set[int]) -> Iterator[None]:
    """Run the processes ``pids`` on ``cpus`` only (what ``taskset -pc`` does), and as
    before afterwards. A process started meanwhile by one of them inherits the set."""
    before = {pid: os.sched_getaffinity(pid) for pid in pids}
    try:
        for pid in before:
            os.sched_setaffinity(pid, cpus)
        yield
    finally:
        for pid, was in before.items():
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(pid, was)


# --- CPU and profiles -----------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def idle_cpu(pids: dict[str, int], seconds: float = 3.0) -> dict[str, float]:
    """Percent of one core each process used over ``seconds`` of no load."""
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {k: 100 * (cpu_seconds(p) - before[k]) / wall for k, p in pids.items()}


def start_profile(pid: int, name: str, seconds: int, rate: int = 250) -> subprocess.Popen | None:
    """``py-spy record`` of one process (raw collapsed stacks); None if py-spy is missing."""
    if not PYSPY.exists():
        return None
    out = WORK / "profiles" / f"{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    proc = subprocess.Popen([str(PYSPY), "record", "--pid", str(pid), "--duration", str(seconds),
                             "--rate", str(rate), "--format", "raw", "--nonblocking",
                             "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.out_path = out  # type: ignore[attr-defined]
    return proc


def finish_profile(proc: subprocess.Popen | None, top: int = 12) -> dict[str, Any]:
    if proc is None:
        return {"error": "py-spy not installed"}
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"error": "py-spy did not finish"}
    return top_entries(proc.out_path, top)  # type: ignore[attr-defined]


def _frame(f: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)", lines merged
    m = re.match(r"(.*) \((.*?):\d+\)$", f.strip())
    if not m:
        return f.strip()
    func, path = m.groups()
    parts = path.split("/")
    for marker in ("site-packages", "lib"):
        if marker in parts:
            parts = parts[len(parts) - parts[::-1].index(marker):]
            break
    short = "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]
    return f"{func} ({short})"


_GENERIC = re.compile(r"\((asyncio/|selectors\.py|<frozen runpy>|threading\.py)|"
                      r"^(main|<module>|_run_cache_worker|_run_batch_worker|Worker\.(run|main|"
                      r"async_run)|CacheWorker\.main) ")


def _component(frame: str) -> str:
    if "(cachesaver_dist/" in frame or "(workers/" in frame:
        return "cachesaver-dist"
    if "(arq/" in frame:
        return "arq"
    if "(redis/" in frame or "_parsers/" in frame or "(asyncio/connection.py" in frame \
            or "(asyncio/client.py" in frame or "(asyncio/retry.py" in frame:
        return "redis-py"
    if "(selectors.py" in frame or "selector_events.py" in frame:
        return "socket I/O + epoll"
    if "(asyncio/" in frame:
        return "asyncio event loop"
    if "(bench/" in frame:
        return "bench driver"
    if "msgpack" in frame:
        return "msgpack"
    return "other"


def top_entries(path: Path, top: int = 12) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw output; the
    inclusive list leaves out the event loop and entry-point frames every stack has."""
    if not Path(path).exists():
        return {"error": f"no profile written ({path})"}
    self_c: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    comp: collections.Counter = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        comp[_component(frames[-1])] += n
        for f in set(frames):
            if not _GENERIC.search(f):
                incl[f] += n
    pct = lambda items: [(f, 100 * c / total) for f, c in items] if total else []  # noqa: E731
    return {"samples": total, "self": pct(self_c.most_common(top)),
            "inclusive": pct(incl.most_common(top)), "components": pct(comp.most_common())}


def profile_md(title: str, prof: dict[str, Any], top: int = 10) -> str:
    if "error" in prof:
        return f"*{title}: {prof['error']}*\n"
    rows = []
    for i in range(top):
        s = prof["self"][i] if i < len(prof["self"]) else ("", 0)
        c = prof["inclusive"][i] if i < len(prof["inclusive"]) else ("", 0)
        rows.append([f"`{s[0]}`" if s[0] else "", fmt(s[1], 1) if s[0] else "",
                     f"`{c[0]}`" if c[0] else "", fmt(c[1], 1) if c[0] else ""])
    comps = ", ".join(f"{k} {v:.0f}%" for k, v in prof.get("components", []))
    return (f"**{title}** ({prof['samples']} on-CPU samples, py-spy; self time by component: "
            f"{comps})\n\n"
            + md_table(["self (function)", "self %", "inclusive (function)", "incl %"], rows)
            + "\n")


# --- plots ----------------------------------------------------------------------------


def plot(name: str, spec: dict[str, Any]) -> str | None:
    """Render ``bench/plots/NAME.png`` with matplotlib from the tools venv; returns the
    markdown image link, or None when matplotlib is not available."""
    if not TOOLS_PY.exists():
        return None
    out = BENCH_HOME / "plots" / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "output": str(out)}
    res = subprocess.run([str(TOOLS_PY), str(BENCH_HOME / "plot.py")], input=json.dumps(spec),
                         text=True, capture_output=True, timeout=120)
    if res.returncode != 0:
        print(f"plot {name} failed: {res.stderr[-1000:]}", file=sys.stderr)
        return None
    return f"![{name}](plots/{name}.png)"
