"""Study ``sharding``: does sharding by prompt key across independent primaries keep the
contract? (``docs/scaling.md``, *Beyond one primary*.)

Starts 4 private Redis servers (``EmbeddedServer(..., persist=False)``, never
``REDIS_URL``): one for the unsharded reference, three as shards. The same deterministic
workload (``bench/shard_router.py``: several namespaces, repeated prompts, n from 1 to 3,
request ids, concurrent batches and concurrent single calls, rounds that re-ask the same
prompt keys) runs through a plain ``OnlineAPI`` on the reference and through the
prototype ``ShardedAPI`` on the three shards (one ``OnlineAPI`` per shard, each with an
in-process model, so each brings its own cache and batch workers). Checked:

* the answers are identical request by request (data, cached and duplicated flags,
  sample indices, provenance);
* no sample index is handed out twice within a (run, namespace, prompt key), and the
  usage counters (``u:<run>``, merged over the shards) equal the samples handed out;
* per prompt key the stored samples are exactly indices 0..highest (no gaps, no
  duplicates), as many as the highest index handed out + 1, the mark equals them, no
  waiter is left, and each key lives on the one shard its hash picks;
* the model calls (prompt, n) are the same multiset; the run's stats merged over the
  shards equal the reference's.

A negative control runs the same workload with requests routed by request id instead
of prompt key: the checks must fail there. Throughput of 1 primary vs 3 shards (the
workload, then a phase of cache hits) is informational: everything runs in one Python
process on a 2-core machine.

Writes its section of ``bench/RESULTS.md``, ``bench/results/sharding.json`` and the
``figures:sharding`` block of ``docs/scaling.md``.

Usage: ``.venv/bin/python -m bench.sharding [--repeat N] [--hits N]``
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench import common as C

C.reexec_in_project_venv()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

from bench import shard_router as S  # noqa: E402

STUDY = "sharding"
SHARDS = 3
COMMAND = ".venv/bin/python -m bench.sharding"
DOCS = C.REPO / "docs" / "scaling.md"
CHECKS = [  # (label, field of the 1-primary run or None, field of the sharded run)
    ("answers identical request by request (data, flags, indices, provenance)", None,
     "answers_differ"),
    ("answers missing on one side", None, "missing_answers"),
    ("sample index handed out twice in a (namespace, key)", "index_twice_ref",
     "index_twice_sharded"),
    ("usage counters (`u:<run>`, merged) ≠ samples handed out",
     "usage_counter_mismatch_ref", "usage_counter_mismatch_sharded"),
    ("keys whose stored indices are not exactly 0..highest", "gaps_or_duplicates_ref",
     "gaps_or_duplicates_sharded"),
    ("keys with samples stored ≠ highest index handed out + 1",
     "generated_not_highest_plus_one_ref", "generated_not_highest_plus_one_sharded"),
    ("keys whose mark ≠ samples stored", "mark_not_samples_ref", "mark_not_samples_sharded"),
    ("waiter hashes left", "waiters_left_ref", "waiters_left_sharded"),
    ("keys stored on two shards", None, "keys_on_two_shards"),
    ("keys on another shard than their hash picks", None, "keys_on_wrong_shard"),
    ("keys whose stored indices differ from the reference's", None,
     "samples_differ_ref_vs_sharded"),
    ("model calls (prompt, n) not in both runs", None, "model_calls_differ"),
    ("run stats counters (merged; cached and deduplicated summed) ≠ the reference's", None,
     "stats_differ"),
]


def run(repeat: int, hits: int) -> None:
    t0 = time.monotonic()
    base = C.WORK / f"redis-{STUDY}-{uuid.uuid4().hex[:6]}"
    servers = []
    try:
        from cachesaver_dist.server import EmbeddedServer

        for i in range(1 + SHARDS):
            servers.append(EmbeddedServer(base / f"s{i}", persist=False))
        urls = [s.start() for s in servers]
        import redis

        with redis.Redis.from_url(urls[0]) as r:
            env = C.environment(str(r.info("server")["redis_version"]))
        w = S.Workload()
        runs = []
        for i in range(repeat):
            print(f"run {i + 1}/{repeat}: 1 primary, then {SHARDS} shards", flush=True)
            prefix = f"shard-{i}-{uuid.uuid4().hex[:6]}:"
            runs.append(asyncio.run(S.compare(urls[0], urls[1:], prefix, w, hit_count=hits)))
        print(f"negative control: {SHARDS} shards routed by request id", flush=True)
        control = asyncio.run(S.compare(urls[0], urls[1:], f"ctl-{uuid.uuid4().hex[:6]}:", w,
                                        route_by="request_id"))
    finally:
        for s in servers:
            with contextlib.suppress(Exception):
                s.stop()
        shutil.rmtree(base, ignore_errors=True)
    res = {"env": env, "command": COMMAND, "shards": SHARDS, "workload": w.__dict__,
           "runs": runs, "control": control, "seconds": time.monotonic() - t0,
           "violations": [S.violations(r) for r in runs],
           "control_violations": S.violations(control),
           "holds": all(not S.violations(r) for r in runs),
           "control_caught": bool(S.violations(control))}
    out = C.write_json(STUDY, res)
    report(res)
    write_docs(res)
    print(f"figures in {out}")
    if not res["holds"] or not res["control_caught"]:
        sys.exit(1)


def _cell(v: dict[str, Any], field: str | None) -> str:
    return "-" if field is None else str(v[field])


def report(res: dict[str, Any]) -> None:
    env, runs, control = res["env"], res["runs"], res["control"]
    first = runs[0]
    headers = ["check (violations)", "1 primary", f"{SHARDS} shards, by prompt key",
               f"control: {SHARDS} shards, by request id"]
    rows = []
    for label, ref_f, shard_f in CHECKS:
        shard = " / ".join(str(r[shard_f]) for r in runs)
        ref = "-" if ref_f is None else " / ".join(str(r[ref_f]) for r in runs)
        rows.append([label, ref, f"**{shard}**" if any(r[shard_f] for r in runs) else shard,
                     str(control[shard_f])])
    t_headers = ["phase", "requests", "1 primary, req/s", f"{SHARDS} shards, req/s",
                 "ratio"]
    t_rows = []
    for phase in ("workload", "hits"):
        for r in runs:
            tp = r["throughput"].get(phase)
            if not tp:
                continue
            one, many = tp["1 primary"], tp[f"{SHARDS} shards"]
            t_rows.append([phase, one["requests"], C.fmt(one["per_s"], 0),
                           C.fmt(many["per_s"], 0), C.fmt(many["per_s"] / one["per_s"])])
    print()
    print(C.text_table(headers, rows))
    print()
    print(C.text_table(t_headers, t_rows))
    w = res["workload"]
    verdict = ("**the design holds**: 0 violations in every run, and the control "
               "is caught" if res["holds"] and res["control_caught"] else
               "**VIOLATIONS**: see the table")
    lines = [
        "## sharding: sharding by prompt key across independent primaries keeps the "
        "contract\n",
        C.environment_md(env),
        f"Command: `{COMMAND}` ({res['seconds']:.0f} s; {len(runs)} run(s)). Four private "
        f"Redis servers: one for the reference (a plain `OnlineAPI`), {SHARDS} as shards "
        "(`bench/shard_router.py`'s `ShardedAPI`: one `OnlineAPI` per shard, each with "
        "an in-process model and so its own cache and batch workers; a request goes to "
        "the shard the jump consistent hash of its prompt key picks; a batch is split by "
        f"shard, each sub-batch sent whole). Workload: {w['prompts']} prompts, "
        f"{w['namespaces']} namespaces, {w['rounds']} rounds; per round "
        f"{w['batch_tasks']} concurrent `batch_request`s (every namespace, most twice "
        "under two request ids, n 1-3, not in request_id order) and concurrent single "
        f"`request()`s ({w['single_callers']} callers), no two concurrent tasks on one "
        f"prompt key: {first['requests']} requests, {first['samples_ref']} samples "
        f"generated over {first['keys_ref']} prompt keys (keys per shard: "
        f"{', '.join(str(k) for k in first['keys_per_shard'])}), "
        f"{first['model_calls_ref']} model calls. Figures: `bench/results/{STUDY}.json`.\n",
        f"Result: {verdict}.\n",
        C.md_table(headers, rows), "",
        "Cells with several figures are one per run. The control sends each request to "
        "the shard of its request id: a prompt key's counters and samples are then split "
        "over shards, so a namespace gets an index twice and samples are generated "
        "again; the checks see it.",
        "",
        "### Throughput (informational)\n",
        "Everything (the client and the in-process workers of every shard) runs in one "
        "Python process on a shared 2-core machine, so this shows what splitting costs "
        "that process (three sets of workers, sub-batches a third the size), not what "
        "more primaries add: that is `docs/scaling.md`'s capacity model.\n",
        C.md_table(t_headers, t_rows), "",
    ]
    C.write_section(STUDY, "\n".join(lines))
    print(f"\nwritten to {C.RESULTS} (section {STUDY})")


def write_docs(res: dict[str, Any]) -> None:
    runs, control, env = res["runs"], res["control"], res["env"]
    first = runs[0]
    caught = ", ".join(f"{k} {v}" for k, v in res["control_violations"].items()
                       if k not in ("answers_differ", "missing_answers"))
    hits = [(r["throughput"]["hits"]["1 primary"]["per_s"],
             r["throughput"]["hits"][f"{SHARDS} shards"]["per_s"]) for r in runs
            if "hits" in r["throughput"]]
    lines = [
        f"Measured by `{res['command']}` ({env['date']}, commit {env['commit']}); "
        f"figures in `bench/results/sharding.json`, section *sharding* of "
        "`bench/RESULTS.md`. Re-running the command rewrites this block.",
        "",
        f"* {len(runs)} run(s) of {first['requests']} requests ({first['samples_ref']} "
        f"samples, {first['keys_ref']} prompt keys, {first['model_calls_ref']} model "
        f"calls) on 1 primary and on {SHARDS} shards: "
        + ("**0 violations** of every check, answers identical request by request."
           if res["holds"] else f"**violations**: {res['violations']}."),
        f"* Negative control (routed by request id): {control['answers_differ']} of "
        f"{control['requests']} answers differ; {caught}"
        + ("." if res["control_caught"] else " — **not caught**."),
    ]
    if hits:
        lines.append(
            "* Hits through the router, one Python process for everything: "
            + ", ".join(f"{C.fmt(a, 0)} req/s on 1 primary vs {C.fmt(b, 0)} on "
                        f"{SHARDS} shards" for a, b in hits)
            + " (the client process is the limit here, not Redis).")
    C.write_block(DOCS, "figures:sharding", "\n".join(lines))
    print(f"written to {DOCS} (block figures:sharding)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=2, help="runs of the comparison (2)")
    p.add_argument("--hits", type=int, default=4000, help="requests of the hit phase (4000)")
    a = p.parse_args()
    run(a.repeat, a.hits)


if __name__ == "__main__":
    main()
