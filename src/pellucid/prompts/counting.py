"""Exact token counts with a model's own tokenizer and chat template.

`TokenCounter.count_messages(messages)` is the number of tokens the engine feeds the model
for a chat request: the conversation rendered by the chat template with the generation
prompt, then encoded the way the engine encodes prompts (special tokens parsed, a BOS
added when the model's tokenizer asks for one). `count_text` is the same for a raw
completion prompt. `truncate(text, n)` cuts text at a token boundary for the budget.

Only the tokenizer and the chat template are needed: `TokenCounter.for_model(name)` reads
them from a GGUF file's metadata without loading any weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pellucid import registry
from pellucid.errors import PellucidError
from pellucid.prompts.budget import ContextBudget
from pellucid.text.chat_template import ChatTemplate, validate_messages
from pellucid.text.gguf import gguf_context_length, gguf_text
from pellucid.text.tokenizer import Tokenizer

Message = dict[str, Any]

# tokenizer, template and context length read from a GGUF file, by (path, mtime, size)
_GGUF_TEXT: dict[tuple[str, int, int], tuple[Tokenizer, ChatTemplate, int]] = {}


@dataclass
class MessageCount:
    """One row of a per-message count.

    `content` is the message's text alone; `tokens` is what adding this message to the
    rendered conversation costs, template markup included (the rows telescope: their sum
    plus the generation prompt is the total).
    """

    index: int
    role: str
    content: int
    tokens: int

    @property
    def overhead(self) -> int:
        return self.tokens - self.content


@dataclass
class ConversationCount:
    """Tokens of a conversation as the model receives it, per message and in total."""

    rows: list[MessageCount]  # empty when the template cannot render a prefix of the messages
    generation_prompt: int  # the assistant header after the last message
    total: int  # == count_messages(messages)
    prompt: str  # the rendered text

    @property
    def content(self) -> int:
        return sum(r.content for r in self.rows)

    @property
    def overhead(self) -> int:
        """Template tokens: everything that is not message content."""
        return self.total - self.content


class TokenCounter:
    """Counts tokens exactly as the engine will see them, for one tokenizer and template."""

    def __init__(self, tokenizer: Tokenizer, chat_template: ChatTemplate, *,
                 context_length: int | None = None, name: str = ""):  # fmt: skip
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.context_length = context_length  # the model's window, when known
        self.name = name

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_llm(cls, llm: Any) -> TokenCounter:
        """The counter of a loaded `pellucid.LLM` (its window: the engine's largest context)."""
        return cls.from_loaded(llm.loaded, name=getattr(llm, "model_name", ""))

    @classmethod
    def from_loaded(cls, lm: Any, name: str = "") -> TokenCounter:
        """The counter of a `LoadedModel`."""
        return cls(lm.tokenizer, lm.chat_template, context_length=model_window(lm.config, lm.model),
                   name=name or str(lm.path))  # fmt: skip

    @classmethod
    def for_model(cls, name_or_path: str | os.PathLike) -> TokenCounter:
        """Tokenizer and chat template of a registry name or model file, without weights.

        A GGUF file is read for its metadata only; other formats load the model.
        """
        from pellucid.weights.gguf import GGUFFile  # the header reader: numpy, no torch

        path = registry.resolve(str(name_or_path))
        if path.is_dir():
            from pellucid.loading import (
                load_model,  # (torch: an HF folder's tokenizer comes with its model)
            )

            return cls.from_loaded(load_model(path, dtype="float32"), name=str(name_or_path))
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key not in _GGUF_TEXT:
            f = GGUFFile(path)
            tok, template = gguf_text(f.metadata)  # the loader's own choice of template
            n_ctx = gguf_context_length(f.metadata)
            if n_ctx is None:  # the architecture's default (loading it imports torch)
                from pellucid.loading import gguf_architecture

                n_ctx = gguf_architecture(f)[1].context_length
            _GGUF_TEXT.clear()  # one model's tokenizer at a time
            _GGUF_TEXT[key] = (tok, template, n_ctx)
        tok, template, n_ctx = _GGUF_TEXT[key]
        return cls(tok, template, context_length=n_ctx, name=str(name_or_path))

    # -- counting -----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt text, exactly as the engine encodes a prompt."""
        return self.tokenizer.encode(text)

    def count_text(self, text: str) -> int:
        """Tokens of `text` as a raw completion prompt (a model's BOS included if it adds one)."""
        return len(self.encode(text))

    def count_file(self, path: str | os.PathLike) -> int:
        """count_text of a UTF-8 file's contents."""
        return self.count_text(read_text(path))

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The conversation as the model receives it (system text folded in when the
        template has no system role)."""
        return self.chat_template.render(
            list(messages), add_generation_prompt=add_generation_prompt
        )

    def count_messages(self, messages: Sequence[Message]) -> int:
        """Tokens the engine feeds the model for a chat request with these messages."""
        return len(self.encode(self.render(messages)))

    def count_conversation(self, messages: Sequence[Message]) -> ConversationCount:
        """count_messages with a per-message breakdown.

        Row i costs count(messages[:i+1]) - count(messages[:i]), both rendered without the
        generation prompt, so the template markup around a message is charged to it; a
        template that cannot render some prefix (one that insists on alternating roles, say)
        gets no rows, only the total.
        """
        msgs = validate_messages(list(messages))
        prompt = self.render(msgs)
        total = len(self.encode(prompt))
        rows: list[MessageCount] = []
        before = 0
        try:
            for i, m in enumerate(msgs):
                n = len(self.encode(self.render(msgs[: i + 1], add_generation_prompt=False)))
                rows.append(
                    MessageCount(i, m["role"], self.count_content(m["content"]), n - before)
                )
                before = n
        except PellucidError:
            rows, before = [], 0
        return ConversationCount(rows, total - before if rows else 0, total, prompt)

    def count_content(self, text: str) -> int:
        """Tokens of a message's text on its own (no BOS, no template)."""
        return len(self.tokenizer.encode(text, add_bos=False)) if text else 0

    # -- cutting ------------------------------------------------------------------------

    def truncate(self, text: str, n_tokens: int) -> str:
        """The longest prefix of `text` that ends on a token boundary of its own encoding,
        is whole UTF-8 characters, and re-encodes to at most `n_tokens` tokens."""
        if n_tokens <= 0:
            return ""
        ids = self.tokenizer.encode(text, add_bos=False)
        if len(ids) <= n_tokens:
            return text
        raw = text.encode("utf-8")
        if b"".join(self.tokenizer.token_bytes(i) for i in ids) != raw:
            return self._truncate_chars(text, n_tokens)  # a tokenizer that normalizes text
        n = n_tokens
        while n > 0:
            head = b"".join(self.tokenizer.token_bytes(i) for i in ids[:n])
            # a token may end inside a multi-byte character: back off to a whole one
            cut = head.decode("utf-8", errors="ignore")
            if raw.startswith(cut.encode("utf-8")) and self.count_content(cut) <= n_tokens:
                return cut
            n -= 1
        return ""

    def _truncate_chars(self, text: str, n_tokens: int) -> str:
        lo, hi = 0, len(text)  # the longest character prefix within n_tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.count_content(text[:mid]) <= n_tokens:
                lo = mid
            else:
                hi = mid - 1
        return text[:lo]

    # -- budgets ------------------------------------------------------------------------

    def budget(self, window: int | None = None, reserve: int = 0, **kw: Any):
        """A ContextBudget counting with this model (window: the model's, by default)."""
        if window is None:
            if self.context_length is None:
                raise PellucidError(
                    "the model's context length is unknown: give a window", param="window"
                )
            window = self.context_length
        kw.setdefault("truncate", self.truncate)
        return ContextBudget(window, self.count_messages, reserve=reserve, **kw)


def model_window(config: Any, model: Any = None) -> int:
    """The model's context window: its config's context length, capped by what the loaded
    model can address (its rotary table)."""
    n = int(config.context_length)
    cap = getattr(model, "max_len", None)
    return min(n, int(cap)) if cap else n


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents, with an error that names the file."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PellucidError(f"file {str(path)!r} does not exist", param="file") from None
    except UnicodeDecodeError as e:
        raise PellucidError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", param="file"
        ) from None
    except OSError as e:
        raise PellucidError(f"cannot read {path}: {e.strerror}", param="file") from None
