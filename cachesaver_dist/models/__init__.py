"""Models the batch workers can serve, and how they are called.

A model name is ``sim:<name>`` (the built-in in-process simulator), a provider
backend ``together:<model>`` / ``openai:<model>`` (see ``cachesaver_dist.backends``),
``dropin:<provider>:<model>`` (what a drop-in client with ``workers="pool"`` asks for),
or an import path ``package.module:factory`` whose factory, called with no arguments,
returns a ``SingleRequestModel`` or ``BatchRequestModel``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import inspect
import itertools
import logging
import uuid
from dataclasses import dataclass
from functools import cache
from typing import Any

from ..errors import ModelError
from ..protocol import encode_sample
from ..typedefs import Batch, BatchRequestModel, Request, Response, SingleRequestModel

log = logging.getLogger("cachesaver_dist.models")

_WORDS = (
    "answer thought step value check branch search reason count plan result idea state "
    "move goal test left right sum product path option guess proof case"
).split()


class SimModel(SingleRequestModel, BatchRequestModel):
    """A built-in model for demos and tests: distinct text per sample, fixed latency."""

    def __init__(self, name: str = "sim", latency: float = 0.0) -> None:
        self.model = f"sim:{name}" if not name.startswith("sim:") else name
        self.latency = latency
        self.calls: list[tuple[str, int]] = []
        self._counter = itertools.count()

    async def request(self, request: Request) -> Response:
        self.calls.append((str(request.prompt), request.n))
        if self.latency:
            await asyncio.sleep(self.latency)
        data, meta = [], []
        prompt_tokens = len(str(request.prompt).split())
        call_id = f"sim-{uuid.uuid4().hex[:12]}"
        for _ in range(request.n):
            seed = hashlib.blake2b(f"{self.model}|{request.prompt}|{next(self._counter)}"
                                   .encode(), digest_size=8).digest()
            words = [_WORDS[b % len(_WORDS)] for b in seed[: 4 + seed[0] % 5]]
            limit = request.max_completion_tokens or request.max_tokens
            finish = "stop"
            if limit and len(words) > limit:
                words, finish = words[:limit], "length"
            data.append(" ".join(words))
            meta.append({"finish_reason": finish, "id": call_id,
                         "usage": {"prompt_tokens": prompt_tokens / request.n,
                                   "completion_tokens": len(words)}})
        return Response(data=data, metadata=meta)

    async def batch_request(self, batch: Batch) -> list[Response]:
        return list(await asyncio.gather(*(self.request(r) for r in batch.requests)))


def model_name_problem(name: str) -> str | None:
    """Why no batch worker can serve a model named ``name``, or None if one can."""
    kind, _, rest = name.partition(":")
    if kind == "dropin":
        provider, _, model = rest.partition(":")
        if provider and model:
            return None
    elif kind and rest:  # sim:<name>, a provider's model, or an import path
        return None
    return (f"model name {name!r} is none of 'sim:<name>', 'together:<model>', "
            "'openai:<model>', 'dropin:<provider>:<model>' or an import path "
            "'package.module:factory'")


def check_model_setup(name: str, options: Any = None) -> None:
    """``ValueError`` for what ``load_model`` would refuse before building anything: a
    name no worker can serve, a provider model without its API key or base URL. Starts,
    imports and connects nothing but the provider's module: a worker checks its models
    before it starts a server."""
    if not name.startswith(("sim:", "dropin:")):
        from ..backends import PROVIDERS, check_setup

        if name.partition(":")[0] in PROVIDERS:
            check_setup(name, options)  # (its own words for a name that names no model)
            return
    problem = model_name_problem(name)
    if problem:
        raise ValueError(problem)


def load_model(name: str, *, sim_latency: float = 0.0, options: Any = None, redis: Any = None,
               keys: Any = None) -> Any:
    """Build the model a worker serves under ``name``; clear errors for bad names.

    ``options`` (``backends.BackendOptions``), ``redis`` and ``keys`` configure the
    provider backends and their cluster-wide limits.
    """
    problem = model_name_problem(name) if name.startswith(("sim:", "dropin:")) else None
    if problem:
        raise ValueError(problem)
    if name.startswith("dropin:"):
        from .dropin import pool_model

        return pool_model(name, getattr(options, "base_url", None))
    if name.startswith("sim:"):
        if options is not None and options.limited:
            log.warning("--rpm, --tpm and --max-concurrent apply to provider models "
                        "(together:, openai:); %s ignores them", name)
        return SimModel(name, latency=sim_latency)
    from ..backends import make_backend

    backend = make_backend(name, options, redis, keys)
    if backend is not None:
        return backend
    problem = model_name_problem(name)
    if problem:
        raise ValueError(problem)
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load model {name!r}: {exc}; is its package on PYTHONPATH?") \
            from exc
    try:
        model = factory()
    except Exception as exc:  # the user's code: named, its traceback with -vv
        log.debug("the factory of model %s failed", name, exc_info=True)
        raise ValueError(f"cannot load model {name!r}: its factory {attr}() raised "
                         f"{type(exc).__name__}: {exc}") from exc
    check_model(model, name)
    return model


def check_model(model: Any, name: str) -> None:
    if isinstance(model, type):
        raise TypeError(f"model {name!r} is the class {model.__name__}, not a model object: "
                        f"pass an instance, {model.__name__}(...)")
    if not callable(getattr(model, "request", None)) and \
            not callable(getattr(model, "batch_request", None)):
        raise TypeError(
            f"model {name!r} ({type(model).__name__}) has neither request() nor "
            "batch_request(); subclass SingleRequestModel or BatchRequestModel"
        )


def model_identity(model: Any) -> str:
    """The default model id of a model object: its ``model`` or ``name``, else its class."""
    for attr in ("model", "name"):
        value = getattr(model, attr, None)
        if isinstance(value, str) and value:
            return value
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


@cache
def _request_class(extra: tuple[str, ...]) -> type[Request]:
    return dataclasses.make_dataclass(
        "Request", [(name, Any, None) for name in extra], bases=(Request,), frozen=True
    )


def make_request(fields: dict[str, Any], n: int, request_id: str | None = None,
                 namespace: str | None = None) -> Request:
    """A ``Request`` carrying ``fields`` (the decoding fields of the original)."""
    base = {f.name for f in dataclasses.fields(Request)}
    extra = tuple(sorted(k for k in fields if k not in base))
    return _request_class(extra)(n=n, request_id=request_id, namespace=namespace, **fields)


@dataclass
class Job:
    """Samples to generate for one prompt key: its fields, the sample indices, and the
    namespace and request id of the first request that claimed them; ``original``: a
    request object made for this prompt key in this process, if the caller knows one
    (the model then gets an object of its class, with its own field values)."""

    fields: dict[str, Any]
    indices: list[int]
    namespace: str | None = None
    request_id: str | None = None
    original: Request | None = None


def _request_for(job: Job, fields: dict[str, Any], n: int) -> Request:
    """What the model gets for one call of ``job``: a copy of ``job.original`` (its class,
    methods and tuples intact) where there is one, else a ``Request`` built from the
    stored fields."""
    if job.original is not None:
        seed = fields.get("seed")
        changes: dict[str, Any] = {"n": n, "request_id": job.request_id,
                                   "namespace": job.namespace}
        if seed is not None and getattr(job.original, "seed", None) not in (None, seed):
            changes["seed"] = seed  # this call's derived seed
        try:
            return dataclasses.replace(job.original, **changes)
        except (TypeError, ValueError):  # a class that cannot be copied so: its fields
            pass
    return make_request(fields, n, job.request_id, job.namespace)


def derive_seed(seed: int, index: int) -> int:
    """The seed sample ``index`` is generated with when the request fixes ``seed``:
    ``seed`` itself for sample 0 (a one-sample request is the plain seeded call), else
    the first 31 bits of BLAKE2b of ``"<seed>:<index>"`` (deterministic, distinct)."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def _calls(job: Job) -> list[tuple[dict[str, Any], list[int]]]:
    """The model calls a job needs: one for all its indices, or, with a fixed integer
    ``seed``, one per index with that index's derived seed (so top-ups differ)."""
    seed = job.fields.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        return [(job.fields, job.indices)]
    return [({**job.fields, "seed": derive_seed(seed, i)}, [i]) for i in job.indices]


async def generate(model: Any, jobs: list[Job]) -> list[list[bytes] | Exception]:
    """Generate every job's samples; per job, the encoded samples (in index order) or
    the error.

    A model with ``request()`` gets one call per job (per index with a fixed seed),
    and failures stay separate; a batch-only model gets one ``batch_request()`` for
    all. The first sample of each call is marked ``call_first`` (its call paid the
    prompt), and so is each sample whose metadata says so (a model that split the call):
    the other samples of the call are ``duplicated`` for their request.
    """
    calls = [(j, fields, indices) for j, job in enumerate(jobs)
             for fields, indices in _calls(job)]
    requests = [_request_for(jobs[j], fields, len(indices)) for j, fields, indices in calls]
    if callable(getattr(model, "request", None)):
        results = await asyncio.gather(*(awaited(model, "request", r) for r in requests),
                                       return_exceptions=True)
    else:
        try:
            results = _listed(await awaited(model, "batch_request", Batch(requests)))
        except Exception as exc:
            results = [exc] * len(requests)
        except asyncio.CancelledError as exc:
            results = [_not_cancelled(exc)] * len(requests)
        if len(results) != len(requests):
            err = ModelError(f"batch_request returned {len(results)} responses for "
                             f"{len(requests)} requests")
            results = [err] * len(requests)
    out: list[list[bytes] | Exception] = [[] for _ in jobs]
    for (j, _, indices), result in zip(calls, results):
        samples = _samples(result, len(indices))
        prev = out[j]
        if isinstance(prev, Exception):
            continue
        out[j] = samples if isinstance(samples, Exception) else prev + samples
    return out


async def awaited(model: Any, method: str, argument: Any) -> Any:
    """``await model.<method>(argument)``; a method that is not ``async def`` (it returned
    something that cannot be awaited) is a ``ModelError`` saying so."""
    result = getattr(model, method)(argument)
    if not inspect.isawaitable(result):
        raise ModelError(f"{type(model).__name__}.{method}() returned "
                         f"{type(result).__name__}, not an awaitable: define it with "
                         f"'async def'")
    return await result


def _listed(responses: Any) -> list[Any]:
    """What ``batch_request()`` returned, as a list; ``ModelError`` if it is no sequence
    of responses (None, one Response, a dict, a str)."""
    if isinstance(responses, (list, tuple)) and not isinstance(responses, Response):
        return list(responses)
    if inspect.isgenerator(responses):
        return list(responses)
    raise ModelError(f"batch_request() returned {type(responses).__name__}, not a list with "
                     "one Response per request of the batch")


class LocalCalls(BatchRequestModel):
    """A local model called as the original's local pipelines call it: ``batch_request()``
    (else ``request()``) with one sample per request, at most ``per_call`` requests per
    call. Every sample is then the first of its call (never ``duplicated``), as in
    ``LocalAPI``; ``deduplicated``: as in ``OrderedLocalAPI``, whose deduplicator merges a
    prompt's requests, the samples of one prompt after its first are ``duplicated``."""

    def __init__(self, model: Any, per_call: int, *, deduplicated: bool = False) -> None:
        self.model, self.per_call, self.deduplicated = model, per_call, deduplicated

    @property
    def route_kind(self) -> str:
        """The prefix of its in-process route: the local pipelines call a model otherwise
        than ``OnlineAPI``, so their workers serve queues of their own."""
        return "inproc-ordered" if self.deduplicated else "inproc-local"

    async def batch_request(self, batch: Batch) -> list[Any]:
        """A ``Response`` per request, or the exception of its failed call (each request
        fails alone, as ``generate`` expects)."""
        singles = [dataclasses.replace(r, n=1) for r in batch.requests for _ in range(r.n)]
        got: list[Any] = []
        if callable(getattr(self.model, "batch_request", None)):
            for i in range(0, len(singles), self.per_call):
                chunk = singles[i:i + self.per_call]
                try:
                    answers = _listed(await awaited(self.model, "batch_request", Batch(chunk)))
                    if len(answers) != len(chunk):
                        raise ModelError(f"batch_request returned {len(answers)} responses "
                                         f"for {len(chunk)} requests")
                except Exception as exc:
                    answers = [exc] * len(chunk)
                got += answers
        else:
            slots = asyncio.Semaphore(self.per_call)

            async def one(request: Request) -> Any:
                async with slots:
                    return await awaited(self.model, "request", request)

            got = list(await asyncio.gather(*(one(r) for r in singles), return_exceptions=True))
        out: list[Any] = []
        at = 0
        for r in batch.requests:
            out.append(_one_sample_each(got[at:at + r.n], r.n, self.deduplicated))
            at += r.n
        return out


def _one_sample_each(answers: list[Any], n: int, deduplicated: bool) -> Any:
    """The ``n`` one-sample answers of a request as one ``Response``, or the first
    failure among them; with ``deduplicated``, only the first opened a call."""
    data, meta = [], []
    for i, answer in enumerate(answers):
        if isinstance(answer, BaseException):
            if not isinstance(answer, Exception):
                raise answer
            return answer
        one = getattr(answer, "data", None)
        if not isinstance(one, list) or len(one) != 1:
            return ModelError(f"model returned {one!r:.80} for a request of n=1; it must "
                              "return Response(data=[sample])")
        data.append(one[0])
        meta.append({**((getattr(answer, "metadata", None) or [None])[0] or {}),
                     "call_first": i == 0 or not deduplicated})
    return Response(data, [False] * n, [False] * n, meta)


def _not_cancelled(exc: asyncio.CancelledError) -> ModelError:
    """A model's ``CancelledError`` as its failure when nobody cancelled this task (the
    model awaited something cancelled elsewhere); re-raised if this task is being
    cancelled (a worker stopping). Left to run, it ended the model call without a trace
    and its requests waited for the lease to run out."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if task is None or cancelling is None or cancelling():
        raise exc
    return ModelError("the model raised CancelledError though nothing cancelled it (did it "
                      "await a task or future cancelled elsewhere?)")


def _samples(result: Any, n: int) -> list[bytes] | Exception:
    if isinstance(result, asyncio.CancelledError):
        return _not_cancelled(result)
    if isinstance(result, BaseException):
        if not isinstance(result, Exception):
            raise result
        return result
    data = getattr(result, "data", None)
    if isinstance(data, tuple):  # Response(data=(...)) is stored as the original stored it
        data = list(data)
    if not isinstance(data, list) or len(data) != n:
        got = (f"{len(data)} samples" if isinstance(data, list) else
               f"a Response whose data is a {type(data).__name__}"
               if isinstance(result, Response) else repr(type(result).__name__))
        return ModelError(f"model returned {got} where {n} were asked for; "
                          "it must return Response(data=[...]) with exactly n items")
    meta = getattr(result, "metadata", None) or [None] * n
    if not isinstance(meta, (list, tuple)) or len(meta) != n or \
            not all(m is None or isinstance(m, dict) for m in meta):
        # (zipped as they were, the samples past its end would never be stored)
        got = (f"a {type(meta).__name__}" if not isinstance(meta, (list, tuple)) else
               f"{len(meta)} entries" if len(meta) != n else "an entry that is not a dict")
        return ModelError(f"model returned Response.metadata with {got} for {n} samples; "
                          "it must be None or a list of one dict (or None) per sample")
    try:
        # the model may say which samples opened a provider call of their own (it split
        # the request): those paid the prompt too
        return [encode_sample(d, {"call_first": i == 0, **(m or {})})
                for i, (d, m) in enumerate(zip(data, meta))]
    except (TypeError, ValueError, OverflowError) as exc:
        return ModelError(f"model returned a sample that cannot be stored ({exc}); "
                          "return str, numbers, lists or dicts")
