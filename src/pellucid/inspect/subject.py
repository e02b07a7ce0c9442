"""What the internals tools look at: a model with its tokenizer, from any of the API's handles.

Every function in pellucid.inspect takes a `source`: an LLM, a LoadedModel, or a registry
name / file path, loaded in the default format (the file's quantized blocks where they lie,
float32 activations: the model as `generate` and `serve` run it). Hooks send every block
through the readable composition, so every hook point sees its tensor in that format.
`load_subject(name, quant="none", dtype="float32")` gives the float32 copy instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pellucid.errors import PellucidError
from pellucid.models.hooks import ActivationCache, Names, as_batch


@dataclass
class Subject:
    model: nn.Module
    tokenizer: Any  # pellucid.text.tokenizer.Tokenizer
    chat_template: Any  # pellucid.text.chat_template.ChatTemplate
    name: str
    format: str = ""  # the weights and activations the figures come from, in words


def describe_format(lm: Any) -> str:
    """A LoadedModel's weight format and activation type, in words ("int4 (the file's blocks), float32 activations")."""
    act = next((str(p.dtype).removeprefix("torch.") for p in lm.model.parameters() if p.is_floating_point()), "float32")
    if lm.quant:
        kinds = sorted({type(m).__name__ for m in lm.model.modules() if type(m).__name__ == "BlockLinear"})
        where = " (the file's blocks)" if kinds and lm.format == "gguf" else ""
        return f"{lm.quant}{where}, {act} activations"
    return f"{act} weights and activations"


def load_subject(source: Any, dtype: str = "auto", quant: str | None = "auto", progress: Any = None) -> Subject:
    """An LLM, a LoadedModel, a Subject, or a name/path (loaded as `quant` / `dtype`, the
    defaults being the served model's format) -> Subject."""
    from pellucid.loading import LoadedModel, load_model

    if isinstance(source, Subject):
        return source
    loaded = getattr(source, "loaded", None)  # an LLM
    if isinstance(loaded, LoadedModel):
        source = loaded
    if isinstance(source, LoadedModel):
        return Subject(source.model, source.tokenizer, source.chat_template, source.path.name, describe_format(source))
    if isinstance(source, (str, Path)):
        lm = load_model(source, dtype=dtype, quant=quant, progress=progress)
        return Subject(lm.model, lm.tokenizer, lm.chat_template, str(source), describe_format(lm))
    raise PellucidError(
        f"cannot inspect a {type(source).__name__}; pass an LLM, a LoadedModel or a model name/path",
        param="model",
    )


def encode(subject: Subject, prompt: str | list[int], *, chat: bool = False) -> list[int]:
    """A raw prompt's token ids, or (chat) those of the prompt wrapped in the chat template."""
    if isinstance(prompt, list):
        subject.tokenizer.check_ids(prompt, "prompt")
        ids = list(prompt)
    else:
        if not isinstance(prompt, str) or not prompt:
            raise PellucidError(
                "prompt must be a non-empty string or a list of token ids", param="prompt"
            )
        if chat:
            prompt = subject.chat_template.render(
                [{"role": "user", "content": prompt}], add_generation_prompt=True
            )
        ids = subject.tokenizer.encode(prompt)
    if not ids:
        raise PellucidError("the prompt encodes to no tokens", param="prompt")
    limit = getattr(subject.model, "max_len", None)
    if limit is not None and len(ids) > limit:
        raise PellucidError(
            f"prompt is {len(ids)} tokens; this model takes at most {limit}", param="prompt"
        )
    return ids


def str_tokens(subject: Subject, ids: list[int]) -> list[str]:
    return [subject.tokenizer.piece(i) for i in ids]


def run_with_cache(source: Any, prompt: str | list[int], names: Names = None, *, chat: bool = False,
                   hooks=()) -> ActivationCache:  # fmt: skip
    """Tokenize `prompt` (raw, or wrapped in the chat template) and record the activations.

    `names`: hook point names, a predicate, or None for all of them (see models/hooks.py).
    """
    subject = load_subject(source)
    ids = encode(subject, prompt, chat=chat)
    cache = subject.model.run_with_cache(as_batch(ids), names, hooks=hooks)
    cache.str_tokens = str_tokens(subject, ids)
    return cache


def label_tokens(pieces: list[str]) -> list[str]:
    """Tokens made readable in tables and plots: spaces as '·', newlines as '\\n'."""
    out = []
    for p in pieces:
        p = p.replace("\n", "\\n").replace("\t", "\\t")
        out.append(p.replace(" ", "·") if p.strip() == "" or p.startswith(" ") else p)
    return out


@torch.no_grad()
def next_token_loss(model: nn.Module, tokens: torch.Tensor, hooks=()) -> float:
    """Mean cross-entropy of each next token given the ones before it (nats)."""
    with model.hooks(hooks):
        logits = model(tokens)  # (B, T, V)
    return float(
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    )
