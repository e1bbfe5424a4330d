"""Every error this package raises. Each message says what was wrong and what to do."""

from __future__ import annotations

import ast
import contextlib

__all__ = [
    "ArchiveError",
    "CacheSaverError",
    "GenerationError",
    "InvalidRequestError",
    "ModelError",
    "NoWorkerError",
    "NotReplicatedError",
    "ProtocolError",
    "ProviderError",
    "RedisRefusedError",
    "RedisUnavailableError",
    "ReplayError",
    "ReplyTimeoutError",
]


class CacheSaverError(Exception):
    """Base class of the errors this package raises."""


class InvalidRequestError(CacheSaverError, ValueError):
    """A request was refused at the client; nothing was sent to Redis."""


class ReplayError(InvalidRequestError):
    """A replayed run cannot serve this request: its manifest does not hold it (or holds it
    for another prompt or ``n``), or its samples are missing. Nothing was generated."""


class ArchiveError(CacheSaverError):
    """An archive cannot be read (corrupt, truncated, another format or version) or
    written; an import refused for this reason has written nothing."""


class GenerationError(CacheSaverError):
    """The model failed for good for this request; its claim was released."""


class NoWorkerError(GenerationError):
    """No live worker serves what a request needs (a model, or the cache queue)."""


class ReplyTimeoutError(CacheSaverError, TimeoutError):
    """No reply arrived in time; the request's samples stay cached for a later call."""


class ProtocolError(CacheSaverError, ValueError):
    """A message in Redis is not one this version understands; ``field`` names the part."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RedisUnavailableError(CacheSaverError, ConnectionError):
    """Redis cannot be reached (or the connection cannot be set up) in the time allowed."""


class NotReplicatedError(RedisUnavailableError):
    """A write was not confirmed by the replicas asked for (``--wait-replicas``) in time."""


class RedisRefusedError(CacheSaverError):
    """Redis refused a command in a way retrying cannot fix (permissions, wrong password,
    out of memory, read-only replica, a key of the wrong type)."""


class ModelError(CacheSaverError, RuntimeError):
    """A model failed or misbehaved; the message names the model and the cause."""


class ProviderError(ModelError):
    """A provider call failed; ``status`` is None for timeouts and connection errors."""

    TRANSIENT_STATUSES = frozenset({408, 409, 429})

    def __init__(self, provider: str, status: int | None, message: str, *,
                 kind: str | None = None, retry_after: float | None = None) -> None:
        self.provider, self.status, self.kind = provider, status, kind
        self.retry_after, self.detail = retry_after, message
        where = f"returned {status}" if status is not None else "call failed"
        super().__init__(f"{provider} {where}" + (f" ({kind})" if kind else "") + f": {message}")

    @property
    def transient(self) -> bool:
        """Worth retrying: rate limits, server errors, timeouts, dropped connections."""
        s = self.status
        return s is None or s in self.TRANSIENT_STATUSES or s >= 500


_HINTS = {
    "NOPERM": "the Redis user lacks a permission: grant it (ops/acl.conf lists each role's "
              "rules; OnlineAPI(direct=True) needs the direct-client user's) or use a user "
              "whose rules cover this prefix",
    "WRONGPASS": "the user name or password in the Redis URL is wrong: fix REDIS_URL",
    "NOAUTH": "the server needs a password: put it in the Redis URL (redis://:PASSWORD@host)",
    "WRONGTYPE": "a key under this prefix holds another type: another program writes there; "
                 "use another --prefix or delete that key",
    "OOM": "Redis is out of memory (maxmemory with noeviction): raise maxmemory, or delete "
           "old samples and runs with 'cachesaver-dist prune' ('cachesaver-dist usage' shows "
           "what takes the memory)",
    "READONLY": "this server is a read-only replica: point the URL at the primary, or use a "
                "redis+sentinel:// URL",
    "MISCONF": "Redis cannot write its persistence files: see the server's log (disk full?)",
    "NOSCRIPT": "the server lost its scripts mid-call: ask again",
    "CORRUPT": "a key's state is corrupt: set it aside or delete it",
}


def redis_message(exc: BaseException) -> str:
    """Redis's own message, without the command and arguments that redis-py adds to
    errors in pipelines (they may hold prompt text)."""
    text = str(exc)
    marker = " of pipeline caused error: "
    if marker not in text:
        return text
    text = text.split(marker, 1)[1]
    # redis-py's asyncio pipelines write the error's args tuple: "('WRONGTYPE ...',)"
    if text.startswith("('") or text.startswith('("'):
        with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
            args = ast.literal_eval(text)
            if isinstance(args, tuple) and args and isinstance(args[0], str):
                return args[0]
    return text


def refused(exc: BaseException, doing: str, *, noperm: str | None = None) -> RedisRefusedError:
    """A ``RedisRefusedError`` for a Redis error reply, saying what to do about it
    (``noperm``: what to do about a missing permission, where the caller knows better)."""
    message = redis_message(exc)
    code = _stripped_code(exc) or message.split(" ", 1)[0].upper()
    hint = (noperm if code == "NOPERM" else None) or _HINTS.get(code)
    return RedisRefusedError(f"Redis refused {doing}: {message[:300]}" +
                             (f" ({hint})" if hint else ""))


def _stripped_code(exc: BaseException) -> str | None:
    """The error code redis-py took off the message (it raises a class of its own for
    these: ``NOPERM ...`` becomes ``NoPermissionError("...")``)."""
    from redis import exceptions as e

    for cls, code in ((e.NoPermissionError, "NOPERM"), (e.OutOfMemoryError, "OOM"),
                      (e.ReadOnlyError, "READONLY"), (e.NoScriptError, "NOSCRIPT")):
        if isinstance(exc, cls):
            return code
    if isinstance(exc, e.AuthenticationError):
        return "NOAUTH" if "required" in str(exc).lower() else "WRONGPASS"
    return None
