"""The sharding design of ``docs/scaling.md`` keeps the contract: the same deterministic
workload on one primary and on three independent primaries, sharded by prompt key
(``bench/shard_router.py``), gives identical answers request by request, no index twice
in a namespace, exactly samples 0..highest per prompt key, the same model calls and the
same run stats once merged. Routing by request id instead must break it (the checks
have teeth). A reduced version of ``bench/sharding.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import shard_router as S
from cachesaver_dist.protocol import Keys
from cachesaver_dist.server import EmbeddedServer

pytestmark = pytest.mark.processes

WORKLOAD = S.Workload(prompts=10, namespaces=2, rounds=3, batch_tasks=3, single_callers=4)


@pytest.fixture(scope="module")
def shard_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Three private servers, the shards (the reference is the session's ``redis_url``)."""
    servers = [EmbeddedServer(Path(tmp_path_factory.mktemp(f"shard{i}")), persist=False)
               for i in range(3)]
    try:
        yield [s.start() for s in servers]
    finally:
        for s in servers:
            s.stop()


def test_jump_hash_is_stable_and_moves_only_to_a_new_shard() -> None:
    keys = [f"{i:016x}{0:016x}" for i in range(0, 2**64, 2**64 // 997)]
    three = [S.shard_of_key(k, 3) for k in keys]
    assert three == [S.shard_of_key(k, 3) for k in keys]
    assert sorted(set(three)) == [0, 1, 2]
    four = [S.shard_of_key(k, 4) for k in keys]
    assert all(a == b or b == 3 for a, b in zip(three, four))


async def test_sharded_by_prompt_key_matches_one_primary(redis_url: str, keys: Keys,
                                                        shard_urls: list[str]) -> None:
    res = await S.compare(redis_url, shard_urls, keys.prefix, WORKLOAD, hit_count=60,
                          hit_callers=16)
    assert S.violations(res) == {}
    assert res["requests"] > 50 and res["keys_sharded"] == WORKLOAD.prompts
    assert res["model_calls_ref"] == res["model_calls_sharded"] > 0
    assert res["samples_ref"] == res["samples_sharded"]
    assert sum(res["keys_per_shard"]) == WORKLOAD.prompts
    assert min(res["keys_per_shard"]) > 0
    assert res["stats_sharded"]["samples_generated"] == res["samples_ref"]
    for side in ("1 primary", "3 shards"):
        hits = res["throughput"]["hits"][side]
        assert hits["hits"] == hits["requests"] == 60


async def test_routing_by_request_id_breaks_the_contract(redis_url: str, keys: Keys,
                                                         shard_urls: list[str]) -> None:
    ctl = Keys(keys.prefix + "ctl:")  # under the test's prefix: deleted with it
    res = await S.compare(redis_url, shard_urls, ctl.prefix, WORKLOAD, route_by="request_id")
    found = S.violations(res)
    assert found["keys_on_two_shards"] > 0
    assert found["model_calls_differ"] > 0
    assert found["index_twice_sharded"] > 0
