"""Parameter counts from hyperparameters alone: no weights, no torch.

The breakdown follows the concept note's picture of a model: token embeddings, (learned)
position embeddings, N transformer layers of self-attention (Wq, Wk, Wv, Wo) and a
feed-forward network, then the output layer, which is often tied to the embedding.
Norm weights, biases and Gemma 3's q/k norms are counted as their own groups so the
totals match what `transformers` reports to the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pellucid.errors import PellucidError

NormKind = Literal["rms", "layer"]
AttnBias = Literal["none", "qkv", "all"]

# Bytes per parameter, as in the concept note's quantization table (plus bf16).
BYTES_PER_PARAM: dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}


@dataclass
class ParamSpec:
    """Shape of a decoder-only transformer, enough to count its parameters.

    `head_dim` 0 means d_model // n_heads; `n_kv_heads` 0 means n_heads (no GQA).
    `learned_positions` is the length of a learned position table (0: RoPE or none).
    `norm` 'layer' is LayerNorm with a bias, 'rms' is RMSNorm (weight only).
    `attn_bias` 'qkv' biases Wq/Wk/Wv (Qwen2), 'all' also Wo (GPT-2).
    `norms_per_block` is 2 for most models, 4 for Gemma 2/3 (pre/post attention and MLP).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    n_kv_heads: int = 0
    head_dim: int = 0
    gated_mlp: bool = True
    tied_embeddings: bool = False
    learned_positions: int = 0
    norm: NormKind = "rms"
    attn_bias: AttnBias = "none"
    mlp_bias: bool = False
    qk_norm: bool = False
    norms_per_block: int = 2
    final_norm: bool = True

    def __post_init__(self) -> None:
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.head_dim == 0:
            if self.n_heads <= 0 or self.d_model % self.n_heads:
                raise PellucidError(
                    f"head_dim is not given and d_model={self.d_model} is not divisible by "
                    f"n_heads={self.n_heads}; pass head_dim explicitly",
                    param="head_dim",
                )
            self.head_dim = self.d_model // self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "n_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise PellucidError(f"{name} must be a positive integer, got {value!r}", param=name)
        if self.n_heads % self.n_kv_heads:
            raise PellucidError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}",
                param="n_kv_heads",
            )
        if self.norm not in ("rms", "layer"):
            raise PellucidError(f"norm must be 'rms' or 'layer', got {self.norm!r}", param="norm")
        if self.attn_bias not in ("none", "qkv", "all"):
            raise PellucidError(
                f"attn_bias must be 'none', 'qkv' or 'all', got {self.attn_bias!r}",
                param="attn_bias",
            )
        if self.learned_positions < 0 or self.norms_per_block < 0:
            raise PellucidError(
                "learned_positions and norms_per_block must be >= 0, got "
                f"{self.learned_positions} and {self.norms_per_block}",
                param="learned_positions" if self.learned_positions < 0 else "norms_per_block",
            )


@dataclass
class ParamCount:
    """Result of `count_params`: ordered breakdown over the whole model, and per layer.

    `breakdown` sums every layer (e.g. 'attn.wq' is Wq of all layers together); 'output'
    is always present and is 0 when tied to the token embeddings.
    """

    breakdown: dict[str, int]
    per_layer: dict[str, int]
    per_layer_total: int
    n_layers: int
    tied_embeddings: bool
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = sum(self.breakdown.values())

    def coarse(self) -> dict[str, int]:
        """The concept note's four boxes: embeddings, attention, feed-forward, output (+ norms)."""
        out = {"embeddings": 0, "attention": 0, "feed_forward": 0, "norms": 0, "output": 0}
        for group, n in self.breakdown.items():
            if group.endswith("embeddings"):
                out["embeddings"] += n
            elif group == "attn.qk_norm" or group.endswith("norms") or group == "final_norm":
                out["norms"] += n
            elif group.startswith("attn."):
                out["attention"] += n
            elif group.startswith("ffn."):
                out["feed_forward"] += n
            else:
                out["output"] += n
        return out


def _norm_params(dim: int, kind: NormKind) -> int:
    return 2 * dim if kind == "layer" else dim


def count_params(spec: ParamSpec) -> ParamCount:
    """Count parameters of a decoder-only transformer from its hyperparameters."""
    d, hd = spec.d_model, spec.head_dim
    q_out, kv_out = spec.n_heads * hd, spec.n_kv_heads * hd

    layer: dict[str, int] = {
        "attn.wq": d * q_out,
        "attn.wk": d * kv_out,
        "attn.wv": d * kv_out,
        "attn.wo": q_out * d,
    }
    if spec.attn_bias != "none":
        layer["attn.bias"] = q_out + 2 * kv_out + (d if spec.attn_bias == "all" else 0)
    if spec.qk_norm:
        layer["attn.qk_norm"] = 2 * _norm_params(hd, spec.norm)
    if spec.gated_mlp:
        layer["ffn.gate"] = d * spec.d_ff
        layer["ffn.up"] = d * spec.d_ff
        layer["ffn.down"] = spec.d_ff * d
    else:
        layer["ffn.fc_in"] = d * spec.d_ff
        layer["ffn.fc_out"] = spec.d_ff * d
    if spec.mlp_bias:
        layer["ffn.bias"] = (2 if spec.gated_mlp else 1) * spec.d_ff + d
    if spec.norms_per_block:
        layer["block_norms"] = spec.norms_per_block * _norm_params(d, spec.norm)
    per_layer_total = sum(layer.values())

    breakdown: dict[str, int] = {"token_embeddings": spec.vocab_size * d}
    if spec.learned_positions:
        breakdown["position_embeddings"] = spec.learned_positions * d
    breakdown.update({k: v * spec.n_layers for k, v in layer.items()})
    if spec.final_norm:
        breakdown["final_norm"] = _norm_params(d, spec.norm)
    breakdown["output"] = 0 if spec.tied_embeddings else d * spec.vocab_size

    return ParamCount(
        breakdown=breakdown,
        per_layer=layer,
        per_layer_total=per_layer_total,
        n_layers=spec.n_layers,
        tied_embeddings=spec.tied_embeddings,
    )


def memory_bytes(total: int, precision: str) -> int:
    """Bytes to hold `total` parameters at `precision` (fp32, fp16, bf16, int8, int4).

    Weights only: no KV cache, activations, or quantization scales.
    """
    key = precision.lower()
    if key not in BYTES_PER_PARAM:
        raise PellucidError(
            f"unknown precision {precision!r}; valid: {', '.join(BYTES_PER_PARAM)}",
            param="precision",
        )
    return math.ceil(total * BYTES_PER_PARAM[key])


PRESETS: dict[str, ParamSpec] = {
    # GPT-2 XL (1.5B): Radford et al. 2019 Table 2 and HF gpt2-xl config.json
    # (n_layer 48, n_embd 1600, n_head 25, n_positions 1024, vocab 50257, n_inner 4*1600).
    "gpt2-xl": ParamSpec(
        vocab_size=50257, d_model=1600, n_layers=48, n_heads=25, d_ff=6400,
        gated_mlp=False, tied_embeddings=True, learned_positions=1024,
        norm="layer", attn_bias="all", mlp_bias=True,
    ),
    # LLaMA 1 7B: Touvron et al. 2023 Table 2 and HF huggyllama/llama-7b config.json.
    "llama-7b": ParamSpec(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
    ),
    # Llama 2 70B: Touvron et al. 2023b (GQA with 8 KV heads) and HF Llama-2-70b-hf config.json.
    "llama-70b": ParamSpec(
        vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
    ),
    # SmolLM2-135M: GGUF metadata of SmolLM2-135M-Instruct.Q4_1.gguf (llama.* keys),
    # same as HF HuggingFaceTB/SmolLM2-135M config.json.
    "smollm2-135m": ParamSpec(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
        tied_embeddings=True,
    ),
    # Gemma 3 270M: GGUF metadata of gemma-3-270m-q4_k_m.gguf (gemma3.* keys: block_count 18,
    # embedding_length 640, head_count 4/1, key_length 256, feed_forward_length 2048,
    # 262144 tokens) and its tensors (attn_q_norm/attn_k_norm, 4 norms per block, no output).
    "gemma3-270m": ParamSpec(
        vocab_size=262144, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
        d_ff=2048, tied_embeddings=True, qk_norm=True, norms_per_block=4,
    ),
}


def spec_from_model(model: Any, cfg: Any) -> ParamSpec:
    """The ParamSpec of a built pellucid model (on the meta device is enough): its
    hyperparameters from the config, its kind of norm, biases and MLP from its modules."""
    from torch import nn

    from pellucid.models.layers import GatedMLP, RMSNorm

    block = model.blocks[0]
    attn, mlp = block.attn, block.mlp
    norms = [m for k, m in block.named_children() if k.endswith("norm")]
    has = lambda m: getattr(m, "bias", None) is not None  # noqa: E731
    attn_bias = "all" if has(attn.o_proj) else ("qkv" if has(attn.q_proj) else "none")
    pos = getattr(model, "pos_embed", None)
    return ParamSpec(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
        n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, gated_mlp=isinstance(mlp, GatedMLP),
        tied_embeddings=bool(cfg.tied_embeddings), learned_positions=pos.num_embeddings if isinstance(pos, nn.Embedding) else 0,
        norm="rms" if all(isinstance(n, RMSNorm) for n in norms) else "layer", attn_bias=attn_bias,
        mlp_bias=any(has(m) for m in mlp.children() if isinstance(m, nn.Linear)),
        qk_norm="q_norm" in attn._modules, norms_per_block=len(norms),
    )  # fmt: skip


def _get(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key)
    return default if value is None else value


def spec_from_hf_config(cfg: dict[str, Any]) -> ParamSpec:
    """Map a transformers config.json dict (llama, mistral, qwen2, gemma3_text, gpt2)."""
    model_type = cfg.get("model_type")
    if model_type == "gpt2":
        d = cfg["n_embd"]
        if cfg.get("add_cross_attention"):
            raise PellucidError("gpt2 with add_cross_attention is not a decoder-only model",
                                param="add_cross_attention")
        return ParamSpec(
            vocab_size=cfg["vocab_size"], d_model=d, n_layers=cfg["n_layer"],
            n_heads=cfg["n_head"], d_ff=_get(cfg, "n_inner", 4 * d), gated_mlp=False,
            tied_embeddings=_get(cfg, "tie_word_embeddings", True),
            learned_positions=_get(cfg, "n_positions", cfg.get("max_position_embeddings")),
            norm="layer", attn_bias="all", mlp_bias=True,
        )
    if model_type not in ("llama", "mistral", "qwen2", "gemma3_text"):
        raise PellucidError(
            f"unsupported model_type {model_type!r}; valid: llama, mistral, qwen2, "
            "gemma3_text, gpt2",
            param="model_type",
        )
    n_heads = cfg["num_attention_heads"]
    common = dict(
        vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"], n_heads=n_heads, d_ff=cfg["intermediate_size"],
        n_kv_heads=_get(cfg, "num_key_value_heads", n_heads), head_dim=_get(cfg, "head_dim", 0),
    )
    if model_type == "llama":
        return ParamSpec(
            **common, tied_embeddings=_get(cfg, "tie_word_embeddings", False),
            attn_bias="all" if cfg.get("attention_bias") else "none",
            mlp_bias=bool(cfg.get("mlp_bias")),
        )
    if model_type == "mistral":
        return ParamSpec(**common, tied_embeddings=_get(cfg, "tie_word_embeddings", False))
    if model_type == "qwen2":
        return ParamSpec(
            **common, tied_embeddings=_get(cfg, "tie_word_embeddings", False), attn_bias="qkv",
        )
    # gemma3_text
    return ParamSpec(
        **{**common, "head_dim": _get(cfg, "head_dim", 256)},
        tied_embeddings=_get(cfg, "tie_word_embeddings", True),
        attn_bias="all" if cfg.get("attention_bias") else "none",
        qk_norm=True, norms_per_block=4,
    )
