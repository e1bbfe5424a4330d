"""One start-up measurement in a fresh process (run by ``bench/startup.py``).

``python bench/_startup_probe.py KIND SPEC_JSON`` prints one JSON line. Nothing but the
standard library is imported before the measured step, so the import figures are those
of a user's first import. Kinds:

* ``import``: ``import cachesaver_dist``, and which heavy modules it loaded;
* ``import-api``: ``from cachesaver_dist import OnlineAPI, Request`` (what a script
  pays before its first constructor);
* ``hit``: ``OnlineAPI(model, cache=URL, prefix=P)`` to the first ``request()``
  returning (a cached sample), then ``requests`` more hits, then ``close()``; ``model``
  is a route the worker processes serve, or, with ``inproc``, a ``SimModel`` (the
  pipeline then starts in-process workers);
* ``original-import``, ``original-hit``: the same with CacheSaver 0.0.6 (its venv) and
  a ``diskcache`` folder.
"""

from __future__ import annotations

import json
import sys
import time

HEAVY = ("arq", "redis", "workers", "msgpack", "asyncio")


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def probe_import(spec: dict) -> dict:
    t0 = time.perf_counter()
    import cachesaver_dist  # noqa: F401

    took = _ms(t0)
    return {"import_ms": took, "loaded": [m for m in HEAVY if m in sys.modules]}


def probe_import_api(spec: dict) -> dict:
    t0 = time.perf_counter()
    from cachesaver_dist import OnlineAPI, Request  # noqa: F401

    return {"import_ms": _ms(t0)}


def probe_hit(spec: dict) -> dict:
    t0 = time.perf_counter()
    import asyncio

    from cachesaver_dist import OnlineAPI, Request, SimModel

    import_ms = _ms(t0)

    async def main() -> dict:
        model = SimModel(spec["model"]) if spec.get("inproc") else spec["model"]
        t0 = time.perf_counter()
        api = OnlineAPI(model, cache=spec["url"], prefix=spec["prefix"])
        first = await api.request(Request(prompt=spec["prompt"], n=1, request_id="r0",
                                          namespace="startup"))
        first_ms = _ms(t0)
        cached = list(first.cached)
        for i in range(spec.get("requests", 0)):
            r = await api.request(Request(prompt=spec["prompt"], n=1, request_id=f"r{i + 1}",
                                          namespace=f"startup-{i}"))
            cached += r.cached
        t1 = time.perf_counter()
        await api.close()
        return {"first_hit_ms": first_ms, "close_ms": _ms(t1), "cached": cached}

    return {"import_ms": import_ms, **asyncio.run(main())}


def probe_original_import(spec: dict) -> dict:
    t0 = time.perf_counter()
    from cachesaver.pipelines import OnlineAPI  # noqa: F401
    from cachesaver.typedefs import Request  # noqa: F401
    from diskcache import Cache  # noqa: F401

    return {"import_ms": _ms(t0)}


def probe_original_hit(spec: dict) -> dict:
    t0 = time.perf_counter()
    import asyncio

    from cachesaver.pipelines import OnlineAPI
    from cachesaver.typedefs import Request, Response, SingleRequestModel
    from diskcache import Cache

    import_ms = _ms(t0)

    class Sim(SingleRequestModel):
        async def request(self, request: Request) -> Response:
            return Response(data=[f"sample {i}" for i in range(request.n)])

    def ask(i: int) -> Request:
        return Request(args=(), kwargs={"prompt": spec["prompt"]}, n=1, request_id=f"r{i}",
                       namespace="startup" if i == 0 else f"startup-{i - 1}")

    async def main() -> dict:
        t0 = time.perf_counter()
        api = OnlineAPI(Sim(), Cache(spec["cache_dir"]), batch_size=1, timeout=0.005)
        first = await api.request(ask(0))
        first_ms = _ms(t0)
        cached = list(first.cached or [False])
        for i in range(spec.get("requests", 0)):
            r = await api.request(ask(i + 1))
            cached += r.cached or [False]
        t1 = time.perf_counter()
        await api.cleanup()
        return {"first_hit_ms": first_ms, "close_ms": _ms(t1), "cached": cached}

    return {"import_ms": import_ms, **asyncio.run(main())}


KINDS = {"import": probe_import, "import-api": probe_import_api, "hit": probe_hit,
         "original-import": probe_original_import, "original-hit": probe_original_hit}


if __name__ == "__main__":
    sys.path.pop(0)  # this folder: the probe imports only installed packages
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    sys.stdout.write(json.dumps(KINDS[kind](spec)) + "\n")
