"""Tables that fit the terminal: headers are never cut, numbers never wrap.

When a table is wider than the terminal, text columns (names, reasons) fold, headers
wrap between words, and if that is not enough the columns of least importance are
left out, named in the caption (``--json`` always has every column).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text

TEXT_MIN = 10  # a folding column is not made narrower than this (or its header's words)


@dataclass(frozen=True)
class Col:
    """A column: ``header``; ``key`` of the row dict (or ``get``); ``drop`` order (0: always
    shown, higher numbers are left out first); ``text`` columns fold, others don't wrap;
    ``whole``: a text column kept on one line (a run id or model name a user copies into
    a command), if need be by leaving out columns that may be left out; when that is not
    enough, the rightmost such column folds first."""

    header: str
    key: str = ""
    drop: int = 0
    text: bool = False
    whole: bool = False
    fmt: Callable[[Any], str] = str
    get: Callable[[dict[str, Any]], Any] | None = None

    def cell(self, row: dict[str, Any]) -> str:
        return self.fmt(self.get(row) if self.get else row.get(self.key))


def _words(text: str) -> int:
    return max((len(w) for w in text.split()), default=0)


def _fits(widths: Sequence[int], width: int) -> bool:
    return sum(w + 3 for w in widths) + 1 <= width  # padding 1 + 1, one rule per column


def fit_table(cols: Sequence[Col], rows: Sequence[dict[str, Any]], width: int, *,
              title: str | None = None, caption: str | None = None) -> Table:
    """A rich ``Table`` of ``rows`` that is at most ``width`` columns wide (a row's
    ``_style``, if any, styles the whole row)."""
    cells = [[c.cell(r) for c in cols] for r in rows]

    def natural(i: int) -> int:
        return max([len(cols[i].header), *(len(row[i]) for row in cells)])

    whole = {i for i, c in enumerate(cols) if c.whole}  # on one line while the table fits

    def folds(i: int) -> bool:
        return cols[i].text and i not in whole

    def minimum(i: int) -> int:
        c = cols[i]
        if folds(i):
            return max(_words(c.header), min(natural(i), TEXT_MIN))
        return max([_words(c.header), *(len(row[i]) for row in cells)])

    def shown() -> tuple[list[int], list[int]]:
        """The columns kept, and those left out (least important first) to fit."""
        keep = list(range(len(cols)))
        droppable = sorted((i for i in keep if cols[i].drop),
                           key=lambda i: (-cols[i].drop, -i))
        dropped: list[int] = []
        while not _fits([minimum(i) for i in keep], width) and droppable:
            i = droppable.pop(0)
            keep.remove(i)
            dropped.append(i)
        return keep, dropped

    keep, dropped = shown()
    while whole and not _fits([minimum(i) for i in keep], width):
        whole.discard(max(whole))
        keep, dropped = shown()
    widths: dict[int, int] | None = None
    if not _fits([natural(i) for i in keep], width):
        widths = {i: minimum(i) for i in keep}
        spare = width - (sum(w + 3 for w in widths.values()) + 1)
        texts = [i for i in keep if folds(i)]
        want = {i: natural(i) - widths[i] for i in texts}
        total = sum(want.values())
        for i in texts:  # share what is left among the text columns, by what they lack
            if spare > 0 and total > 0:
                extra = min(want[i], spare * want[i] // total)
                widths[i] += extra
        left = width - (sum(w + 3 for w in widths.values()) + 1)
        for i in texts:  # rounding leftovers
            add = max(0, min(left, natural(i) - widths[i]))
            widths[i] += add
            left -= add
    notes = [caption] if caption else []
    if dropped:
        names = ", ".join(cols[i].header for i in sorted(dropped))
        notes.append(f"not shown at {width} columns: {names} (--json has every column)")
    table = Table(title=title, caption="\n".join(notes) or None, caption_justify="left")
    for i in keep:
        c = cols[i]
        table.add_column(Text(c.header), justify="left" if c.text else "right",
                         overflow="fold",
                         width=widths[i] if widths else None,
                         min_width=minimum(i))
    for row, values in zip(rows, cells):
        table.add_row(*(Text(values[i]) for i in keep), style=row.get("_style"))
    return table
