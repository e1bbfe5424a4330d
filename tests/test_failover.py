"""A Sentinel failover under load loses nothing when workers wait for a replica.

Redis replicates asynchronously: after ``SENTINEL FAILOVER`` the old primary keeps
accepting writes on connections opened before it, until Sentinel demotes it and it
throws them away. Workers started with ``--wait-replicas 1`` (and direct clients given
the same setting) answer only from writes the replica holds. The fault run is
``bench/faults.py``'s (real servers, a sentinel, CLI workers, client processes
recording every sample); without the option the same run hands indices out twice (see
docs/reliability.md).
"""

from __future__ import annotations

import pytest

from bench import faults

pytestmark = pytest.mark.processes


@pytest.mark.parametrize("direct", [False, True], ids=["via-cache-workers", "direct-clients"])
def test_sentinel_failover_with_wait_replicas_keeps_the_contract(tmp_path, monkeypatch, direct):
    """``direct``: the clients reserve themselves, waiting for the replica as the workers
    do (``CACHESAVER_WAIT_REPLICAS``)."""
    monkeypatch.setattr(faults, "DIRECT", direct)
    [fault] = [f for f in faults.FAULTS if f.name == "sentinel-failover-wait"]
    result = faults.run_fault(fault, tmp_path / fault.name)
    assert result.get("error") is None, result
    assert result["requests"] > 100 and result["lost"] == 0, result
    assert result["indices_handed_out_twice"] == 0, result
    assert result["samples_changed_or_lost"] == 0, result
    assert result["workers_died"] == [], result
