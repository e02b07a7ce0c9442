"""Linear layers and embeddings on blocks of 32 (GGUF's own layouts), for pellucid's CPU kernels.

Two kinds of block cover every format the default models store:

- Q4: 4-bit q per value, a float32 scale d and offset m per block of 32: w = d * q + m.
  A GGUF Q4_0, Q4_1 or Q4_K tensor maps onto it exactly (Q4_K's 6-bit sub-block scales
  and mins multiplied out once at load; the products are exact in float32). Nibbles are
  kept in GGUF's Q4_0 order: byte j of a block holds value j (low) and j + 16 (high).
- Q8: int8 q per value, a float32 scale d per block of 32 (or 16): w = d * q. Q8_0, Q5_0
  (q - 16 fits in int8) and Q6_K (blocks of 16) map onto it exactly.

The kernels (`torch.ops.pellucid.q4_mm` / `q8_mm`) quantize the float32 activations per
block of 32 to int16 and sum exact integer dot products per block, in one fixed order
per output, so a row's result does not depend on how many rows share the call.
Without the kernels (no compiler, another device) the layers still compute, through a
dequantized matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pellucid.errors import PellucidError
from pellucid.quantization.int4 import quantize_int4

ROW_CHUNK = 4096  # rows quantized at a time: bounds the float temporaries


def _has_ops() -> bool:
    return hasattr(torch.ops.pellucid, "q4_mm")


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in 0..15 -> (N, K / 2) uint8 in GGUF's block order."""
    N, K = q.shape
    b = q.to(torch.uint8).view(N, K // 32, 32)
    return (b[..., :16] | (b[..., 16:] << 4)).reshape(N, K // 2).contiguous()


def unpack_q4(qs: torch.Tensor) -> torch.Tensor:
    N = qs.shape[0]
    p = qs.view(N, -1, 16)
    return torch.cat([p & 0x0F, p >> 4], dim=-1).reshape(N, -1)


def quantize_q8(w, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float, or a row source (w[a:b], w.shape) -> q (N, K) int8, d (N, K / block) float32:
    symmetric absmax per block, ROW_CHUNK rows at a time."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8)
    d = torch.empty(N, K // block, dtype=torch.float32)
    for r in range(0, N, ROW_CHUNK):
        wb = w[r : r + ROW_CHUNK].float().reshape(-1, K // block, block)
        s = wb.abs().amax(-1) / 127.0  # (n, G)
        d[r : r + ROW_CHUNK] = s
        q[r : r + ROW_CHUNK] = (wb / s.clamp(min=1e-30)[..., None]).round_().clamp_(-127, 127).reshape(-1, K)
    return q, d


def _check(name: str, N: int, K: int) -> None:
    if K % 32:
        raise PellucidError(f"{name or 'a linear layer'} has {K} input features, not a multiple of 32 (a block)", param="quant")


class _BlockLinear(nn.Module):
    """Shared parts: bias, shape, bytes, row concatenation."""

    kind = ""
    fields: tuple[str, ...] = ()

    def _finish(self, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = self.qs.shape[0], self.qs.shape[1] * (2 if self.kind == "q4" else 1)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _out(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @classmethod
    def concat_rows(cls, parts: list[_BlockLinear]) -> _BlockLinear:
        """One layer with `parts`' output rows in order; each part's buffers become views of its own."""
        if len({p.d.shape[1] for p in parts}) != 1:
            raise TypeError("cannot fuse layers with different block sizes")
        has_bias = [p.bias is not None for p in parts]
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for f in cls.fields:
            fused.register_buffer(f, torch.cat([getattr(p, f) for p in parts]).contiguous())
        bias = None
        if any(has_bias):
            bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features) for p in parts])
        fused._finish(bias)
        a = 0
        for p in parts:
            n = p.out_features
            for f in cls.fields:
                setattr(p, f, getattr(fused, f)[a : a + n])
            if p.bias is not None:
                p.bias = fused.bias[a : a + n]
            a += n
        return fused

    def extra_repr(self) -> str:
        bs = self.in_features // self.d.shape[1]
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind} blocks of {bs}"


class Q4Linear(_BlockLinear):
    """w = d * q + m, 4-bit q, per block of 32. 0.5 + 8 / 32 bytes per parameter."""

    bits, kind, fields = 4, "q4", ("qs", "d", "m")

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("qs", qs.contiguous())
        self.register_buffer("d", d.float().contiguous())
        self.register_buffer("m", m.float().contiguous())
        self._finish(bias)

    @classmethod
    def from_blocks(cls, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None = None,
                    name: str = "") -> Q4Linear:  # fmt: skip
        """q (N, K) in 0..15 (unpacked), d and m (N, K / 32)."""
        _check(name, *q.shape)
        return cls(pack_q4(q), d, m, bias)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, *, group_size: int = 32,
                   name: str = "") -> Q4Linear:  # fmt: skip
        """Min/max asymmetric 4-bit per group (a multiple of 32), stored per block of 32."""
        N, K = w.shape
        _check(name, N, K)
        if group_size % 32 or K % group_size:
            raise PellucidError(f"int4 group size {group_size}: must be a multiple of 32 that divides {K} ({name})", param="group_size")
        q, sz = quantize_int4(w, group_size, torch.float32)  # sz (G, N, 2): scale, zero; w = (q - 8) * scale + zero
        rep = group_size // 32
        d = sz[..., 0].t().repeat_interleave(rep, dim=1)
        m = (sz[..., 1] - 8.0 * sz[..., 0]).t().repeat_interleave(rep, dim=1)
        return cls.from_blocks(q, d, m, bias, name)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K = self.out_features, self.in_features
        q = unpack_q4(self.qs).float().view(N, K // 32, 32)
        return (q * self.d[..., None] + self.m[..., None]).reshape(N, K).to(dtype)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) float32 on CPU -> (M, N) float32: the kernel and the bias, nothing else (the fused path)."""
        y = torch.ops.pellucid.q4_mm(x, self.qs, self.d, self.m)
        return y if self.bias is None else y.add_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if _has_ops() and x.device.type == "cpu":
            y = torch.ops.pellucid.q4_mm(x2, self.qs, self.d, self.m)  # (M, N) float32
        else:
            y = x2 @ self.dequantize().t()
        return self._out(y, x)


class Q8Linear(_BlockLinear):
    """w = d * q, int8 q, per block of 32 (16 for Q6_K). 1 + 4 / 32 bytes per parameter."""

    bits, kind, fields = 8, "q8", ("qs", "d")

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("qs", qs.to(torch.int8).contiguous())
        self.register_buffer("d", d.float().contiguous())
        self._finish(bias)

    @classmethod
    def from_blocks(cls, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None, name: str = "") -> Q8Linear:
        _check(name, *q.shape)
        return cls(q, d, bias)

    @classmethod
    def from_float(cls, w, bias: torch.Tensor | None = None, *, name: str = "") -> Q8Linear:
        """w: an (N, K) tensor or a row source (w[a:b], w.shape)."""
        _check(name, *w.shape)
        q, d = quantize_q8(w)  # reads w a block of rows at a time
        return cls(q, d, bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        N, K = self.out_features, self.in_features
        bs = K // self.d.shape[1]
        return (self.qs.float().view(N, -1, bs) * self.d[..., None]).reshape(N, K).to(dtype)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) float32 on CPU -> (M, N) float32: the kernel and the bias, nothing else (the fused path)."""
        y = torch.ops.pellucid.q8_mm(x, self.qs, self.d)
        return y if self.bias is None else y.add_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if _has_ops() and x.device.type == "cpu":
            y = torch.ops.pellucid.q8_mm(x2, self.qs, self.d)  # (M, N) float32
        else:
            y = x2 @ self.dequantize().t()
        return self._out(y, x)


class Q8Embedding(nn.Module):
    """Token rows stored as Q8 blocks of 32 (a tied head's own buffers when it is Q8), dequantized per lookup."""

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, out_dtype: torch.dtype = torch.float32):
        super().__init__()
        if qs.shape[1] != d.shape[1] * 32:
            raise PellucidError(f"a Q8 embedding needs blocks of 32; got {qs.shape[1]} values and {d.shape[1]} scales per row")
        self.register_buffer("qs", qs)
        self.register_buffer("d", d)
        self.num_embeddings, self.embedding_dim = qs.shape
        self.out_dtype = out_dtype

    @property
    def nbytes(self) -> int:
        return self.qs.numel() + self.d.numel() * 4

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if _has_ops() and tokens.device.type == "cpu":
            return torch.ops.pellucid.embedding_q8(tokens, self.qs, self.d).to(self.out_dtype)
        rows = F.embedding(tokens, self.qs).float()  # (..., E)
        d = F.embedding(tokens, self.d).repeat_interleave(32, dim=-1)
        return (rows * d).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, q8 blocks of 32, out {self.out_dtype}"
