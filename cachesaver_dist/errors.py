"""Errors raised to users. Each message says what was wrong and what to do."""

from __future__ import annotations


class CacheSaverError(Exception):
    """Base class of the errors this package raises."""


class InvalidRequestError(CacheSaverError, ValueError):
    """A request was refused at the client; nothing was sent to Redis."""


class GenerationError(CacheSaverError):
    """The model failed for good for this request; its claim was released."""


class ReplyTimeoutError(CacheSaverError, TimeoutError):
    """No reply arrived in time; the request's samples stay cached for a later call."""
