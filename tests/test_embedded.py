"""The embedded default: no Redis configured, a private server that keeps its data."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cachesaver_dist import OnlineAPI, Request, SimModel
from tests.conftest import ROOT

pytestmark = pytest.mark.processes


@pytest.fixture
def no_redis_env(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_no_redis_configured_works_and_keeps_data(no_redis_env, tmp_path):
    model = SimModel("embedded")
    async with OnlineAPI(model, data_dir=tmp_path) as first:
        a = await first.request(Request("kept?", 2, "1", "ns"))
    assert not (tmp_path / "server.json").exists()  # the server was stopped
    async with OnlineAPI(model, data_dir=tmp_path) as second:
        b = await second.request(Request("kept?", 2, "1", "ns"))
    assert b.data == a.data and b.cached == [True, True]
    assert model.calls == [("kept?", 2)]


KILLED_RUN = """
import asyncio, sys
from cachesaver_dist import OnlineAPI, Request, SimModel
async def main():
    api = OnlineAPI(SimModel("embedded"), data_dir=sys.argv[1])
    r = await api.request(Request("survives a kill", 1, "1", "ns"))
    print(r.data[0], flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


async def test_killed_runs_server_is_cleaned_up_by_the_next(no_redis_env, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(CACHESAVER_NO_PDEATHSIG="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        text = proc.stdout.readline().decode().strip()
        assert text, proc.stderr.read().decode()[-2000:]
        stale_pid = json.loads((tmp_path / "server.json").read_text())["pid"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _alive(stale_pid)  # left behind by the killed run
    model = SimModel("embedded")
    async with OnlineAPI(model, data_dir=tmp_path) as api:
        r = await api.request(Request("survives a kill", 1, "1", "ns"))
        assert not _alive(stale_pid)
    assert r.data == [text] and r.cached == [True]
    assert model.calls == []


def test_demo_command_runs_on_the_embedded_default(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["COLUMNS"] = "120"
    cmd = [sys.executable, "-m", "cachesaver_dist.cli", "demo", "--puzzles", "3",
           "--latency", "0.01"]
    outputs = []
    for _ in range(2):
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        outputs.append(done.stdout.decode())
    rows = [re.findall(r"│ (pass[^│]*?)\s+│\s+(\d+) │\s+(\d+) │\s+(\d+) │", out)
            for out in outputs]
    first_run, second_run = rows
    assert int(first_run[0][2]) > 0, outputs[0]  # pass 1 generated samples
    assert int(first_run[1][2]) == 0 and int(first_run[1][3]) > 0  # pass 2 from cache
    assert first_run[2][0].startswith("pass 3") and int(first_run[2][2]) == 0  # direct
    assert first_run[2][3] == first_run[1][3]  # the same samples served from cache
    assert all(int(r[2]) == 0 for r in second_run), outputs[1]  # data kept across runs
    assert (tmp_path / ".cachesaver" / "appendonlydir").is_dir()  # persisted where it ran


@pytest.mark.parametrize("first_to_stop", ["owner", "other"])
async def test_two_clients_of_one_process_share_the_server_until_the_last_stops(
        no_redis_env, tmp_path, first_to_stop):
    """Two pipelines without a URL in one process use one server; closing either leaves
    it serving the other, and it stops with the last."""
    home = tmp_path / "home"
    a = OnlineAPI(SimModel("share-a"), data_dir=home)
    b = OnlineAPI(SimModel("share-b"), data_dir=home)
    await a.request(Request("p", 1, "a", "ns"))
    await b.request(Request("p", 1, "b", "ns"))
    assert a._server.owner and not b._server.owner and a._url == b._url
    pid = json.loads((home / "server.json").read_text())["pid"]
    first, last = (a, b) if first_to_stop == "owner" else (b, a)
    await first.close()
    assert _alive(pid)
    got = await asyncio.wait_for(last.request(Request("q", 1, "c", "ns")), 10)
    assert got.cached == [False]
    await last.close()
    assert not _alive(pid) and not (home / "server.json").exists()


OWNER_RUN = """
import asyncio, sys
from cachesaver_dist import OnlineAPI, Request, SimModel
async def main():
    async with OnlineAPI(SimModel("embedded"), data_dir=sys.argv[1]) as api:
        r = await api.request(Request("owner's", 1, "1", "ns"))
        print(r.data[0], flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # until the test says: end
asyncio.run(main())
"""


async def test_a_process_using_anothers_server_goes_on_after_that_one_ends(no_redis_env,
                                                                            tmp_path):
    """Two scripts run side by side on the default data dir: the second uses the server
    the first started; when the first ends (and stops it), the second goes on."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONPATH"] = str(ROOT)
    owner = subprocess.Popen([sys.executable, "-c", OWNER_RUN, str(tmp_path)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        text = owner.stdout.readline().decode().strip()
        assert text, owner.stderr.read().decode()[-2000:]
        model = SimModel("embedded")
        async with OnlineAPI(model, data_dir=tmp_path, request_timeout=20) as api:
            before = await api.request(Request("guest's", 1, "1", "ns"))
            assert not api._server.owner
            owner.communicate(b"end\n", timeout=30)
            assert owner.returncode == 0
            again = await asyncio.wait_for(api.request(Request("guest's", 1, "1", "ns2")), 15)
            mine = await asyncio.wait_for(api.request(Request("owner's", 1, "2", "ns")), 15)
        assert again.data == before.data and again.cached == [True]
        assert mine.data == [text] and mine.cached == [True]  # its samples are kept
        assert not (tmp_path / "server.json").exists()  # stopped with the last user
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
