"""cachesaver-dist: a distributed, Redis-backed, namespace-aware LLM response cache."""

from .errors import CacheSaverError, GenerationError, InvalidRequestError, ReplyTimeoutError
from .models import SimModel
from .pipelines import OnlineAPI
from .protocol import Keys, prompt_key
from .typedefs import Batch, BatchRequestModel, Request, Response, SingleRequestModel

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "BatchRequestModel",
    "CacheSaverError",
    "GenerationError",
    "InvalidRequestError",
    "Keys",
    "OnlineAPI",
    "ReplyTimeoutError",
    "Request",
    "Response",
    "SimModel",
    "SingleRequestModel",
    "prompt_key",
]
