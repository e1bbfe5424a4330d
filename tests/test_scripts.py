"""Unit tests of the reserve/fill/release scripts and the protocol, on fakeredis."""

from __future__ import annotations

import collections
import contextlib
import enum
import os
import random
from typing import Any

import fakeredis
import msgpack
import pytest

from cachesaver_dist import protocol
from cachesaver_dist.errors import ProtocolError
from cachesaver_dist.protocol import (
    CONSUMER_GROUP,
    CacheJob,
    Keys,
    WorkItem,
    arq_deserialize,
    arq_serialize,
    decode_job,
    encode_spec,
    prompt_key,
    unique_id,
)
from cachesaver_dist.scripts import fill, fill_many, release, reserve, reserve_jobs, script

KEYS = Keys("unit:")


@pytest.fixture
async def r():
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


def item(uuid, ns="ns", n=1, key="k1", run="run", rid=""):
    return WorkItem(uuid, rid, key, ns, n, run, "sim:x", "sim:x", encode_spec("sim:x", "sim:x",
                                                                               {"prompt": key}))


async def stream_entries(r, route="sim:x"):
    return [(fields[b"key"].decode(), fields[b"idx"].decode())
            for _, fields in await r.xrange(KEYS.work_stream(route))]


async def stream_specs(r, route="sim:x"):
    return [fields[b"spec"] for _, fields in await r.xrange(KEYS.work_stream(route))]


@pytest.fixture
def specs_sent(r, monkeypatch):
    """The specs of each reserve script call, as sent."""
    calls = []
    original = r.evalsha

    async def evalsha(sha, numkeys, *args):
        if sha == script(r, "reserve").sha:
            argv = args[numkeys:]
            first = 5 + int(argv[4])  # the header and the job ids, then 9 values per request
            calls.append([argv[i] for i in range(first + 5, len(argv), 9)])
        return await original(sha, numkeys, *args)

    monkeypatch.setattr(r, "evalsha", evalsha)
    return calls


async def test_claim_then_fill_completes_waiter(r):
    [res] = await reserve(r, KEYS, "c", [item("u1", n=2)])
    assert (res.complete, res.new, res.start, res.flags) == (False, True, 0, "gg")
    assert await stream_entries(r) == [("k1", "0,1")]
    done = await fill(r, KEYS, "k1", {0: b"s0"})
    assert done == []  # index 1 still missing
    [w] = await fill(r, KEYS, "k1", {1: b"s1"})
    assert (w.waiter_id, w.start, w.flags, w.samples) == ("c:u1", 0, "gg", [b"s0", b"s1"])
    assert await r.hlen(KEYS.waiters("k1")) == 0


async def test_retry_with_same_uuid_is_idempotent(r):
    await reserve(r, KEYS, "c", [item("u1", n=2)])
    await fill(r, KEYS, "k1", {0: b"s0", 1: b"s1"})
    [again] = await reserve(r, KEYS, "c", [item("u1", n=2)])
    assert (again.complete, again.new, again.start, again.flags) == (True, False, 0, "gg")
    [other] = await reserve(r, KEYS, "c", [item("u2", n=1)])
    assert other.start == 2  # the retry did not advance the counter
    assert await stream_entries(r) == [("k1", "0,1"), ("k1", "2")]


async def test_in_flight_indices_are_waited_for_not_claimed(r):
    a, b = await reserve(r, KEYS, "c", [item("u1", ns="a", n=2), item("u2", ns="b", n=3)])
    assert (a.flags, b.flags) == ("gg", "ddg")
    assert await stream_entries(r) == [("k1", "0,1,2")]  # one entry for the key
    waiters = {w.waiter_id for w in await fill(r, KEYS, "k1", {0: b"0", 1: b"1", 2: b"2"})}
    assert waiters == {"c:u1", "c:u2"}


async def test_cached_samples_are_returned_in_the_same_call(r):
    await reserve(r, KEYS, "c", [item("u1", n=2)])
    await fill(r, KEYS, "k1", {0: b"s0", 1: b"s1"})
    [hit] = await reserve(r, KEYS, "c", [item("u2", ns="other", n=2)])
    assert (hit.complete, hit.flags, hit.samples) == (True, "cc", [b"s0", b"s1"])


async def test_release_tells_waiters_and_lets_the_next_request_claim(r):
    await reserve(r, KEYS, "c", [item("u1", ns="a"), item("u2", ns="b")])
    failed, malformed = await release(r, KEYS, "k1", [0])
    assert malformed == []
    assert {w.waiter_id for w in failed} == {"c:u1", "c:u2"}
    [retry] = await reserve(r, KEYS, "c", [item("u3", ns="c")])
    assert retry.flags == "g" and retry.start == 0
    assert await stream_entries(r) == [("k1", "0"), ("k1", "0")]
    assert (await stream_specs(r))[-1] == item("u3").spec  # the re-claim has its spec


async def test_hits_are_reserved_in_one_call_without_their_specs(r, specs_sent):
    await reserve(r, KEYS, "c", [item("u1", key="k1"), item("u2", key="k2")])
    await fill(r, KEYS, "k1", {0: b"a"})
    await fill(r, KEYS, "k2", {0: b"b"})
    specs_sent.clear()
    hits = await reserve(r, KEYS, "c", [item("u3", ns="b", key="k1"),
                                        item("u4", ns="b", key="k2")])
    assert [(h.complete, h.samples) for h in hits] == [(True, [b"a"]), (True, [b"b"])]
    assert specs_sent == [[b"", b""]]


async def test_a_claim_sends_the_rest_of_the_batch_again_with_specs(r, specs_sent):
    await reserve(r, KEYS, "c", [item("u1", key="k1")])
    await fill(r, KEYS, "k1", {0: b"a"})
    specs_sent.clear()
    batch = [item("u2", ns="b", key="k1"), item("u3", ns="b", key="k2", n=2),
             item("u4", ns="c", key="k1")]
    a, b, c = await reserve(r, KEYS, "c", batch)
    assert [(x.item.uuid, x.flags, x.start) for x in (a, b, c)] == [
        ("u2", "c", 0), ("u3", "gg", 0), ("u4", "c", 0)]
    assert specs_sent == [[b"", b"", b""], [batch[1].spec, batch[2].spec]]
    assert await stream_entries(r) == [("k1", "0"), ("k2", "0,1")]
    assert (await stream_specs(r))[-1] == batch[1].spec
    assert await r.hget(KEYS.usage("run"), "k2b") == b"2"  # counted once, not per pass


async def test_a_pass_without_specs_leaves_a_claiming_request_untouched(r):
    it = item("u1", n=3)
    argv = [3_600_000, 3_600_000, 60_000, 1, 0,
            it.namespace, it.n, "c:u1", "run|sim:x", it.key, b"", 5, "ns\nr1", 0]
    keys = [KEYS.cache_queue, KEYS.samples("k1"), KEYS.generation("k1"), KEYS.waiters("k1"),
            KEYS.usage("run"),
            KEYS.work_stream("sim:x"), KEYS.model_keys("sim:x"), KEYS.manifest("run"),
            KEYS.reservations("c", "b")]
    assert await script(r, "reserve")(keys=keys, args=argv) == [[], 0, []]
    assert [await r.exists(k) for k in keys] == [0] * 9  # no counter, record, claim, entry,
    # spec, model index or manifest entry


def spec_of(ns, rid, prompt="p1"):
    return encode_spec("sim:x", "sim:x", {"prompt": prompt, "temperature": 0.5}, ns, rid)


def asked(uuid, ns, rid, spec=b"", key="k1"):
    """A request as a cache worker reads it from a job; ``spec`` b"": its client left the
    prompt out (its key's spec is stored)."""
    return WorkItem(uuid, rid, key, ns, 1, "run", "sim:x", "sim:x", spec)


def test_a_job_body_leaves_out_only_the_prompts_of_stored_keys():
    items = [asked("u1", "a", "r1", spec_of("a", "r1"), key="k1"),
             asked("u2", "a", "r2", spec_of("a", "r2", "p2"), key="k2")]
    body, slim = protocol.encode_job_and_copy("c", items, 60, "b", stored={"k1"})
    assert [it.spec for it in decode_job(body).items] == [b"", items[1].spec]
    assert [it.spec for it in decode_job(slim).items] == [b"", b""]
    full, _ = protocol.encode_job_and_copy("c", items, 60, "b")
    assert [it.spec for it in decode_job(full).items] == [it.spec for it in items]


def test_a_rebuilt_spec_is_the_one_the_request_would_have_sent():
    stored = spec_of("other", "r0")
    assert protocol.respec(stored, "sim:x", "sim:x", "a", "r7") == spec_of("a", "r7")
    assert protocol.respec(stored, "sim:x", "sim:x", "a", "") == spec_of("a", None)
    with pytest.raises(ProtocolError):
        protocol.respec(b"not a spec", "sim:x", "sim:x", "a", "r7")


async def test_a_claim_rebuilds_a_left_out_prompt_from_the_stored_spec(r):
    """The claim hands the batch workers this request's spec (its namespace and request
    id), built from the one its prompt key keeps."""
    await reserve(r, KEYS, "c", [asked("u1", "a", "r1", spec_of("a", "r1"))])
    assert await r.hget(KEYS.generation("k1"), "spec") == spec_of("a", "r1")
    [got] = await reserve_jobs(r, KEYS, [CacheJob("c", [asked("u2", "a", "r2")], 60, "b2")])
    assert [(x.item.uuid, x.start, x.flags) for x in got or []] == [("u2", 1, "g")]
    assert await stream_entries(r) == [("k1", "0"), ("k1", "1")]
    assert (await stream_specs(r))[-1] == spec_of("a", "r2")


async def test_a_left_out_prompt_that_is_not_stored_leaves_the_request_to_its_client(r):
    await reserve(r, KEYS, "c", [asked("u1", "a", "r1", spec_of("a", "r1"))])
    await r.hdel(KEYS.generation("k1"), "spec")  # pruned, or imported without one
    hit_first = [asked("u0", "b", "r0"), asked("u2", "a", "r2")]
    [got] = await reserve_jobs(r, KEYS, [CacheJob("c", hit_first, 60, "b2")])
    # u0 waits on index 0 (in flight); u2 would claim index 1: left untouched
    assert [(x.item.uuid, x.start) for x in got or []] == [("u0", 0)]
    assert await r.hget(KEYS.usage("run"), "k1a") == b"1"
    assert await stream_entries(r) == [("k1", "0")]


async def test_late_fill_never_overwrites(r):
    await reserve(r, KEYS, "c", [item("u1")])
    await fill(r, KEYS, "k1", {0: b"first"})
    await fill(r, KEYS, "k1", {0: b"late"})
    assert await r.hget(KEYS.samples("k1"), 0) == b"first"


async def test_usage_counter_expires_after_idle_ttl(r):
    await reserve(r, KEYS, "c", [item("u1")], run_ttl_s=100)
    ttl = await r.pttl(KEYS.usage("run"))
    assert 0 < ttl <= 100_000


def test_prompt_key_is_canonical():
    base = prompt_key("m", {"prompt": "p", "temperature": 0.5, "stop": None})
    assert base == prompt_key("m", {"temperature": 0.5, "prompt": "p"})
    assert base != prompt_key("other-model", {"prompt": "p", "temperature": 0.5})
    assert prompt_key("m", {"prompt": "p", "t": 1.0}) == prompt_key("m", {"prompt": "p", "t": 1})
    msgs = [{"role": "user", "content": "hi"}]
    assert prompt_key("m", {"prompt": msgs}) == prompt_key(
        "m", {"prompt": [{"content": "hi", "role": "user"}]})
    nested = {"prompt": [{"content": "x", "w": 2.0, "meta": {"b": None, "a": [1.0]}}],
              "stop": ("a", 3.0)}
    assert prompt_key("m", nested) == prompt_key(
        "m", {"stop": ["a", 3], "prompt": [{"meta": {"a": [1]}, "w": 2, "content": "x"}]})
    assert prompt_key("m", {"prompt": "p", "t": 0.5}) != prompt_key("m", {"prompt": "p", "t": 1})
    with pytest.raises(TypeError):
        prompt_key("m", {"prompt": object()})


def test_prompt_keys_do_not_change_between_versions():
    """Stored samples are found by these keys: a faster canonical form must give the
    same bytes (values pinned from earlier versions)."""
    chat = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "temperature": 0.7, "max_tokens": 256, "stop": ("\nInput:",)}
    nested = {"prompt": "p", "temperature": 1.0,
              "meta": {"b": None, "a": [1.0, {"x": b"y", "n": None}]}}
    assert prompt_key("m", chat) == "1a225ee56129082cbf6ea4fcef461ec6"
    assert prompt_key("m", nested) == "e3151a2d41956a2897a6cef4aaf7d6d2"


class Level(enum.IntEnum):
    LOW = 1


def test_a_remembered_prompt_key_is_the_key_hashed_afresh():
    """``prompt_key`` remembers keys by the fields' msgpack bytes: values Python holds
    equal but msgpack stores apart (``True`` and ``1``) never share a remembered key, and
    a spec put together from its parts has the bytes of the whole map."""
    rng = random.Random(7)
    scalars = [0, 1, 0.0, 1.0, -0.0, 2.5, True, False, None, "1", "a", b"1", b"a", 2**64,
               float("nan"), Level.LOW, "\udc80"]

    def value(depth: int = 0) -> Any:
        roll = rng.random()
        if depth > 5 or roll < 0.55:
            return rng.choice(scalars)
        if roll < 0.7:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        if roll < 0.8:
            return tuple(value(depth + 1) for _ in range(rng.randint(0, 3)))
        if roll < 0.9:
            return {rng.choice("xyz"): rng.choice(["s", "t"]) for _ in range(rng.randint(1, 2))}
        made = {rng.choice(["x", "y", 1]): value(depth + 1) for _ in range(rng.randint(1, 3))}
        return collections.OrderedDict(made) if rng.random() < 0.2 else made

    def key_or_error(fn: Any, fields: dict[str, Any]) -> str:
        try:
            return fn("m", fields)
        except (TypeError, ValueError, OverflowError) as exc:
            return type(exc).__name__

    protocol._keys_seen.clear()
    for _ in range(4000):
        fields = {name: value() for name in rng.sample(["p", "t", "q"], rng.randint(1, 3))}
        assert key_or_error(prompt_key, fields) == key_or_error(protocol._hash_key, fields), \
            fields
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            whole = msgpack.packb({"v": 1, "route": "r", "model_id": "m", "fields": fields,
                                   "namespace": "ns", "request_id": None}, use_bin_type=True)
            assert encode_spec("r", "m", fields, "ns") == whole
    assert len(protocol._keys_seen) > 100  # the property was tested on remembered keys
    assert prompt_key("m", {"t": 1}) != prompt_key("m", {"t": True})
    assert prompt_key("m", {"t": [1]}) != prompt_key("m", {"t": [True]})


def test_remembered_prompt_keys_stay_within_their_byte_budget(monkeypatch):
    """Long prompts (up to max_prompt_bytes each) must not pile up in memory."""
    monkeypatch.setattr(protocol, "KEYS_REMEMBERED_BYTES", 1 << 20)
    protocol._keys_seen.clear()
    for i in range(40):
        prompt_key("m", {"prompt": f"{i} " + "x" * 100_000})
        assert protocol._keys_bytes <= 1 << 20
        assert 0 < len(protocol._keys_seen) <= 10


def test_unique_ids_are_unique_in_forked_children_too():
    ids = {unique_id() for _ in range(1000)}
    assert len(ids) == 1000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids must not repeat the parent's
        os.write(write, unique_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    assert child not in ids and child[:20] != next(iter(ids))[:20]


def test_messages_carry_a_schema_version():
    with pytest.raises(ProtocolError, match="schema version 99"):
        decode_job(msgpack.packb({"v": 99}))


def test_arq_serializer_is_msgpack_not_pickle():
    job = {"t": 1, "f": "process_batch", "a": [b"payload"], "k": {}, "et": 5}
    data = arq_serialize(job)
    assert not data.startswith(b"\x80")  # pickle protocol header
    assert arq_deserialize(data) == job
    big = arq_deserialize(arq_serialize({**job, "a": [b"x" * 100_000]}))["a"][0]
    assert big == b"x" * 100_000 and repr(big) == "<100000 bytes>"  # arq logs repr(args)
    failed = arq_deserialize(arq_serialize({"r": ValueError("boom")}))
    assert failed == {"r": "ValueError: boom"}


def test_hiredis_packer_writes_what_redis_py_writes():
    from redis.asyncio import Connection

    from cachesaver_dist.connection import HiredisPackConnection

    args = ("EVALSHA", "abc", 2, b"\x00bin\xff", "näme|ns", 1.5, 10**12, "")
    plain = b"".join(Connection().pack_command(*args))
    fast = b"".join(HiredisPackConnection().pack_command(*args))
    assert fast == plain


async def test_fill_many_stores_several_keys_in_one_call(r, specs_sent):
    await reserve(r, KEYS, "c", [item("u1", key="k1"), item("u2", key="k2", n=2)])
    done, _ = await fill_many(r, KEYS, [("k1", {0: b"a"}), ("k2", {0: b"b"}), ("k2", {1: b"c"})])
    assert [[(w.waiter_id, w.samples) for w in per_key] for per_key in done] == [
        [("c:u1", [b"a"])], [], [("c:u2", [b"b", b"c"])]]  # k2 completes with its 2nd part
    again = await fill_many(r, KEYS, [("k1", {0: b"late"})])
    assert again == ([[]], []) and await r.hget(KEYS.samples("k1"), 0) == b"a"


# --- specs, model index and manifests (reserve.lua); import, prune, fork -------------------


def mitem(uuid, rid, ns="ns", n=1, key="k1", run="run", manifest=True):
    return WorkItem(uuid, rid, key, ns, n, run, "sim:x", "sim:x",
                    encode_spec("sim:x", "sim:x", {"prompt": key}, ns, rid), manifest)


async def test_a_claim_keeps_its_spec_and_indexes_the_key_a_hit_writes_neither(r):
    first = item("u1", n=2)
    await reserve(r, KEYS, "c", [first])
    assert await r.hget(KEYS.generation("k1"), "spec") == first.spec
    assert await r.smembers(KEYS.model_keys("sim:x")) == {b"k1"}
    await fill(r, KEYS, "k1", {0: b"a", 1: b"b"})
    await r.hdel(KEYS.generation("k1"), "spec")
    await r.delete(KEYS.model_keys("sim:x"))
    [hit] = await reserve(r, KEYS, "c", [item("u2", ns="other", n=2)])
    assert hit.complete
    assert not await r.hexists(KEYS.generation("k1"), "spec")  # no write on the hit path
    assert not await r.exists(KEYS.model_keys("sim:x"))
    later = item("u3", ns="other", n=1)  # index 2: a claim again
    await reserve(r, KEYS, "c", [later])
    assert await r.hget(KEYS.generation("k1"), "spec") == later.spec
    assert await r.smembers(KEYS.model_keys("sim:x")) == {b"k1"}
    again = item("u4", ns="third", n=4)  # claims index 3; the first spec stays
    await reserve(r, KEYS, "c", [again])
    assert await r.hget(KEYS.generation("k1"), "spec") == later.spec


async def test_the_manifest_keeps_the_first_reservation_of_a_request_id(r):
    await reserve(r, KEYS, "c", [mitem("u1", "a", n=2), mitem("u2", "", n=1),
                                 mitem("u3", "b", ns="other", manifest=False)])
    assert await r.hgetall(KEYS.manifest("run")) == {b"ns\na": b"k1|0|2"}  # no id: not kept
    await reserve(r, KEYS, "c", [mitem("u1", "a", n=2)])  # a retry: the same range
    assert await r.hgetall(KEYS.manifest("run")) == {b"ns\na": b"k1|0|2"}
    await reserve(r, KEYS, "c", [mitem("u4", "a", n=2)])  # another request, the same id
    assert await r.hgetall(KEYS.manifest("run")) == {b"ns\na": b"k1|0|2|*"}
    await reserve(r, KEYS, "c", [mitem("u5", "a", n=2)])
    assert await r.hgetall(KEYS.manifest("run")) == {b"ns\na": b"k1|0|2|*"}
    assert 0 < await r.pttl(KEYS.manifest("run")) <= 3_600_000 * 24 * 7
    await reserve(r, KEYS, "c", [mitem("u6", "z", run="other-run", manifest=False)])
    assert not await r.exists(KEYS.manifest("other-run"))


async def test_manifest_entries_of_two_runs_and_models_in_one_batch(r):
    a = mitem("u1", "a", run="r1")
    b = WorkItem("u2", "b", "k2", "ns", 1, "r2", "sim:y", "sim:y",
                 encode_spec("sim:y", "sim:y", {"prompt": "k2"}), True)
    await reserve(r, KEYS, "c", [a, b])
    assert await r.hgetall(KEYS.manifest("r1")) == {b"ns\na": b"k1|0|1"}
    assert await r.hgetall(KEYS.manifest("r2")) == {b"ns\nb": b"k2|0|1"}
    assert await r.smembers(KEYS.model_keys("sim:y")) == {b"k2"}


async def run_import(r, key, samples, spec=b"", model="sim:x"):
    k = [KEYS.samples(key), KEYS.generation(key), KEYS.model_keys(model)]
    argv = [key, spec, len(samples)]
    for idx, s in samples.items():
        argv += [idx, s]
    [out] = await script(r, "import")(keys=k, args=argv)
    return out[0], out[1], [int(i) for i in out[2]]


async def test_import_is_append_only_idempotent_and_raises_the_mark(r):
    await reserve(r, KEYS, "c", [item("u1", n=2)])  # 0, 1 claimed: 1 stays in flight
    await fill(r, KEYS, "k1", {0: b"s0"})
    spec = encode_spec("sim:x", "sim:x", {"prompt": "k1"})
    assert await run_import(r, "k1", {0: b"s0", 1: b"s1", 4: b"s4"}, spec) == (2, 1, [])
    assert await r.hget(KEYS.generation("k1"), "mark") == b"5"
    released = {f for f in await r.hkeys(KEYS.generation("k1")) if f.startswith(b"x")}
    assert released == {b"x2", b"x3"}  # the gap above the old mark: claimed by the next asker
    assert await run_import(r, "k1", {0: b"s0", 1: b"s1", 4: b"s4"}, spec) == (0, 3, [])
    assert await run_import(r, "k1", {0: b"other", 3: b"s3"}, spec) == (1, 0, [0])
    assert await r.hget(KEYS.samples("k1"), 0) == b"s0"
    assert not await r.hexists(KEYS.generation("k1"), "x3")
    [w] = await fill(r, KEYS, "k1", {1: b"late"})  # the in-flight claim completes
    assert w.samples == [b"s0", b"s1"]  # with the imported sample, never overwritten


async def test_import_keeps_a_spec_and_indexes_a_new_key_only(r):
    spec = encode_spec("sim:x", "sim:x", {"prompt": "k9"})
    await run_import(r, "k9", {0: b"a"}, spec)
    assert await r.smembers(KEYS.model_keys("sim:x")) == {b"k9"}
    await run_import(r, "k8", {0: b"b"})  # no spec: not indexed
    assert await r.smembers(KEYS.model_keys("sim:x")) == {b"k9"}
    assert not await r.hexists(KEYS.generation("k8"), "spec")


async def prune_key(r, key, mode="real", pairs=(), model="sim:x", indexed=True):
    k = [KEYS.samples(key), KEYS.generation(key), KEYS.waiters(key), KEYS.model_keys(model)]
    return await script(r, "prune")(keys=k, args=[mode, key if indexed else "", *pairs])


async def test_prune_skips_a_key_being_generated_and_releases_what_it_deletes(r):
    await reserve(r, KEYS, "c", [item("u1", n=3)])
    await fill(r, KEYS, "k1", {0: b"a", 1: b"b"})  # index 2 in flight, its waiter waits
    assert await prune_key(r, "k1") == [-1, 0]
    await r.delete(KEYS.waiters("k1"))  # even without waiters: index 2 is claimed, unfilled
    assert await prune_key(r, "k1") == [-1, 0]
    await fill(r, KEYS, "k1", {2: b"c"})
    before = {k: await r.dump(k) for k in await r.keys("*")}
    assert await prune_key(r, "k1", "dry", [0, b"a"]) == [1, 0]
    assert await prune_key(r, "k1", "dry") == [3, 1]
    assert {k: await r.dump(k) for k in await r.keys("*")} == before  # dry: nothing
    assert await prune_key(r, "k1", "real", [0, b"a", 1, b"changed"]) == [1, 0]
    assert await r.hkeys(KEYS.samples("k1")) == [b"1", b"2"]
    assert await r.hget(KEYS.generation("k1"), "x0") == b"1"
    [again] = await reserve(r, KEYS, "c", [item("u2", ns="fresh", n=1)])
    assert again.flags == "g"  # index 0 is claimed again
    await fill(r, KEYS, "k1", {0: b"a2"})
    assert await prune_key(r, "k1") == [3, 1]
    assert not await r.exists(KEYS.samples("k1"), KEYS.generation("k1"))
    assert not await r.sismember(KEYS.model_keys("sim:x"), "k1")


async def test_fork_copies_counters_and_refuses_an_existing_run(r):
    await reserve(r, KEYS, "c", [item("u1", n=3)])
    args = ["new", 1.0, 60_000]
    ks = [KEYS.usage("run"), KEYS.usage("new"), KEYS.manifest("new"), KEYS.stats("new"),
          KEYS.runs]
    assert await script(r, "fork")(keys=ks, args=args) == 1
    assert await r.hgetall(KEYS.usage("new")) == {b"k1ns": b"3"}
    assert 0 < await r.pttl(KEYS.usage("new")) <= 60_000
    assert await script(r, "fork")(keys=ks, args=args) == -2
    ks[0] = KEYS.usage("missing")
    ks[1] = KEYS.usage("new2")
    assert await script(r, "fork")(keys=ks, args=["new2", 1.0, 60_000]) == -1


def test_arq_job_bodies_and_keys_are_arqs_own():
    from arq import constants
    from arq.jobs import deserialize_job, serialize_job

    from cachesaver_dist.protocol import (
        ARQ_IN_PROGRESS,
        ARQ_JOB,
        ARQ_RETRY,
        CACHE_JOB,
        arq_deserialize,
        arq_serialize,
        encode_arq_job,
    )

    assert (ARQ_JOB, ARQ_IN_PROGRESS, ARQ_RETRY) == (
        constants.job_key_prefix, constants.in_progress_key_prefix, constants.retry_key_prefix)
    job = deserialize_job(encode_arq_job(b"payload", 1234), deserializer=arq_deserialize)
    assert (job.function, list(job.args), job.kwargs, job.job_try) == (
        CACHE_JOB, [b"payload"], {}, None)
    assert job.enqueue_time.timestamp() == 1.234
    assert encode_arq_job(b"payload", 1234) == serialize_job(
        CACHE_JOB, (b"payload",), {}, None, 1234, serializer=arq_serialize)


def test_a_job_and_its_wake_token_copy_are_encoded_as_apart():
    from cachesaver_dist.protocol import decode_job, encode_job, encode_job_and_copy

    items = [item("a"), item("b", n=3)._replace(manifest=True)]
    for batch, after in (("", ""), ("b1", "")):
        body, copy = encode_job_and_copy("c", items, 60, batch, after)
        assert (body, copy) == (encode_job("c", items, 60, batch, after),
                                encode_job("c", items, 60, batch, after, specs=False))
        assert decode_job(body).items == items  # the body whole, its specs included
        assert decode_job(copy).items == [it._replace(spec=b"") for it in items]
        assert all(it.spec for it in items)  # (the copy did not empty the items' specs)


async def test_batches_of_one_run_in_one_call_share_its_counters(r):
    """Two client batches (two groups) of the same run, reserved in one call: their
    requests for the same prompt and namespace get consecutive ranges, and a corrupt
    counter fails the call with what is wrong."""
    from cachesaver_dist.protocol import CacheJob
    from cachesaver_dist.scripts import reserve_jobs

    jobs = [CacheJob("c1", [item("a", n=2)], 60, "b1"), CacheJob("c2", [item("b", n=1)], 60, "b2"),
            CacheJob("c1", [item("c", n=1, run="other")], 60, "b3")]
    got = await reserve_jobs(r, KEYS, jobs)
    assert [[x.start for x in per_job] for per_job in got] == [[0], [2], [0]]
    assert await r.hgetall(KEYS.usage("run")) == {b"k1ns": b"3"}
    assert 0 < await r.pttl(KEYS.usage("run"))
    await r.hset(KEYS.usage("run"), "k1ns", "three")
    with pytest.raises(Exception, match="CORRUPT usage counter k1ns"):
        await reserve(r, KEYS, "c3", [item("d")], batch="b4")


async def test_withdraw_deletes_only_the_claims_of_requests_that_gave_up(r):
    """withdraw.lua: entries holding only withdrawn indices go; their indices without a
    sample are released; the requests' waiter records go; everything else stays."""
    from cachesaver_dist.protocol import claimed_indices
    from cachesaver_dist.scripts import withdraw

    [gave_up] = await reserve(r, KEYS, "c", [item("u1", n=2)], batch="b1")
    [other] = await reserve(r, KEYS, "d", [item("u2", ns="other", n=3)], batch="b2")
    await r.xadd(KEYS.work_stream("sim:x"), {"key": "k1", "idx": "0,5"})  # mixed: kept
    assert (gave_up.flags, other.flags) == ("gg", "ddg")
    record = await r.hget(KEYS.reservations("c", "b1"), "c:u1")
    assert claimed_indices(record) == [0, 1]
    assert await withdraw(r, KEYS, "sim:x", "k1", ["c:u1"], [0, 1]) == (1, 2)
    assert await stream_entries(r) == [("k1", "2"), ("k1", "0,5")]
    assert await r.hmget(KEYS.generation("k1"), "x0", "x1") == [b"1", b"1"]
    assert await r.hkeys(KEYS.waiters("k1")) == [b"d:u2"]
    [again] = await reserve(r, KEYS, "e", [item("u3", ns="third", n=1)])
    assert again.flags == "g"  # a released index is claimed by the next request that needs it
    # an entry a batch worker was handed (alive or not) is its to finish: left alone
    stream = KEYS.work_stream("sim:x")
    await r.xgroup_create(stream, CONSUMER_GROUP, id="0")
    await r.xreadgroup(CONSUMER_GROUP, "w1", {stream: ">"}, count=10)
    assert await withdraw(r, KEYS, "sim:x", "k1", ["e:u3"], [0]) == (0, 0)
    assert ("k1", "0") in await stream_entries(r)
    with pytest.raises(ProtocolError):
        claimed_indices(b"zero|gg")


async def test_give_back_returns_a_failed_range_as_if_never_asked(r):
    """give_back.lua: the range of a request that failed goes back to its namespace with
    its reservation record and manifest entry, so the same request asked again gets it."""
    from cachesaver_dist.scripts import give_back

    failed = item("u1", n=2, rid="r1")._replace(manifest=True)
    [res] = await reserve(r, KEYS, "c", [failed], batch="b")
    mfield = protocol.manifest_field("ns", "r1")
    assert (res.start, await r.hget(KEYS.manifest("run"), mfield)) == (0, b"k1|0|2")
    assert await give_back(r, KEYS, "c", "b", [failed]) == 1
    assert await r.hgetall(KEYS.usage("run")) == {}
    assert await r.hget(KEYS.reservations("c", "b"), "c:u1") is None
    assert await r.hget(KEYS.manifest("run"), mfield) is None
    [again] = await reserve(r, KEYS, "c", [item("u2", n=2, rid="r1")._replace(manifest=True)],
                            batch="b2")
    assert again.start == 0 and await r.hget(KEYS.manifest("run"), mfield) == b"k1|0|2"
    assert await give_back(r, KEYS, "c", "b", [failed]) == 0  # its record is gone


async def test_give_back_never_returns_a_range_with_a_later_one_after_it(r):
    """Only the last range of a counter goes back (else an index would be handed out
    twice); several failures are taken last to first, so consecutive ones all go back."""
    from cachesaver_dist.scripts import give_back

    a, b, c = item("u1"), item("u2"), item("u3", n=2)
    await reserve(r, KEYS, "c", [a, b, c], batch="b")  # 0, 1, 2-3
    records = await r.hgetall(KEYS.reservations("c", "b"))
    assert await give_back(r, KEYS, "c", "b", [a]) == 0
    assert await give_back(r, KEYS, "c", "b", [a, b]) == 0
    assert await r.hget(KEYS.usage("run"), "k1ns") == b"4"
    assert await r.hgetall(KEYS.reservations("c", "b")) == records  # nothing touched
    assert await give_back(r, KEYS, "c", "b", [b, c]) == 2
    assert await r.hget(KEYS.usage("run"), "k1ns") == b"1"
    assert list(await r.hgetall(KEYS.reservations("c", "b"))) == [b"c:u1"]
    [again] = await reserve(r, KEYS, "c", [item("u4")], batch="b2")
    assert again.start == 1
    other = item("u5", ns="ns2")  # another namespace's counter is its own
    await reserve(r, KEYS, "c", [other], batch="b3")
    assert await give_back(r, KEYS, "c", "b3", [other]) == 1
    assert await r.hget(KEYS.usage("run"), "k1ns") == b"2"


async def test_a_time_to_live_redis_cannot_keep_is_refused_before_anything_is_written(
        redis, keys):
    """A PEXPIRE refused after a script's writes would leave them without expiry (a claim
    with no work queued: its prompt would wait for ever): the scripts check first."""
    from cachesaver_dist import runs

    with pytest.raises(Exception, match="run's time to live") as info:
        await reserve(redis, keys, "c", [item("u1")], run_ttl_s=10**20)
    assert "nothing was written" in str(info.value)
    assert await redis.keys(f"{keys.prefix}*") == []
    await reserve(redis, keys, "c", [item("u1")])  # run "run" now has counters
    with pytest.raises(Exception, match="time to live"):
        await runs.fork(redis, keys, "run", "new", run_ttl_s=10**20)
    assert not await redis.exists(keys.usage("new"))
    assert await redis.zscore(keys.runs, "new") is None


async def test_reply_messages_built_in_lua_are_what_encode_replies_writes(redis):
    """``lua/lib/replies.lua`` (the reserve call's published replies), byte for byte,
    over every length and integer encoding msgpack has for what a reply holds."""
    from cachesaver_dist.protocol import encode_replies, reply
    from cachesaver_dist.scripts import LUA_DIR

    lua = (LUA_DIR / "lib" / "replies.lua").read_text() + """
local parts, count, i = {}, 0, 1
while i <= #ARGV do
  local n = tonumber(ARGV[i + 3])
  local samples = {}
  for j = 1, n do samples[j] = ARGV[i + 3 + j] end
  mp_reply(parts, ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], samples)
  count, i = count + 1, i + 4 + n
end
return mp_message(parts, count)"""
    starts = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32 + 5, 2**40]
    sizes = [0, 31, 32, 255, 256, 65535, 65536]
    replies, argv = [], []
    for i, start in enumerate(starts):
        samples = [bytes([65 + i]) * size for size in sizes[: 1 + i % len(sizes)]]
        if i == 3:
            samples = [b"s"] * 17  # a 16-bit array header
        request_id = "r" * (i * 7 + 1)  # fixstr and str8
        replies.append(reply(request_id, start, "c" * len(samples), samples))
        argv += [request_id, start, "c" * len(samples), len(samples), *samples]
    assert await redis.eval(lua, 0, *argv) == encode_replies(replies)
    many = [reply("x", 0, "c", [b"y"])] * 20  # a 16-bit array of replies
    argv = ["x", 0, "c", 1, b"y"] * 20
    assert await redis.eval(lua, 0, *argv) == encode_replies(many)
