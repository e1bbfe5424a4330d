"""Runs: the manifest a run keeps, replay (and what it refuses), fork, the runs listing."""

from __future__ import annotations

import asyncio

import pytest
import redis as sync_redis

from cachesaver_dist import Batch, OnlineAPI, ReplayError, Request, SimModel
from cachesaver_dist.errors import InvalidRequestError
from cachesaver_dist.protocol import decode_manifest_entry, manifest_field, prompt_key
from tests.test_archive import cli, cli_json, record

MODEL_ID = "sim:archive"  # record()'s model


def replay(redis_url, keys, run, **kw) -> OnlineAPI:
    return OnlineAPI(MODEL_ID, cache=redis_url, prefix=keys.prefix, replay=run,
                     reply_timeout=0.5, request_timeout=5, **kw)


async def test_manifest_records_each_request_id_range(redis_url, keys):
    requests = [Request("m prompt", 2, "a", "ns1"), Request("m prompt", 1, "b", "ns1"),
                Request("m prompt", 3, "c", "ns2"), Request("m prompt", 1, None, "ns2")]
    await record(redis_url, keys, "rec", requests)
    client = sync_redis.Redis.from_url(redis_url)
    try:
        manifest = {k.decode(): decode_manifest_entry(v)
                    for k, v in client.hgetall(keys.manifest("rec")).items()}
        assert 0 < client.pttl(keys.manifest("rec")) <= client.pttl(keys.usage("rec")) + 1000
    finally:
        client.close()
    key = prompt_key(MODEL_ID, {"prompt": "m prompt"})
    assert {f: (e.key, e.start, e.n, e.ambiguous) for f, e in manifest.items()} == {
        manifest_field("ns1", "a"): (key, 0, 2, False),
        manifest_field("ns1", "b"): (key, 2, 1, False),
        manifest_field("ns2", "c"): (key, 1, 3, False),
    }  # the request without a request_id (ordered first: index 0 of ns2) is not recorded


async def test_without_manifest_nothing_is_recorded(redis_url, keys):
    async with OnlineAPI(SimModel("plain"), cache=redis_url, prefix=keys.prefix,
                         run="plain") as api:
        await api.request(Request("p", 1, "a", "ns"))
    client = sync_redis.Redis.from_url(redis_url)
    assert not client.exists(keys.manifest("plain"))
    client.close()


async def test_replay_in_any_order_and_batching_serves_the_recorded_samples(redis_url, keys):
    requests = [Request(f"r prompt {i % 3}", 1 + i % 2, f"id{i}", f"ns{i % 2}")
                for i in range(12)]
    recorded = await record(redis_url, keys, "rec", requests)
    async with replay(redis_url, keys, "rec") as api:
        backwards = await asyncio.gather(*(api.request(r) for r in reversed(requests)))
        as_batch = await api.batch_request(Batch(requests[::2]))
    assert {f"{r.namespace}/{r.request_id}": g.data
            for r, g in zip(reversed(requests), backwards)} == recorded
    assert [g.data for g in as_batch] == [recorded[f"{r.namespace}/{r.request_id}"]
                                          for r in requests[::2]]
    assert all(all(g.cached) for g in backwards)


async def test_replay_refuses_what_the_manifest_does_not_hold(redis_url, keys):
    await record(redis_url, keys, "rec", [Request("the prompt", 2, "known", "ns")])
    async with replay(redis_url, keys, "rec") as api:
        with pytest.raises(ReplayError, match="holds no request_id 'unknown'"):
            await api.request(Request("the prompt", 2, "unknown", "ns"))
        with pytest.raises(ReplayError, match="holds no request_id 'known' in namespace 'x'"):
            await api.request(Request("the prompt", 2, "known", "x"))
        with pytest.raises(ReplayError, match="changed since run 'rec'"):
            await api.request(Request("a changed prompt", 2, "known", "ns"))
        with pytest.raises(ReplayError, match="n=3; run 'rec' recorded n=2"):
            await api.request(Request("the prompt", 3, "known", "ns"))
        with pytest.raises(ReplayError, match="has none"):
            await api.request(Request("the prompt", 2, None, "ns"))
        assert (await api.request(Request("the prompt", 2, "known", "ns"))).cached == [True] * 2
    assert issubclass(ReplayError, InvalidRequestError)
    client = sync_redis.Redis.from_url(redis_url)
    try:  # nothing was generated or queued by the refused requests
        assert client.hlen(keys.samples(prompt_key(MODEL_ID, {"prompt": "the prompt"}))) == 2
        assert not client.exists(keys.samples(prompt_key(MODEL_ID,
                                                          {"prompt": "a changed prompt"})))
        assert not list(client.scan_iter(match=f"{keys.prefix}llm:*x"))
    finally:
        client.close()


async def test_replay_refuses_missing_samples_an_unknown_run_and_ambiguous_ids(redis_url, keys):
    await record(redis_url, keys, "rec", [Request("gone", 1, "a", "ns"),
                                          Request("twice", 1, "dup", "ns"),
                                          Request("twice", 1, "dup", "ns")])
    client = sync_redis.Redis.from_url(redis_url)
    client.delete(keys.samples(prompt_key(MODEL_ID, {"prompt": "gone"})))
    client.close()
    async with replay(redis_url, keys, "rec") as api:
        with pytest.raises(ReplayError, match=r"1 of the 1 samples .* are not in this cache"):
            await api.request(Request("gone", 1, "a", "ns"))
        with pytest.raises(ReplayError, match="used more than once"):
            await api.request(Request("twice", 1, "dup", "ns"))
    with pytest.raises(ReplayError, match="has no manifest"):
        async with replay(redis_url, keys, "never-recorded") as api:
            await api.request(Request("gone", 1, "a", "ns"))
    with pytest.raises(InvalidRequestError, match="replay=RUN"):
        replay(redis_url, keys, "rec", manifest=True)


async def test_recording_the_same_ranges_again_keeps_the_manifest_replayable(redis_url, keys):
    """A run reset with ``drop-run`` and recorded anew gets the same ranges: the manifest
    entries stay as they were (only a different range marks an id ambiguous)."""
    requests = [Request("again", 2, "a", "ns"), Request("again", 1, "b", "ns")]
    first = await record(redis_url, keys, "redo", requests)
    assert cli(redis_url, keys.prefix, "drop-run", "redo").returncode == 0
    assert await record(redis_url, keys, "redo", requests) == first
    async with replay(redis_url, keys, "redo") as api:
        got = await api.batch_request(Batch(requests))
    assert {f"ns/{r.request_id}": g.data for r, g in zip(requests, got)} == first
    bad = cli(redis_url, keys.prefix, "drop-run", "a run")
    assert bad.returncode == 1 and "run id 'a run' is not valid" in bad.stderr


async def test_fork_continues_from_the_copied_counters(redis_url, keys):
    model = SimModel("archive")
    async with OnlineAPI(model, cache=redis_url, prefix=keys.prefix, run="base") as api:
        first = await api.request(Request("fork prompt", 3, "a", "x"))
    assert [m["index"] for m in first.metadata] == [0, 1, 2]
    done = cli(redis_url, keys.prefix, "fork", "base", "branch")
    assert done.returncode == 0, done.stderr
    assert "1 counter(s) copied" in done.stdout

    async def next_in(run: str):
        async with OnlineAPI(model, cache=redis_url, prefix=keys.prefix, run=run) as api:
            return await api.request(Request("fork prompt", 2, "b", "x"))

    branch, base, fresh = await next_in("branch"), await next_in("base"), await next_in("new")
    assert [m["index"] for m in branch.metadata] == [3, 4]  # continues after the checkpoint
    assert base.data == branch.data and base.cached == [True, True]  # the same samples
    assert [m["index"] for m in fresh.metadata] == [0, 1] and fresh.data == first.data[:2]
    assert model.calls == [("fork prompt", 3), ("fork prompt", 2)]

    exists = cli(redis_url, keys.prefix, "fork", "base", "branch")
    assert exists.returncode == 1 and "exists already" in exists.stderr
    unknown = cli(redis_url, keys.prefix, "fork", "no-such-run", "other")
    assert unknown.returncode == 1 and "has no counters" in unknown.stderr
    # --run-ttl 0 keeps the new run without expiry; a negative one is refused, not applied
    assert cli(redis_url, keys.prefix, "fork", "base", "kept", "--run-ttl", "0").returncode == 0
    negative = cli(redis_url, keys.prefix, "fork", "base", "lost", "--run-ttl", "-5")
    assert negative.returncode == 2 and "--run-ttl: must be a whole number of seconds from 0" \
        in negative.stderr
    client = sync_redis.Redis.from_url(redis_url)
    try:
        assert client.ttl(keys.usage("kept")) == -1 and client.hlen(keys.usage("kept")) == 1
        assert not client.exists(keys.usage("lost"))
    finally:
        client.close()


async def test_runs_lists_namespaces_requests_samples_and_age(redis_url, keys):
    await record(redis_url, keys, "listed", [Request("l1", 2, "a", "alpha"),
                                             Request("l2", 3, "b", "beta"),
                                             Request("l1", 1, "c", "beta")])
    async with OnlineAPI(SimModel("archive"), cache=redis_url, prefix=keys.prefix,
                         run="plain") as api:
        await api.request(Request("l1", 1, "z", "alpha"))
    assert cli(redis_url, keys.prefix, "fork", "plain", "forked").returncode == 0
    runs = {r["run"]: r for r in cli_json(redis_url, keys.prefix, "runs")}
    assert set(runs) == {"listed", "plain", "forked"}
    listed = runs["listed"]
    assert listed["namespaces"] == {"alpha": 2, "beta": 4}
    assert (listed["requests"], listed["samples_used"], listed["manifest"]) == (3, 6, 3)
    assert listed["prompt_keys"] == 2 and 0 <= listed["age_s"] < 60
    assert 0 < listed["expires_in_s"] <= 7 * 86400
    assert (runs["plain"]["manifest"], runs["plain"]["requests"]) == (0, 1)
    # a fork has no statistics of its own: no count, not 0 requests
    assert (runs["forked"]["requests"], runs["forked"]["samples_used"]) == (None, 1)
    assert runs["forked"]["samples_generated"] is None
    table = cli(redis_url, keys.prefix, "runs")
    assert table.returncode == 0 and "listed" in table.stdout and "alpha, beta" in table.stdout
    [forked_row] = [line for line in table.stdout.splitlines() if "forked" in line]
    assert forked_row.split("│")[3].strip() == "-"


async def test_stats_of_a_run_expire_and_the_run_index_is_trimmed(redis_url, keys):
    from cachesaver_dist import defaults

    await record(redis_url, keys, "ttl", [Request("t", 1, "a", "ns")])
    client = sync_redis.Redis.from_url(redis_url)
    try:
        assert 0 < client.ttl(keys.stats("ttl")) <= defaults.STATS_TTL_S
        assert client.ttl(keys.stats()) == -1  # the total is kept
        client.zadd(keys.runs, {"ancient": 1.0})
    finally:
        client.close()
    from cachesaver_dist import stats

    stats._refreshed.clear()
    await record(redis_url, keys, "ttl2", [Request("t", 1, "b", "ns")])
    client = sync_redis.Redis.from_url(redis_url)
    try:
        assert client.zscore(keys.runs, "ancient") is None
        assert client.zscore(keys.runs, "ttl2") is not None
    finally:
        client.close()
