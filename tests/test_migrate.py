"""Migration from the original CacheSaver, against folders written by the REAL original.

A session fixture installs ``cachesaver==0.0.6`` from the registry into its own
virtualenv (``bench/.venv-original``, shared with the benchmarks and ignored by git;
built once, ~30-60 s) and runs ``tests/original_cachesaver.py`` there, which sends
requests through the original's ``OnlineAPI`` with a diskcache folder and a counting
model, for the prompt form, 0.0.6's args/kwargs form, and a folder whose samples hold
objects that are not plain data.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache
import pytest
from redis.asyncio import Redis

from cachesaver_dist import Batch, OnlineAPI, Request, Response, SingleRequestModel, cli, migrate
from cachesaver_dist.migrate import ArgsRequest, Found
from cachesaver_dist.prepare import prepare
from cachesaver_dist.protocol import Keys, decode_replies, decode_sample, encode_sample

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL_VENV = ROOT / "bench" / ".venv-original"
WRITER = Path(__file__).with_name("original_cachesaver.py")
MODEL_ID = "counting"

PROMPT_REQUESTS = [
    {"prompt": "p1", "n": 1, "request_id": "001", "namespace": "a"},
    {"prompt": "p2", "n": 3, "request_id": "002", "namespace": "a", "temperature": 0.5},
    {"prompt": "p1", "n": 3, "request_id": "003", "namespace": "b"},
    {"prompt": "p1", "n": 2, "request_id": "004", "namespace": "a"},
    {"prompt": "p2", "n": 2, "request_id": "005", "namespace": "c", "temperature": 0.5},
    {"prompt": "p3", "n": 1, "request_id": "006", "namespace": "b", "max_tokens": 16},
    {"prompt": "p2", "n": 4, "request_id": "007", "namespace": "b", "temperature": 0.5},
    {"prompt": "p1", "n": 1, "request_id": "008", "namespace": "c"},
]
_CHAT = {"model": "m1", "messages": [{"role": "user", "content": "Cats or dogs?"}],
         "temperature": 0.7}
ARGS_REQUESTS = [
    {"args": [], "kwargs": _CHAT, "n": 2, "request_id": "001", "namespace": "a"},
    {"args": [], "kwargs": {**_CHAT, "store": False}, "n": 1, "request_id": "002",
     "namespace": "b"},
    {"args": [], "kwargs": {**_CHAT, "temperature": 0.2}, "n": 1, "request_id": "003",
     "namespace": "a"},
    {"args": ["positional"], "kwargs": {"model": "m1", "prompt": "Once upon a time"}, "n": 3,
     "request_id": "004", "namespace": "c"},
    {"args": [], "kwargs": _CHAT, "n": 3, "request_id": "005", "namespace": "c"},
    {"args": [], "kwargs": _CHAT, "n": 1, "request_id": "006", "namespace": "a"},
]
OBJECT_REQUESTS = [{"prompt": "q", "n": 4, "request_id": "001", "namespace": "a"}]


@dataclass(frozen=True)
class PromptRequest(Request):
    """The prompt form here: the original's decoding fields, without its args/kwargs."""

    temperature: float = 1.0
    max_tokens: int | None = None


class Counting(SingleRequestModel):
    name = MODEL_ID

    def __init__(self) -> None:
        self.calls: list[Request] = []

    @property
    def samples(self) -> int:
        return sum(r.n for r in self.calls)

    async def request(self, request: Request) -> Response:
        self.calls.append(request)
        return Response(data=[f"new:{len(self.calls)}:{i}" for i in range(request.n)])


# --- the original package and its folders ------------------------------------------------


@pytest.fixture(scope="session")
def original_python() -> str:
    """A virtualenv with the original ``cachesaver==0.0.6`` from the registry."""
    python = ORIGINAL_VENV / "bin" / "python"
    probe = "from cachesaver.pipelines import OnlineAPI; import diskcache, deepdiff"
    if python.exists() and subprocess.run([str(python), "-c", probe],
                                          capture_output=True).returncode == 0:
        return str(python)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(ORIGINAL_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "cachesaver==0.0.6"], check=True, timeout=900)
    subprocess.run([str(python), "-c", probe], check=True)
    return str(python)


@dataclass
class Written:
    """A folder written by the original: what each request got, and what it paid."""

    folder: Path
    responses: list[dict[str, Any]]
    samples: int
    marker: Path


def write_folder(python: str, where: Path, form: str, requests: list[dict]) -> Written:
    folder, marker = where / form, where / f"{form}-marker"
    spec = {"folder": str(folder), "form": form, "requests": requests, "marker": str(marker)}
    done = subprocess.run([python, str(WRITER)], input=json.dumps(spec), text=True,
                          capture_output=True, timeout=120, cwd=where)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["samples"] > 0
    return Written(folder, out["responses"], out["samples"], marker)


@pytest.fixture(scope="session")
def folders(original_python: str, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Written]:
    where = tmp_path_factory.mktemp("original")
    return {form: write_folder(original_python, where, form, requests)
            for form, requests in (("prompt", PROMPT_REQUESTS), ("args", ARGS_REQUESTS),
                                   ("objects", OBJECT_REQUESTS))}


@pytest.fixture
def via_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``OnlineAPI(cache=diskcache.Cache(...))`` finds the test server in REDIS_URL."""
    monkeypatch.setenv("REDIS_URL", redis_url)


def ours(form: str, spec: dict[str, Any], namespace: str | None = None) -> Request:
    fields = {**spec, **({"namespace": namespace} if namespace else {})}
    if form == "args":
        return ArgsRequest(**{**fields, "args": tuple(fields["args"])})
    return PromptRequest(**fields)


def key_of(request: Request) -> str:
    return prepare(request, run="r", route="x", model_id=MODEL_ID).key


async def imported_counts(redis: Redis, keys: Keys, requests: list[Request]
                          ) -> dict[str, tuple[str, int]]:
    """Per prompt key: the original's key it was imported from, and how many samples."""
    out = {}
    for k in {key_of(r) for r in requests}:
        g = await redis.hgetall(keys.generation(k))
        assert int(g[b"imported"]) == int(g[b"mark"]) == await redis.hlen(keys.samples(k))
        out[k] = (g[b"imported_from"].decode(), int(g[b"imported"]))
    return out


def paid(counts: dict[str, tuple[str, int]]) -> int:
    """Samples of the distinct original entries imported (two prompt keys here may be one
    original key: 0.0.6 leaves some kwargs, such as store, out of its key)."""
    return sum(dict(counts.values()).values())


def assert_replayed(got: list[Response], written: Written) -> None:
    for response, orig in zip(got, written.responses, strict=True):
        assert response.data == orig["data"]
        assert response.cached == [True] * len(orig["data"])
        assert {(m["source"], m["origin"]) for m in response.metadata} == {
            ("stored", "cachesaver")}


# --- lazily, through OnlineAPI(cache=diskcache.Cache(folder)) --------------------------------


async def test_prompt_form_every_paid_sample_reused(folders, via_env, redis, keys):
    written = folders["prompt"]
    requests = [ours("prompt", r) for r in PROMPT_REQUESTS]
    model = Counting()
    async with OnlineAPI(model, cache=diskcache.Cache(written.folder),
                         prefix=keys.prefix) as api:
        got = [await api.request(r) for r in requests]
        assert_replayed(got, written)
        assert model.calls == []
        counts = await imported_counts(redis, keys, requests)
        assert paid(counts) == written.samples  # every sample the original paid for

        # more than was paid for: only the missing samples are generated
        p2 = ours("prompt", PROMPT_REQUESTS[1])
        m = counts[key_of(p2)][1]
        more = await api.request(PromptRequest("p2", m + 2, "009", "fresh", temperature=0.5))
    assert [(r.prompt, r.n) for r in model.calls] == [("p2", 2)]
    assert more.cached == [True] * m + [False, False]
    stored = await redis.hgetall(keys.samples(key_of(p2)))
    assert more.data[:m] == [decode_sample(stored[str(i).encode()])["data"] for i in range(m)]


async def test_args_form_every_paid_sample_reused(folders, via_env, redis, keys):
    written = folders["args"]
    requests = [ours("args", r) for r in ARGS_REQUESTS]
    model = Counting()
    async with OnlineAPI(model, cache=diskcache.Cache(written.folder),
                         prefix=keys.prefix) as api:
        got = await api.batch_request(Batch(requests))  # in request_id order, as the original
        assert_replayed(got, written)
        assert model.calls == []
        counts = await imported_counts(redis, keys, requests)
        assert paid(counts) == written.samples
        assert len(counts) == len(set(dict(counts.values()))) + 1  # store: one key more here

        chat = requests[0]
        m = counts[key_of(chat)][1]
        more = await api.request(ArgsRequest(args=(), kwargs=_CHAT, n=m + 1,
                                             request_id="007", namespace="fresh"))
    assert len(model.calls) == 1 and model.samples == 1
    assert (model.calls[0].args, model.calls[0].kwargs) == ((), _CHAT)  # as the caller made them
    assert more.cached == [True] * m + [False]


async def test_two_pipelines_on_one_folder_import_once(folders, via_env, redis, keys):
    written = folders["prompt"]
    models = [Counting(), Counting()]
    apis = [OnlineAPI(model, cache=diskcache.Cache(written.folder), prefix=keys.prefix)
            for model in models]
    try:
        got = await asyncio.gather(*(
            asyncio.gather(*(api.request(ours("prompt", r, f"{i}-{r['namespace']}"))
                             for r in PROMPT_REQUESTS))
            for i, api in enumerate(apis)))
    finally:
        await asyncio.gather(*(api.close() for api in apis))
    for responses in got:
        assert_replayed(responses, written)  # one batch each: served in request_id order
    assert [m.calls for m in models] == [[], []]
    counts = await imported_counts(redis, keys, [ours("prompt", r) for r in PROMPT_REQUESTS])
    assert paid(counts) == written.samples  # no index twice, nothing appended


async def test_concurrent_imports_write_each_key_once(folders, redis_url, keys):
    written = folders["prompt"]
    items = [(prepare(r, run="r", route="x", model_id=MODEL_ID), r)
             for r in (ours("prompt", s) for s in PROMPT_REQUESTS)]
    clients = [Redis.from_url(redis_url), Redis.from_url(redis_url)]
    try:
        summaries = await asyncio.gather(*(
            migrate.import_for(c, keys, diskcache.Cache(written.folder), items)
            for c in clients))
        again = await migrate.import_for(clients[0], keys, diskcache.Cache(written.folder),
                                         items)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    distinct = len({it.key for it, _ in items})
    assert sum(s.imported_keys for s in summaries) == distinct
    assert sum(s.samples_imported for s in summaries) == written.samples
    assert sum(s.already for s in summaries) == distinct  # the other one found them done
    assert again.requests == 0  # known in this process: not even asked


# --- in bulk, with the command ---------------------------------------------------------------


@pytest.mark.parametrize("form", ["prompt", "args"])
def test_bulk_command_imports_the_same(form, folders, redis_url, keys, tmp_path, capsys):
    written = folders[form]
    lines = tmp_path / "requests.jsonl"
    lines.write_text("".join(json.dumps(r["fields"]) + "\n" for r in written.responses))
    argv = ["import-cachesaver", str(written.folder), "--requests", str(lines), "--model",
            MODEL_ID, "--redis-url", redis_url, "--prefix", keys.prefix, "--json"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    specs = PROMPT_REQUESTS if form == "prompt" else ARGS_REQUESTS
    requests = [ours(form, r) for r in specs]
    distinct = len({key_of(r) for r in requests})
    assert summary["requests"] == len(specs)
    assert (summary["keys"], summary["keys_found"]) == (distinct, distinct)
    assert summary["samples_skipped"] == summary["keys_not_found"] == 0
    counts = asyncio.run(_counts(redis_url, keys, requests))
    assert paid(counts) == written.samples
    assert summary["samples_imported"] == sum(m for _, m in counts.values())

    async def replay() -> tuple[list[Response], Counting]:
        model = Counting()
        async with OnlineAPI(model, cache=redis_url, prefix=keys.prefix) as api:  # no folder
            return [await api.request(r) for r in requests], model

    got, model = asyncio.run(replay())
    assert_replayed(got, written)
    assert model.calls == []

    assert cli.main(argv) == 0  # idempotent
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["keys_already_imported"], again["samples_imported"]) == (distinct, 0)


def test_bulk_command_reports_unreadable_lines(folders, redis_url, keys, tmp_path, capsys):
    lines = tmp_path / "requests.jsonl"
    lines.write_text('[1, 2]\n{"n": 1, "prompt": "x", "args": [], "kwargs": {}}\nnot json\n')
    code = cli.main(["import-cachesaver", str(folders["prompt"].folder), "--requests",
                     str(lines), "--model", MODEL_ID, "--redis-url", redis_url, "--prefix",
                     keys.prefix])
    out = capsys.readouterr().out
    assert code == 1
    assert "requests read: 3 (2 unreadable)" in out
    assert "line 1: a request must be a JSON object" in out and "line 3:" in out
    assert cli.main(["import-cachesaver", str(lines.parent / "nowhere"), "--requests",
                     str(lines), "--model", MODEL_ID, "--redis-url", redis_url]) == 1
    assert "not a CacheSaver (diskcache) folder" in capsys.readouterr().err


async def _counts(redis_url: str, keys: Keys, requests: list[Request]
                  ) -> dict[str, tuple[str, int]]:
    redis = Redis.from_url(redis_url)
    try:
        return await imported_counts(redis, keys, requests)
    finally:
        await redis.aclose()


# --- what is refused -------------------------------------------------------------------------


async def test_objects_are_refused_never_run(folders, via_env, redis, keys, caplog):
    written = folders["objects"]
    assert written.responses[0]["data"] == ["q#0", "<Evil>", "<Completion>", "q#3"]
    model = Counting()
    async with OnlineAPI(model, cache=diskcache.Cache(written.folder),
                         prefix=keys.prefix) as api:
        got = await api.request(PromptRequest("q", 4, "001", "a"))
    assert not written.marker.exists()  # the pickled os.system call never ran
    assert got.data[0] == "q#0" and got.data[3] == "q#3"
    assert got.cached == [True, False, False, True]  # the refused two are generated anew
    assert [(r.prompt, r.n) for r in model.calls] == [("q", 2)]
    refused = [r.getMessage() for r in caplog.records if "not imported" in r.getMessage()]
    assert any("sample 1 not imported: pickled object refused: posix.system" in m
               for m in refused), refused
    assert any("sample 2 not imported: pickled object refused: __main__.Completion" in m
               for m in refused), refused


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_plain_loads_refuses_every_global(tmp_path):
    marker = tmp_path / "ran"
    plain = [{"a": (1, 2.5, None, True)}, b"x", {3, 4}, "s"]
    assert migrate.plain_loads(pickle.dumps(plain)) == plain
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        loaded = migrate.plain_loads(pickle.dumps(["ok", _Evil(marker), Counter(a=1)],
                                                  protocol=protocol))
        assert not marker.exists()
        assert loaded[0] == "ok"
        origins = sorted(o for x in loaded[1:] for o in migrate._refusals(x))
        assert origins == ["collections.Counter", "posix.system"]


def test_an_entry_that_is_an_object_is_reported(tmp_path):
    marker = tmp_path / "ran"
    with diskcache.Cache(tmp_path / "folder") as c:
        c.set("k-object", _Evil(marker))
        c.set("k-dict", {"not": "a list"})
    found, failed = migrate.lookup(tmp_path / "folder", {"A": lambda: ["k-object"],
                                                         "B": lambda: ["missing", "k-dict"]})
    assert not marker.exists() and failed == []
    assert [(f.key, f.samples) for f in found] == [("A", []), ("B", [])]
    assert "refused pickled object (posix.system)" in found[0].skipped[0][1]
    assert "is a dict, not a list of samples" in found[1].skipped[0][1]


# --- the script -------------------------------------------------------------------------------


async def test_import_script_semantics(redis, keys):
    """Set-if-absent at 0..m-1, mark raised, skipped indices released, waiters completed
    (and told), once per key."""
    k = "k" * 32
    await redis.hset(keys.generation(k), mapping={"mark": 2})         # 0, 1 claimed ...
    await redis.hset(keys.waiters(k), "client1:req1", "0|gg|run1|counting")  # ... by req1
    await redis.hset(keys.samples(k), "1", encode_sample("generated"))
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.reply_channel("client1"))
    samples = [encode_sample(f"old{i}", {"origin": "cachesaver"}) for i in range(4)]
    summary = migrate.Summary()
    await migrate._store(redis, keys, [Found(k, "orig", [samples[0], samples[1], None,
                                                         samples[3]], [(2, "why")])], summary)
    assert (summary.imported_keys, summary.samples_imported, summary.samples_present) == (1, 2, 1)
    g = await redis.hgetall(keys.generation(k))
    assert g == {b"mark": b"4", b"x2": b"1", b"imported": b"4", b"imported_from": b"orig"}
    s = await redis.hgetall(keys.samples(k))
    assert sorted(s) == [b"0", b"1", b"3"] and decode_sample(s[b"1"])["data"] == "generated"
    assert await redis.hlen(keys.waiters(k)) == 0
    for _ in range(20):
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if msg:
            break
    [reply] = decode_replies(msg["data"])
    assert (reply["id"], reply["start"], reply["flags"]) == ("req1", 0, "gg")
    assert [decode_sample(x)["data"] for x in reply["samples"]] == ["old0", "generated"]
    await pubsub.aclose()

    summary = migrate.Summary()  # a second import changes nothing
    await migrate._store(redis, keys, [Found(k, "other", [samples[2]] * 6, [])], summary)
    assert (summary.already, summary.samples_imported) == (1, 0)
    assert await redis.hlen(keys.samples(k)) == 3


def test_candidate_keys_follow_the_originals_hash():
    from deepdiff import DeepHash

    def h(p: dict) -> str:
        return DeepHash(p)[p]

    prompt = migrate.original_params(PromptRequest("p", 2, "id", "ns", temperature=0.5))
    assert prompt == {"prompt": "p", "temperature": 0.5, "max_tokens": None}
    assert migrate.candidate_keys(prompt)[:2] == [
        h({**prompt, "args": (), "kwargs": {}}), h({**prompt, "args": [], "kwargs": {}})]
    assert h(prompt) in migrate.candidate_keys(prompt)  # older versions: no args/kwargs
    args = migrate.original_params(ArgsRequest(kwargs={"model": "m", "store": True,
                                                       "stream": False}, n=1,
                                               request_id=None, namespace=None))
    assert args == {"args": (), "kwargs": {"model": "m", "store": True, "stream": False}}
    assert migrate.candidate_keys(args)[0] == h({"args": (), "kwargs": {"model": "m"}})


async def test_custom_hash_and_folders_without_entries(via_env, keys, tmp_path):
    """``hash=`` gives the original's key too; an empty folder (or an object that only
    names a folder) imports nothing and changes nothing."""
    with diskcache.Cache(str(tmp_path / "hashed")) as c:
        c.set("mine:p", ["old0", "old1"])

    class Folder:
        directory = str(tmp_path / "plain")

    model = Counting()
    for prompt, cache in (("e1", diskcache.Cache(str(tmp_path / "empty"))), ("e2", Folder())):
        async with OnlineAPI(model, cache=cache, prefix=keys.prefix) as api:
            assert (await api.request(Request(prompt, 1, "1", "a"))).cached == [False]
    async with OnlineAPI(model, cache=diskcache.Cache(str(tmp_path / "hashed")),
                         prefix=keys.prefix, hash=lambda r: f"mine:{r.prompt}") as api:
        got = await api.request(Request("p", 3, "1", "a"))
    assert got.data[:2] == ["old0", "old1"] and got.cached == [True, True, False]
    assert [(r.prompt, r.n) for r in model.calls] == [("e1", 1), ("e2", 1), ("p", 1)]
