"""Tables and key: value lists that read at any width, a pipe's 80 columns included.

A table is drawn in the first layout that fits the console without cutting anything:
boxed, then compact (no vertical rules), then turned on its side (one column per record,
for a few records), each first at its natural width and then with headers and the columns
marked `wrap` broken between words; when none fits, each row becomes a block of
`key  value` lines. No header is shortened with '…', no column is dropped, and no word is
split, so a path is always whole (a path too long for the line runs past its end).
"""

from __future__ import annotations

import io
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

WIDE = 100  # at this width and above the usual tables fit boxed; below, layouts change
SECTION = None  # in a row list: a rule after the previous row


@dataclass
class Col:
    header: str
    justify: str = "left"  # "left" or "right"
    wrap: bool = False  # may its cells break between words (descriptions, lists)?
    style: str | None = None


def console(stderr: bool = False) -> Console:
    """A console sized now (COLUMNS is read at creation), without guessing highlights."""
    return Console(stderr=stderr, highlight=False)


class SizedAtUse:
    """A module-level console that is sized when it prints, not when its module is imported:
    rich fixes a console's width for good if COLUMNS is set when it is made (an import
    inside one command run with COLUMNS=60 would size every later command's output)."""

    def __init__(self, **kw: Any):
        self.kw = kw

    def now(self) -> Console:
        """A console sized now, for what keeps one across calls (a progress bar, a live display)."""
        return Console(**self.kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.now(), name)


def plain(cell: Any) -> str:
    if isinstance(cell, Text):
        return cell.plain
    return Text.from_markup(str(cell)).plain


def _lines(cell: Any) -> list[str]:
    return plain(cell).splitlines() or [""]


def _natural(cell: Any) -> int:
    return max(cell_len(ln) for ln in _lines(cell))


def _longest_word(cell: Any) -> int:
    return max((cell_len(w) for ln in _lines(cell) for w in ln.split()), default=0)


def wrap(text: str, width: int, indent: str = "", first: str = "") -> list[str]:
    """Word-wrapped lines that never split a word: a long path stays on one line."""
    if not text:
        return [first.rstrip()]
    return textwrap.wrap(text, width=max(width, 8), initial_indent=first, subsequent_indent=indent,
                         break_long_words=False, break_on_hyphens=False) or [first.rstrip()]  # fmt: skip


def paragraph(con: Console, text: str, style: str | None = None, indent: int = 0) -> None:
    """Print text wrapped between words at the console's width (markup is not read)."""
    pad = " " * indent
    for line in wrap(text, con.width, pad, pad):
        con.print(Text(line, style=style or ""), soft_wrap=True)


def path_line(con: Console, label: str, path: str | os.PathLike) -> None:
    """`label path` on one line, however narrow the console: a path must never be split."""
    con.print(Text(f"{label}{path}"), soft_wrap=True)


def print_json(obj: Any, indent: int | None = 2) -> None:
    sys.stdout.write(json.dumps(obj, indent=indent) + "\n")


# -- tables -------------------------------------------------------------------------------


def _make(
    cols: list[Col], rows: list, compact: bool, show_header: bool, widths: list[int] | None
) -> Table:
    if compact:
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                  show_header=show_header)  # fmt: skip
    else:
        t = Table(show_header=show_header)
    for i, c in enumerate(cols):
        w = widths[i] if widths else None
        # no_wrap only at the natural width: with set widths a header may break between words
        t.add_column(c.header, justify=c.justify, style=c.style, width=w, no_wrap=widths is None)  # type: ignore[arg-type]
    for r in rows:
        if r is SECTION:
            if t.rows:
                t.rows[-1].end_section = True
            continue
        t.add_row(*r)
    return t


def _overhead(cols: list[Col], compact: bool) -> int:
    """Columns of the console a layout takes beyond its cells (rules, padding)."""
    probe = _make([Col("")] * len(cols), [["x"] * len(cols)], compact, False, [1] * len(cols))
    c = Console(width=10_000, file=io.StringIO(), color_system=None)
    lines = c.render_lines(probe, c.options, pad=False)
    return max(sum(cell_len(s.text) for s in line) for line in lines) - len(cols)


def _layout(
    cols: list[Col], rows: list, width: int, show_header: bool, wrapped: bool
) -> Table | None:
    """The table at its natural width (wrapped=False), or with set widths that break headers
    and `wrap` columns between words; None if even that does not fit."""
    body = [r for r in rows if r is not SECTION]
    heads = [c.header if show_header else "" for c in cols]
    natural = [max([_natural(h), *(_natural(r[i]) for r in body)]) for i, h in enumerate(heads)]
    least = [max([_longest_word(h), *((_longest_word if c.wrap else _natural)(r[i]) for r in body)])
             for i, (h, c) in enumerate(zip(heads, cols, strict=True))]  # fmt: skip
    for compact in (False, True):
        if not wrapped:
            if sum(natural) + _overhead(cols, compact) <= width:
                return _make(cols, rows, compact, show_header, None)
            continue
        room = width - _overhead(cols, compact) - sum(least)
        if room >= 0:
            want = [n - m for n, m in zip(natural, least, strict=True)]
            total = sum(want) or 1
            widths = [m + (room * w) // total for m, w in zip(least, want, strict=True)]
            return _make(cols, rows, compact, show_header, widths)
    return None


def fits(con: Console, cols: list[Col], rows: list) -> bool:
    """Would the table fit the console at its natural width (nothing wrapped)?"""
    return _layout(cols, rows, con.width, True, False) is not None


def _transposed(cols: list[Col], rows: list, key: int) -> tuple[list[Col], list]:
    body = [r for r in rows if r is not SECTION]
    right = sum(c.justify == "right" for i, c in enumerate(cols) if i != key) * 2 >= len(cols) - 1
    tcols = [Col(cols[key].header, style="bold")] + [
        Col(plain(r[key]), "right" if right else "left") for r in body
    ]
    trows = [[c.header, *(r[i] for r in body)] for i, c in enumerate(cols) if i != key]
    return tcols, trows


def records(con: Console, cols: list[Col], rows: list, key: int = 0) -> None:
    """Each row as a block of `header  value` lines, its key first and in bold."""
    body = [r for r in rows if r is not SECTION]
    kw = min(max((cell_len(c.header) for c in cols), default=0), max(8, con.width // 3))
    order = [key] + [i for i in range(len(cols)) if i != key]
    for n, r in enumerate(body):
        if n:
            con.print()
        for i in order:
            if i == key or plain(r[i]).strip():  # an empty cell says nothing here
                kv_line(con, cols[i].header, plain(r[i]), kw, style="bold" if i == key else "")


def kv_line(con: Console, k: str, v: str, kw: int, indent: int = 0, style: str = "") -> None:
    lead = " " * indent + k.ljust(kw) + "  "
    if cell_len(lead) > con.width // 2:  # a long key: the value goes below it
        con.print(Text(" " * indent + k, style="dim"), soft_wrap=True)
        lead = " " * (indent + 4)
    for j, line in enumerate(wrap(v, con.width - cell_len(lead), "", "")):
        text = Text()
        text.append(lead if j == 0 else " " * cell_len(lead), style="dim" if j == 0 else "")
        text.append(line, style=style)
        con.print(text, soft_wrap=True)


def show_table(con: Console, cols: list[Col], rows: list, *, title: str | None = None, caption: str | None = None,
               key: int = 0, side_ok: bool = True) -> None:  # fmt: skip
    """Print rows (lists of cells, rich markup allowed; SECTION draws a rule) under `cols`.

    `key` is the column that names a row (the heading of its block in the key: value
    layout); `side_ok=False` keeps a long table from being turned on its side.
    """
    if title:
        paragraph(con, title, style="bold")
    body = [r for r in rows if r is not SECTION]
    side = _transposed(cols, rows, key) if side_ok and 2 <= len(body) <= 8 else None
    t = None
    for wrapped in (False, True):  # natural widths first, either way round; then wrapped
        t = _layout(cols, rows, con.width, True, wrapped)
        if t is None and len(body) == 1:
            break  # one row that does not fit as it is reads best as key: value lines
        if t is None and side is not None:
            t = _layout(*side, con.width, True, wrapped)
        if t is not None:
            break
    if t is None:
        records(con, cols, rows, key)
    else:
        con.print(t)
    if caption:
        paragraph(con, caption, style="dim")


def show_kv(con: Console, pairs: list[tuple[str, Any]], *, title: str | None = None) -> None:
    """Label / value pairs: a boxed two-column table where it fits, else `label  value` lines.

    A value that is an os.PathLike is never broken (nor is any word of any value).
    """
    if title:
        paragraph(con, title, style="bold")
    cols = [Col("", style="bold"), Col("", wrap=True)]
    rows = [[Text(k), Text(str(v))] for k, v in pairs]
    # a path stays whole: the value column may wrap only between the words of other values
    for r, (_, v) in zip(rows, pairs, strict=True):
        if isinstance(v, os.PathLike):
            r[1].no_wrap = True
    t = _layout(cols, rows, con.width, False, False) or _layout(cols, rows, con.width, False, True)
    if t is not None and all(_natural(r[1]) <= _width_of(t, 1) for r, (_, v) in zip(rows, pairs, strict=True)
                             if isinstance(v, os.PathLike)):  # fmt: skip
        con.print(t)
        return
    kw = min(max((cell_len(k) for k, _ in pairs), default=0), max(8, con.width // 3))
    for k, v in pairs:
        kv_line(con, k, str(v), kw)


def _width_of(t: Table, i: int) -> int:
    return t.columns[i].width or 10_000
