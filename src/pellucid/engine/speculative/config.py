"""Speculative decoding from names (LLM(speculative=...), the CLI) and the plain baseline it is measured against."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pellucid.engine.speculative.decoder import SpeculativeDecoder
from pellucid.engine.speculative.drafters import Drafter, ModelDrafter, NgramDrafter, truncated
from pellucid.errors import PellucidError

# -- construction from names ---------------------------------------------------------------


@dataclass
class SpeculativeConfig:
    """How to speculate: `draft` "ngram" (prompt lookup) or "model"."""

    draft: str = "ngram"
    num_draft: int = 4
    draft_model: str | None = None  # registry name or path; None = the target's own file
    draft_quant: str | None = None  # "int8" / "int4": load the draft model quantized
    draft_dtype: str | None = None  # None = the target's dtype
    draft_layers: int | None = None  # run only the first N blocks of the draft model
    max_ngram: int = 3
    min_ngram: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.draft not in ("ngram", "model"):
            raise PellucidError(f"draft = {self.draft!r} is not one of: ngram, model", param="draft")
        if not 1 <= self.num_draft <= 64:
            raise PellucidError(f"num_draft = {self.num_draft} is out of range; allowed: 1..64", param="num_draft")
        if self.draft_layers is not None and self.draft_layers < 1:
            raise PellucidError(f"draft_layers = {self.draft_layers} is out of range; allowed: 1..the model's layers", param="draft_layers")


def make_drafter(cfg: SpeculativeConfig, lm, *, max_len: int | None = None) -> Drafter:
    """Build the drafter a config asks for, checking that a draft model shares the tokenizer."""
    if cfg.draft == "ngram":
        return NgramDrafter(cfg.max_ngram, cfg.min_ngram)
    quant = cfg.draft_quant
    if cfg.draft_model is None and cfg.draft_dtype is None and quant is None and cfg.draft_layers is None:
        quant = "int4"  # the default draft model: an int4 copy of the target
    if cfg.draft_model is None and cfg.draft_dtype is None and quant is None:
        draft_lm = lm  # the target's own weights (with draft_layers: a truncated view of them)
    else:
        from pellucid.loading import load_model

        first = next(lm.model.parameters())
        dtype = cfg.draft_dtype or ("bfloat16" if quant else str(first.dtype).removeprefix("torch."))
        draft_lm = load_model(cfg.draft_model or lm.path, dtype=dtype, device=str(first.device), quant=quant)
        check_same_vocabulary(lm.tokenizer, draft_lm.tokenizer)
    model = draft_lm.model
    name = str(cfg.draft_model or "target") + (f" {quant}" if quant else f" {cfg.draft_dtype}" if cfg.draft_dtype else "")
    if cfg.draft_layers is not None:
        model = truncated(model, cfg.draft_layers)
        name += f"[:{cfg.draft_layers} layers]"
    return ModelDrafter(model, vocab_size=lm.config.vocab_size, max_len=max_len, name=name)


def check_same_vocabulary(a, b) -> None:
    """Two tokenizers must map ids to the same bytes for a draft model to make sense."""
    if a.vocab_size != b.vocab_size or any(a.token_bytes(i) != b.token_bytes(i) for i in range(0, a.vocab_size, 97)):
        raise PellucidError("the draft model does not share the target's tokenizer "
                            f"(vocabularies of {a.vocab_size} and {b.vocab_size} tokens)", param="draft_model")  # fmt: skip


def from_option(lm, option, *, max_len: int) -> SpeculativeDecoder:
    """LLM(speculative=...): "ngram", "model", a dict of SpeculativeConfig fields, or one."""
    if isinstance(option, str):
        cfg = SpeculativeConfig(draft=option)
    elif isinstance(option, dict):
        try:
            cfg = SpeculativeConfig(**option)
        except TypeError as e:
            raise PellucidError(f"unknown speculative option: {e}", param="speculative") from None
    elif isinstance(option, SpeculativeConfig):
        cfg = option
    else:
        raise PellucidError(f"speculative must be 'ngram', 'model', a dict or a SpeculativeConfig, not {option!r}",
                            param="speculative")  # fmt: skip
    return SpeculativeDecoder(lm, make_drafter(cfg, lm, max_len=max_len), num_draft=cfg.num_draft, max_len=max_len)


@dataclass


class PlainRun:
    """Plain decoding of one request through the engine, timed like a speculative run."""

    token_ids: list[int]
    text: str
    prefill_seconds: float  # to the first token
    decode_seconds: float  # first token to last

    @property
    def decode_tok_s(self) -> float:
        n = len(self.token_ids) - 1  # decode steps after the prefill's token
        return n / self.decode_seconds if self.decode_seconds > 0 and n > 0 else 0.0


def measure_plain(llm, prompt_ids: list[int], params) -> PlainRun:
    """Decode one request plainly with llm.engine: the baseline for a speed-up."""
    req = llm.engine.make_request(prompt_ids, params)
    t0 = time.perf_counter()
    t_first = None
    for o in llm.engine.run(req):
        if t_first is None and o.new_token_ids:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    t_first = t_first or t_end
    return PlainRun(list(req.output_ids), req.text, t_first - t0, t_end - t_first)
