"""cachesaver-dist: a distributed, Redis-backed, namespace-aware LLM response cache.

The names below are imported on first use (PEP 562), so ``import cachesaver_dist``
loads neither redis, arq, msgpack nor asyncio: a script pays for what it uses.
"""

from __future__ import annotations

from importlib import import_module

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing (~10 ms)
if TYPE_CHECKING:
    from .errors import (
        CacheSaverError,
        GenerationError,
        InvalidRequestError,
        ModelError,
        NoWorkerError,
        ProtocolError,
        RedisRefusedError,
        RedisUnavailableError,
        ReplayError,
        ReplyTimeoutError,
    )
    from .local import LocalAPI, OrderedLocalAPI
    from .models import SimModel
    from .pipelines import OnlineAPI
    from .protocol import Keys, prompt_key
    from .typedefs import (
        Batch,
        BatchRequestModel,
        Metadata,
        Request,
        Response,
        SingleRequestModel,
    )

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "BatchRequestModel",
    "CacheSaverError",
    "GenerationError",
    "InvalidRequestError",
    "Keys",
    "LocalAPI",
    "Metadata",
    "ModelError",
    "NoWorkerError",
    "OnlineAPI",
    "OrderedLocalAPI",
    "ProtocolError",
    "RedisRefusedError",
    "RedisUnavailableError",
    "ReplayError",
    "ReplyTimeoutError",
    "Request",
    "Response",
    "SimModel",
    "SingleRequestModel",
    "prompt_key",
]

# name -> the submodule that defines it
_SOURCES = {
    **dict.fromkeys(("CacheSaverError", "GenerationError", "InvalidRequestError", "ModelError",
                     "NoWorkerError", "ProtocolError", "RedisRefusedError",
                     "RedisUnavailableError", "ReplayError", "ReplyTimeoutError"), "errors"),
    "SimModel": "models",
    **dict.fromkeys(("LocalAPI", "OrderedLocalAPI"), "local"),
    "OnlineAPI": "pipelines",
    **dict.fromkeys(("Keys", "prompt_key"), "protocol"),
    **dict.fromkeys(("Batch", "BatchRequestModel", "Metadata", "Request", "Response",
                     "SingleRequestModel"), "typedefs"),
}


if not TYPE_CHECKING:  # type checkers read the imports above (and flag unknown names)

    def __getattr__(name: str) -> object:
        source = _SOURCES.get(name)
        if source is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(import_module(f"{__name__}.{source}"), name)
        globals()[name] = value  # later lookups skip this function
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
