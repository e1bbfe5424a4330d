"""The original's pipelines for local models, ``LocalAPI`` and ``OrderedLocalAPI``:
``OnlineAPI`` with their signatures, calling the model as the original does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import defaults
from .models import LocalCalls, check_model, model_identity
from .pipelines import OnlineAPI, check_counts
from .typedefs import Request


def _local_model(model: Any, per_call: int, options: dict[str, Any], *,
                 deduplicated: bool = False) -> Any:
    """A model object called as the original's local pipelines call it (``LocalCalls``),
    keeping its own identity; a model name is left as it is."""
    if isinstance(model, str):
        return model
    check_model(model, type(model).__name__)
    check_counts(requests_per_model_call=per_call)
    options["model_id"] = options.get("model_id") or model_identity(model)
    return LocalCalls(model, per_call, deduplicated=deduplicated)


class LocalAPI(OnlineAPI):
    """The original's pipeline for local models (cache, then a batcher, then the model),
    with its signature. The model is called as the original calls it: ``batch_request()``
    with one sample per request, ``batch_size`` requests at most. Unlike the original,
    requests are ordered by ``request_id`` (as in ``OrderedLocalAPI``), so with several
    requests of one prompt and namespace each may get other samples of the same list."""

    def __init__(self, model: Any, cache: Any = None, batch_size: int = defaults.BATCH_SIZE,
                 hash: Callable[[Request], Any] | None = None,
                 timeout: float | None = defaults.BATCH_TIMEOUT_S,
                 allow_batch_overflow: bool = False, **options: Any) -> None:
        super().__init__(_local_model(model, batch_size, options), cache, batch_size, hash,
                         timeout, allow_batch_overflow, **options)


class OrderedLocalAPI(OnlineAPI):
    """The original's ordered pipeline for local models, with its signature: requests are
    collected in batches of ``collection_batch_size`` and ordered by ``request_id``; the
    model gets ``batch_request()`` calls of at most ``hardware_batch_size`` requests of
    one sample each, as in the original. Its flags are the original's too: a prompt's
    requests in flight are merged, so its samples after the first are ``duplicated``."""

    def __init__(self, model: Any, cache: Any = None,
                 collection_batch_size: int = defaults.BATCH_SIZE,
                 hardware_batch_size: int = defaults.BATCH_SIZE,
                 timeout: float | None = defaults.BATCH_TIMEOUT_S,
                 allow_batch_overflow: bool = False, **options: Any) -> None:
        super().__init__(_local_model(model, hardware_batch_size, options, deduplicated=True),
                         cache, collection_batch_size, None, timeout, allow_batch_overflow,
                         model_batch_size=hardware_batch_size, **options)
