"""Building blocks shared by the architectures: norms, rotary embeddings, attention, MLPs.

Shape letters used across pellucid: B batch, T query positions, L key positions,
H query heads, K key/value heads, D head dim, E d_model, F d_ff, V vocabulary, S cache slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pellucid.models.hooks import HookPoint


@dataclass
class ModelConfig:
    """Fields every architecture has; each architecture's config adds its own."""

    arch: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    context_length: int
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    tied_embeddings: bool = False
    name: str = ""

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        """KV-cache bytes per token position: 2 (K and V) x layers x K heads x D x bytes per element."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * element_bytes

    def attention_share(self) -> float:
        """Multiply-adds a token spends attending to one earlier position (scores and values, every
        layer and query head), as a fraction of those it spends in the weights (projections, MLP, head)."""
        E, H, K, D, F = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        weights = self.n_layers * (E * (H + 2 * K) * D + H * D * E + 3 * E * F) + E * self.vocab_size
        return 2 * self.n_layers * H * D / weights


def gguf_getter(meta: dict, arch: str):
    """`g(key, default)`: the GGUF metadata value `{arch}.{key}`; KeyError naming it when missing without a default."""

    def g(key: str, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise KeyError(f"{arch}.{key}")
        return v

    return g


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight). Gemma stores its weight as an offset from one (offset=1)."""

    def __init__(self, dim: int, eps: float = 1e-5, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0 else torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as the reference implementations do, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float() if self.offset == 0 else self.offset + self.weight.float()
        return (xf * w).to(x.dtype)


def rope_table(head_dim: int, max_len: int, base: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_len, D/2) for the rotate-half (NeoX / HF) layout, whose two
    halves of a head share these angles (so half the table is kept); positions divided by `scale`."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64) / scale, inv_freq)  # (T, D/2)
    return angles.cos().float(), angles.sin().float()


class Rope:
    """A rotary table (cos, sin (P, D/2)) and this forward's positions (B, T); gathered once, on first use."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor):
        self.cos, self.sin, self.pos = cos, sin, pos
        self._at: tuple[torch.Tensor, torch.Tensor] | None = None

    def at_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, T, D/2) at each token's position."""
        if self._at is None:
            self._at = (self.cos[self.pos], self.sin[self.pos])
        return self._at


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos, sin (B, T, D/2) already gathered at each token's position:
    x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), as the reference computes it."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * c + (-x2) * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


@dataclass
class ForwardContext:
    """Where this forward's tokens sit: positions, and the cache slots they write to.

    Without a cache, the tokens are the whole sequence and attention is causal over them.
    With a cache, row b writes its keys at `input_pos[b]` of slot `slots[b]` and attends to
    the first `kv_len` positions of that slot, masked to those at or before its own.
    """

    input_pos: torch.Tensor  # (B, T) int64
    cache: object | None = None  # engine.kv_cache.KVCache
    slots: torch.Tensor | None = None  # (B,) int64
    kv_len: int = 0
    # Per-row edits of the residual stream after block i (pellucid.steering): rows index the
    # flattened (B*T) tokens. steer[i] = (rows, vectors (R, E)) added there; capture[i] = rows
    # whose stream is copied into captured[i] (R, E).
    steer: dict | None = None
    capture: dict | None = None
    captured: dict = field(default_factory=dict)
    _masks: dict = field(default_factory=dict)

    @classmethod
    def full(cls, tokens: torch.Tensor) -> ForwardContext:
        B, T = tokens.shape
        return cls(input_pos=torch.arange(T, device=tokens.device).expand(B, T))

    def mask(self, window: int | None = None) -> torch.Tensor | None:
        """Boolean (B, 1, T, L) mask, True where a query may attend; None = plain causal."""
        if self.cache is None and window is None:
            return None
        if window not in self._masks:
            q = self.input_pos[:, None, :, None]  # (B, 1, T, 1)
            if self.cache is None:
                k = self.input_pos[:, None, None, :]  # (B, 1, 1, T)
            else:
                k = torch.arange(self.kv_len, device=q.device)[None, None, None, :]  # (1, 1, 1, L)
            m = k <= q
            if window is not None:
                m = m & (q - k < window)
            self._masks[window] = m
        return self._masks[window]


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, bias: bool = False, o_bias: bool = False,
                 window: int | None = None, scale: float | None = None, qk_norm: bool = False):  # fmt: skip
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = window
        self.scale = scale if scale is not None else 1.0 / math.sqrt(cfg.head_dim)
        E, H, K, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(E, H * D, bias=bias)
        self.k_proj = nn.Linear(E, K * D, bias=bias)
        self.v_proj = nn.Linear(E, K * D, bias=bias)
        self.o_proj = nn.Linear(H * D, E, bias=o_bias)
        if qk_norm:  # Gemma 3: RMSNorm over each head's queries and keys, before rotary
            self.q_norm = RMSNorm(D, cfg.norm_eps, offset=1.0)
            self.k_norm = RMSNorm(D, cfg.norm_eps, offset=1.0)
        self.hook_q = HookPoint()  # (B, T, H, D) after rotary
        self.hook_k = HookPoint()  # (B, T, K, D) after rotary
        self.hook_v = HookPoint()  # (B, T, K, D)
        self.hook_pattern = HookPoint()  # (B, H, T, L) attention probabilities
        self.hook_z = HookPoint()  # (B, T, H, D) per-head outputs before o_proj

    def forward(self, x: torch.Tensor, rope: Rope | None, ctx: ForwardContext) -> torch.Tensor:
        """x (B, T, E) -> (B, T, E). `rope`: None for learned positions (GPT-2)."""
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, K, D)
        v = self.v_proj(x).view(B, T, K, D)
        if "q_norm" in self._modules:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope.at_positions()
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = self.hook_q(q), self.hook_k(k)
        v = self.hook_v(v)
        if ctx.cache is not None:
            keys, values = ctx.cache.update(self.layer_idx, ctx.slots, ctx.input_pos, k, v, ctx.kv_len)  # (B, K, L, D)
        else:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, T, D)
        q = q.transpose(1, 2)  # (B, H, T, D)
        mask = ctx.mask(self.window)
        z = self._explicit(q, keys, values, mask) if self.hook_pattern.active else None
        if z is None:  # no pattern hook, or hooks that only read it: the fast path's exact numbers
            z = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=H != K
            )  # (B, H, T, D)
        z = self.hook_z(z.transpose(1, 2))  # (B, T, H, D)
        return self.o_proj(z.reshape(B, T, H * D))

    def _explicit(self, q, keys, values, mask) -> torch.Tensor | None:
        """Attention with the probabilities materialised, for hooks that read or edit them.

        None when the hooks left the pattern as it was, so reading it changes no output bit.
        """
        rep = self.n_heads // self.n_kv_heads
        keys = keys.repeat_interleave(rep, dim=1)  # (B, H, L, D)
        values = values.repeat_interleave(rep, dim=1)
        scores = (q.float() @ keys.float().transpose(-1, -2)) * self.scale  # (B, H, T, L)
        if mask is None:
            T, L = scores.shape[-2:]
            mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        version = probs._version
        pattern = self.hook_pattern(probs)
        if pattern is probs and probs._version == version:  # neither replaced nor edited in place
            return None
        return (pattern @ values.float()).to(q.dtype)

    def fused(self, x: torch.Tensor, rope: Rope, ctx: ForwardContext) -> torch.Tensor:
        """forward() as one projection, one fused op (norms, rotary, cache write, attention) and o_proj."""
        B, T, E = x.shape
        qn, kn = (self.q_norm.weight, self.k_norm.weight) if "q_norm" in self._modules else (None, None)
        eps, offset = (self.q_norm.eps, self.q_norm.offset) if qn is not None else (0.0, 0.0)
        qkv = matmul(self.qkv_proj, x.view(B * T, E)).view(B, T, -1)
        z = torch.ops.pellucid.attention(
            qkv, ctx.cache.k_layers[self.layer_idx], ctx.cache.v_layers[self.layer_idx], ctx.slots, ctx.input_pos,
            rope.cos, rope.sin, self.n_heads, self.n_kv_heads, self.scale, self.window or 0, qn, kn, eps, offset,
        )  # (B, T, H * D)  # fmt: skip
        return matmul(self.o_proj, z.view(B * T, -1)).view(B, T, E)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with SiLU (Llama), GeGLU with tanh-GELU (Gemma)."""

    def __init__(self, d_model: int, d_ff: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.act = act
        self.hook_post = HookPoint()  # (B, T, F) activations before down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
        return self.down_proj(self.hook_post(g * self.up_proj(x)))

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """forward() as one gate+up projection, one fused activation-and-product, and down_proj."""
        shape = x.shape
        gu = matmul(self.gate_up_proj, x.view(-1, shape[-1]))
        return matmul(self.down_proj, torch.ops.pellucid.glu(gu, 0 if self.act == "silu" else 1)).view(shape)


def matmul(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ W^T (+ bias) -> (M, N): a quantized layer's kernel itself (its `mm`), or F.linear."""
    mm = getattr(linear, "mm", None)
    return mm(x) if mm is not None else F.linear(x, linear.weight, linear.bias)


def fuse_linears(parts: list[nn.Module]) -> nn.Module:
    """One linear layer whose output rows are `parts`' rows in order; each part becomes a view of it.

    Float layers share one weight; quantized ones (duck-typed: a `concat_rows` classmethod)
    share their buffers. The fused layer is kept out of the module tree (the parts still
    own the parameters, so counts, names and state dicts do not change).
    """
    kinds = {type(p) for p in parts}
    if len(kinds) != 1:
        raise TypeError(f"cannot fuse layers of different kinds: {sorted(k.__name__ for k in kinds)}")
    kind = kinds.pop()
    if kind is nn.Linear:
        w = torch.cat([p.weight.detach() for p in parts])
        has_bias = parts[0].bias is not None
        fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta")
        fused.weight = nn.Parameter(w, requires_grad=False)
        if has_bias:
            fused.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
        a = 0
        for p in parts:
            n = p.out_features
            p.weight = nn.Parameter(fused.weight[a : a + n], requires_grad=False)
            if has_bias:
                p.bias = nn.Parameter(fused.bias[a : a + n], requires_grad=False)
            a += n
        return fused
    concat = getattr(kind, "concat_rows", None)
    if concat is None:
        raise TypeError(f"{kind.__name__} cannot be fused (no concat_rows)")
    return concat(parts)
