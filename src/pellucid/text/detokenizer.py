"""Streaming detokenizer: token ids in, text out, never half a UTF-8 character.

Every token stands for exact bytes (`Tokenizer.token_bytes`); an incremental UTF-8
decoder holds back the bytes of a character that a later token will complete.
"""

from __future__ import annotations

import codecs

from pellucid.text.tokenizer import Tokenizer


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything emitted so far

    def push(self, token: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        if self.skip_special and token in self.tokenizer.special_ids:
            return ""
        new = self._decoder.decode(self.tokenizer.token_bytes(token))
        self.text += new
        return new

    def flush(self) -> str:
        """End of stream: whatever bytes are pending, with U+FFFD for an incomplete tail."""
        new = self._decoder.decode(b"", final=True)
        self.text += new
        return new
