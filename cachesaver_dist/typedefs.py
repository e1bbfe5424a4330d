"""The user-facing types: the same surface as the single-process CacheSaver."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cache
from typing import Any

__all__ = ["Batch", "BatchRequestModel", "Request", "Response", "SingleRequestModel"]

# Fields of a request that steer the cache rather than the model.
ROUTING_FIELDS = ("n", "request_id", "namespace")


@dataclass(frozen=True)
class Request:
    """One call to the LLM.

    Subclass it (as a frozen dataclass) to add decoding fields such as ``temperature``
    or ``max_completion_tokens``: they become part of the prompt key and reach the
    model. Attributes a request does not define read as ``None``.
    """

    prompt: Any
    n: int = 1
    request_id: str | None = None
    namespace: str | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def model_fields(self) -> dict[str, Any]:
        """Everything that shapes generation: all fields but n, request_id and namespace."""
        names = _model_field_names(type(self))  # type: ignore[arg-type]
        return {name: getattr(self, name) for name in names}


@cache
def _model_field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ROUTING_FIELDS)


@dataclass(frozen=True)
class Batch:
    """Requests sent together; inside a batch they are served in ``request_id`` order."""

    requests: list[Request]

    def __post_init__(self) -> None:
        from .errors import InvalidRequestError

        if not isinstance(self.requests, (list, tuple)):
            raise InvalidRequestError(f"Batch(requests) must be a list of Request objects, got "
                                      f"{type(self.requests).__name__}")
        for i, r in enumerate(self.requests):
            if not isinstance(r, Request):
                raise InvalidRequestError(f"Batch.requests[{i}] is a {type(r).__name__}, not a "
                                          "Request; build it with Request(prompt=..., n=...)")


@dataclass
class Response:
    """Samples for one request.

    ``cached[i]``: sample ``i`` existed before this request. ``duplicated[i]``: it did
    not, and another request's generation produced it (no spend of its own).
    """

    data: list[Any]
    cached: list[bool] | None = None
    duplicated: list[bool] | None = None
    metadata: list[dict[str, Any]] | None = field(default=None, repr=False, compare=False)


class SingleRequestModel(ABC):
    """A model that answers one request at a time."""

    @abstractmethod
    async def request(self, request: Request) -> Response: ...


class BatchRequestModel(ABC):
    """A model that answers a batch of requests in one call."""

    @abstractmethod
    async def batch_request(self, batch: Batch) -> list[Response]: ...
