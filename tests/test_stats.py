"""Accounting: the ``stats`` command's figures equal what the simulator counted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cachesaver_dist import OnlineAPI, Request
from cachesaver_dist.report import load_prices, price_of, summarize
from tests.conftest import ROOT, subprocess_env
from tests.test_backends import MODEL, sim, sim_counters, start_workers  # noqa: F401

pytestmark = pytest.mark.processes
ROUTE = f"openai:{MODEL}"


def stats_rows(redis_url: str, prefix: str, run: str, prices: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "cachesaver_dist.cli", "stats", "--run", run, "--json",
         "--prefix", prefix, "--prices", prices],
        env=subprocess_env(redis_url), capture_output=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


async def test_stats_equal_what_the_simulator_counted(sim, redis_url, keys, processes,  # noqa: F811
                                                      tmp_path):
    start_workers(processes, ROUTE, sim, "sk-test")
    prompts = [f"stats prompt {i}" for i in range(6)]
    async with OnlineAPI(ROUTE, cache=redis_url, prefix=keys.prefix, run="acct") as api:
        for ns, n in (("a", 2), ("b", 3), ("a", 1)):  # b reuses a's 2, then a takes index 2
            for i, p in enumerate(prompts):
                await api.request(Request(p, n, f"{ns}{i}", ns))
    counted = await sim_counters(sim)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({MODEL: [1.0, 2.0]}))
    [row] = stats_rows(redis_url, keys.prefix, "acct", str(prices))
    assert row["model"] == ROUTE
    assert row["requests"] == 18
    assert row["samples_generated"] == counted["samples"] == 6 * 3
    assert row["samples_cached"] == 6 * 2 + 6 * 1  # b's first two; a's third from b
    assert row["samples_deduplicated"] == 0
    assert row["tokens_generated"] == counted["prompt_tokens"] + counted["completion_tokens"]
    spent = (counted["prompt_tokens"] * 1.0 + counted["completion_tokens"] * 2.0) / 1e6
    assert row["dollars_spent"] == pytest.approx(spent)
    assert row["dollars_saved"] > 0


def test_price_table_matches_provider_prefixes_and_reports_unpriced():
    prices = load_prices()
    assert price_of("together:meta-llama/Llama-3.3-70B-Instruct-Turbo", prices) == (0.88, 0.88)
    assert price_of("sim:demo", prices) is None
    row = summarize({"requests": 1, "samples_cached": 2, "completion_tokens_cached": 10}, None)
    assert row["samples_cached"] == 2 and row["dollars_saved"] is None


def test_bad_price_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"price file .* is not readable"):
        load_prices(bad)
    cases = [('{"m": "cheap"}', r"'m' must be .* two numbers of dollars, got 'cheap'"),
             ('{"m": [1, "x"]}', r"'m' must be .*got \[1, 'x'\]"),
             ("[1, 2]", r"must hold \{.model.")]
    for content, named in cases:
        bad.write_text(content)
        with pytest.raises(ValueError, match=named):
            load_prices(bad)


async def test_drop_run_resets_a_runs_counters(redis_url, keys):
    from cachesaver_dist import SimModel

    model = SimModel("drop")
    async with OnlineAPI(model, cache=redis_url, prefix=keys.prefix, run="exp-1") as api:
        first = await api.request(Request("d", 2, "a", "ns"))
        done = subprocess.run(
            [sys.executable, "-m", "cachesaver_dist.cli", "drop-run", "exp-1", "--prefix",
             keys.prefix], env=subprocess_env(redis_url), capture_output=True, timeout=60)
        assert done.returncode == 0 and b"counters dropped" in done.stdout, done.stderr
        again = await api.request(Request("d", 2, "b", "ns"))
    assert again.data == first.data and again.cached == [True, True]


def test_stats_of_an_unused_prefix_names_it(redis_url, keys):
    done = subprocess.run(
        [sys.executable, "-m", "cachesaver_dist.cli", "stats", "--prefix", keys.prefix],
        env=subprocess_env(redis_url), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"no statistics yet under prefix {keys.prefix!r}" in done.stdout


@pytest.mark.parametrize("as_json", [False, True])
def test_stats_of_an_unknown_run_is_an_error(redis_url, keys, as_json):
    """A typo in --run is an error with --json too (not ``[]`` and status 0): the message
    on stderr, nothing on stdout, status 1."""
    done = subprocess.run(
        [sys.executable, "-m", "cachesaver_dist.cli", "stats", "--run", "no-such-run",
         "--prefix", keys.prefix, *(["--json"] if as_json else [])],
        env=subprocess_env(redis_url), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert done.stderr.startswith("cachesaver-dist: no statistics yet for run 'no-such-run' "
                                  f"under prefix {keys.prefix!r}"), done.stderr
    assert "'cachesaver-dist runs' lists the runs" in done.stderr


def test_account_adds_requests_samples_and_tokens_per_kind():
    from cachesaver_dist.protocol import CACHED, DUPLICATED, GENERATED
    from cachesaver_dist.stats import account

    tally: dict = {}
    usage = {"prompt_tokens": 10, "completion_tokens": 4}
    account(tally, "r1", "m", CACHED + DUPLICATED, [usage, {"prompt_tokens": 2.5}])
    account(tally, "r1", "m", CACHED, [None])  # no usage: the sample counts, no tokens
    account(tally, "r2", "m", GENERATED, [{"prompt_tokens": "7", "completion_tokens": 1}])
    assert tally == {
        ("r1", "m|requests"): 2, ("r1", "m|samples_cached"): 2,
        ("r1", "m|prompt_tokens_cached"): 10, ("r1", "m|completion_tokens_cached"): 4,
        ("r1", "m|samples_deduplicated"): 1, ("r1", "m|prompt_tokens_deduplicated"): 2.5,
        ("r2", "m|requests"): 1, ("r2", "m|samples_generated"): 1,
        ("r2", "m|completion_tokens_generated"): 1,  # a count that is not a number: left out
    }


def test_a_sample_served_again_is_counted_without_being_decoded_again(monkeypatch,
                                                                       record_decodes):
    from cachesaver_dist import outbox
    from cachesaver_dist.errors import ProtocolError
    from cachesaver_dist.memo import BytesMemo
    from cachesaver_dist.protocol import encode_sample

    decoded = record_decodes(outbox)
    samples = [encode_sample(f"answer {i:02d}", {"usage": {"prompt_tokens": i, "other": "x"}})
               for i in range(20)]
    entry = max(map(len, samples)) + outbox._ENTRY_BYTES
    monkeypatch.setattr(outbox, "_usages", BytesMemo(16 * entry))  # 16 such at most

    assert outbox.usage_of(samples[0]) == {"prompt_tokens": 0}  # the token counts only
    assert outbox.usage_of(bytes(bytearray(samples[0]))) == {"prompt_tokens": 0}  # equal bytes
    assert len(decoded) == 1
    for raw in samples:
        outbox.usage_of(raw)
    assert 0 < len(outbox._usages) <= 16  # bounded: the memory is emptied when full

    huge = encode_sample("x" * entry, {"usage": {"prompt_tokens": 1}})  # over 1/16: not kept
    assert outbox.usage_of(huge) == {"prompt_tokens": 1}
    assert outbox._usages.get(huge) is None

    bad = b"\xc1 not msgpack"
    for _ in range(2):  # an unreadable sample is never remembered: refused every time
        with pytest.raises(ProtocolError):
            outbox.usage_of(bad)
    assert outbox._usages.get(bad) is None
