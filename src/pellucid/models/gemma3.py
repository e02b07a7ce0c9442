"""Gemma 3 (text): Gemma 3 270M, 1B, and the text tower of the larger ones.

Differences from Llama: embeddings scaled by sqrt(d_model) (rounded to the model dtype),
RMSNorm with (1 + weight), RMSNorm on each head's queries and keys, a norm after
attention and after the MLP as well as before, GELU-tanh gated MLP, attention scale
1/sqrt(query_pre_attn_scalar), and sliding-window layers (local rotary base) interleaved
with global layers (global base, optional linear scaling): every 6th layer is global.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pellucid.errors import PellucidError
from pellucid.models.decoder import Block, Decoder
from pellucid.models.layers import Attention, GatedMLP, ModelConfig, RMSNorm, gguf_getter
from pellucid.text.gguf import ARCH_TEMPLATES


@dataclass
class Gemma3Config(ModelConfig):
    sliding_window: int = 512
    global_layers: tuple[int, ...] = field(default_factory=tuple)  # full attention; the rest slide
    rope_local_base: float = 10_000.0
    rope_scale: float = 1.0  # linear position scaling of the global layers (4B and up: 8)
    query_pre_attn_scalar: float = 256.0
    final_logit_softcap: float | None = None


def every_nth_global(n_layers: int, pattern: int = 6) -> tuple[int, ...]:
    """Gemma 3's layout: five sliding-window layers, then one global, repeated."""
    return tuple(i for i in range(n_layers) if (i + 1) % pattern == 0)


def GemmaRMSNorm(dim: int, eps: float = 1e-6) -> RMSNorm:  # noqa: N802  (reads as the class it builds)
    """x / rms(x) * (1 + weight): the weight is stored as an offset from one."""
    return RMSNorm(dim, eps, offset=1.0)


class Gemma3(Decoder):
    def block(self, cfg: Gemma3Config, i: int) -> Block:
        E, is_global = cfg.d_model, i in cfg.global_layers
        attn = Attention(cfg, i, window=None if is_global else cfg.sliding_window,
                         scale=cfg.query_pre_attn_scalar**-0.5, qk_norm=True)  # fmt: skip
        return Block(
            GemmaRMSNorm(E, cfg.norm_eps), attn, GemmaRMSNorm(E, cfg.norm_eps), GatedMLP(E, cfg.d_ff, "gelu_tanh"),
            post_attention_norm=GemmaRMSNorm(E, cfg.norm_eps), post_mlp_norm=GemmaRMSNorm(E, cfg.norm_eps),
            rope="rope" if is_global else "local",
        )  # fmt: skip

    def final_norm(self, cfg: Gemma3Config) -> RMSNorm:
        return GemmaRMSNorm(cfg.d_model, cfg.norm_eps)

    def rotary(self) -> dict[str, tuple[float, float]]:
        """Global layers: rope_base with linear scaling; sliding layers: the local base."""
        return {"rope": (self.cfg.rope_base, self.cfg.rope_scale), "local": (self.cfg.rope_local_base, 1.0)}

    def init_buffers(self) -> None:
        super().init_buffers()
        device = self.norm.weight.device
        # float32 here; rounded to the model dtype at use, as the reference does
        self.register_buffer("embed_scale", torch.tensor(self.cfg.d_model**0.5, device=None if device.type == "meta" else device),
                             persistent=False)  # fmt: skip

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # (B, T, E)
        return self.hook_embed(x * self.embed_scale.to(x.dtype))

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x).float()
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


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
    "blocks.{L}.attn.q_norm.weight": "blk.{L}.attn_q_norm.weight",
    "blocks.{L}.attn.k_norm.weight": "blk.{L}.attn_k_norm.weight",
    "blocks.{L}.post_attention_norm.weight": "blk.{L}.post_attention_norm.weight",
    "blocks.{L}.mlp_norm.weight": "blk.{L}.ffn_norm.weight",
    "blocks.{L}.mlp.gate_proj.weight": "blk.{L}.ffn_gate.weight",
    "blocks.{L}.mlp.up_proj.weight": "blk.{L}.ffn_up.weight",
    "blocks.{L}.mlp.down_proj.weight": "blk.{L}.ffn_down.weight",
    "blocks.{L}.post_mlp_norm.weight": "blk.{L}.post_ffw_norm.weight",
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
    "blocks.{L}.attn.q_norm.weight": "model.layers.{L}.self_attn.q_norm.weight",
    "blocks.{L}.attn.k_norm.weight": "model.layers.{L}.self_attn.k_norm.weight",
    "blocks.{L}.post_attention_norm.weight": "model.layers.{L}.post_attention_layernorm.weight",
    "blocks.{L}.mlp_norm.weight": "model.layers.{L}.pre_feedforward_layernorm.weight",
    "blocks.{L}.mlp.gate_proj.weight": "model.layers.{L}.mlp.gate_proj.weight",
    "blocks.{L}.mlp.up_proj.weight": "model.layers.{L}.mlp.up_proj.weight",
    "blocks.{L}.mlp.down_proj.weight": "model.layers.{L}.mlp.down_proj.weight",
    "blocks.{L}.post_mlp_norm.weight": "model.layers.{L}.post_feedforward_layernorm.weight",
}


def config_from_gguf(meta: dict, arch: str = "gemma3") -> Gemma3Config:
    g = gguf_getter(meta, arch)
    n_heads, d_model, n_layers = int(g("attention.head_count")), int(g("embedding_length")), int(g("block_count"))
    head_dim = int(g("attention.key_length", d_model // n_heads))
    vocab = int(meta.get(f"{arch}.vocab_size", 0)) or len(meta["tokenizer.ggml.tokens"])
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise PellucidError(f"{arch}.rope.scaling.type is {scaling!r}; pellucid supports none and linear for Gemma 3")
    # llama.cpp writes no query_pre_attn_scalar: it is head_dim, except Gemma 3 27B (62 layers): d_model / heads
    scalar = meta.get(f"{arch}.attention.query_pre_attn_scalar") or (d_model // n_heads if n_layers == 62 else head_dim)
    softcap = meta.get(f"{arch}.final_logit_softcapping")
    return Gemma3Config(
        arch=arch,
        vocab_size=vocab,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(g("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(g("feed_forward_length")),
        context_length=int(g("context_length", 32768)),
        rope_base=float(g("rope.freq_base", 1_000_000.0)),
        norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        tied_embeddings=True,
        name=str(meta.get("general.name", "")),
        sliding_window=int(g("attention.sliding_window", 512)),
        global_layers=every_nth_global(n_layers),
        rope_local_base=float(g("rope.freq_base_swa", 10_000.0)),
        rope_scale=float(meta.get(f"{arch}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
        query_pre_attn_scalar=float(scalar),
        final_logit_softcap=float(softcap) if softcap else None,
    )


def from_gguf_tensor(name: str, w: torch.Tensor, cfg: Gemma3Config) -> torch.Tensor:
    """llama.cpp's converter stores Gemma norms as 1 + weight; ours keep the offset."""
    return w - 1.0 if name.endswith("norm.weight") else w


def config_from_hf(c: dict) -> Gemma3Config:
    if c.get("attn_logit_softcapping"):
        raise PellucidError("config.json sets attn_logit_softcapping; Gemma 3 has none and pellucid does not implement it")
    if c.get("use_bidirectional_attention"):
        raise PellucidError("config.json sets use_bidirectional_attention (an encoder variant); pellucid runs causal models")
    n_heads, n_layers = c["num_attention_heads"], c["num_hidden_layers"]
    rp = c.get("rope_parameters") or {}
    full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    scaling = c.get("rope_scaling") or full
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise PellucidError(f"config.json: rope type {rope_type!r} is not supported for Gemma 3 (default, linear are)")
    types = c.get("layer_types")
    if types:
        global_layers = tuple(i for i, t in enumerate(types) if t == "full_attention")
    else:
        global_layers = every_nth_global(n_layers, c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6)
    return Gemma3Config(
        arch=c.get("model_type", "gemma3_text"),
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        d_ff=c["intermediate_size"],
        context_length=c.get("max_position_embeddings", 32768),
        rope_base=float(c.get("rope_theta") or full.get("rope_theta") or 1_000_000.0),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tied_embeddings=bool(c.get("tie_word_embeddings", True)),
        sliding_window=int(c.get("sliding_window") or 4096),
        global_layers=global_layers,
        rope_local_base=float(c.get("rope_local_base_freq") or local.get("rope_theta") or 10_000.0),
        rope_scale=float(scaling.get("factor", 1.0)) if rope_type == "linear" else 1.0,
        query_pre_attn_scalar=float(c.get("query_pre_attn_scalar") or 256),
        final_logit_softcap=c.get("final_logit_softcapping") or None,
    )


ROPE_TYPES = ("default", "linear")  # config.json rotary variants config_from_hf handles

CHAT_TEMPLATE = ARCH_TEMPLATES["gemma3"]  # for a folder or file that carries no template

MODEL = Gemma3
CONFIG = Gemma3Config
