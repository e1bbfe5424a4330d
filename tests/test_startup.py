"""Start and stop (issue #11): ``import cachesaver_dist`` stays light (its public names
load on first use; checked in a fresh interpreter, where nothing is imported yet), and
stopping loses nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from cachesaver_dist import Batch, OnlineAPI, Request, SimModel
from cachesaver_dist.prepare import prepare
from cachesaver_dist.protocol import CONSUMER_GROUP
from cachesaver_dist.scripts import reserve
from tests.conftest import ROOT
from workers.batch_worker import BatchWorker

HEAVY = ("arq", "redis", "workers", "msgpack", "asyncio")

REPORT_LOADED = f"""
import json, sys
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))))
"""


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("statement", [
    "import cachesaver_dist",
    # the data types and errors need no transport either
    "from cachesaver_dist import Batch, CacheSaverError, Metadata, Request, Response",
])
def test_import_loads_no_heavy_module(statement: str) -> None:
    loaded = json.loads(_run(statement + REPORT_LOADED))
    assert loaded == [], f"{statement!r} imported {loaded}: import them where they are used"


def test_the_check_sees_an_eager_import() -> None:
    loaded = json.loads(_run("import cachesaver_dist\nimport workers.cache_worker"
                             + REPORT_LOADED))
    assert {"arq", "redis", "asyncio"} <= set(loaded)


def test_a_client_does_not_load_arq() -> None:
    """Clients write arq's job bodies themselves (protocol.encode_arq_job): only workers
    import arq."""
    loaded = json.loads(_run("from cachesaver_dist import OnlineAPI, Request\n"
                             "import cachesaver_dist.pipelines" + REPORT_LOADED))
    assert "redis" in loaded and "arq" not in loaded


def test_every_public_name_resolves() -> None:
    out = json.loads(_run("""
import importlib, json
import cachesaver_dist as c
names = {n: getattr(c, n) for n in c.__all__}
star = {}
exec("from cachesaver_dist import *", star)
print(json.dumps({
    "all": sorted(c.__all__), "sources": sorted(c._SOURCES),
    "same": sorted(n for n, v in names.items() if v is getattr(
        importlib.import_module("cachesaver_dist." + c._SOURCES[n]), n)),
    "star": sorted(set(star) - {"__builtins__"}),
    "dir": sorted(set(c.__all__) - set(dir(c))),
    "version": c.__version__,
}))
"""))
    assert out["all"] == out["sources"]  # each name knows the module that defines it
    assert out["same"] == out["all"] == out["star"]
    assert out["dir"] == []
    assert out["version"]


def test_unknown_name_is_an_attribute_error() -> None:
    import cachesaver_dist

    with pytest.raises(AttributeError, match="no attribute 'OnlineApi'"):
        cachesaver_dist.OnlineApi  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(ImportError):
        exec("from cachesaver_dist import OnlineApi", {})


# --- stop -----------------------------------------------------------------------------


async def test_close_lets_pending_requests_finish(redis_url, keys):
    model = SimModel("closing", latency=0.2)
    pipe = OnlineAPI(model, cache=redis_url, prefix=keys.prefix)
    await pipe.start()
    asked = [asyncio.create_task(pipe.request(Request(f"p{i}", 1, str(i), "ns")))
             for i in range(3)]
    await asyncio.sleep(0)  # the requests are queued; the model has not answered yet
    await pipe.close()
    done = await asyncio.gather(*asked)
    assert [(len(r.data), r.cached) for r in done] == [(1, [False])] * 3
    assert sorted(model.calls) == [("p0", 1), ("p1", 1), ("p2", 1)]


async def test_close_during_start_up_lets_waiting_requests_finish(redis_url, redis, keys):
    """Requests made before the first connection is up wait for it; a ``close()`` that
    comes meanwhile sends them and waits for their answers instead of cancelling them
    (they would leave their jobs queued, to be generated for nobody)."""
    model = SimModel("starting")
    pipe = OnlineAPI(model, cache=redis_url, prefix=keys.prefix)
    asked = [asyncio.create_task(pipe.request(Request(f"p{i}", 1, str(i), "ns")))
             for i in range(3)]
    batch = asyncio.create_task(pipe.batch_request(Batch([Request("b", 2, "b", "ns")])))
    await asyncio.sleep(0)  # every call now waits for start-up
    assert pipe._started is not None and not pipe._started.done()
    await pipe.close()
    done = await asyncio.gather(*asked, batch, return_exceptions=True)
    assert [type(r).__name__ for r in done] == ["Response"] * 3 + ["list"]
    assert sorted(model.calls) == [("b", 2), ("p0", 1), ("p1", 1), ("p2", 1)]
    assert await redis.zcard(keys.cache_queue) == 0  # every job was served


async def test_entries_handed_to_a_read_cut_short_by_stop_are_generated(redis, keys):
    """``stop()`` cuts the batch worker's blocking read short. Entries Redis handed such a
    read (here: read by the test under the worker's consumer name) are generated and
    acknowledged, not left leased until their lease runs out."""
    route = "sim:stopping"
    item = prepare(Request("p", 1, None, "ns"), run="run", route=route, model_id=route)
    [res] = await reserve(redis, keys, "c", [item])
    assert not res.complete  # claimed: one work entry
    model = SimModel(route)
    worker = BatchWorker(redis, keys, {route: model})
    await worker._ensure_groups()
    stream = keys.work_stream(route)
    got = await redis.xreadgroup(CONSUMER_GROUP, worker.name, {stream: ">"}, count=10)
    assert len(got[0][1]) == 1
    running = asyncio.create_task(worker.run())
    for _ in range(500):  # until the worker waits on its blocking read
        if worker._reading is not None:
            break
        await asyncio.sleep(0.01)
    assert worker._reading is not None
    worker.stop()
    await asyncio.wait_for(running, 10)
    assert model.calls == [("p", 1)]
    assert (await redis.xpending(stream, CONSUMER_GROUP))["pending"] == 0
