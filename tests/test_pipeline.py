"""The semantics of DESIGN section 5, through OnlineAPI on a real Redis server.

The model runs in-process here; cache and batch workers are the same code the
worker pool runs (cross-process behaviour is in test_processes.py).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass

import pytest

from cachesaver_dist import (
    Batch,
    GenerationError,
    InvalidRequestError,
    OnlineAPI,
    Request,
    Response,
    SimModel,
    SingleRequestModel,
)
from cachesaver_dist.errors import NoWorkerError
from cachesaver_dist.protocol import Keys, prompt_key
from tests.conftest import ROOT, subprocess_env
from workers.batch_worker import BatchWorker


@dataclass(frozen=True)
class DecodingRequest(Request):
    temperature: float = 1
    max_completion_tokens: int | None = None


def api(model, redis_url: str, keys: Keys, **kw) -> OnlineAPI:
    return OnlineAPI(model, cache=redis_url, prefix=keys.prefix, **kw)


async def test_reuse_across_namespaces_one_call(redis_url, keys):
    model = SimModel("reuse", latency=0.05)
    async with api(model, redis_url, keys) as pipe:
        a, b = await asyncio.gather(
            pipe.request(Request("What is 2+2?", 1, "a", "ns1")),
            pipe.request(Request("What is 2+2?", 1, "b", "ns2")),
        )
    assert model.calls == [("What is 2+2?", 1)]
    assert a.data == b.data
    # "a" sorts first, so its claim generated the sample; "b" did not cause it: cached
    assert (a.cached, a.duplicated, b.cached, b.duplicated) == ([False], [False], [True], [False])
    assert (a.metadata[0]["source"], b.metadata[0]["source"]) == ("generated", "shared")


async def test_fresh_within_namespace_one_call_n2(redis_url, keys):
    model = SimModel("fresh")
    async with api(model, redis_url, keys) as pipe:
        r1, r2 = await pipe.batch_request(Batch([Request("p", 1, "1", "ns"),
                                                 Request("p", 1, "2", "ns")]))
    assert model.calls == [("p", 2)]
    assert r1.data != r2.data
    assert (r1.metadata[0]["index"], r2.metadata[0]["index"]) == (0, 1)


async def test_minimal_generation_asks_only_missing(redis_url, keys):
    model = SimModel("minimal")
    async with api(model, redis_url, keys) as pipe:
        first = await pipe.request(Request("q", 2, "x", "ns1"))
        third = await pipe.request(Request("q", 3, "y", "ns2"))
    assert model.calls == [("q", 2), ("q", 1)]
    assert third.data[:2] == first.data
    assert first.cached == [False, False] and first.duplicated == [False, True]
    assert third.cached == [True, True, False]
    assert third.duplicated == [False, False, False]


async def test_batch_is_ordered_by_request_id(redis_url, keys):
    model = SimModel("order")
    batch = Batch([Request("same", 1, rid, "ns") for rid in ("3", "1", "2")])
    async with api(model, redis_url, keys) as pipe:
        responses = await pipe.batch_request(batch)
    index = {r.request_id: resp.metadata[0]["index"] for r, resp in zip(batch.requests, responses)}
    assert index == {"1": 0, "2": 1, "3": 2}
    assert model.calls == [("same", 3)]


async def test_flags_cached_and_duplicated(redis_url, keys):
    model = SimModel("flags", latency=0.05)
    async with api(model, redis_url, keys) as pipe:
        gen, dup = await pipe.batch_request(Batch([Request("f", 2, "a", "n1"),
                                                   Request("f", 2, "b", "n2")]))
        again = await pipe.request(Request("f", 3, "c", "n3"))
    assert (gen.cached, gen.duplicated) == ([False, False], [False, True])
    assert (dup.cached, dup.duplicated) == ([True, True], [False, False])
    assert dup.data == gen.data
    assert again.cached == [True, True, False] and again.duplicated == [False] * 3


async def test_model_identity_is_part_of_the_key(redis_url, keys):
    m1, m2 = SimModel("one"), SimModel("two")
    async with api(m1, redis_url, keys) as p1, api(m2, redis_url, keys) as p2:
        await p1.request(Request("shared prompt", 1, "a", "ns"))
        await p2.request(Request("shared prompt", 1, "a", "ns"))
    assert m1.calls == m2.calls == [("shared prompt", 1)]


async def test_decoding_fields_are_in_the_key_and_reach_the_model(redis_url, keys):
    seen = []

    class Recorder(SingleRequestModel):
        model = "recorder"

        async def request(self, request):
            seen.append((request.temperature, request.max_completion_tokens, request.top_p))
            return Response(data=[f"t={request.temperature}"] * request.n)

    async with api(Recorder(), redis_url, keys) as pipe:
        hot = await pipe.request(DecodingRequest("x", 1, "a", "ns", temperature=0.9))
        cold = await pipe.request(DecodingRequest("x", 1, "b", "ns2", temperature=0.1,
                                                  max_completion_tokens=5))
        same = await pipe.request(DecodingRequest("x", 1, "c", "ns3", temperature=0.9))
    assert seen == [(0.9, None, None), (0.1, 5, None)]
    assert (hot.data, cold.data) == (["t=0.9"], ["t=0.1"])
    assert same.cached == [True]


async def test_runs_new_instance_rereads_and_shared_run_shares(redis_url, keys):
    model = SimModel("runs")
    async with api(model, redis_url, keys) as first:
        a = await first.request(Request("r", 2, "1", "ns"))
    async with api(model, redis_url, keys) as second:  # a fresh run: index 0 again
        b = await second.request(Request("r", 2, "1", "ns"))
    assert b.data == a.data and b.cached == [True, True]
    assert len(model.calls) == 1

    async with api(model, redis_url, keys, run="shared") as p1, \
            api(model, redis_url, keys, run="shared") as p2:
        x = await p1.request(Request("r", 2, "1", "ns"))
        y = await p2.request(Request("r", 2, "2", "ns"))
    assert [m["index"] for m in x.metadata + y.metadata] == [0, 1, 2, 3]
    assert model.calls == [("r", 2), ("r", 2)]


async def test_concurrent_request_calls_are_batched_and_deterministic(redis_url, keys):
    model = SimModel("batched")
    async with api(model, redis_url, keys, batch_size=8, timeout=0.05) as pipe:
        responses = await asyncio.gather(*(
            pipe.request(Request("p", 1, f"{i:02d}", "ns")) for i in range(8)))
    assert [r.metadata[0]["index"] for r in responses] == list(range(8))
    assert model.calls == [("p", 8)]


async def test_notebook_surface_with_import_changed(redis_url, keys):
    """The seed notebook's pipeline cell, with only the import changed."""

    class OnlineLLM(SimModel):
        def __init__(self, client, model: str):
            super().__init__(model)
            self.client = client

    model = OnlineLLM(client=None, model="meta-llama/Llama-3.3-70B-Instruct-Turbo-Free")
    request1 = DecodingRequest(prompt="What is the meaning of life?", n=2, request_id="sth1",
                               namespace="sth", max_completion_tokens=10)
    request2 = DecodingRequest(prompt="Cats or dogs?", n=1, request_id="sth2",
                               namespace="sth", max_completion_tokens=10)
    pipeline = OnlineAPI(model=model, cache=redis_url, batch_size=2, timeout=1,
                         prefix=keys.prefix)
    single = await pipeline.request(request1)
    both = await pipeline.batch_request(Batch(requests=[request1, request2]))
    await pipeline.close()
    assert len(single.data) == 2 and single.cached == [False, False]
    assert both[0].data != single.data  # same namespace: fresh samples
    assert [len(r.data) for r in both] == [2, 1]


async def test_permanent_model_error_reaches_waiters_and_releases_claim(redis_url, keys):
    class Flaky(SingleRequestModel):
        model = "flaky"
        broken = True

        async def request(self, request):
            if self.broken:
                raise ValueError("invalid api key")
            return Response(data=["ok"] * request.n)

    model = Flaky()
    async with api(model, redis_url, keys) as pipe:
        results = await asyncio.gather(pipe.request(Request("e", 1, "a", "ns1")),
                                       pipe.request(Request("e", 1, "b", "ns2")),
                                       return_exceptions=True)
        assert all(isinstance(r, GenerationError) for r in results)
        assert "invalid api key" in str(results[0]) and "flaky" in str(results[0])
        model.broken = False
        later = await pipe.request(Request("e", 1, "c", "ns3"))
    assert later.data == ["ok"] and later.metadata[0]["index"] == 0


async def test_bad_metadata_fails_the_call_and_leaves_the_key_usable(redis_url, keys):
    """Metadata shorter than the samples once stored only the first samples and
    acknowledged the rest: the key then waited forever, in every namespace."""

    class Model(SingleRequestModel):
        model = "bad-meta"
        meta: list | None = [{}]

        async def request(self, request):
            return Response(data=tuple(f"s{i}" for i in range(request.n)), metadata=self.meta)

    model = Model()
    async with api(model, redis_url, keys, request_timeout=10) as pipe:
        for meta, message in (([{}], "metadata with 1 entries for 2 samples"),
                              ("x", "metadata with a str"),
                              (["x", {}], "an entry that is not a dict")):
            model.meta = meta
            with pytest.raises(GenerationError, match=message):
                await asyncio.wait_for(pipe.request(Request("m", 2, "a", "ns")), 5)
        model.meta = None  # and a tuple of samples is taken, as the original took it
        later = await asyncio.wait_for(pipe.request(Request("m", 2, "b", "ns2")), 5)
    assert later.data == ["s0", "s1"] and later.cached == [False, False]


@pytest.mark.parametrize("bad, message", [
    (Request("p", -1, "a", "ns"), "n must be"),
    (Request("p", True, "a", "ns"), "n must be"),
    (Request(123, 1, "a", "ns"), "prompt must be"),
    (Request("p", 1, "a", 5), "namespace must be a str"),
    (Request("p", 1, "a", ""), "namespace must have"),
    (Request("p", 1, "a", "bad\nname"), "control characters"),
    (Request("p", 1, 7, "ns"), "request_id must be a str"),
    (DecodingRequest("p", 1, "a", "ns", temperature=object()), "field 'temperature'"),
    (Request("x" * 2_000_000, 1, "a", "ns"), "over the limit"),
])
async def test_bad_input_is_refused_and_nothing_is_written(redis_url, keys, redis, bad, message):
    model = SimModel("bad")
    async with api(model, redis_url, keys) as pipe:
        with pytest.raises(InvalidRequestError, match=message):
            await pipe.request(bad)
        with pytest.raises(InvalidRequestError, match=message):
            await pipe.batch_request(Batch([Request("good", 1, "g", "ns"), bad]))
    assert model.calls == []
    data = ("s:", "g:", "w:", "u:", "r:", "queue:", "stats")
    written = [k async for k in redis.scan_iter(match=f"{keys.prefix}*")
               if k.decode()[len(keys.prefix):].startswith(data)]
    assert written == []


def test_bad_arguments_are_refused_early():
    with pytest.raises(InvalidRequestError, match="run id"):
        OnlineAPI("sim:x", run="has space")
    with pytest.raises(TypeError, match="neither request"):
        OnlineAPI(object())


async def test_no_worker_error_names_the_commands_to_run(redis_url, keys, redis):
    """Run as printed, the commands start workers this client sees: its prefix is in them.
    Without a cache worker, the request's jobs leave the queue as it fails: a cache worker
    started later would claim samples for it, for nobody."""
    messages = []
    for direct in (False, True):  # a direct client needs no cache worker: then the batch one
        async with OnlineAPI("sim:nobody", cache=redis_url, prefix=keys.prefix, direct=direct,
                             reply_timeout=0.5) as api:
            with pytest.raises(NoWorkerError) as info:
                await api.request(Request("anyone?", 1, f"q{direct}", "ns"))
        messages.append(str(info.value))
        if not direct:  # its jobs left the queue
            assert await redis.zcard(keys.cache_queue) == 0
        else:  # its claim was withdrawn: a batch worker started later generates nothing
            key = prompt_key("sim:nobody", {"prompt": "anyone?"})
            assert await redis.xlen(keys.work_stream("sim:nobody")) == 0
            assert await redis.hget(keys.generation(key), "x0") == b"1"
            assert not await redis.exists(keys.waiters(key))
            model = SimModel("nobody")
            late = BatchWorker(redis, keys, {"sim:nobody": model})
            running = asyncio.create_task(late.run())
            await asyncio.sleep(1.0)
            late.stop()
            await asyncio.wait_for(running, 10)
            assert model.calls == []
    assert f"'cachesaver-dist worker cache --prefix {keys.prefix}'" in messages[0], messages
    assert f"'cachesaver-dist worker batch --prefix {keys.prefix} --model sim:nobody'" \
        in messages[1], messages


async def test_unreachable_redis_is_a_clear_error_fast():
    import time

    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"cannot reach Redis at redis://127\.0\.0\.1:1/0"):
        async with OnlineAPI("sim:x", cache="redis://127.0.0.1:1/0"):
            pass
    assert time.monotonic() - started < 10


async def test_calls_returning_together_are_stored_together(redis_url, keys, monkeypatch):
    import workers.batch_worker as bw

    stores = []
    real_fill_many = bw.fill_many

    async def counting_fill_many(redis, k, fills, **kw):
        stores.append(len(fills))
        return await real_fill_many(redis, k, fills, **kw)

    monkeypatch.setattr(bw, "fill_many", counting_fill_many)
    model = SimModel("together", latency=0.2)
    async with api(model, redis_url, keys, batch_size=16) as pipe:
        replies = await pipe.batch_request(Batch([Request(f"q{i}", 1, f"{i:02d}", "ns")
                                                  for i in range(16)]))
    assert len(model.calls) == 16 and all(len(r.data) == 1 for r in replies)
    assert sum(stores) == 16 and len(stores) <= 3, stores  # not one round trip per call


async def test_answered_batches_leave_no_reservation_records(redis_url, keys, redis):
    """A batch answered at its first ask needs its records no more: the client deletes
    them (with its next enqueue, or when it closes), whatever the batches in flight."""
    records = f"{keys.prefix}r:*"
    async with api(SimModel("records"), redis_url, keys, batch_size=2, timeout=0) as pipe:
        await asyncio.gather(*(pipe.request(Request(f"p{i}", 1, f"{i:02d}", "ns"))
                               for i in range(64)))  # 32 batches in flight together
        for ns in ("a", "b", "c"):
            hits = await asyncio.gather(*(pipe.request(Request(f"p{i}", 1, f"{i:02d}", ns))
                                          for i in range(64)))
            assert all(h.cached == [True] for h in hits)
        await pipe.request(Request("last", 1, "x", "ns"))
        left = [k async for k in redis.scan_iter(match=records)]
        assert len(left) <= 1, left  # only the batch just answered
    assert [k async for k in redis.scan_iter(match=records)] == []


def test_a_pipeline_never_closed_lets_asyncio_run_end(redis_url, keys):
    """``asyncio.run()`` cancels each task once at its end: the in-process workers of a
    pipeline never closed end then, even when its loop last stopped (a nested
    ``asyncio.run`` under nest_asyncio stops it anywhere) just as the cache worker's write
    of a command ended (redis-py's ``asyncio.wait_for`` lost the cancellation there and
    the script never exited)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.unclosed_proc", keys.prefix],
                            env=subprocess_env(redis_url), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the script did not exit:\n{out.decode(errors='replace')}")
    assert proc.returncode == 0, out.decode(errors="replace")


async def test_async_with_left_by_a_cancellation_gives_up_requests_in_flight(redis_url, keys):
    """Cancelled (as Ctrl-C cancels ``asyncio.run``'s task), ``async with`` does not wait
    for the replies of the requests in flight, nor send the ones still collecting: no
    worker serves this model, and nothing re-asks for it after the cancellation."""
    import time

    pipe = api("sim:gives-up", redis_url, keys, reply_timeout=30, request_timeout=60,
               batch_size=4, timeout=30)

    async def body() -> None:
        async with pipe:
            sent = asyncio.gather(*(pipe.request(Request(f"p{i}", 1, f"{i}", "ns"))
                                    for i in range(4)))  # a batch of 4: sent at once
            await asyncio.gather(sent, pipe.request(Request("not sent", 1, "x", "ns")))

    task = asyncio.create_task(body())
    await asyncio.sleep(0.5)  # the batch waits for replies, the fifth request for its batch
    assert len(pipe._flushes) == 1 and len(pipe._pending) == 1
    started = time.monotonic()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=20)
    assert done and task.cancelled()
    assert time.monotonic() - started < 2.0
    assert pipe._started is None and not pipe._flushes and not pipe._pending  # closed


async def test_async_with_left_by_an_exception_still_finishes_requests_in_flight(redis_url,
                                                                                 keys):
    model = SimModel("exc-exit", latency=0.5)
    with pytest.raises(ValueError, match="user code failed"):
        async with api(model, redis_url, keys, batch_size=2) as pipe:
            requests = [asyncio.create_task(pipe.request(Request(f"p{i}", 1, f"{i}", "ns")))
                        for i in range(4)]
            await asyncio.sleep(0.1)  # sent, the model calls running
            raise ValueError("user code failed")
    assert [len((await r).data) for r in requests] == [1] * 4


def test_a_pipeline_outlives_the_event_loop_it_started_in(redis_url, keys):
    """Two asyncio.run() with one pipeline and no close() between: the second opened
    the first loop's connections and failed with 'Event loop is closed'."""
    model = SimModel("two-loops")
    pipe = api(model, redis_url, keys, run="two-loops")

    async def ask(request_id: str) -> Response:
        return await asyncio.wait_for(pipe.request(Request("p", 1, request_id, "ns")), 10)

    first = asyncio.run(ask("a"))
    second = asyncio.run(ask("b"))
    asyncio.run(pipe.close())
    assert len(model.calls) == 2 and first.data != second.data  # the same run goes on
    assert second.metadata[0]["index"] == 1


async def test_two_pipelines_of_one_model_give_the_model_the_callers_request(redis_url, keys):
    """Pipelines of one model id in one process share its work stream: the one whose
    batch worker took another's work gave its model a plain Request, without the
    caller's class and methods."""

    @dataclass(frozen=True)
    class Chat(Request):
        temperature: float = 1

        def messages(self):
            return [{"role": "user", "content": self.prompt}]

    class Model(SingleRequestModel):
        model = "two-pipelines"

        def __init__(self, latency: float) -> None:
            self.latency, self.got = latency, []

        async def request(self, request):
            self.got.append(type(request))
            await asyncio.sleep(self.latency)
            return Response(data=[request.messages()[0]["content"]] * request.n)

    slow, idle = Model(0.2), Model(0)
    async with api(slow, redis_url, keys, concurrency=1, batch_size=1) as a, \
            api(idle, redis_url, keys) as b:
        await b.start()  # its batch worker reads the same stream
        got = await asyncio.gather(*(a.request(Chat(f"p{i}", 1, f"{i}", "ns"))
                                     for i in range(8)))
    assert [r.data for r in got] == [[f"p{i}"] for i in range(8)]
    assert idle.got and set(slow.got + idle.got) == {Chat}


@pytest.mark.parametrize("method", ["request", "batch_request"])
async def test_a_model_raising_cancelled_error_fails_its_requests_at_once(redis_url, keys,
                                                                           method):
    """A CancelledError the model raised by itself (it awaited something cancelled
    elsewhere) ended the call silently: its requests waited for the lease to run out."""

    class Model:
        model = f"cancelling-{method}"
        calls = 0

        async def _one(self, request):
            self.calls += 1
            if self.calls == 1:
                inner = asyncio.ensure_future(asyncio.sleep(10))
                inner.cancel()
                await inner  # raises CancelledError: nobody cancelled the caller
            return Response(data=["ok"] * request.n)

        async def request(self, request):
            return await self._one(request)

        async def batch_request(self, batch):
            return [await self._one(r) for r in batch.requests]

    model = Model()
    setattr(model, "request" if method == "batch_request" else "batch_request", None)
    async with api(model, redis_url, keys) as pipe:
        with pytest.raises(GenerationError, match="raised CancelledError"):
            await asyncio.wait_for(pipe.request(Request("c", 1, "a", "ns")), 5)
        later = await asyncio.wait_for(pipe.request(Request("c", 1, "b", "ns2")), 5)
    assert later.data == ["ok"]


async def test_giving_up_during_a_model_call_still_stops_at_once(redis_url, keys):
    started = asyncio.Event()

    class Slow(SingleRequestModel):
        model = "slow-give-up"

        async def request(self, request):
            started.set()
            await asyncio.sleep(30)
            return Response(data=["late"] * request.n)

    pipe = api(Slow(), redis_url, keys)
    call = asyncio.ensure_future(pipe.request(Request("s", 1, "a", "ns")))
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(pipe.close(give_up=True), 10)
    with pytest.raises(asyncio.CancelledError):
        await call


@pytest.mark.parametrize("direct", [False, True])
async def test_a_request_made_while_close_runs_is_served_after_it(redis_url, keys, direct):
    """A request made while close() stopped the workers went to the client being
    closed: it failed (CancelledError, or NoWorkerError) instead of opening the pipeline
    again, as a request after close() does."""
    model = SimModel("closing")
    pipe = api(model, redis_url, keys, timeout=0.01, direct=direct)
    await pipe.start()
    local = pipe._local
    stop, late = local.stop, []

    async def stop_then_ask() -> None:
        await stop()
        late.append(asyncio.ensure_future(pipe.request(Request("late", 1, "a", "ns"))))
        await asyncio.sleep(0.1)  # the request's batch is due meanwhile

    local.stop = stop_then_ask
    await pipe.close()
    got = await asyncio.wait_for(late[0], 10)
    await pipe.close()
    assert len(got.data) == 1 and model.calls == [("late", 1)]


async def test_a_batch_model_returning_no_list_is_told_so(redis_url, keys):
    """A batch_request() returning one Response (or None) was read as a sequence: three
    'responses' (its fields), or "'NoneType' object is not iterable"."""

    class Model:
        model = "no-list"
        answer: object = None

        async def batch_request(self, batch):
            return self.answer

    model = Model()
    async with api(model, redis_url, keys) as pipe:
        for answer in (None, Response(data=["x"])):
            model.answer = answer
            with pytest.raises(GenerationError, match=r"batch_request\(\) returned "
                               f"{type(answer).__name__}, not a list"):
                await asyncio.wait_for(pipe.batch_request(Batch(
                    [Request(f"{i}", 1, f"{i}", "ns") for i in range(3)])), 5)
