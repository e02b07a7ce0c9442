"""The one error type that front doors show as a clean message instead of a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PellucidError(Exception):
    """Bad input or an unmet requirement, explained in one paragraph for a person.

    `param` names the offending field where there is one (the HTTP server puts it in the
    error body); `status` is the HTTP status the server answers with.
    """

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice `word` was most likely meant to be, or None: a close spelling
    (difflib's ratio >= cutoff, case ignored), else the one choice that contains it."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=cutoff)
    if close:
        return by_lower[close[0]]
    containing = [c for low, c in by_lower.items() if len(word) >= 3 and word.lower() in low]
    return containing[0] if len(containing) == 1 else None
