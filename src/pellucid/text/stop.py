"""Stop sequences, matched on decoded text across token boundaries.

`push(text)` returns the text that is safe to emit: a tail that could still grow into a
stop string is held back. When a stop string appears, the text before it is emitted and
everything from the stop string on is dropped.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Add newly decoded text; return what may be emitted now."""
        if self.matched is not None:
            return ""
        buf = self._pending + text
        if not self.stops:
            return buf
        cut, which = len(buf) + 1, None
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and i < cut:
                cut, which = i, s
        if which is not None:
            self.matched, self._pending = which, ""
            return buf[:cut]
        keep = self._held_tail(buf)
        self._pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def _held_tail(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for n in range(min(self.hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out if self.matched is None else ""
