"""Dead letters: malformed messages set aside with their reason, never fatal.

A worker that meets a message it cannot read logs it once (kind, reason, where, size:
never its content, which may hold prompt text), moves it to the ``dead`` stream under
the prefix and goes on. ``cachesaver-dist dead-letters`` lists and drops them.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from . import defaults
from .protocol import DeadLetter, Keys, decode_dead_letter, encode_dead_letter

log = logging.getLogger("cachesaver_dist.deadletters")

MAX_RAW_BYTES = 1 << 20


_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")  # a stream entry id, as Redis writes it

def queue_dead_letter(pipe: Any, keys: Keys, kind: str, reason: str, raw: bytes | str,
                      source: str) -> Any:
    """Log a dead letter and queue its ``XADD`` on ``pipe`` (a pipeline or client); returns
    what ``pipe.xadd`` returns (an awaitable on a client)."""
    data = raw.encode(errors="surrogateescape") if isinstance(raw, str) else bytes(raw)
    log.error("dead letter: %s from %s (%d bytes): %s; set aside in %s", kind, source[:120],
              len(data), reason[:300], keys.dead_letters)
    letter = DeadLetter(kind, reason, source, data[:MAX_RAW_BYTES], time.time())
    return pipe.xadd(keys.dead_letters, encode_dead_letter(letter),
                     maxlen=defaults.DEAD_LETTERS_KEPT, approximate=True)


async def set_aside(redis: Any, keys: Keys, kind: str, reason: str, raw: bytes | str,
                    source: str) -> None:
    """Move one malformed message to the dead-letter stream now."""
    await queue_dead_letter(redis, keys, kind, reason, raw, source)


async def set_aside_key(redis: Any, keys: Keys, key: str, expected: str) -> None:
    """Move a key that holds another type than ``expected`` to the dead letters (its
    ``DUMP``, which ``RESTORE`` brings back) and delete it, so the work can go on."""
    found = await redis.type(key)
    found = found.decode() if isinstance(found, bytes) else str(found)
    raw = await redis.dump(key) or b""
    pipe = redis.pipeline(transaction=True)
    queue_dead_letter(pipe, keys, "foreign key", f"{key} holds a {found}, not a {expected}; "
                      "its DUMP is kept here (RESTORE brings it back)", raw, key)
    pipe.delete(key)
    await pipe.execute()


async def list_dead_letters(redis: Any, keys: Keys, count: int = 100
                            ) -> list[tuple[str, DeadLetter]]:
    """The newest ``count`` dead letters, newest first."""
    entries = await redis.xrevrange(keys.dead_letters, count=count)
    return [(eid.decode(), decode_dead_letter(fields)) for eid, fields in entries]


async def drop_dead_letters(redis: Any, keys: Keys, ids: list[str] | None = None) -> int:
    """Delete the named dead letters, or all of them; returns how many were dropped."""
    if ids is None:
        pipe = redis.pipeline(transaction=True)
        pipe.xlen(keys.dead_letters)
        pipe.delete(keys.dead_letters)
        count, _ = await pipe.execute()
        return int(count)
    bad = [i for i in ids if not _ENTRY_ID.fullmatch(i)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a dead letter id: ids look like "
                         "'1796330463128-1' (the first column of 'cachesaver-dist dead-letters')")
    return int(await redis.xdel(keys.dead_letters, *ids)) if ids else 0


def print_table(rows: list[dict[str, Any]]) -> None:
    """The ``dead-letters`` table (rows as ``--json`` prints them), fitted to the terminal."""
    from rich.console import Console

    from .tables import Col, fit_table

    console = Console()
    cols = [Col("id", "id"), Col("kind", "kind", text=True),  # an id stays whole: --drop takes it
            Col("bytes", "bytes", drop=2), Col("source", "source", text=True, drop=1),
            Col("reason", "reason", text=True)]
    console.print(fit_table(cols, rows, console.width, title="dead letters, newest first"))
