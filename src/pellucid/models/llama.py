"""Llama: SmolLM2, Llama 2/3, Mistral without a sliding window.

RMSNorm, rotary embeddings (rotate-half layout), grouped-query attention, SwiGLU MLP,
tied or separate output head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pellucid.models.decoder import Block, Decoder
from pellucid.models.layers import Attention, GatedMLP, ModelConfig, RMSNorm, gguf_getter


@dataclass
class LlamaConfig(ModelConfig):
    sliding_window: int | None = None


class Llama(Decoder):
    attn_bias = False  # Qwen2 sets True

    def block(self, cfg: LlamaConfig, i: int) -> Block:
        return Block(
            RMSNorm(cfg.d_model, cfg.norm_eps),
            Attention(cfg, i, bias=self.attn_bias, window=cfg.sliding_window),
            RMSNorm(cfg.d_model, cfg.norm_eps),
            GatedMLP(cfg.d_model, cfg.d_ff, "silu"),
        )


# Checkpoint names -> ours. {L} is the layer index.
GGUF_NAMES = {
    "embed.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "blocks.{L}.attention_norm.weight": "blk.{L}.attn_norm.weight",
    "blocks.{L}.attn.q_proj.weight": "blk.{L}.attn_q.weight",
    "blocks.{L}.attn.k_proj.weight": "blk.{L}.attn_k.weight",
    "blocks.{L}.attn.v_proj.weight": "blk.{L}.attn_v.weight",
    "blocks.{L}.attn.o_proj.weight": "blk.{L}.attn_output.weight",
    "blocks.{L}.mlp_norm.weight": "blk.{L}.ffn_norm.weight",
    "blocks.{L}.mlp.gate_proj.weight": "blk.{L}.ffn_gate.weight",
    "blocks.{L}.mlp.up_proj.weight": "blk.{L}.ffn_up.weight",
    "blocks.{L}.mlp.down_proj.weight": "blk.{L}.ffn_down.weight",
}
HF_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "blocks.{L}.attention_norm.weight": "model.layers.{L}.input_layernorm.weight",
    "blocks.{L}.attn.q_proj.weight": "model.layers.{L}.self_attn.q_proj.weight",
    "blocks.{L}.attn.k_proj.weight": "model.layers.{L}.self_attn.k_proj.weight",
    "blocks.{L}.attn.v_proj.weight": "model.layers.{L}.self_attn.v_proj.weight",
    "blocks.{L}.attn.o_proj.weight": "model.layers.{L}.self_attn.o_proj.weight",
    "blocks.{L}.mlp_norm.weight": "model.layers.{L}.post_attention_layernorm.weight",
    "blocks.{L}.mlp.gate_proj.weight": "model.layers.{L}.mlp.gate_proj.weight",
    "blocks.{L}.mlp.up_proj.weight": "model.layers.{L}.mlp.up_proj.weight",
    "blocks.{L}.mlp.down_proj.weight": "model.layers.{L}.mlp.down_proj.weight",
}


def config_from_gguf(meta: dict, arch: str = "llama") -> LlamaConfig:
    g = gguf_getter(meta, arch)
    n_heads = int(g("attention.head_count"))
    d_model = int(g("embedding_length"))
    vocab = int(meta.get(f"{arch}.vocab_size", 0)) or len(meta["tokenizer.ggml.tokens"])
    return LlamaConfig(
        arch=arch,
        vocab_size=vocab,
        d_model=d_model,
        n_layers=int(g("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", 0)) or d_model // n_heads,
        d_ff=int(g("feed_forward_length")),
        context_length=int(g("context_length", 4096)),
        rope_base=float(g("rope.freq_base", 10_000.0)),
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        name=str(meta.get("general.name", "")),
        sliding_window=None,
    )


def from_gguf_tensor(name: str, w: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """Undo llama.cpp's row permutation of Q and K (interleaved rotary pairs -> halves)."""
    if name.endswith("attn.q_proj.weight"):
        return _unpermute(w, cfg.n_heads)
    if name.endswith("attn.k_proj.weight"):
        return _unpermute(w, cfg.n_kv_heads)
    return w


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    # (heads, D/2, 2, in) -> (heads, 2, D/2, in): pair members become the two halves
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def config_from_hf(c: dict) -> LlamaConfig:
    n_heads = c["num_attention_heads"]
    return LlamaConfig(
        arch=c.get("model_type", "llama"),
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        d_ff=c["intermediate_size"],
        context_length=c.get("max_position_embeddings", 4096),
        # transformers 5 writes rope_theta inside rope_parameters; older configs at the top level
        rope_base=float(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10_000.0),
        norm_eps=float(c.get("rms_norm_eps", 1e-5)),
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        sliding_window=c.get("sliding_window") if c.get("use_sliding_window", True) else None,
    )


MODEL = Llama
CONFIG = LlamaConfig
