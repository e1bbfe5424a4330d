"""Tables fit the terminal: at 80 columns no header is cut (columns are left out by
importance and named), and every table command has ``--json``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from cachesaver_dist.deadletters import queue_dead_letter
from cachesaver_dist.demo import _COLUMNS as DEMO_COLUMNS
from cachesaver_dist.protocol import CONSUMER_GROUP
from cachesaver_dist.report import COLUMNS as STATS_COLUMNS
from cachesaver_dist.stats import account, write_tally
from cachesaver_dist.tables import Col, fit_table
from tests.conftest import ROOT, subprocess_env

LONG_MODEL = "together:meta-llama/Llama-3.3-70B-Instruct-Turbo"


def run(redis_url: str, prefix: str, *args: str, columns: int = 80
        ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "cachesaver_dist.cli", *args, "--prefix", prefix],
                          env=subprocess_env(redis_url, COLUMNS=str(columns)),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done


def headers(out: str) -> list[list[str]]:
    """Each table's column headers, read back from the rendered header rows."""
    tables, block = [], None
    for line in out.splitlines():
        if line.startswith("┏"):
            block = []
        elif line.startswith("┡") and block is not None:
            cells = [[c.strip() for c in row.split("┃")[1:-1]] for row in block]
            tables.append([" ".join(filter(None, col)) for col in zip(*cells)])
            block = None
        elif block is not None:
            block.append(line)
    return tables


def hidden(out: str) -> list[str]:
    found = re.search(r"not shown at \d+ columns: (.*?) \(--json", " ".join(out.split()))
    return found.group(1).split(", ") if found else []


def assert_fits(out: str, cols: list[Col], width: int) -> list[str]:
    """No header is cut, nothing is wider than ``width``, and the columns not shown are
    named; returns the headers shown."""
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= width
    [shown] = [h for h in headers(out) if h[0] == cols[0].header]
    expected = [c.header for c in cols]
    assert sorted(shown + hidden(out)) == sorted(expected), (shown, hidden(out))
    assert shown == [h for h in expected if h in shown]  # in order
    return shown


async def fill_stats(redis, keys) -> None:
    tally: dict = {}
    usage = {"prompt_tokens": 123456, "completion_tokens": 654321}
    for run_id in ("experiment-2024-11-03-ablation-b", "r2"):
        for _ in range(3):
            account(tally, run_id, LONG_MODEL, "ccdg", [usage] * 4)
            account(tally, run_id, "sim:x", "g", [None])
    pipe = redis.pipeline(transaction=False)
    write_tally(pipe, keys, tally)
    await pipe.execute()


async def test_stats_fit_80_columns_and_json_has_every_column(redis_url, keys, redis):
    await fill_stats(redis, keys)
    narrow = run(redis_url, keys.prefix, "stats").stdout
    shown = assert_fits(narrow, STATS_COLUMNS, 80)
    assert {"run", "model", "requests", "generated", "cached", "$ saved"} <= set(shown)
    body = [line.split("│") for line in narrow.splitlines() if line.startswith("│")]
    models = "".join(cells[2].strip() for cells in body)
    assert models.count(LONG_MODEL) == 3  # long names fold, not cut (2 runs and the total)
    # where the table can fit so, run ids and model names stay on one line (to copy them)
    from io import StringIO

    from rich.console import Console

    row = {"run": "run-8c17e1f3b6b7", "model": "openai:meta-llama/Llama-3.1-8B",
           "requests": 1234, "samples_generated": 99, "samples_cached": 1135}
    console = Console(width=80, file=StringIO())
    console.print(fit_table(STATS_COLUMNS, [row], 80))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert_fits(out, STATS_COLUMNS, 80)
    assert any(row["run"] in line for line in out.splitlines()), out  # the model folds
    wide = Console(width=100, file=StringIO())
    wide.print(fit_table(STATS_COLUMNS, [row], 100))
    out = wide.file.getvalue()  # type: ignore[attr-defined]
    assert any(row["run"] in line and row["model"] in line for line in out.splitlines()), out
    wide = run(redis_url, keys.prefix, "stats", columns=220).stdout
    assert assert_fits(wide, STATS_COLUMNS, 220) == [c.header for c in STATS_COLUMNS]
    rows = json.loads(run(redis_url, keys.prefix, "stats", "--json").stdout)
    assert len(rows) == 6 and {"tokens_deduplicated", "dollars_spent"} <= set(rows[0])


async def test_dead_letters_and_top_fit_80_columns(redis_url, keys, redis):
    await fill_stats(redis, keys)
    for i in range(2):
        await queue_dead_letter(redis, keys, "work stream entry", "spec: field 'model' is "
                                "missing [in entry] " + "x" * 120, b"\x00" * i,
                                f"{keys.work_stream(LONG_MODEL)}/1-{i}")
    out = run(redis_url, keys.prefix, "dead-letters").stdout
    assert_fits(out, [Col("id"), Col("kind"), Col("bytes"), Col("source"), Col("reason")], 80)
    reasons = "".join(line.split("│")[-2] for line in out.splitlines() if line.startswith("│"))
    assert "[inentry]" in reasons.replace(" ", "")  # text, not rich markup (folded lines)
    lines = run(redis_url, keys.prefix, "dead-letters", "--json").stdout.splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["work stream entry"] * 2
    stream = keys.work_stream("sim:x")  # an entry read by a worker that is gone
    await redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    await redis.xadd(stream, {"i": "0"})
    await redis.xreadgroup(CONSUMER_GROUP, "gone-1-abc", {stream: ">"}, count=1)
    frame = run(redis_url, keys.prefix, "top", "--once").stdout
    assert "…" not in frame and max(map(len, frame.splitlines())) <= 80
    models, routes = headers(frame)
    assert models[:2] == ["model", "requests"] and routes[:3] == ["route", "workers", "backlog"]
    assert "1 (1 orphaned)" in frame
    snap = json.loads(run(redis_url, keys.prefix, "top", "--json").stdout)
    assert snap["dead_letters"] == 2 and {m["model"] for m in snap["models"]} == \
        {LONG_MODEL, "sim:x"}
    assert [(r["route"], r["pending"], r["orphaned"]) for r in snap["routes"]] == [
        ("cache", 0, 0), ("sim:x", 1, 1)]


@pytest.mark.parametrize("width", [80, 100, 132])
def test_fit_table_keeps_headers_whole(width):
    from io import StringIO

    from rich.console import Console

    row = {"pass": "pass 2 (re-run)", "requests": 123456, "samples_generated": 98765,
           "samples_cached": 4321, "samples_deduplicated": 999, "tokens_generated": 12345678,
           "dollars_spent": 12.3456, "dollars_saved": 98.7654, "seconds": 123.45}
    console = Console(width=width, file=StringIO())
    console.print(fit_table(DEMO_COLUMNS, [row, row], width, title="demo"))
    assert_fits(console.file.getvalue(), DEMO_COLUMNS, width)  # type: ignore[attr-defined]


async def test_runs_and_usage_fit_a_narrow_terminal(redis_url, keys):
    from cachesaver_dist import OnlineAPI, Request, SimModel

    async with OnlineAPI(SimModel(LONG_MODEL), cache=redis_url, prefix=keys.prefix,
                         run="experiment-2024-11-03-ablation-b", manifest=True) as api:
        await api.batch_request([Request("p", 2, f"id{i}", f"namespace-{i}") for i in range(5)])
    runs = run(redis_url, keys.prefix, "runs", columns=60).stdout
    assert_fits(runs, [Col(h) for h in ("run", "namespaces", "requests", "samples used",
                                         "manifest", "last used", "expires")], 60)
    first = "".join(line.split("│")[1].strip() for line in runs.splitlines()
                    if line.startswith("│"))
    assert first == "experiment-2024-11-03-ablation-b"  # on one line: it fits so
    usage = run(redis_url, keys.prefix, "usage", columns=60).stdout
    assert_fits(usage, [Col(h) for h in ("model", "prompt keys", "samples", "memory")], 60)
    assert_fits(usage, [Col(h) for h in ("run", "counters", "manifest", "memory")], 60)


def test_top_into_a_file_writes_each_frame_as_it_comes(redis_url, keys, tmp_path):
    """Not a terminal: frames are printed one after another (and flushed), not held back
    until the end, so ``top > file`` (stopped with SIGTERM) has them."""
    import signal
    import time

    out = tmp_path / "top.txt"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cachesaver_dist.cli", "top", "--interval", "0.2",
             "--prefix", keys.prefix], env=subprocess_env(redis_url, COLUMNS="100"),
            stdout=sink, stderr=subprocess.PIPE, cwd=ROOT)
        try:
            deadline = time.monotonic() + 20
            while out.read_text().count("workers and backlog") < 3:
                assert time.monotonic() < deadline and proc.poll() is None, out.read_text()
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)


@pytest.mark.parametrize("args", [("dead-letters", "--json"), ("runs", "--json"),
                                  ("top", "--interval", "0.1")])
async def test_output_into_a_pipe_read_no_further_ends_quietly(redis_url, keys, redis, args):
    """``cachesaver-dist ... | head``: the reader goes away before the output ends. Every
    command stops without a word (status 1), as the tables printed by rich do, not with
    'cachesaver-dist: [Errno 32] Broken pipe'."""
    for i in range(3):
        await queue_dead_letter(redis, keys, "work stream entry", "bad", b"x", f"s/1-{i}")
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: the first write fails
    proc = subprocess.Popen([sys.executable, "-m", "cachesaver_dist.cli", *args, "--prefix",
                             keys.prefix], env=subprocess_env(redis_url), stdout=write_end,
                            stderr=subprocess.PIPE, cwd=ROOT)
    os.close(write_end)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.decode()) == (1, "")
