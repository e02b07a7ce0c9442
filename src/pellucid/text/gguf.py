"""A GGUF model's tokenizer and chat template, from the file's metadata alone.

The one place that decides a GGUF model's template: the file's own, else its
architecture's turn format (Gemma 3 270M's file carries none). load_model and the
weightless readers (pellucid.prompts.counting: count, render, budget) both use it, so
they render the same prompt; it needs no weights and no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pellucid.text.chat_template import ChatTemplate
from pellucid.text.tokenizer import Tokenizer

# Gemma's turn format, for files that carry no template. No system turn: ChatTemplate folds
# a system message into the first user turn.
GEMMA_TURNS = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('Gemma has no system turn') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + (m['content'] | trim) + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# architecture (GGUF general.architecture or config.json model_type) -> its template when the file has none
ARCH_TEMPLATES = {"gemma3": GEMMA_TURNS, "gemma3_text": GEMMA_TURNS}


def gguf_text(metadata: Mapping[str, Any]) -> tuple[Tokenizer, ChatTemplate]:
    """The tokenizer and chat template a GGUF file's metadata describes."""
    tok = Tokenizer.from_gguf(metadata)
    bos = tok.piece(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.piece(tok.eos_id) if tok.eos_id is not None else ""
    source = metadata.get("tokenizer.chat_template") or ARCH_TEMPLATES.get(str(metadata.get("general.architecture")))
    return tok, ChatTemplate(source, bos_token=bos, eos_token=eos)


def gguf_context_length(metadata: Mapping[str, Any]) -> int | None:
    """The context window the file states ({arch}.context_length), or None."""
    n = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    return int(n) if n is not None else None
