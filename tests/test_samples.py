"""Samples as the client reads them: decoded once per distinct sample, shared safely."""

from __future__ import annotations

import asyncio
import copy
import sys
from dataclasses import dataclass

import pytest

from cachesaver_dist import OnlineAPI, Request, Response, SingleRequestModel, samples
from cachesaver_dist.errors import ProtocolError
from cachesaver_dist.memo import BytesMemo
from cachesaver_dist.pipelines import _response
from cachesaver_dist.protocol import CACHED, GENERATED, encode_sample


@pytest.fixture
def decoded(monkeypatch, record_decodes) -> list[bytes]:
    """The samples decoded from here on (a fresh memory of decoded samples)."""
    monkeypatch.setattr(samples, "_read", BytesMemo(samples.SAMPLES_REMEMBERED_BYTES))
    return record_decodes(samples)


def reply(raws: list[bytes], flags: str, start: int = 0) -> dict:
    return {"id": "r", "start": start, "flags": flags, "samples": raws}


def test_a_sample_served_again_is_not_decoded_again(decoded):
    raw = encode_sample("text", {"call_first": True, "usage": {"prompt_tokens": 3}})
    first = _response(reply([raw], CACHED))
    again = _response(reply([bytes(bytearray(raw))], CACHED, start=4))  # equal bytes
    assert decoded == [raw]
    assert first.data == again.data == ["text"] and first.cached == again.cached == [True]
    created = first.metadata[0].pop("created")
    assert isinstance(created, float) and again.metadata[0].pop("created") == created
    assert first.metadata == [{"usage": {"prompt_tokens": 3}, "index": 0, "source": "stored"}]
    assert again.metadata == [{"usage": {"prompt_tokens": 3}, "index": 4, "source": "stored"}]


def test_responses_sharing_a_sample_never_share_what_users_can_change(decoded):
    raw = encode_sample("text", {"usage": {"prompt_tokens": 3}, "model": "m"})
    first = _response(reply([raw], CACHED))
    first.metadata[0]["usage"]["prompt_tokens"] = 999  # a user changing their copy
    first.metadata[0]["model"] = "changed"
    first.metadata[0]["mine"] = True
    again = _response(reply([raw], CACHED))
    assert len(decoded) == 1
    assert again.metadata[0]["usage"] == {"prompt_tokens": 3}
    assert again.metadata[0]["model"] == "m" and "mine" not in again.metadata[0]


@pytest.mark.parametrize("data, meta", [
    (["a", "list"], {}),
    ({"a": "dict"}, {}),
    ("text", {"logprobs": [0.1, 0.2]}),
    ("text", {"usage": {"details": {"cached_tokens": 1}}}),
])
def test_a_sample_holding_lists_or_deep_dicts_is_decoded_for_every_response(decoded, data,
                                                                              meta):
    raw = encode_sample(data, meta)
    first = _response(reply([raw], CACHED))
    for value in [first.data[0], *first.metadata[0].values()]:  # changed where they are
        if isinstance(value, list):
            value.append("changed")
        elif isinstance(value, dict):
            value.clear()
    again = _response(reply([raw], CACHED))
    assert len(decoded) == 2
    assert again.data == [data]
    assert {k: v for k, v in again.metadata[0].items() if k in meta} == meta


def test_flags_and_call_first_are_read_from_each_sample(decoded):
    raws = [encode_sample(f"s{i}", {"call_first": i == 0}) for i in range(3)]
    r = _response(reply(raws, GENERATED * 3, start=2))
    assert r.data == ["s0", "s1", "s2"]
    assert r.cached == [False] * 3 and r.duplicated == [False, True, True]
    assert [m["index"] for m in r.metadata] == [2, 3, 4]
    assert all("call_first" not in m and "v" not in m and "data" not in m for m in r.metadata)


@pytest.mark.parametrize("raw", [b"\xc1 not msgpack", [1], {"a": 1}, None, "text"])
def test_an_unreadable_sample_is_refused_every_time(decoded, raw):
    for _ in range(2):
        with pytest.raises(ProtocolError):
            samples.read_sample(raw)
    assert len(samples._read) == 0


async def test_an_error_reply_with_samples_is_told_as_an_error(redis):
    """A malformed error reply (samples beside its error, here unhashable ones) is
    delivered as the error it carries; the client's reply reader goes on."""
    from cachesaver_dist.client import CacheClient
    from cachesaver_dist.protocol import Keys, decode_replies, encode_replies, error_reply

    client = CacheClient(redis, Keys("t:"))
    got: dict = {}

    class Box:
        def put(self, request_id, value):
            got[request_id] = value

    client._waiting["x"] = Box()  # type: ignore[assignment]
    message = encode_replies([{**error_reply("x", "model_error", "boom"), "samples": [[1]]}])
    client._received(decode_replies(message))
    assert got == {"x": {"id": "x", "error": {"kind": "model_error", "message": "boom"}}}


def test_what_a_remembered_sample_is_charged_follows_its_size_in_memory(monkeypatch):
    memo: BytesMemo[samples.Sample] = BytesMemo(1 << 30)
    monkeypatch.setattr(samples, "_read", memo)
    for text in ("x" * 2000, "\U0001F600" * 2000):  # 2 and 8 kB in memory
        raw = encode_sample(text, {"usage": {"prompt_tokens": 1}})
        before = memo._bytes
        data = samples.read_sample(raw).data
        assert memo._bytes - before >= len(raw) + sys.getsizeof(data)


def test_the_memory_of_decoded_samples_is_bounded():
    memo: BytesMemo[str] = BytesMemo(1600)
    for i in range(40):
        memo.put(b"%03d" % i, str(i), 100)
        assert len(memo) <= 16  # emptied when full
    assert memo.get(b"039") == "39" and memo.get(b"000") is None
    memo.put(b"big", "x", 101)  # over 1/16 of the limit: not kept
    assert memo.get(b"big") is None


@dataclass(frozen=True)
class _Req(Request):
    temperature: float = 1.0


async def test_the_same_sample_in_many_namespaces_reaches_each_caller_as_its_own(redis_url,
                                                                                  keys):
    """End to end, through the cache worker and the reply channel: a sample reused
    across namespaces is the same for every caller, and what one caller changes in its
    response is not seen by the next."""

    class Model(SingleRequestModel):
        model = "sample-sharing"

        async def request(self, request):
            data = ["list", request.prompt] if request.prompt == "list" else "text"
            return Response(data=[data] * request.n,
                            metadata=[{"usage": {"prompt_tokens": 5}}] * request.n)

    async with OnlineAPI(Model(), cache=redis_url, prefix=keys.prefix) as api:
        for prompt in ("text", "list"):
            seen = []
            for ns in range(3):
                r = await asyncio.wait_for(api.request(_Req(prompt, 1, "a", f"ns{ns}")), 10)
                seen.append(copy.deepcopy((r.data, r.metadata[0]["usage"])))
                r.metadata[0]["usage"]["prompt_tokens"] = -1
                if isinstance(r.data[0], list):
                    r.data[0].append("changed")
            expected = ["list", "list"] if prompt == "list" else "text"
            assert seen == [([expected], {"prompt_tokens": 5})] * 3
