"""The decoder skeleton every architecture shares.

`Decoder` owns the token embedding, the blocks, the final norm, the output head, the
rotary tables and the model-level hooks; `Block` is the pre-norm residual block with its
five hook points. An architecture file says only what differs: which norm, attention and
MLP a block is made of, which rotary tables exist, how positions enter, and how the
logits leave (Gemma's soft cap).

One forward runs, with two ways through a block: the readable composition below, and,
when the model has been packed for pellucid's CPU ops (`pack_for_cpu_ops`) and no hook
inside the block is attached, the same computation as a few fused calls (`Block.fused`).
A hook anywhere in a block sends that block through the readable composition, so hooks
always see (and may edit) the tensors they name.
"""

from __future__ import annotations

import torch
from torch import nn

from pellucid.models.hooks import HookedMixin, HookPoint
from pellucid.models.layers import (
    Attention,
    ForwardContext,
    GatedMLP,
    ModelConfig,
    RMSNorm,
    Rope,
    fuse_linears,
    rope_table,
)


class Block(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)); Gemma also normalises each branch's output."""

    def __init__(self, attention_norm: nn.Module, attn: Attention, mlp_norm: nn.Module, mlp: nn.Module, *,
                 post_attention_norm: nn.Module | None = None, post_mlp_norm: nn.Module | None = None,
                 rope: str | None = "rope"):  # fmt: skip
        super().__init__()
        self.attention_norm = attention_norm
        self.attn = attn
        if post_attention_norm is not None:
            self.post_attention_norm = post_attention_norm
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        if post_mlp_norm is not None:
            self.post_mlp_norm = post_mlp_norm
        self.rope = rope  # which of the model's rotary tables this block uses (None: no rotary)
        self.hook_resid_pre = HookPoint()  # (B, T, E)
        self.hook_attn_out = HookPoint()  # (B, T, E) what attention adds (after a post-norm)
        self.hook_resid_mid = HookPoint()  # (B, T, E)
        self.hook_mlp_out = HookPoint()  # (B, T, E) what the MLP adds (after a post-norm)
        self.hook_resid_post = HookPoint()  # (B, T, E)
        self.fusable = False  # set by pack_for_cpu_ops
        self._post_norms = post_attention_norm is not None
        self._hook_lists: tuple[list, ...] = ()  # each hook point's `fns` (set by pack_for_cpu_ops)

    def forward(self, x: torch.Tensor, rope: Rope | None, ctx: ForwardContext) -> torch.Tensor:
        if self.fusable and ctx.cache is not None and not any(self._hook_lists):
            return self.fused(x, rope, ctx)
        x = self.hook_resid_pre(x)
        a = self.attn(self.attention_norm(x), rope, ctx)
        if "post_attention_norm" in self._modules:
            a = self.post_attention_norm(a)
        h = self.hook_resid_mid(x + self.hook_attn_out(a))
        m = self.mlp(self.mlp_norm(h))
        if "post_mlp_norm" in self._modules:
            m = self.post_mlp_norm(m)
        return self.hook_resid_post(h + self.hook_mlp_out(m))

    def fused(self, x: torch.Tensor, rope: Rope, ctx: ForwardContext) -> torch.Tensor:
        """The same block as pellucid's fused CPU ops: norms, attention with its cache write, gated MLP.

        x (B, T, E) float32 is updated in place (nothing else holds it when no hook is attached).
        """
        ops = torch.ops.pellucid
        n = self.attention_norm
        a = self.attn.fused(ops.rms_norm(x, n.weight, n.eps, n.offset), rope, ctx)  # (B, T, E)
        if self._post_norms:
            n = self.post_attention_norm
            a = ops.rms_norm(a, n.weight, n.eps, n.offset)
        n = self.mlp_norm
        h = ops.add_rms_norm(x, a, n.weight, n.eps, n.offset)  # x += a; h = norm(x)
        m = self.mlp.fused(h)
        if self._post_norms:
            n = self.post_mlp_norm
            m = ops.rms_norm(m, n.weight, n.eps, n.offset)
        return x.add_(m)


class Decoder(HookedMixin, nn.Module):
    """Embedding -> blocks -> final norm -> head. Subclasses define `block(cfg, i)`."""

    def __init__(self, cfg: ModelConfig, max_len: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint()  # (B, T, E) token embeddings (after any scaling)
        self.init_positions()
        self.blocks = nn.ModuleList(self.block(cfg, i) for i in range(cfg.n_layers))
        self.norm = self.final_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        limit = self.position_limit()
        self.max_len = min(max_len or cfg.context_length, limit) if limit else max_len or cfg.context_length
        self.init_buffers()

    # -- what an architecture may override ------------------------------------------------
    def block(self, cfg: ModelConfig, i: int) -> Block:
        raise NotImplementedError

    def final_norm(self, cfg: ModelConfig) -> nn.Module:
        return RMSNorm(cfg.d_model, cfg.norm_eps)

    def rotary(self) -> dict[str, tuple[float, float]]:
        """Rotary tables: name -> (base, linear position scale). Blocks pick one by name."""
        return {"rope": (self.cfg.rope_base, 1.0)}

    def init_positions(self) -> None:
        """Modules for learned positions (GPT-2); rotary models have none."""

    def position_limit(self) -> int | None:
        """The most positions the model can represent (None: rotary, no limit)."""
        return None

    def embed_positions(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hook_embed(self.embed(tokens))  # (B, T, E)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x).float()

    # -- shared ------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """A tied output head reads the embedding's own table (quantized layers share their bytes instead)."""
        if self.cfg.tied_embeddings and isinstance(self.lm_head, nn.Linear) and isinstance(self.embed, nn.Embedding):
            self.lm_head.weight = self.embed.weight

    def init_buffers(self) -> None:
        """Tie the output head and compute the rotary tables (neither is in a checkpoint)."""
        self.tie_weights()
        device = self.norm.weight.device  # (not the embedding's: a block table has no float weight)
        if device.type == "meta":
            device = None
        for name, (base, scale) in self.rotary().items():
            cos, sin = rope_table(self.cfg.head_dim, self.max_len, base, scale)
            self.register_buffer(f"{name}_cos", cos.to(device), persistent=False)  # (max_len, D)
            self.register_buffer(f"{name}_sin", sin.to(device), persistent=False)

    def runs_fused(self) -> bool:
        """Every block runs pellucid's fused ops (packed, and no hook attached in it)."""
        return all(b.fusable and not any(b._hook_lists) for b in self.blocks)

    def batch_invariant(self) -> bool:
        """A token's results do not depend on the other rows of its batch: fused blocks whose projections
        and head are all pellucid's integer kernels (torch's float matmuls block differently by batch size)."""
        if not self.runs_fused():
            return False
        parts = [m for b in self.blocks for m in (b.attn.qkv_proj, b.attn.o_proj, b.mlp.gate_up_proj, b.mlp.down_proj)]
        return all(hasattr(m, "mm") for m in [*parts, self.lm_head])

    def final_hidden(self, tokens: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        """tokens (B, T) -> the final norm's output (B, T, E) for every position: the whole
        sequence at once (no cache), what unembed turns into logits a chunk at a time."""
        ctx = ctx or ForwardContext.full(tokens)
        x = self.embed_positions(self.embed_tokens(tokens), ctx)
        ropes = {name: Rope(getattr(self, f"{name}_cos"), getattr(self, f"{name}_sin"), ctx.input_pos)
                 for name in self.rotary()}  # fmt: skip
        return self.norm(self.run_blocks(x, ropes, ctx))

    def run_blocks(self, x: torch.Tensor, ropes: dict[str, Rope], ctx: ForwardContext) -> torch.Tensor:
        """The blocks in order; after block i, the rows `ctx.steer[i]` names get their vectors added
        and the rows `ctx.capture[i]` names are copied out (no hook: the fused path stays fused)."""
        steer, capture = ctx.steer or {}, ctx.capture or {}
        for i, block in enumerate(self.blocks):
            x = block(x, ropes.get(block.rope), ctx)
            if i in steer:
                rows, vectors = steer[i]
                flat = x.reshape(-1, x.shape[-1])  # (a view: x is contiguous)
                if block.fusable and ctx.cache is not None and not any(block._hook_lists):
                    flat.index_add_(0, rows, vectors)  # the fused block's own output: nothing else holds it
                else:
                    x = flat.index_add(0, rows, vectors).view(x.shape)
            if i in capture:
                ctx.captured[i] = x.reshape(-1, x.shape[-1]).index_select(0, capture[i])
        return x

    def forward(self, tokens: torch.Tensor, ctx: ForwardContext | None = None, *, last_only: bool = False,
                rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """tokens (B, T) -> logits (B, T, V); (B, V) with `last_only`; (R, V) for `rows` of the flattened (B*T) tokens."""
        ctx = ctx or ForwardContext.full(tokens)
        x = self.embed_positions(self.embed_tokens(tokens), ctx)
        ropes = {name: Rope(getattr(self, f"{name}_cos"), getattr(self, f"{name}_sin"), ctx.input_pos)
                 for name in self.rotary()}  # fmt: skip
        x = self.run_blocks(x, ropes, ctx)
        if rows is not None:
            x = x.reshape(-1, x.shape[-1])[rows]  # (R, E)
        elif last_only:
            x = x[:, -1]
        n = self.norm
        if self.blocks[-1].fusable and ctx.cache is not None:  # the same norm as one op
            return self.unembed(torch.ops.pellucid.rms_norm(x, n.weight, n.eps, n.offset))
        return self.unembed(n(x))


def pack_for_cpu_ops(model: nn.Module) -> int:
    """Let each block whose parts the fused ops cover run through them; returns how many can.

    Fuses q/k/v and gate/up into one projection each (the separate layers become views of
    the fused one, so hooks, counts and names see no change). Needs pellucid's CPU ops
    (`torch.ops.pellucid.attention`), float32 activations, RMSNorm, rotary attention and a
    gated MLP: GPT-2, bfloat16 and float16 models keep the readable composition only.
    """
    if not hasattr(torch.ops.pellucid, "attention") or not hasattr(model, "blocks"):
        return 0
    n = 0
    for block in model.blocks:
        norms = [m for k, m in block.named_children() if k.endswith("norm")]
        attn, mlp = block.attn, block.mlp
        if block.rope is None or not isinstance(mlp, GatedMLP) or not all(isinstance(m, RMSNorm) and m.weight.dtype == torch.float32 for m in norms):
            continue
        try:
            qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        except TypeError:
            continue
        if isinstance(qkv, nn.Linear) and qkv.weight.dtype != torch.float32:
            continue
        attn.__dict__["qkv_proj"] = qkv  # outside the module tree: the parts keep owning the weights
        mlp.__dict__["gate_up_proj"] = gate_up
        block._hook_lists = tuple(m.fns for m in block.modules() if isinstance(m, HookPoint))
        block.fusable = True
        n += 1
    return n
