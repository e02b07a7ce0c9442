"""GPT-2: learned absolute positions, LayerNorm with bias, GELU MLP, biases everywhere.

Checkpoints fuse Q, K and V into one projection (`c_attn`, `attn_qkv`); it is split at
load into q_proj, k_proj, v_proj so that attention and its hooks are the shared ones.
Hugging Face stores GPT-2's projections as Conv1D, (in, out): transposed at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pellucid.errors import PellucidError
from pellucid.models.decoder import Block, Decoder
from pellucid.models.hooks import HookPoint
from pellucid.models.layers import Attention, ForwardContext, ModelConfig, gguf_getter


@dataclass
class GPT2Config(ModelConfig):
    act: str = "gelu_tanh"  # HF "gelu_new"; "gelu" is the exact erf form
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32, like RMSNorm, whatever the model dtype.
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, act: str):
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff)
        self.down_proj = nn.Linear(d_ff, d_model)
        self.approximate = "tanh" if act == "gelu_tanh" else "none"
        self.hook_post = HookPoint()  # (B, T, F) activations before down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hook_post(F.gelu(self.up_proj(x), approximate=self.approximate)))


class GPT2(Decoder):
    def block(self, cfg: GPT2Config, i: int) -> Block:
        E = cfg.d_model
        attn = Attention(cfg, i, bias=True, o_bias=True, scale=cfg.attn_scale)
        return Block(LayerNorm(E, cfg.norm_eps), attn, LayerNorm(E, cfg.norm_eps), MLP(E, cfg.d_ff, cfg.act), rope=None)

    def final_norm(self, cfg: GPT2Config) -> LayerNorm:
        return LayerNorm(cfg.d_model, cfg.norm_eps)

    def rotary(self) -> dict[str, tuple[float, float]]:
        return {}  # learned absolute positions instead

    def init_positions(self) -> None:
        self.pos_embed = nn.Embedding(self.cfg.context_length, self.cfg.d_model)
        self.hook_pos_embed = HookPoint()  # (B, T, E) position embeddings

    def position_limit(self) -> int:
        return self.cfg.context_length  # learned positions end where the table ends

    def embed_positions(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x + self.hook_pos_embed(self.pos_embed(ctx.input_pos))  # (B, T, E)


def _table(prefix: str, names: dict[str, str]) -> dict[str, str]:
    return {ours: prefix + theirs for ours, theirs in names.items()}


GGUF_NAMES = {
    "embed.weight": "token_embd.weight",
    "pos_embed.weight": "position_embd.weight",
    "norm.weight": "output_norm.weight",
    "norm.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
    **_table("blk.{L}.", {
        "blocks.{L}.attention_norm.weight": "attn_norm.weight",
        "blocks.{L}.attention_norm.bias": "attn_norm.bias",
        "blocks.{L}.attn.q_proj.weight": "attn_qkv.weight",
        "blocks.{L}.attn.q_proj.bias": "attn_qkv.bias",
        "blocks.{L}.attn.k_proj.weight": "attn_qkv.weight",
        "blocks.{L}.attn.k_proj.bias": "attn_qkv.bias",
        "blocks.{L}.attn.v_proj.weight": "attn_qkv.weight",
        "blocks.{L}.attn.v_proj.bias": "attn_qkv.bias",
        "blocks.{L}.attn.o_proj.weight": "attn_output.weight",
        "blocks.{L}.attn.o_proj.bias": "attn_output.bias",
        "blocks.{L}.mlp_norm.weight": "ffn_norm.weight",
        "blocks.{L}.mlp_norm.bias": "ffn_norm.bias",
        "blocks.{L}.mlp.up_proj.weight": "ffn_up.weight",
        "blocks.{L}.mlp.up_proj.bias": "ffn_up.bias",
        "blocks.{L}.mlp.down_proj.weight": "ffn_down.weight",
        "blocks.{L}.mlp.down_proj.bias": "ffn_down.bias",
    }),
}  # fmt: skip
HF_NAMES = {
    "embed.weight": "transformer.wte.weight",
    "pos_embed.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
    **_table("transformer.h.{L}.", {
        "blocks.{L}.attention_norm.weight": "ln_1.weight",
        "blocks.{L}.attention_norm.bias": "ln_1.bias",
        "blocks.{L}.attn.q_proj.weight": "attn.c_attn.weight",
        "blocks.{L}.attn.q_proj.bias": "attn.c_attn.bias",
        "blocks.{L}.attn.k_proj.weight": "attn.c_attn.weight",
        "blocks.{L}.attn.k_proj.bias": "attn.c_attn.bias",
        "blocks.{L}.attn.v_proj.weight": "attn.c_attn.weight",
        "blocks.{L}.attn.v_proj.bias": "attn.c_attn.bias",
        "blocks.{L}.attn.o_proj.weight": "attn.c_proj.weight",
        "blocks.{L}.attn.o_proj.bias": "attn.c_proj.bias",
        "blocks.{L}.mlp_norm.weight": "ln_2.weight",
        "blocks.{L}.mlp_norm.bias": "ln_2.bias",
        "blocks.{L}.mlp.up_proj.weight": "mlp.c_fc.weight",
        "blocks.{L}.mlp.up_proj.bias": "mlp.c_fc.bias",
        "blocks.{L}.mlp.down_proj.weight": "mlp.c_proj.weight",
        "blocks.{L}.mlp.down_proj.bias": "mlp.c_proj.bias",
    }),
}  # fmt: skip


def _split_qkv(name: str, w: torch.Tensor, cfg: GPT2Config) -> torch.Tensor:
    """The q, k or v third of a fused (3E, ...) projection, by which parameter asks."""
    E = cfg.n_heads * cfg.head_dim
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        if f".attn.{part}." in name:
            assert w.shape[0] == 3 * E, f"{name}: fused QKV has {w.shape[0]} rows, expected {3 * E}"
            return w[i * E : (i + 1) * E]
    return w


def from_gguf_tensor(name: str, w: torch.Tensor, cfg: GPT2Config) -> torch.Tensor:
    """llama.cpp's converter already transposed the Conv1D weights to (out, in)."""
    return _split_qkv(name, w, cfg)


def from_hf_tensor(name: str, w: torch.Tensor, cfg: GPT2Config) -> torch.Tensor:
    """Conv1D (in, out) -> (out, in), then split the fused QKV."""
    if name.startswith("blocks.") and name.endswith(".weight") and w.dim() == 2:
        w = w.t()
    return _split_qkv(name, w, cfg)


def _act(name: str) -> str:
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return "gelu_tanh"
    if name == "gelu":
        return "gelu"
    raise PellucidError(f"GPT-2 activation_function {name!r} is not supported (gelu_new, gelu_pytorch_tanh, gelu are)")


def config_from_gguf(meta: dict, arch: str = "gpt2") -> GPT2Config:
    g = gguf_getter(meta, arch)
    d_model, n_heads = int(g("embedding_length")), int(g("attention.head_count"))
    return GPT2Config(
        arch=arch,
        vocab_size=int(meta.get(f"{arch}.vocab_size", 0)) or len(meta["tokenizer.ggml.tokens"]),
        d_model=d_model,
        n_layers=int(g("block_count")),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        d_ff=int(g("feed_forward_length", 4 * d_model)),
        context_length=int(g("context_length")),
        norm_eps=float(g("attention.layer_norm_epsilon", 1e-5)),
        name=str(meta.get("general.name", "")),
        act="gelu_tanh",  # llama.cpp's GELU is the tanh form
    )


def config_from_hf(c: dict) -> GPT2Config:
    if c.get("scale_attn_by_inverse_layer_idx") or c.get("reorder_and_upcast_attn"):
        raise PellucidError("config.json sets scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn; pellucid's GPT-2 does not support them")
    d_model, n_heads = c["n_embd"], c["n_head"]
    return GPT2Config(
        arch="gpt2",
        vocab_size=c["vocab_size"],
        d_model=d_model,
        n_layers=c["n_layer"],
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        d_ff=c.get("n_inner") or 4 * d_model,
        context_length=c.get("n_positions", 1024),
        norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
        tied_embeddings=bool(c.get("tie_word_embeddings", True)),
        act=_act(c.get("activation_function", "gelu_new")),
        attn_scale=None if c.get("scale_attn_weights", True) else 1.0,
    )


MODEL = GPT2
CONFIG = GPT2Config
