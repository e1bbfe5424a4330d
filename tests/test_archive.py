"""Export and import (docs/archive.md) on real Redis servers, through the CLI.

The round trip of issue 10: a run recorded by 3 client processes against a worker pool on
one server is exported, imported into a fresh server, and replayed there by 3 other client
processes with another arrival order: every request id gets the same samples, and the
model is not called (no worker even runs there).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import redis as sync_redis
from redis.asyncio import Redis

from cachesaver_dist import OnlineAPI, Request, SimModel
from cachesaver_dist.archive_format import FORMAT, read_records
from cachesaver_dist.errors import ArchiveError
from cachesaver_dist.protocol import Keys, decode_spec, prompt_key
from cachesaver_dist.server import EmbeddedServer
from tests.conftest import ROOT, subprocess_env
from tests.support import COUNTER_ENV

MODEL = "tests.support:counting_model"


# --- helpers (used by test_runs.py and test_retention.py too) -------------------------------


def cli(url: str, prefix: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``cachesaver-dist ARGS --prefix PREFIX`` against ``url``."""
    return subprocess.run(
        [sys.executable, "-m", "cachesaver_dist.cli", *args, "--prefix", prefix],
        env=subprocess_env(url, COLUMNS="200"), capture_output=True, text=True,
        timeout=timeout, cwd=ROOT)


def cli_json(url: str, prefix: str, *args: str) -> Any:
    done = cli(url, prefix, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def dump(url: str, prefix: str, *, with_ttl: bool = False) -> dict[str, Any]:
    """Every key under ``prefix`` -> its full content (``DUMP``: type, encoding, values);
    with ``with_ttl``, also whether it expires."""
    client = sync_redis.Redis.from_url(url)
    try:
        out: dict[str, Any] = {}
        for name in sorted(client.scan_iter(match=f"{prefix}*", count=1000)):
            value = client.dump(name)
            out[name.decode()] = (value, client.pttl(name) > 0) if with_ttl else value
        return out
    finally:
        client.close()


def contents(url: str, prefix: str) -> dict[str, Any]:
    """Every key under ``prefix`` -> its values as Python data (sorted zset members without
    scores: an import refreshes the run index's times)."""
    client = sync_redis.Redis.from_url(url)
    try:
        out: dict[str, Any] = {}
        for name in client.scan_iter(match=f"{prefix}*", count=1000):
            kind = client.type(name).decode()
            out[name.decode()] = {
                "hash": lambda n: client.hgetall(n),
                "set": lambda n: sorted(client.smembers(n)),
                "zset": lambda n: sorted(client.zrange(n, 0, -1)),
                "string": lambda n: client.get(n),
                "stream": lambda n: client.xlen(n),
                "list": lambda n: client.lrange(n, 0, -1),
            }[kind](name)
        return out
    finally:
        client.close()


async def record(url: str, keys: Keys, run: str, requests: list[Request],
                 model: Any = None) -> dict[str, list]:
    """Serve ``requests`` in one process with an in-process model, keeping a manifest."""
    async with OnlineAPI(model or SimModel("archive"), cache=url, prefix=keys.prefix, run=run,
                         manifest=True) as api:
        got = await asyncio.gather(*(api.request(r) for r in requests))
    return {f"{r.namespace}/{r.request_id}": g.data for r, g in zip(requests, got)}


@pytest.fixture
def fresh_server(tmp_path: Path):
    """A second, empty Redis server: the archive's destination."""
    server = EmbeddedServer(tmp_path / "fresh", persist=False)
    url = server.start()
    yield url
    server.stop()


def clients(url: str, prefix: str, run: str, mode: str, seed: int, parts: int = 3
            ) -> dict[str, list]:
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.replay_proc", prefix, run, MODEL, mode, str(part),
         str(parts), str(seed)],
        env=subprocess_env(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        for part in range(parts)]
    merged: dict[str, list] = {}
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
        got = json.loads(out)
        assert not set(got) & set(merged)
        merged.update(got)
    return merged


# --- the round trip -------------------------------------------------------------------------


@pytest.mark.processes
def test_round_trip_export_import_replay_in_3_processes(redis_url, keys, processes, tmp_path,
                                                        fresh_server):
    counter = f"{keys.prefix}test-counter"
    processes.cli("worker", "cache", name="cache")
    processes.cli("worker", "batch", "--model", MODEL, name="batch",
                  env={COUNTER_ENV: counter})
    processes.wait_alive("cache")
    processes.wait_alive(MODEL)
    recorded = clients(redis_url, keys.prefix, "paper-run", "record", seed=1)
    assert len(recorded) == 36
    source = sync_redis.Redis.from_url(redis_url)
    calls = int(source.hget(counter, "__calls__"))
    assert calls > 0
    processes.stop_all()  # no worker from here on

    archive = tmp_path / "paper-run.csd.gz"
    done = cli(redis_url, keys.prefix, "export", str(archive), "--run", "paper-run")
    assert done.returncode == 0, done.stderr
    assert "36 manifest entries" in done.stdout

    target = Keys("imported:")
    done = cli(fresh_server, target.prefix, "import", str(archive))
    assert done.returncode == 0, done.stderr
    assert " 0 disagreeing" in done.stdout

    replayed = clients(fresh_server, target.prefix, "paper-run", "replay", seed=2)
    assert replayed == recorded  # every request id, the same samples, bit for bit
    fresh = sync_redis.Redis.from_url(fresh_server)
    try:
        names = [n.decode() for n in fresh.scan_iter(count=1000)]
        assert not [n for n in names if ":llm:" in n or ":queue:" in n], names  # no work
        assert all(n.startswith(target.prefix) for n in names)
    finally:
        fresh.close()
    assert int(source.hget(counter, "__calls__")) == calls  # 0 model calls since recording
    source.close()


# --- merge semantics ------------------------------------------------------------------------


REQUESTS = [Request(f"archive prompt {i % 4}", 1 + i % 2, f"r{i}", f"ns{i % 2}")
            for i in range(12)]


async def test_reimport_is_idempotent_and_a_disagreeing_sample_is_reported(
        redis_url, keys, tmp_path, fresh_server):
    await record(redis_url, keys, "exp", REQUESTS)
    archive = tmp_path / "exp.gz"
    assert cli(redis_url, keys.prefix, "export", str(archive), "--run", "exp").returncode == 0
    target = "merge:"
    first = cli_json(fresh_server, target, "import", str(archive))
    assert first["written"] == first["samples"] > 0 and first["present"] == 0
    after_first = contents(fresh_server, target)

    again = cli_json(fresh_server, target, "import", str(archive))
    assert (again["written"], again["present"], again["disagreeing"]) == (0, first["samples"], 0)
    assert (again["counters_written"], again["manifest_written"]) == (0, 0)
    assert contents(fresh_server, target) == after_first  # same result, nothing duplicated

    client = sync_redis.Redis.from_url(fresh_server)
    key = prompt_key("sim:archive", {"prompt": "archive prompt 0"})
    client.hset(f"{target}s:{key}", "0", b"a different sample")
    done = cli(fresh_server, target, "import", str(archive))
    assert done.returncode == 0, done.stderr
    assert "1 disagreeing" in done.stdout
    assert f"disagreeing sample: key {key} index 0" in done.stdout
    assert client.hget(f"{target}s:{key}", "0") == b"a different sample"  # never overwritten
    assert "a replay of run(s) exp here serves the samples stored here" in done.stderr
    client.close()
    folder = cli(fresh_server, target, "import", str(tmp_path))
    assert folder.returncode == 1 and "is a directory: name the archive file to read" \
        in folder.stderr, folder.stderr


async def test_import_merges_append_only_and_raises_the_mark(redis_url, keys, tmp_path,
                                                            fresh_server):
    """A key with other samples on the target keeps them; the archive fills the rest, the
    mark covers every imported index, and a request then continues after them."""
    await record(redis_url, keys, "exp", [Request("merge me", 3, "a", "ns")])
    archive = tmp_path / "merge.gz"
    assert cli(redis_url, keys.prefix, "export", str(archive)).returncode == 0
    target = Keys("target:")
    key = prompt_key("sim:archive", {"prompt": "merge me"})
    client = sync_redis.Redis.from_url(fresh_server)
    source = sync_redis.Redis.from_url(redis_url)
    try:
        client.hset(target.samples(key), "1", source.hget(keys.samples(key), "1"))
        client.hset(target.generation(key), "mark", 2)
        client.hset(target.generation(key), "x0", 1)  # released on the target
        result = cli_json(fresh_server, target.prefix, "import", str(archive))
        assert (result["written"], result["present"]) == (2, 1)
        assert client.hgetall(target.samples(key)) == source.hgetall(keys.samples(key))
        assert client.hget(target.generation(key), "mark") == b"3"
        assert not client.hexists(target.generation(key), "x0")  # filled: not released
        spec = decode_spec(client.hget(target.generation(key), "spec"))
        assert (spec.model_id, spec.fields) == ("sim:archive", {"prompt": "merge me"})
        assert client.smembers(target.model_keys("sim:archive")) == {key.encode()}
    finally:
        client.close()
        source.close()
    model = SimModel("archive")
    async with OnlineAPI(model, cache=fresh_server, prefix=target.prefix) as api:
        got = await api.request(Request("merge me", 4, "b", "other"))
    assert model.calls == [("merge me", 1)]  # only index 3 is new
    assert [m["index"] for m in got.metadata] == [0, 1, 2, 3]


async def test_a_corrupted_archive_is_refused_before_anything_is_written(
        redis_url, keys, tmp_path, fresh_server):
    await record(redis_url, keys, "exp", REQUESTS)
    good = tmp_path / "good.gz"
    assert cli(redis_url, keys.prefix, "export", str(good), "--run", "exp").returncode == 0
    data = good.read_bytes()

    flipped = tmp_path / "flipped.gz"  # a byte of the compressed stream
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0x40
    flipped.write_bytes(bytes(damaged))

    # a byte of a sample inside intact gzip: only the SHA-256 can tell
    raw = bytearray(gzip.decompress(data))
    at = raw.index(b"archive prompt") if b"archive prompt" in raw else len(raw) // 2
    raw[at] ^= 0x01
    rehashed = tmp_path / "rehashed.gz"
    rehashed.write_bytes(gzip.compress(bytes(raw)))

    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(gzip.decompress(data)[:-60]))

    for bad, reason in ((flipped, ""), (rehashed, "SHA-256 mismatch"),
                        (truncated, "truncated")):
        done = cli(fresh_server, "victim:", "import", str(bad))
        assert done.returncode == 1, (bad, done.stdout)
        assert reason in done.stderr and "copy the archive again, or export it anew" \
            in done.stderr, done.stderr
        assert dump(fresh_server, "victim:") == {}  # nothing written
        with pytest.raises(ArchiveError):
            list(read_records(bad))
    assert cli(fresh_server, "victim:", "import", str(good), "--verify").returncode == 0
    assert dump(fresh_server, "victim:") == {}  # --verify writes nothing either

    for where, reason in ((tmp_path / "no" / "such" / "x.gz", "is not a directory: create it"),
                          (tmp_path, "is a directory: name the archive file")):
        done = cli(redis_url, keys.prefix, "export", str(where), "--force")
        assert done.returncode == 1 and reason in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


async def test_archive_format_header_records_trailer(redis_url, keys, tmp_path):
    await record(redis_url, keys, "exp", REQUESTS)
    path = tmp_path / "fmt.gz"
    assert cli(redis_url, keys.prefix, "export", str(path), "--run", "exp").returncode == 0
    objects = list(msgpack.Unpacker(gzip.open(path), raw=False, strict_map_key=False))
    header, *records, trailer = objects
    assert (header["t"], header["format"], header["version"]) == ("header", FORMAT, 1)
    assert header["selection"]["runs"] == ["exp"] and header["prefix"] == keys.prefix
    assert trailer["t"] == "trailer" and trailer["records"] == len(records) + 1
    kinds = [r["t"] for r in records]
    assert kinds == sorted(kinds, key=["key", "counters", "manifest"].index)  # keys first
    key_records = [r for r in records if r["t"] == "key"]
    assert trailer["samples"] == sum(len(r["samples"]) for r in key_records)
    assert trailer["keys"] == len({r["key"] for r in key_records}) == 4
    for r in key_records:
        assert r["model_id"] == r["spec"]["model_id"] == "sim:archive"
        assert r["spec"]["fields"]["prompt"].startswith("archive prompt")
        assert all(isinstance(i, int) and isinstance(s, bytes) for i, s in r["samples"].items())
    [manifest] = [r for r in records if r["t"] == "manifest"]
    assert len(manifest["entries"]) == len(REQUESTS)
    assert {tuple(e[:2]) for e in manifest["entries"]} == {(r.namespace, r.request_id)
                                                          for r in REQUESTS}


async def test_export_selects_by_model_namespace_and_key(redis_url, keys, tmp_path):
    await record(redis_url, keys, "run-a", REQUESTS)
    await record(redis_url, keys, "run-b", [Request("other model prompt", 2, "z", "solo")],
                 model=SimModel("other"))

    def exported(*selectors: str) -> list[dict]:
        path = tmp_path / f"sel{len(list(tmp_path.iterdir()))}.gz"
        done = cli(redis_url, keys.prefix, "export", str(path), *selectors)
        assert done.returncode == 0, done.stderr
        return list(read_records(path))[1:]

    everything = exported()
    assert {r["model_id"] for r in everything} == {"sim:archive", "sim:other"}
    by_model = exported("--model", "sim:other")
    assert [(r["model_id"], len(r["samples"])) for r in by_model] == [("sim:other", 2)]
    by_ns = exported("--namespace", "ns1")  # ns1 asked prompts 1 and 3, 3 times n=2 each
    assert {r["spec"]["fields"]["prompt"] for r in by_ns} == {"archive prompt 1",
                                                              "archive prompt 3"}
    assert all(sorted(r["samples"]) == list(range(6)) for r in by_ns)
    assert not [r for r in by_ns if r["t"] != "key"]  # no run selected: no run state
    key = prompt_key("sim:archive", {"prompt": "archive prompt 2"})
    by_key = exported("--key", key)
    assert [r["key"] for r in by_key] == [key]
    run_b = exported("--run", "run-b", "--no-run-state")
    assert [r["model_id"] for r in run_b] == ["sim:other"]
    both = exported("--run", "run-a", "--model", "sim:other")  # filters combine
    assert [r["t"] for r in both] == ["counters", "manifest"]
    assert cli(redis_url, keys.prefix, "export", str(tmp_path / "sel1.gz")).returncode == 1
    missing = cli(redis_url, keys.prefix, "export", str(tmp_path / "x.gz"), "--run", "nope")
    assert missing.returncode == 1 and "no counters" in missing.stderr
    typo = cli(redis_url, keys.prefix, "export", str(tmp_path / "y.gz"), "--model", "sim:othr")
    assert typo.returncode == 1 and "no prompt keys of model 'sim:othr'" in typo.stderr
    nokey = "0" * 32  # a prompt key, with no samples
    for selector, named in ((("--namespace", "ns9"), "no run used namespace(s) 'ns9'"),
                            (("--key", "deadbeef"), "--key 'deadbeef' is not a prompt key"),
                            (("--key", nokey), f"--key '{nokey}': no samples under prefix "
                                               f"{keys.prefix!r} (redis-cli --scan --pattern "
                                               f"'{keys.samples('*')}' lists the keys"),
                            (("--key", key, "--key", nokey), f"--key '{nokey}': no samples")):
        typo = cli(redis_url, keys.prefix, "export", str(tmp_path / "y.gz"), *selector)
        assert typo.returncode == 1 and named in typo.stderr, typo.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("y.gz")]  # nor a .partial


async def test_export_of_a_run_says_which_samples_it_was_handed_are_not_stored(
        redis_url, keys, redis, tmp_path):
    """A run exported while a request of it waits for its samples (or after they failed)
    gives an archive that cannot replay that request: the export says so."""
    await record(redis_url, keys, "half", REQUESTS)
    done = cli(redis_url, keys.prefix, "export", str(tmp_path / "whole.gz"), "--run", "half")
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
    # a request of the run claims 3 samples nobody generates yet (no worker serves it)
    api = OnlineAPI("sim:unserved", cache=redis_url, prefix=keys.prefix, run="half",
                    manifest=True, direct=True, request_timeout=30)
    await api.start()
    waiting = asyncio.ensure_future(api.request(Request("archive prompt 9", 3, "late", "ns0")))
    for _ in range(200):
        if await redis.hlen(keys.usage("half")) > 4:  # 4 (prompt key, namespace) counters before
            break
        await asyncio.sleep(0.01)
    waiting.cancel()
    await api.close(give_up=True)
    path = tmp_path / "partial.gz"
    done = cli(redis_url, keys.prefix, "export", str(path), "--run", "half")
    assert done.returncode == 0, done.stderr
    assert "warning: 3 sample(s) the selected run(s) were handed are not stored" in done.stderr
    assert json.loads(cli(redis_url, keys.prefix, "export", str(path), "--run", "half",
                          "--force", "--json").stdout)["missing"] == 3


# --- the archive file: OS errors ------------------------------------------------------------


async def test_an_archive_path_that_cannot_be_written_or_read_is_one_clear_line(
        redis_url, keys, tmp_path):
    """An OS error on the archive file (no such directory under /proc, a part of the path
    that is a file, a name too long) is one line naming the path, the error and what to do,
    status 1: no traceback, and nothing left behind."""
    await record(redis_url, keys, "os", REQUESTS[:2])
    (tmp_path / "out.gz.partial").mkdir()  # where the export writes first: cannot be opened
    (tmp_path / "file").write_text("not a directory")
    long_name = str(tmp_path / ("x" * 300 + ".gz"))
    for argv, said in (
            (["export", str(tmp_path / "out.gz")], f"cannot write {tmp_path / 'out.gz'}: Is a "
                                                   "directory (at "),
            (["export", long_name], f"cannot write {long_name}: File name too long"),
            (["import", str(tmp_path / "file" / "x.gz")], f"cannot read "
                                                          f"{tmp_path / 'file' / 'x.gz'}: Not a "
                                                          "directory: check the path"),
            (["import", long_name], f"cannot read {long_name}: File name too long"),
            *([(["export", "/proc/x.gz"], "cannot write /proc/x.gz: No such file or directory")]
              if Path("/proc/self").is_dir() else [])):
        done = cli(redis_url, keys.prefix, *argv)
        assert done.returncode == 1, (argv, done.stderr)
        assert done.stderr.startswith(f"cachesaver-dist: {said}"), (argv, done.stderr)
        assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert "name a file in a directory you can write to" in cli(
        redis_url, keys.prefix, "export", str(tmp_path / "out.gz")).stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "out.gz.partial"]


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no named pipes")
async def test_export_force_refuses_a_path_that_is_not_a_regular_file(redis_url, keys,
                                                                       tmp_path):
    """``export --force`` onto a pipe (or a device: ``/dev/null`` as root) is refused: the
    archive is renamed over FILE, which would replace the device or pipe with a file."""
    import os
    import stat

    await record(redis_url, keys, "fifo", REQUESTS[:2])
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    done = cli(redis_url, keys.prefix, "export", str(fifo), "--run", "fifo", "--force")
    assert done.returncode == 1, done.stdout
    assert done.stderr == (f"cachesaver-dist: {fifo} is not a regular file (a device, a pipe, "
                           "a socket): name the archive file to write\n")
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # still the pipe
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


async def test_import_from_a_pipe_is_refused_not_called_truncated(redis_url, keys,
                                                                  tmp_path):
    """``cat FILE | import /dev/stdin``: the archive is read twice (checked whole, then
    merged) and a pipe gives its bytes once. The message says so, not that an intact
    archive is truncated and should be copied again; nothing is written."""
    await record(redis_url, keys, "piped", REQUESTS[:2])
    path = tmp_path / "piped.gz"
    assert cli(redis_url, keys.prefix, "export", str(path), "--run", "piped").returncode == 0
    target = keys.prefix + "into:"
    done = subprocess.run(
        [sys.executable, "-m", "cachesaver_dist.cli", "import", "/dev/stdin", "--prefix",
         target], env=subprocess_env(redis_url), input=path.read_bytes(), capture_output=True,
        timeout=120, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr.decode() == (
        "cachesaver-dist: /dev/stdin is not a regular file (a pipe, a device): import reads "
        "the archive twice, checking it whole before it writes anything; save it to a file "
        "first (--verify alone reads it once)\n")
    assert dump(redis_url, target) == {}
    done = subprocess.run(
        [sys.executable, "-m", "cachesaver_dist.cli", "import", "/dev/stdin", "--verify"],
        env=subprocess_env(redis_url), input=path.read_bytes(), capture_output=True,
        timeout=120, cwd=ROOT)
    assert done.returncode == 0 and b"/dev/stdin: intact" in done.stdout, done.stderr


async def test_a_full_disk_mid_export_is_an_archive_error_and_leaves_no_file(
        redis_url, redis, keys, tmp_path, monkeypatch):
    import errno

    from cachesaver_dist.archive import Selection, export

    await record(redis_url, keys, "full", REQUESTS[:2])
    writes = []

    def full(self, data):
        writes.append(len(data))
        if len(writes) > 1:  # the header goes in, the first key record does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)

    monkeypatch.setattr(gzip.GzipFile, "write", full)
    path = tmp_path / "full.gz"
    with pytest.raises(ArchiveError, match=f"cannot write {path}: No space left on device: "
                                           "name a file in a directory you can write to"):
        await export(redis, keys, path, Selection(runs=["full"]))
    assert list(tmp_path.iterdir()) == []  # the partial file was removed


def test_an_unreadable_archive_is_not_called_damaged(tmp_path):
    """Opening the file fails (here: a directory): the message says so and what to do, not
    'corrupt; copy the archive again'."""
    with pytest.raises(ArchiveError, match=f"cannot read {tmp_path}: Is a directory: check "
                                           "the path, and that you may read the file"):
        list(read_records(tmp_path))


async def test_sigterm_mid_export_removes_the_unfinished_file(tmp_path, keys):
    """``kill`` (SIGTERM: a batch system's time limit) during an export: it stops with
    status 143 and leaves no ``.partial`` file behind, as on an error. The server is
    frozen (SIGSTOP) once the export has begun, so the signal lands mid-export."""
    import os
    import signal
    import time

    from cachesaver_dist.scripts import fill

    server = EmbeddedServer(tmp_path / "frozen", persist=False)
    url = server.start()
    pid = server._proc.pid
    out = tmp_path / "out"
    out.mkdir()
    try:
        await record(url, keys, "big", REQUESTS[:1])
        client = Redis.from_url(url)
        try:  # enough prompt keys that the export takes a while
            for i in range(0, 3000, 500):
                await asyncio.gather(*(fill(client, keys, f"{k:032x}", {0: b"\x81\xa4data\xa1x"})
                                       for k in range(i, i + 500)))
        finally:
            await client.aclose()
        export = subprocess.Popen(
            [sys.executable, "-m", "cachesaver_dist.cli", "export", str(out / "a.gz"),
             "--prefix", keys.prefix], env=subprocess_env(url), cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not (out / "a.gz.partial").exists():
            assert export.poll() is None and time.monotonic() < deadline, \
                export.communicate()[1].decode()[-2000:]
            await asyncio.sleep(0.002)
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.2)
            export.send_signal(signal.SIGTERM)
            _, err = await asyncio.to_thread(export.communicate, timeout=15)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert export.returncode == 143, err.decode()[-2000:]
        assert "Traceback" not in err.decode(), err.decode()[-2000:]
        assert list(out.iterdir()) == []  # neither the archive nor its .partial
    finally:
        server.stop()
