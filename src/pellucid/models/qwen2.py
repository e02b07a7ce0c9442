"""Qwen2 / Qwen2.5: Llama with biases on the query, key and value projections."""

from __future__ import annotations

from pellucid.errors import PellucidError
from pellucid.models import llama
from pellucid.models.llama import LlamaConfig, config_from_gguf  # noqa: F401  (same GGUF keys)


class Qwen2(llama.Llama):
    attn_bias = True


_BIASES = ("q_proj", "k_proj", "v_proj")
GGUF_NAMES = {
    **llama.GGUF_NAMES,
    **{f"blocks.{{L}}.attn.{p}.bias": f"blk.{{L}}.attn_{p[0]}.bias" for p in _BIASES},
}
HF_NAMES = {
    **llama.HF_NAMES,
    **{f"blocks.{{L}}.attn.{p}.bias": f"model.layers.{{L}}.self_attn.{p}.bias" for p in _BIASES},
}


def from_gguf_tensor(name, w, cfg):
    """llama.cpp stores Qwen2's Q and K in the rotate-half layout already: nothing to undo."""
    return w


def config_from_hf(c: dict) -> LlamaConfig:
    if c.get("use_sliding_window"):
        raise PellucidError("config.json sets use_sliding_window for Qwen2 (per-layer windows); pellucid does not support it yet")
    cfg = llama.config_from_hf(c)
    cfg.sliding_window = None
    return cfg


MODEL = Qwen2
CONFIG = LlamaConfig
