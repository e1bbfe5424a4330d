"""Retention: the eviction check, prune (dry and real) and usage, on real Redis servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis.asyncio import Redis

from cachesaver_dist import Request, SimModel
from cachesaver_dist.prepare import prepare
from cachesaver_dist.protocol import Keys, pack, prompt_key
from cachesaver_dist.retention import check_eviction_policy
from cachesaver_dist.scripts import fill, reserve
from cachesaver_dist.server import find_server_binary
from tests.conftest import ROOT, Processes, subprocess_env
from tests.test_archive import cli, cli_json, contents, dump, record

DAY = 86400


def pkey(model: str, prompt: str) -> str:
    return prompt_key(model, {"prompt": prompt})


async def populate(url: str, keys: Keys) -> None:
    """Two models, two runs, two namespaces; a key being generated (claimed, never filled:
    no worker serves its stream); a key with one old and one new sample."""
    await record(url, keys, "r1", [Request(f"pa {i}", 2, f"a{i}", "ns1") for i in range(3)],
                 model=SimModel("pa"))
    await record(url, keys, "r2", [Request(f"pa {i}", 1, f"b{i}", "ns2") for i in range(2)]
                 + [Request("pb 0", 2, "c0", "ns2")], model=SimModel("pa"))
    await record(url, keys, "r2", [Request("pb 0", 1, "d0", "ns1")], model=SimModel("pb"))
    redis = Redis.from_url(url)
    try:
        busy = prepare(Request("busy", 2, "w", "ns1"), run="r1", route="sim:nobody",
                       model_id="sim:pa")
        await reserve(redis, keys, "client", [busy])
        aged = prepare(Request("aged", 2, "v", "ns1"), run="r1", route="sim:nobody",
                       model_id="sim:pa")
        await reserve(redis, keys, "client", [aged])
        now = time.time()
        await fill(redis, keys, aged.key, {
            0: pack({"v": 1, "data": "old", "created": now - 10 * DAY}),
            1: pack({"v": 1, "data": "new", "created": now - 1 * DAY})})
    finally:
        await redis.aclose()


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def hlen(url: str, name: str) -> int:
    client = sync_redis.Redis.from_url(url)
    try:
        return int(client.hlen(name))
    finally:
        client.close()


SELECTORS = {
    "model": ("--model", "sim:pa"),
    "older-than": ("--older-than", "5"),
    "model-older-than": ("--model", "sim:pb", "--older-than", "5"),
    "run": ("--run", "r1"),
    "namespace": ("--namespace", "ns2"),
    "run-namespace": ("--run", "r2", "--namespace", "ns1"),
}


@pytest.mark.parametrize("selector", list(SELECTORS))
async def test_prune_dry_run_changes_nothing_and_prune_deletes_what_it_said(
        redis_url, keys, selector):
    await populate(redis_url, keys)
    p = keys.prefix
    args = SELECTORS[selector]
    before_dump, before = dump(redis_url, p, with_ttl=True), contents(redis_url, p)
    dry = cli_json(redis_url, p, "prune", *args, "--dry-run")
    assert dump(redis_url, p, with_ttl=True) == before_dump  # not one byte changed
    real = cli_json(redis_url, p, "prune", *args)
    assert {**dry, "dry_run": False} == real
    after = contents(redis_url, p)
    gone = changed(before, after)
    samples_before = sum(len(v) for k, v in before.items() if k.startswith(f"{p}s:"))
    samples_after = sum(len(v) for k, v in after.items() if k.startswith(f"{p}s:"))
    assert samples_before - samples_after == real["samples"]

    pa = [pkey("sim:pa", f"pa {i}") for i in range(3)] + [pkey("sim:pa", "pb 0")]
    aged, busy = pkey("sim:pa", "aged"), pkey("sim:pa", "busy")
    if selector == "model":
        expected = {f"{p}{f}:{k}" for k in [*pa, aged] for f in ("s", "g")}
        assert gone == expected | {f"{p}keys:sim:pa"}
        assert after[f"{p}keys:sim:pa"] == [busy.encode()]  # the busy key stays indexed
        assert (real["prompt_keys"], real["skipped_busy"], real["redis_keys"]) == (5, 1, 10)
        assert real["bytes"] > 0
    elif selector == "older-than":
        assert gone == {f"{p}s:{aged}", f"{p}g:{aged}"}
        assert after[f"{p}s:{aged}"].keys() == {b"1"}
        assert after[f"{p}g:{aged}"][b"x0"] == b"1"  # released: generated again if asked
        assert (real["samples"], real["prompt_keys"], real["redis_keys"]) == (1, 1, 0)
    elif selector == "model-older-than":
        assert gone == set() and real["samples"] == 0  # pb's samples are all new
    elif selector == "run":
        assert gone == {f"{p}u:r1", f"{p}m:r1", f"{p}stats:r1", f"{p}runs"}
        assert b"r1" not in after[f"{p}runs"] and real["redis_keys"] == 3
        assert real["samples"] == 0
    elif selector == "namespace":
        assert gone == {f"{p}u:r2", f"{p}m:r2"}
        assert all(not k.endswith(b"ns2") for k in after[f"{p}u:r2"])
        assert real["fields"] == 2 * 3  # 3 counters and 3 manifest entries
    else:
        assert gone == {f"{p}u:r2", f"{p}m:r2"} and real["fields"] == 2
        assert all(not k.endswith(b"ns1") for k in after[f"{p}u:r2"])


async def test_a_pruned_key_is_generated_again_and_prune_refuses_bad_selectors(redis_url,
                                                                              keys):
    await populate(redis_url, keys)
    assert cli(redis_url, keys.prefix, "prune", "--older-than", "5").returncode == 0
    model = SimModel("pa")
    from cachesaver_dist import OnlineAPI

    async with OnlineAPI(model, cache=redis_url, prefix=keys.prefix) as api:
        got = await api.request(Request("aged", 2, "again", "fresh"))
    assert model.calls == [("aged", 1)] and got.data[1] == "new"  # only index 0 regenerated
    for bad in (("--model", "m", "--run", "r"), ()):  # usage errors: status 2, as argparse's
        done = cli(redis_url, keys.prefix, "prune", *bad)
        assert done.returncode == 2 and "cachesaver-dist: prune: give one of" in done.stderr, bad
    done = cli(redis_url, keys.prefix, "prune", "--older-than", "-1")
    assert done.returncode == 2 and "--older-than: must be a number of days" in done.stderr
    for typo, named in ((("--model", "sim:pz"), "no prompt keys of model 'sim:pz'"),
                        (("--run", "r9", "--dry-run"), "no run 'r9'"),
                        (("--run", "bad run"), "run id 'bad run' is not valid"),
                        (("--namespace", "nsX"), "no run used namespace 'nsX'"),
                        (("--run", "r1", "--namespace", "nsX"),
                         "run 'r1' did not use namespace 'nsX'")):
        done = cli(redis_url, keys.prefix, "prune", *typo)  # a typo is not a success
        # not found: status 1, as drop-run's, fork's and export's (2 is for usage errors)
        assert done.returncode == 1 and named in done.stderr, (typo, done.stderr)
    assert cli(redis_url, keys.prefix, "prune", "--run", "r1", "--dry-run").returncode == 0


async def test_usage_lists_models_and_runs(redis_url, keys):
    await populate(redis_url, keys)
    report = cli_json(redis_url, keys.prefix, "usage")
    models = {m["model"]: m for m in report["models"]}
    assert set(models) == {"sim:pa", "sim:pb"}
    assert (models["sim:pa"]["prompt_keys"], models["sim:pa"]["samples"]) == (6, 3 * 2 + 2 + 2)
    assert (models["sim:pb"]["prompt_keys"], models["sim:pb"]["samples"]) == (1, 1)
    assert all(m["bytes"] > 0 for m in models.values())
    runs = {r["run"]: r for r in report["runs"]}
    assert set(runs) == {"r1", "r2"}
    assert (runs["r1"]["counters"], runs["r1"]["manifest"]) == (5, 3)
    assert (runs["r2"]["counters"], runs["r2"]["manifest"]) == (4, 4)
    assert report["samples"]["samples"] == 11
    assert report["server"]["maxmemory_policy"] == "noeviction"
    table = cli(redis_url, keys.prefix, "usage")
    assert table.returncode == 0 and "sim:pa" in table.stdout and "r2" in table.stdout


# --- the eviction check -------------------------------------------------------------------


@pytest.fixture
def lru_server(tmp_path: Path) -> Iterator[str]:
    """A private server that evicts: maxmemory-policy allkeys-lru."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [find_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--maxmemory", "100mb",
         "--maxmemory-policy", "allkeys-lru"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = sync_redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except sync_redis.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None, "no redis-server"
            time.sleep(0.05)
    client.close()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def wait_for_log(proc: subprocess.Popen, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = Processes.logs(proc)
        if text in log:
            return log
        assert proc.poll() is None, log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the worker's log: {Processes.logs(proc)}")


@pytest.mark.processes
def test_workers_warn_against_a_server_that_evicts(lru_server, redis_url, keys, tmp_path):
    evicting = Processes(lru_server, keys, tmp_path)
    normal = Processes(redis_url, keys, tmp_path)
    try:
        cache = evicting.cli("worker", "cache", name="lru-cache")
        batch = evicting.cli("worker", "batch", "--model", "sim:x", name="lru-batch")
        ok = normal.cli("worker", "cache", name="ok-cache")
        for proc in (cache, batch):
            log = wait_for_log(proc, "not 'noeviction'")
            assert "maxmemory-policy is 'allkeys-lru'" in log and "104857600 bytes" in log
        assert "WARNING" not in wait_for_log(ok, "maxmemory-policy is noeviction")
    finally:
        evicting.stop_all()
        normal.stop_all()


async def test_the_check_is_skipped_when_config_get_is_refused(lru_server):
    admin = sync_redis.Redis.from_url(lru_server)
    admin.execute_command("ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all",
                          "-config")
    admin.close()
    limited = Redis.from_url(lru_server.replace("redis://", "redis://limited:pw@"))
    try:
        message = await check_eviction_policy(limited)
    finally:
        await limited.aclose()
    assert message.startswith("eviction check skipped"), message
    assert "noperm" in message.lower() or "permission" in message.lower(), message
    plain = Redis.from_url(lru_server)
    try:
        assert "'allkeys-lru', not 'noeviction'" in await check_eviction_policy(plain)
    finally:
        await plain.aclose()


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="no pseudo-terminals")
async def test_prune_shows_its_progress_on_a_terminal(redis_url, keys):
    """docs/archive.md: a progress bar shows on a terminal. ``prune --older-than`` reads
    every sample of every prompt key, minutes on a large cache: it says how far it is."""
    await populate(redis_url, keys)
    main, side = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachesaver_dist.cli", "prune", "--older-than", "5",
         "--dry-run", "--prefix", keys.prefix], env=subprocess_env(redis_url),
        stdout=subprocess.PIPE, stderr=side, cwd=ROOT)
    os.close(side)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal's other side closed: the process ended
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert b"would delete 1 sample(s)" in out
    assert b"prune: prompt keys" in shown and b"keys checked" in shown, shown
