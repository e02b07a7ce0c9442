"""Linear layers and embeddings whose weights are rows of GGUF blocks, for pellucid's CPU kernels.

A GGUF file's quantized tensors are used where they lie: `BlockLinear.data` is a uint8
view of the memory-mapped file, (rows, bytes per row), read by `pellucid::block_mm`
(Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K). Nothing is converted at load and no second copy
is made; a tied output head and the token embedding share the same bytes. Float weights
(a Hugging Face folder, a float tensor of a GGUF file) are quantized into the same block
formats once, by `quantize_blocks` (Q4_1 for 4 bits, Q8_0 for 8).

Rows that an architecture reorders (Llama's Q and K, stored in llama.cpp's interleaved
rotary order) stay where they are: the kernel writes row n's output to column
`out_index[n]`, so the layer's outputs come in our order at no cost.

Without the kernels (no compiler, another device) the layers still compute, through a
dequantized matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pellucid import kernels
from pellucid.errors import PellucidError

ROW_CHUNK = 4096  # rows quantized or dequantized at a time: bounds the float temporaries


def _has_ops() -> bool:
    return hasattr(torch.ops.pellucid, "block_mm")


def dequantize_rows(data: torch.Tensor, qtype: int, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a block matrix as float32 (the kernel's lookup, or gguf's numpy reference without it)."""
    if _has_ops():
        return kernels.dequantize(data, qtype, k, rows)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    sel = data if rows is None else data[rows]
    return torch.from_numpy(dequantize(sel.numpy(), GGMLQuantizationType(qtype))).reshape(-1, k)


def quantize_blocks(w, qtype: int, group_size: int = 32) -> torch.Tensor:
    """w (N, K) float, or a row source (w[a:b], w.shape) -> (N, row bytes) uint8 of Q8_0 or Q4_1 blocks.

    Q8_0: d = max |w| / 127 per block of 32 (stored as float16), q = round(w / d).
    Q4_1: per group of `group_size` (a multiple of 32), m = min, d = (max - min) / 15 (both
    float16), q = round((w - m) / d) in 0..15; q is chosen against the rounded d and m.
    """
    N, K = w.shape
    if K % 32:
        raise PellucidError(f"a block layer needs input features in blocks of 32; got {K}", param="quant")
    if qtype == kernels.Q4_1 and (group_size % 32 or K % group_size):
        raise PellucidError(f"int4 group size {group_size}: must be a multiple of 32 that divides {K}", param="group_size")
    block, size = kernels.BLOCK_SIZES[qtype]
    out = torch.empty(N, K // 32, size, dtype=torch.uint8)
    for r in range(0, N, ROW_CHUNK):
        wb = w[r : r + ROW_CHUNK].float().reshape(-1, K // 32, 32)  # (n, B, 32)
        o = out[r : r + ROW_CHUNK]
        if qtype == kernels.Q8_0:
            d = (wb.abs().amax(-1) / 127.0).half()  # (n, B)
            df = d.float()
            q = torch.where(df[..., None] > 0, wb / df.clamp(min=1e-30)[..., None], 0).round_().clamp_(-127, 127)
            o[..., 0:2] = d.view(torch.uint8).view(*d.shape, 2)
            o[..., 2:] = q.to(torch.int8).view(torch.uint8)
        elif qtype == kernels.Q4_1:
            g = wb.reshape(wb.shape[0], K // group_size, group_size)
            lo, hi = g.amin(-1), g.amax(-1)  # (n, G)
            rep = group_size // 32
            d = ((hi - lo) / 15.0).half().repeat_interleave(rep, dim=1)  # (n, B)
            m = lo.half().repeat_interleave(rep, dim=1)
            df = d.float()
            q = torch.where(df[..., None] > 0, (wb - m.float()[..., None]) / df.clamp(min=1e-30)[..., None], 0)
            q = q.round_().clamp_(0, 15).to(torch.uint8)  # (n, B, 32)
            o[..., 0:2] = d.view(torch.uint8).view(*d.shape, 2)
            o[..., 2:4] = m.view(torch.uint8).view(*m.shape, 2)
            o[..., 4:] = q[..., :16] | (q[..., 16:] << 4)
        else:
            raise PellucidError(f"pellucid quantizes float weights to Q8_0 or Q4_1, not {kernels.ROW_TYPES.get(qtype, qtype)}")
    return out.view(N, -1)


class BlockLinear(nn.Module):
    """y = x @ W^T + b with W stored as rows of GGUF blocks (`data`, uint8 (N, row bytes)) of type `qtype`."""

    def __init__(self, data: torch.Tensor, qtype: int, in_features: int, bias: torch.Tensor | None = None,
                 out_index: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        if qtype not in kernels.BLOCK_TYPES:
            raise PellucidError(f"GGML type {qtype} is not a block format the kernels read ({', '.join(kernels.BLOCK_TYPES.values())})")
        if data.dim() != 2 or data.dtype != torch.uint8 or data.shape[1] != kernels.row_bytes(qtype, in_features):
            raise PellucidError(f"{kernels.BLOCK_TYPES[qtype]} rows of {in_features} values are "
                                f"{kernels.row_bytes(qtype, in_features)} bytes; got {tuple(data.shape)} {data.dtype}")  # fmt: skip
        self.qtype, self.in_features, self.out_features = qtype, in_features, data.shape[0]
        self.act_bits = 16  # activations quantized per block to int16 (8: int8, see set_activation_bits)
        self.mm_type = qtype  # block_mm's type: qtype, plus kernels.A8 for 8-bit activations
        self.register_buffer("data", data)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.register_buffer("out_index", out_index, persistent=False)

    @classmethod
    def from_float(cls, w, bias: torch.Tensor | None = None, *, bits: int = 4, group_size: int = 32) -> BlockLinear:
        """Quantize a float weight (N, K) (or a row source) to Q4_1 (bits=4) or Q8_0 (bits=8) blocks."""
        qtype = kernels.Q4_1 if bits == 4 else kernels.Q8_0
        return cls(quantize_blocks(w, qtype, group_size), qtype, w.shape[1], bias)

    def set_activation_bits(self, bits: int) -> None:
        """16 (the default: a per-block int16 copy of the activations, summed exactly) or 8
        (int8, as llama.cpp does: the K-quants' VNNI kernels do twice the products an
        instruction, at llama.cpp's fidelity rather than float32's)."""
        if bits not in (8, 16):
            raise PellucidError(f"activation bits {bits!r}: must be 8 or 16", param="quant")
        self.act_bits = bits
        self.mm_type = self.qtype + (kernels.A8 if bits == 8 else 0)

    @property
    def kind(self) -> str:
        return kernels.BLOCK_TYPES[self.qtype]

    @property
    def nbytes(self) -> int:
        return self.data.numel() + (0 if self.bias is None else self.bias.numel() * 4)

    def weight_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Our rows (all, or `rows`) of the weight as float32: the stored rows, in output order."""
        if self.out_index is not None:
            stored = torch.argsort(self.out_index)  # our row r is stored row stored[r]
            rows = stored if rows is None else stored[rows]
        return dequantize_rows(self.data, self.qtype, self.in_features, rows)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_rows().to(dtype)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) float32 on CPU -> (M, N) float32: the kernel with the bias, nothing else (the fused path)."""
        b = self._buffers  # plain dict reads: this runs once per layer and step
        return torch.ops.pellucid.block_mm(x, [b["data"]], [self.mm_type], b["bias"], b["out_index"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if _has_ops() and x.device.type == "cpu":
            y = self.mm(x2)  # (M, N) float32
        else:
            y = F.linear(x2, self.dequantize().to(x2.device), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @classmethod
    def concat_rows(cls, parts: list[BlockLinear]) -> FusedBlockLinear:
        return FusedBlockLinear(parts)

    def extra_repr(self) -> str:
        where = ", rows reordered" if self.out_index is not None else ""
        acts = ", int8 activations" if self.act_bits == 8 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}{where}{acts}"


class FusedBlockLinear(nn.Module):
    """Several BlockLinear layers' outputs side by side from one kernel call (q/k/v, gate/up).

    The parts keep their own bytes (views of the file, of any block types); nothing is copied.
    """

    def __init__(self, parts: list[BlockLinear]):
        super().__init__()
        ks = {p.in_features for p in parts}
        if len(ks) != 1:
            raise TypeError(f"cannot fuse layers with different input sizes: {sorted(ks)}")
        self.__dict__["parts"] = list(parts)  # not submodules: the parts stay owned where they are
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        index, bias, a = [], [], 0
        for p in parts:
            index.append(p.out_index + a if p.out_index is not None else torch.arange(a, a + p.out_features))
            bias.append(p.bias if p.bias is not None else torch.zeros(p.out_features))
            a += p.out_features
        reordered = any(p.out_index is not None for p in parts)
        self.out_index = torch.cat(index) if reordered else None
        self.bias = torch.cat(bias) if any(p.bias is not None for p in parts) else None
        self._ws, self._types = [p.data for p in parts], [p.mm_type for p in parts]

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        d = self.__dict__
        return torch.ops.pellucid.block_mm(x, d["_ws"], d["_types"], d["bias"], d["out_index"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class BlockEmbedding(nn.Module):
    """Token rows stored as GGUF blocks (a tied head's own bytes when tied), dequantized per lookup."""

    def __init__(self, data: torch.Tensor, qtype: int, embedding_dim: int, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        if qtype not in kernels.ROW_TYPES or data.dim() != 2 or data.shape[1] != kernels.row_bytes(qtype, embedding_dim):
            raise PellucidError(f"an embedding of {embedding_dim} values per row cannot be read from {tuple(data.shape)} "
                                f"bytes of GGML type {qtype}")  # fmt: skip
        self.register_buffer("data", data)
        self.qtype = qtype
        self.num_embeddings, self.embedding_dim = data.shape[0], embedding_dim
        self.out_dtype = out_dtype

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole table as `dtype` (built on each call: for inspection, not the forward pass)."""
        return dequantize_rows(self.data, self.qtype, self.embedding_dim).to(dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if _has_ops() and tokens.device.type == "cpu":
            return torch.ops.pellucid.block_rows(self.data, self.qtype, self.embedding_dim, tokens).to(self.out_dtype)
        flat = tokens.reshape(-1).cpu()
        rows = dequantize_rows(self.data, self.qtype, self.embedding_dim, flat)
        return rows.reshape(*tokens.shape, self.embedding_dim).to(device=tokens.device, dtype=self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {kernels.ROW_TYPES[self.qtype]}, out {self.out_dtype}"
