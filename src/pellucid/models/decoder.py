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
            self.register_buffer(f"{name}_cos", cos.to(device), persistent=False)  # (max_len, D/2)
            self.register_buffer(f"{name}_sin", sin.to(device), persistent=False)

    def runs_fused(self) -> bool:
        """Every block runs pellucid's fused ops (packed, and no hook attached in it)."""
        hooks = self.__dict__.get("_block_hooks")  # every block's hook lists, when all blocks are packed
        return hooks is not None and not any(hooks)

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
        stack = self.__dict__.get("_stack")
        if stack is not None and ctx.cache is not None and x.dtype == torch.float32 and self.runs_fused():
            return self._run_stack(stack, x, ctx, steer, capture)
        for i, block in enumerate(self.blocks):
            x = block(x, ropes.get(block.rope), ctx)
            if i in steer or i in capture:
                # a fused block's output is its own (no hook holds it): steer it in place
                fused = block.fusable and ctx.cache is not None and not any(block._hook_lists)
                x = _edit_stream(x, i, ctx, steer, capture, in_place=fused)
        return x

    def _run_stack(self, stack, x: torch.Tensor, ctx: ForwardContext, steer: dict, capture: dict) -> torch.Tensor:
        """run_blocks on pellucid.Stack: the blocks between two edited layers in one C++ call each."""
        x = x.contiguous()
        k, v, first = ctx.cache.k, ctx.cache.v, 0
        for i in sorted({*steer, *capture, len(self.blocks) - 1}):
            x = _edit_stream(stack.run(x, k, v, ctx.slots, ctx.input_pos, first, i + 1), i, ctx, steer, capture, in_place=True)
            first = i + 1
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


def _edit_stream(x: torch.Tensor, i: int, ctx: ForwardContext, steer: dict, capture: dict, *, in_place: bool) -> torch.Tensor:
    """After block i: add the steered rows' vectors (in place where nothing else holds x) and
    copy the captured rows into ctx.captured[i]."""
    flat = x.reshape(-1, x.shape[-1])  # (a view: x is contiguous)
    if i in steer:
        rows, vectors = steer[i]
        if in_place:
            flat.index_add_(0, rows, vectors)
        else:
            flat = flat.index_add(0, rows, vectors)
            x = flat.view(x.shape)
    if i in capture:
        ctx.captured[i] = flat.index_select(0, capture[i])
    return x


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
    if n == len(model.blocks):
        model.__dict__["_block_hooks"] = tuple(fns for b in model.blocks for fns in b._hook_lists)
        build_stack(model)
    return n


def _mm_parts(linear: nn.Module) -> tuple | None:
    """A projection as block_mm's arguments (block tensors, types, bias, out_index); None: not block kernels."""
    if "_ws" in linear.__dict__:  # FusedBlockLinear
        return linear.__dict__["_ws"], linear.__dict__["_types"], linear.bias, linear.out_index
    if "data" in getattr(linear, "_buffers", {}) and hasattr(linear, "qtype"):  # BlockLinear
        return [linear._buffers["data"]], [linear.mm_type], linear._buffers.get("bias"), linear._buffers.get("out_index")
    return None


def build_stack(model: nn.Module) -> bool:
    """Give a packed model whose projections all run pellucid's block kernels a pellucid.Stack:
    the whole block stack in one C++ call per step (Decoder.run_blocks), the same ops in the
    same order as Block.fused. Layout of its lists, per layer: ints n_qkv, n_o, n_gate_up,
    n_down, heads, kv heads, window, act, post norms, then each part's block type; tensors
    attention norm, q norm, k norm, post-attention norm, MLP norm, post-MLP norm, cos, sin,
    (bias, out index) of each projection, then each part's blocks; floats the norms' eps and
    offsets and the attention scale. An empty tensor is "none"."""
    try:
        make = torch.classes.pellucid.Stack
    except RuntimeError:  # kernels built before it existed, or not loaded
        return False
    none = torch.empty(0)
    T: list[torch.Tensor] = []
    ints: list[int] = [len(model.blocks)]
    floats: list[float] = []
    for b in model.blocks:
        attn, mlp = b.attn, b.mlp
        parts = [_mm_parts(p) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(p is None for p in parts):
            return False
        qn = attn.q_norm if "q_norm" in attn._modules else None
        pa = b.post_attention_norm if b._post_norms else None
        pm = b.post_mlp_norm if b._post_norms else None
        cos, sin = getattr(model, f"{b.rope}_cos"), getattr(model, f"{b.rope}_sin")
        ints += [len(p[0]) for p in parts] + [attn.n_heads, attn.n_kv_heads, attn.window or 0, 0 if mlp.act == "silu" else 1, int(b._post_norms)]
        ints += [int(t) for p in parts for t in p[1]]
        T += [b.attention_norm.weight, qn.weight if qn is not None else none, attn.k_norm.weight if qn is not None else none,
              pa.weight if pa is not None else none, b.mlp_norm.weight, pm.weight if pm is not None else none, cos, sin]  # fmt: skip
        T += [t if t is not None else none for p in parts for t in (p[2], p[3])]
        T += [w for p in parts for w in p[0]]
        norm = [(m.eps, m.offset) if m is not None else (0.0, 0.0) for m in (b.attention_norm, qn, pa, b.mlp_norm, pm)]
        floats += [*norm[0], attn.scale, *norm[1], *norm[2], *norm[3], *norm[4]]
    model.__dict__["_stack"] = make(T, ints, [float(f) for f in floats])
    return True
