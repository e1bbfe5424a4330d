"""cachesaver-dist: a distributed, Redis-backed, namespace-aware LLM response cache."""

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
from .models import SimModel
from .pipelines import LocalAPI, OnlineAPI, OrderedLocalAPI
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
