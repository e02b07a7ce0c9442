"""Stop sequences, matched on decoded text across token boundaries.

`push(text)` returns the text that is safe to emit: a tail that could still grow into a
stop string is held back. When a stop string appears, the text before it is emitted and
everything from the stop string on is dropped; `matched` is then that stop string.

Which stop wins: the occurrence that is complete first in the text (the smallest end);
among those ending at the same place, the longest. A stream notices exactly that one
first, so the result does not depend on how the text was cut into pieces: streaming and
non-streaming give the same text.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = list(dict.fromkeys(s for s in stops if s))
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # longest tail to hold back
        self._pending = ""
        self.matched: str | None = None

    def push(self, text: str, match: bool = True) -> str:
        """Add newly decoded text; return what may be emitted now.

        match=False (before min_tokens): complete stop strings pass through as text, but a
        tail that could still become one is held back as usual.
        """
        if self.matched is not None:
            return ""
        buf = self._pending + text
        if not self.stops:
            return buf
        hit = self._first_complete(buf) if match else None
        if hit is not None:
            start, stop = hit
            self.matched, self._pending = stop, ""
            return buf[:start]
        keep = self._held_tail(buf)
        self._pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def _first_complete(self, buf: str) -> tuple[int, str] | None:
        """(start, stop) of the occurrence that ends first; ties: the longest stop."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for s in self.stops:
            i = buf.find(s)
            if i != -1:
                key = (i + len(s), -len(s), s)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        end, neg_len, s = best
        return end + neg_len, s

    def _held_tail(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for n in range(min(self.hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    @property
    def pending(self) -> str:
        """The text held back right now."""
        return self._pending

    def flush(self) -> str:
        """End of the text: release whatever was held back (nothing once a stop matched)."""
        out, self._pending = self._pending, ""
        return out if self.matched is None else ""
