"""Writes CacheSaver folders with the REAL original package (run in its own virtualenv).

``python original_cachesaver.py < spec.json`` with ``{"folder", "form", "requests",
"marker"}``: sends each request, in order, through the original's ``OnlineAPI`` with
a diskcache folder and a counting model, and prints one JSON line: per request the
samples and cached flags it got, the request's fields as the original saw them
(``dataclasses.asdict``), and the model's calls and samples.

Forms: ``prompt`` (a ``Request`` subclass with a ``prompt`` field, as older versions'
users wrote requests: 0.0.6's hash needs ``kwargs``, so they are passed empty), ``args``
(0.0.6's own ``Request(args=..., kwargs=...)``), ``objects`` (the prompt form, with a
model that returns, besides text, objects that are not plain data: one like an SDK's
response, and one whose unpickling would run a command that creates ``marker``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

from cachesaver.pipelines import OnlineAPI
from cachesaver.typedefs import Request, Response, SingleRequestModel
from diskcache import Cache


@dataclass(frozen=True)
class PromptRequest(Request):
    prompt: str
    temperature: float = 1.0
    max_tokens: int = None


@dataclass
class Completion:
    """Stands in for an SDK's response object."""

    text: str


class Evil:
    """Pickles as a call of os.system: only an unrestricted unpickler runs it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CountingModel(SingleRequestModel):
    def __init__(self, form: str, marker: str) -> None:
        self.form, self.marker = form, marker
        self.calls = self.samples = 0
        self.made: dict[str, int] = {}

    async def request(self, request: Request) -> Response:
        self.calls += 1
        self.samples += request.n
        text = request.prompt if self.form != "args" else json.dumps(request.kwargs,
                                                                      sort_keys=True)
        data = []
        for _ in range(request.n):
            i = self.made.get(text, 0)
            self.made[text] = i + 1
            sample = f"{text}#{i}"
            if self.form == "objects" and i % 4 == 1:
                data.append(Evil(self.marker))
            elif self.form == "objects" and i % 4 == 2:
                data.append(Completion(sample))
            else:
                data.append(sample)
        return Response(data=data)


def build(form: str, spec: dict) -> Request:
    fields = dict(spec)
    if form == "args":
        return Request(args=tuple(fields.pop("args", ())), kwargs=fields.pop("kwargs"),
                       **fields)
    return PromptRequest(args=(), kwargs={}, **fields)


def plain(value):
    if isinstance(value, (Completion, Evil)):
        return f"<{type(value).__name__}>"
    return value


async def main() -> None:
    spec = json.load(sys.stdin)
    form = spec["form"]
    model = CountingModel(form, spec.get("marker", "/nonexistent"))
    cache = Cache(spec["folder"])
    out = []
    async with OnlineAPI(model, cache, batch_size=4, timeout=0.01) as api:
        for r in spec["requests"]:
            request = build(form, r)
            response = await api.request(request)
            out.append({"data": [plain(d) for d in response.data],
                        "cached": list(response.cached or []),
                        "fields": dataclasses.asdict(request)})
    cache.close()
    print(json.dumps({"responses": out, "calls": model.calls, "samples": model.samples}))


if __name__ == "__main__":
    asyncio.run(main())
