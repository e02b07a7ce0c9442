"""Progress of a long step, as a person waiting for it wants to see it.

In a terminal: a rich bar with the phase, a percentage and the count. Otherwise (a log,
a pipe, `pellucid serve` under a supervisor): one plain line when a phase starts, then a
line at most every `every` seconds, then one when it ends. Loading reports its phases
through this (`load_model(progress=...)`); `None` reports nothing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, *, stream: TextIO | None = None, every: float = 2.0, terminal: bool | None = None):
        self.label, self.every = label, every
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self._bar = None
        self._task = None
        self.phase, self.total, self.done = "", 0, 0
        self._t0 = self._last = time.perf_counter()

    # -- what the loader calls -------------------------------------------------------------
    def start(self, phase: str, total: int = 0) -> None:
        """A new phase of `total` steps (0: one step of unknown length)."""
        self._end_phase()
        self.phase, self.total, self.done = phase, total, 0
        self._last = time.perf_counter()
        if self.terminal:
            if self._bar is None:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TaskProgressColumn,
                    TextColumn,
                )

                self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), MofNCompleteColumn(),
                                     console=Console(file=self.stream), transient=True)  # fmt: skip
                self._bar.start()
            self._task = self._bar.add_task(f"{self.label}: {phase}", total=total or None)
        else:
            self._line(f"{phase}" + (f" (0/{total:,})" if total else "..."))

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=n)
        elif not self.terminal and time.perf_counter() - self._last >= self.every and self.total:
            self._line(f"{self.phase} {100 * self.done // self.total}% ({self.done:,}/{self.total:,})")

    def finish(self) -> float:
        """End the last phase; returns the seconds since this Progress was made."""
        self._end_phase()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        return time.perf_counter() - self._t0

    # -- internals ---------------------------------------------------------------------------
    def _end_phase(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.remove_task(self._task)
            self._task = None
        elif not self.terminal and self.phase and self.total and self.done:
            self._line(f"{self.phase} 100% ({self.done:,}/{self.total:,})")
        self.phase = ""

    def _line(self, text: str) -> None:
        self._last = time.perf_counter()
        self.stream.write(f"{self.label}: {text} [{self._last - self._t0:.1f} s]\n")
        self.stream.flush()
