"""The user-facing types: the same surface as the single-process CacheSaver.

``Request`` is a frozen dataclass (subclass it to add decoding fields), ``Batch`` and
``Response`` are named tuples (``data, cached, duplicated = response``), and the model
interfaces are runtime-checkable protocols: any object with the method qualifies, and
subclassing them still works.
"""

from __future__ import annotations

import dataclasses
import keyword
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from .errors import InvalidRequestError

__all__ = ["Batch", "BatchRequestModel", "Metadata", "Request", "Response", "SingleRequestModel"]

# Fields of a request that steer the cache rather than the model.
ROUTING_FIELDS = ("n", "request_id", "namespace")


@dataclass(frozen=True)
class Request:
    """One call to the LLM: ``n`` samples of ``prompt`` for one ``namespace``.

    Subclass it (as a frozen dataclass) to add decoding fields such as ``temperature``
    or ``max_completion_tokens``, required or with defaults: they become part of the
    prompt key and reach the model. Attributes a request does not define read as
    ``None``. ``request_id`` orders requests inside a batch (plain string order);
    ``None`` is allowed and sorts first.
    """

    prompt: Any
    n: int
    request_id: str | None
    namespace: str | None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def model_fields(self) -> dict[str, Any]:
        """Everything that shapes generation: all fields but n, request_id and namespace."""
        read = _READERS.get(type(self))
        if read is None:
            read = _READERS[type(self)] = _fields_reader(type(self))
        return read(self)


_READERS: dict[type, Callable[[Any], dict[str, Any]]] = {}


def _fields_reader(cls: type) -> Callable[[Any], dict[str, Any]]:
    """``model_fields`` for instances of ``cls``: a function generated for its fields, as
    ``dataclasses`` generates ``__init__`` (every request is read so, and ``__getattr__``
    above makes a loop of ``getattr`` calls cost three times as much)."""
    names = tuple(f.name for f in dataclasses.fields(cls) if f.name not in ROUTING_FIELDS)
    if not all(name.isidentifier() and not keyword.iskeyword(name) for name in names):
        return lambda request: {name: getattr(request, name) for name in names}
    scope: dict[str, Any] = {"__name__": __name__}
    exec("def read(r):\n    return {" + ", ".join(f"{n!r}: r.{n}" for n in names) + "}\n",
         scope)
    read: Callable[[Any], dict[str, Any]] = scope["read"]
    read.__qualname__ = f"{cls.__qualname__}.model_fields"
    return read


class _BatchFields(NamedTuple):
    requests: list[Request]


class Batch(_BatchFields):
    """Requests sent together; inside a batch they are served in ``request_id`` order."""

    __slots__ = ()

    def __new__(cls, requests: list[Request]) -> Batch:
        if not isinstance(requests, (list, tuple)):
            raise InvalidRequestError(f"Batch(requests) must be a list of Request objects, got "
                                      f"{type(requests).__name__}")
        for i, r in enumerate(requests):
            if not isinstance(r, Request):
                raise InvalidRequestError(
                    f"Batch.requests[{i}] is a {type(r).__name__}, not a Request; build it "
                    "with Request(prompt=..., n=..., request_id=..., namespace=...)")
        return super().__new__(cls, list(requests))


class _ResponseFields(NamedTuple):
    data: list[Any]
    cached: list[bool] | None = None
    duplicated: list[bool] | None = None


class Response(_ResponseFields):
    """Samples for one request, as a named tuple ``(data, cached, duplicated)``.

    ``cached[i]``: this request did not cause sample ``i`` to be generated (it was
    stored before, or another request's generation, in any namespace or process,
    produced it). ``duplicated[i]``: this request's own model call generated it, and it
    was not the call's first sample (the prompt was paid once, for an earlier one).
    ``metadata`` (not part of the tuple, not compared) holds per sample its ``index``,
    ``source`` (``stored``, ``shared`` or ``generated``) and what the model reported.
    """

    metadata: list[dict[str, Any]] | None = None

    def __new__(cls, data: list[Any], cached: list[bool] | None = None,
                duplicated: list[bool] | None = None,
                metadata: list[dict[str, Any]] | None = None) -> Response:
        self = tuple.__new__(cls, (data, cached, duplicated))  # the named tuple's own way
        self.metadata = metadata
        return self

    def _replace(self, **changes: Any) -> Response:
        return Response(*super()._replace(**changes), metadata=self.metadata)


class Metadata(NamedTuple):
    """What a drop-in client's ``create(..., metadata=True)`` returns beside the
    response: the sample count and the flags of ``Response``."""

    n: int
    cached: list[bool] | None = None
    duplicated: list[bool] | None = None


@runtime_checkable
class SingleRequestModel(Protocol):
    """A model that answers one request at a time."""

    async def request(self, request: Request) -> Response: ...


@runtime_checkable
class BatchRequestModel(Protocol):
    """A model that answers a batch of requests in one call."""

    async def batch_request(self, batch: Batch) -> list[Response]: ...
