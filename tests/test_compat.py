"""Faithful to the original CacheSaver: its types, its flags, its entry points.

The expected flags are the original's (cachesaver 0.0.6, run side by side with the same
calls); the tests are our own. Real Redis, in-process workers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
import redis as sync_redis

from cachesaver_dist import (
    Batch,
    BatchRequestModel,
    GenerationError,
    InvalidRequestError,
    LocalAPI,
    OnlineAPI,
    OrderedLocalAPI,
    Request,
    Response,
    SimModel,
    SingleRequestModel,
)
from cachesaver_dist.models import derive_seed


class Recorder:
    """A duck-typed model (no base class) that records every call it gets."""

    model = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str | None, str | None]] = []
        self.counter = 0

    async def request(self, request: Request) -> Response:
        self.calls.append((request.prompt, request.n, request.namespace, request.request_id))
        await asyncio.sleep(0.02)
        out = []
        for _ in range(request.n):
            out.append(f"{request.prompt}#{self.counter}")
            self.counter += 1
        return Response(data=out)


def api(model, redis_url, keys, cls=OnlineAPI, **kw):
    return cls(model, cache=redis_url, prefix=keys.prefix, **kw)


# --- types -----------------------------------------------------------------------------


def test_response_is_a_named_tuple_with_metadata_beside_it():
    r = Response(["a", "b"], [False, True], [False, False], metadata=[{"index": 0}, {}])
    data, cached, duplicated = r
    assert (data, cached, duplicated) == (["a", "b"], [False, True], [False, False])
    assert r == Response(["a", "b"], [False, True], [False, False])  # metadata not compared
    changed = r._replace(cached=[True, True])
    assert changed.cached == [True, True] and changed.metadata == r.metadata
    assert Response(["x"]).cached is None and Response(["x"]).metadata is None
    assert tuple(Batch([Request("p", 1, "a", "ns")])) == ([Request("p", 1, "a", "ns")],)


def test_request_subclasses_may_add_required_fields():
    @dataclass(frozen=True)
    class ModelRequest(Request):
        model: str
        temperature: float = 1.0

    r = ModelRequest("p", 2, "id", "ns", model="m")
    assert (r.model, r.temperature, r.top_p) == ("m", 1.0, None)
    assert r.model_fields() == {"prompt": "p", "model": "m", "temperature": 1.0}
    with pytest.raises(TypeError):
        Request("p")  # base fields take no defaults, as in the original


def test_model_interfaces_are_runtime_protocols():
    assert isinstance(Recorder(), SingleRequestModel)
    assert not isinstance(Recorder(), BatchRequestModel)
    assert isinstance(SimModel(), SingleRequestModel) and isinstance(SimModel(), BatchRequestModel)


# --- flags: the original's table, row by row ----------------------------------------------


async def test_one_request_n2_duplicates_its_second_sample(redis_url, keys):
    async with api(Recorder(), redis_url, keys) as pipe:
        r = await pipe.request(Request("p", 2, "a", "ns"))
    assert (r.cached, r.duplicated) == ([False, False], [False, True])


async def test_five_concurrent_identical_requests_are_one_call(redis_url, keys):
    model = Recorder()
    async with api(model, redis_url, keys, batch_size=8) as pipe:
        rs = await asyncio.gather(*(pipe.request(Request("p", 1, str(i), "ns"))
                                    for i in range(5)))
    assert [c[:2] for c in model.calls] == [("p", 5)]
    assert [r.duplicated[0] for r in rs] == [False, True, True, True, True]
    assert [r.cached[0] for r in rs] == [False] * 5
    assert len({r.data[0] for r in rs}) == 5


async def test_same_prompt_in_two_namespaces_second_is_cached(redis_url, keys):
    model = Recorder()
    async with api(model, redis_url, keys) as pipe:
        first, second = await pipe.batch_request(Batch([Request("p", 1, "1", "ns1"),
                                                        Request("p", 1, "2", "ns2")]))
    assert (first.cached, first.duplicated) == ([False], [False])
    assert (second.cached, second.duplicated) == ([True], [False])
    assert second.data == first.data and len(model.calls) == 1
    assert [m["source"] for m in first.metadata + second.metadata] == ["generated", "shared"]


async def test_batch_in_request_id_order_one_call(redis_url, keys):
    model = Recorder()
    batch = Batch([Request("p", 1, rid, "ns") for rid in ("3", "1", "2")])
    async with api(model, redis_url, keys) as pipe:
        rs = await pipe.batch_request(batch)
    assert [c[:2] for c in model.calls] == [("p", 3)]
    assert [r.metadata[0]["index"] for r in rs] == [2, 0, 1]
    assert [r.duplicated[0] for r in rs] == [True, False, True]


async def test_flags_across_client_processes_sharing_a_cache(redis_url, keys):
    """A second client (another OnlineAPI, own connection and workers) asking for what
    the first generated: cached, not duplicated; its own top-up: generated."""
    async with api(Recorder(), redis_url, keys) as first:
        a = await first.request(Request("p", 2, "a", "ns"))
    async with api(Recorder(), redis_url, keys) as second:  # a fresh run: index 0 again
        b = await second.request(Request("p", 3, "a", "ns"))
    assert (a.cached, a.duplicated) == ([False, False], [False, True])
    assert (b.cached, b.duplicated) == ([True, True, False], [False, False, False])
    assert [m["source"] for m in b.metadata] == ["stored", "stored", "generated"]


# --- the model sees the caller's request ----------------------------------------------------


async def test_the_model_sees_namespace_and_the_first_request_id(redis_url, keys):
    model = Recorder()
    async with api(model, redis_url, keys) as pipe:
        await pipe.batch_request(Batch([Request("p", 1, "b", "ns-x"),
                                        Request("p", 1, "a", "ns-x")]))
        await pipe.request(Request("q", 1, None, "ns-y"))
    assert model.calls == [("p", 2, "ns-x", "a"), ("q", 1, "ns-y", None)]


# --- n=0, seeds ---------------------------------------------------------------------------


async def test_n_zero_returns_an_empty_response_and_writes_nothing(redis_url, keys):
    model = Recorder()
    async with api(model, redis_url, keys) as pipe:
        r = await pipe.request(Request("p", 0, "a", "ns"))
        [b] = await pipe.batch_request(Batch([Request("p", 0, "b", "ns")]))
        written = sync_redis.Redis.from_url(redis_url).keys(f"{keys.prefix}[sgwur]:*")
    assert r == b == Response([], [], []) and model.calls == [] and written == []


class SeededModel:
    """Sample text = the seed it was generated with (a provider honouring seeds)."""

    model = "seeded"

    def __init__(self) -> None:
        self.calls: list[tuple[int | None, int]] = []

    async def request(self, request: Request) -> Response:
        self.calls.append((request.seed, request.n))
        return Response(data=[f"seed={request.seed}/{i}" for i in range(request.n)])


@dataclass(frozen=True)
class SeedRequest(Request):
    seed: int | None = None


async def test_a_fixed_seed_gives_each_index_its_own_derived_seed(redis_url, keys):
    model = SeededModel()
    async with api(model, redis_url, keys) as pipe:
        three = await pipe.request(SeedRequest("p", 3, "a", "ns1", seed=7))
        five = await pipe.request(SeedRequest("p", 5, "b", "ns2", seed=7))
    seeds = [7, derive_seed(7, 1), derive_seed(7, 2), derive_seed(7, 3), derive_seed(7, 4)]
    assert len(set(seeds)) == 5
    assert three.data == [f"seed={s}/0" for s in seeds[:3]]
    assert five.data == [f"seed={s}/0" for s in seeds]  # top-ups are new samples too
    assert sorted(model.calls) == sorted((s, 1) for s in seeds)
    assert three.duplicated == [False] * 3  # one call per sample: each paid its prompt


# --- the original's other entry points ------------------------------------------------------


async def test_requests_within_the_window_are_ordered_by_request_id(redis_url, keys):
    """As in the original, a batch goes ``timeout`` seconds after its first request:
    requests a few ms apart get their samples in ``request_id`` order whatever order they
    arrive in. ``eager=True`` sends a request made while none is in flight at once."""
    delays = {"a": 0.002, "b": 0.0, "c": 0.001}

    async def ask(pipe, rid, ns):
        await asyncio.sleep(delays[rid])
        r = await pipe.request(Request("p", 1, rid, ns))
        return rid, r.metadata[0]["index"]

    for eager, order in ((False, "abc"), (True, "bac")):
        async with api(Recorder(), redis_url, keys, batch_size=8, timeout=0.5,
                       eager=eager) as pipe:
            got = dict(await asyncio.gather(*(ask(pipe, rid, f"ns{eager}") for rid in delays)))
        assert got == {rid: i for i, rid in enumerate(order)}, (eager, got)


@dataclass(frozen=True)
class ChatRequest(Request):
    """A subclass as users write them: a tuple field, a method, a property."""

    stop: tuple[str, ...] = ("\n",)
    seed: int | None = None

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]

    @property
    def tag(self) -> str:
        return f"T{self.n}"


class Inspector:
    """Records what each call's request object is and can do."""

    model = "inspector"

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    async def request(self, request: Any) -> Response:
        self.seen.append((type(request).__name__, request.stop, request.messages()[0]["content"],
                          request.tag, request.n, request.request_id, request.namespace,
                          request.seed))
        return Response(data=[f"{request.prompt}#{len(self.seen)}.{i}" for i in range(request.n)])


async def test_a_model_object_gets_requests_of_the_callers_class(redis_url, keys):
    """As in the original, the model gets the caller's own class, its methods and tuples
    intact (a copy with the call's n, id and namespace); seeded calls get the seed of the
    sample they make. ``batch_request`` and ``request`` alike."""
    model = Inspector()
    async with api(model, redis_url, keys, batch_size=8, timeout=0.05) as pipe:
        await pipe.request(ChatRequest("p", 2, "a", "ns", stop=("END",)))
        await pipe.batch_request(Batch([ChatRequest("q", 1, "b", "ns2")]))
        await pipe.request(ChatRequest("s", 2, "c", "ns", seed=7))
    assert model.seen[:2] == [("ChatRequest", ("END",), "p", "T2", 2, "a", "ns", None),
                              ("ChatRequest", ("\n",), "q", "T1", 1, "b", "ns2", None)]
    assert sorted(s[-1] for s in model.seen[2:]) == sorted([7, derive_seed(7, 1)])
    assert all(s[0] == "ChatRequest" and s[4] == 1 for s in model.seen[2:])


class OneSampleModel:
    """A local model written for the original's ``LocalAPI``: one sample per request
    (``n`` is not read), and a ``request()`` the local pipelines must not use."""

    model = "local-one"

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int]]] = []
        self.count = 0

    async def request(self, request: Request) -> Response:
        raise AssertionError("the local pipelines call batch_request()")

    async def batch_request(self, batch: Batch) -> list[Response]:
        self.calls.append([(r.prompt, r.n) for r in batch.requests])
        out = []
        for r in batch.requests:
            out.append(Response(data=[f"{r.prompt}#{self.count}"]))
            self.count += 1
        return out


async def test_local_apis_call_the_model_as_the_original_does(redis_url, keys):
    """One sample per request in ``batch_request()`` calls of at most ``batch_size`` /
    ``hardware_batch_size`` requests; each sample paid its own prompt."""
    model = OneSampleModel()
    async with api(model, redis_url, keys, LocalAPI, batch_size=4) as local:
        r = await local.request(Request("p", 3, "a", "ns"))
    assert r.data == ["p#0", "p#1", "p#2"] and r.cached == [False] * 3
    assert r.duplicated == [False] * 3
    assert model.calls == [[("p", 1)] * 3]

    model = OneSampleModel()
    ordered = OrderedLocalAPI(model, redis_url, collection_batch_size=8, hardware_batch_size=2,
                              prefix=keys.prefix)
    rs = await ordered.batch_request(Batch([Request(f"q{i}", 1 + i % 2, str(i), "ns")
                                            for i in range(6)]))
    await ordered.cleanup()
    assert [len(x.data) for x in rs] == [1, 2, 1, 2, 1, 2]
    assert len({d for x in rs for d in x.data}) == 9  # nine samples, each its own call
    assert max(len(c) for c in model.calls) <= 2  # the hardware batch size bounds a call
    assert all(n == 1 for c in model.calls for _, n in c)
    assert ordered.model_id == "local-one"  # the model's own identity, not the wrapper's


async def test_local_and_online_pipelines_of_one_model_keep_their_own_queues(redis_url,
                                                                             keys):
    """An ``OnlineAPI`` and a ``LocalAPI`` of the same model in one process: each one's
    workers serve only its own requests, so the local pipeline's model calls stay one
    sample per request in ``batch_request()`` (the online one would call ``request()``
    with ``n``, which this model refuses)."""
    model = OneSampleModel()
    async with api(model, redis_url, keys) as online, \
            api(model, redis_url, keys, LocalAPI, batch_size=4) as local:
        await online.start()  # its in-process workers read their queue
        got = await asyncio.gather(*(local.request(Request(f"p{i}", 2, str(i), "ns"))
                                     for i in range(10)))
    assert [len(r.data) for r in got] == [2] * 10
    assert all(n == 1 for call in model.calls for _, n in call)
    assert (online.route, local.route) == ("inproc:local-one", "inproc-local:local-one")


async def test_ordered_local_api_flags_a_prompts_later_samples_as_the_original(redis_url,
                                                                             keys):
    """The original's OrderedLocalAPI deduplicates: a request's second sample, and the
    samples of identical requests in flight after the first, are ``duplicated``;
    LocalAPI (no deduplicator) flags none."""
    ordered = OrderedLocalAPI(OneSampleModel(), redis_url, collection_batch_size=8,
                              hardware_batch_size=3, timeout=0.05, prefix=keys.prefix)
    async with ordered:
        r = await ordered.request(Request("p", 2, "a", "ns"))
        rs = await asyncio.gather(*(ordered.request(Request("q", 1, str(i), "ns"))
                                    for i in range(5)))
    assert (r.cached, r.duplicated) == ([False, False], [False, True])
    assert [x.duplicated[0] for x in rs] == [False, True, True, True, True]
    assert [x.cached[0] for x in rs] == [False] * 5 and len({x.data[0] for x in rs}) == 5
    async with api(OneSampleModel(), redis_url, keys, LocalAPI, batch_size=8,
                   timeout=0.05) as local:
        rs = await asyncio.gather(*(local.request(Request("q2", 1, str(i), "ns"))
                                    for i in range(5)))
    assert [x.duplicated[0] for x in rs] == [False] * 5


async def test_a_local_models_failing_call_fails_only_its_requests():
    """As ``generate`` keeps failures apart: one bad request (or one bad chunk of
    ``batch_request``) fails alone; ``request()`` calls run ``per_call`` at a time."""
    from cachesaver_dist.models import LocalCalls

    class Picky:
        running = peak = 0

        async def request(self, request: Request) -> Response:
            Picky.running += 1
            Picky.peak = max(Picky.peak, Picky.running)
            await asyncio.sleep(0.01)
            Picky.running -= 1
            if request.prompt == "bad":
                raise ValueError("bad prompt")
            return Response(data=[request.prompt + "!"])

    class PickyBatch:
        async def batch_request(self, batch: Batch) -> list[Response]:
            if any(r.prompt == "bad" for r in batch.requests):
                raise ValueError("bad chunk")
            return [Response(data=[r.prompt + "!"]) for r in batch.requests]

    batch = Batch([Request("good", 2, "a", "ns"), Request("bad", 1, "b", "ns"),
                   Request("fine", 1, "c", "ns")])
    got = await LocalCalls(Picky(), per_call=2).batch_request(batch)
    assert got[0].data == ["good!", "good!"] and got[0].duplicated == [False, False]
    assert isinstance(got[1], ValueError) and got[2].data == ["fine!"], got
    assert Picky.peak == 2
    # in calls of 2 samples: [good, good] is kept, [bad, fine] fails as one call
    got = await LocalCalls(PickyBatch(), per_call=2).batch_request(batch)
    assert got[0].data == ["good!", "good!"]
    assert [str(g) for g in got[1:]] == ["bad chunk", "bad chunk"]


async def test_a_failed_request_asked_again_gets_the_same_indices(redis_url, keys):
    """A request whose model call failed uses up nothing, as in the original: asked again
    in its namespace it gets the indices it would have got, and another namespace then
    reuses those samples (one generation in all)."""

    class Flaky(SingleRequestModel):
        model = "flaky-once"
        broken, calls = True, 0

        async def request(self, request):
            if self.broken:
                raise ValueError("invalid api key")
            self.calls += 1
            return Response(data=[f"s{self.calls}"] * request.n)

    model = Flaky()
    async with api(model, redis_url, keys, batch_size=2) as pipe:
        with pytest.raises(GenerationError, match="invalid api key"):
            await pipe.request(Request("p", 2, "a", "ns1"))
        model.broken = False
        again = await pipe.request(Request("p", 2, "a", "ns1"))
        other = await pipe.request(Request("p", 2, "a", "ns2"))
    assert [m["index"] for m in again.metadata] == [0, 1] and again.cached == [False, False]
    assert other.data == again.data and other.cached == [True, True]
    assert model.calls == 1


async def test_a_hash_callable_replaces_the_prompt_key(redis_url, keys):
    model = Recorder()

    def by_first_word(request: Request) -> str:
        return request.prompt.split()[0]

    async with api(model, redis_url, keys, hash=by_first_word) as pipe:
        a = await pipe.request(Request("hello world", 1, "a", "ns1"))
        b = await pipe.request(Request("hello there", 1, "b", "ns2"))
    assert b.data == a.data and b.cached == [True] and len(model.calls) == 1


def test_entry_point_arguments_with_no_meaning_here():
    with pytest.raises(InvalidRequestError, match="correctness=True has no meaning"):
        OnlineAPI(Recorder(), None, 4, None, 30, True, True)
    pipe = OnlineAPI(Recorder(), None, 4, None, -1, True)  # timeout=-1 as the wrappers pass
    assert pipe.timeout == 0 and pipe.allow_batch_overflow is True
    with pytest.raises(InvalidRequestError, match="hash must be a callable"):
        OnlineAPI(Recorder(), hash="md5")
