"""Weight-only int4, one scale and zero per group of `group_size` inputs.

w[n, k] ~= (q[n, k] - 8) * scale[g, n] + zero[g, n] with g = k // group_size and q in
[0, 15] (min/max asymmetric rounding). Two layouts:

`aten._weight_int4pack_mm_for_cpu` (torch's packing, bfloat16 scale and zero, bfloat16
activations), 0.5 + 4 / group_size bytes per parameter: the layer for devices where
pellucid's own kernels (pellucid.kernels, quantization/blocks.py) do not run.
"""

from __future__ import annotations

import torch
from torch import nn

from pellucid.quantization.kernels import check_linear_shapes, has_kernel

KERNEL = "aten._weight_int4pack_mm_for_cpu"


ROW_CHUNK = 4096  # rows quantized at a time: bounds the float temporaries (a multiple of the kernel's 64-row blocks)


def quantize_int4(w: torch.Tensor, group_size: int = 32, scale_dtype: torch.dtype = torch.bfloat16
                  ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """w (N, K) -> q (N, K) uint8 in [0, 15], scales_and_zeros (K / group_size, N, 2).

    The scale and zero are rounded to `scale_dtype` first and q is chosen against the
    rounded values, so the stored bytes decode to the nearest representable weights.
    """
    N, K = w.shape
    G = K // group_size
    q = torch.empty(N, K, dtype=torch.uint8, device=w.device)
    sz = torch.empty(G, N, 2, dtype=scale_dtype, device=w.device)
    for r in range(0, N, ROW_CHUNK):
        wg = w[r : r + ROW_CHUNK].float().reshape(-1, G, group_size)  # (n, G, g)
        lo, hi = wg.amin(-1), wg.amax(-1)  # (n, G)
        scale = ((hi - lo) / 15.0).clamp_(min=1e-10).to(scale_dtype).float()
        zero = (lo + 8.0 * scale).to(scale_dtype).float()
        lo = zero - 8.0 * scale  # the value q = 0 decodes to
        qg = (wg - lo[..., None]).div_(scale[..., None]).round_().clamp_(0, 15)
        q[r : r + ROW_CHUNK] = qg.reshape(-1, K)
        sz[:, r : r + ROW_CHUNK, 0] = scale.t()
        sz[:, r : r + ROW_CHUNK, 1] = zero.t()
    return q, sz


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in [0, 15] -> the CPU kernel's packed (N, K / 2) uint8 layout, a block of rows at a time."""
    parts = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[r : r + ROW_CHUNK].to(torch.int32), 1)
             for r in range(0, q.shape[0], ROW_CHUNK)]  # fmt: skip
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """q (N, K) unpacked, sz (G, N, 2) -> (N, K) float32."""
    scale = sz[..., 0].float().t().repeat_interleave(group_size, dim=1)  # (N, K)
    zero = sz[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (q.float() - 8.0) * scale + zero


class Int4Linear(nn.Module):
    """A drop-in for nn.Linear holding packed int4 weights with group-wise scales and zeros."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, *, group_size: int = 32, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None, name: str = ""):  # fmt: skip
        super().__init__()
        check_linear_shapes("int4", in_features, out_features, group_size, name)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.compute_dtype = dtype
        G = in_features // group_size
        self.register_buffer("weight_packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(G, out_features, 2, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.weight_q: torch.Tensor | None = None  # unpacked (N, K) int32, kept only without the kernel

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, *, group_size: int = 32,
                   dtype: torch.dtype = torch.bfloat16, name: str = "") -> Int4Linear:  # fmt: skip
        N, K = w.shape
        check_linear_shapes("int4", K, N, group_size, name)
        q, sz = quantize_int4(w, group_size, dtype)
        return cls.from_quantized(q, sz, bias, group_size=group_size, dtype=dtype, name=name)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None = None, *,
                       group_size: int = 32, dtype: torch.dtype = torch.bfloat16, name: str = "") -> Int4Linear:  # fmt: skip
        """q (N, K) integers in [0, 15], sz (K / group_size, N, 2) scales and zeros."""
        N, K = q.shape
        assert sz.shape == (K // group_size, N, 2), f"scales_and_zeros {tuple(sz.shape)} for q {tuple(q.shape)}"
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        check_linear_shapes("int4", K, N, group_size, name)
        m.in_features, m.out_features, m.group_size, m.compute_dtype = K, N, group_size, dtype
        m.weight_q = None
        if has_kernel("int4", q.device):
            packed = pack_int4(q)
        else:  # keep the nibbles unpacked; forward dequantizes (correct, not fast)
            packed = torch.empty(0, dtype=torch.uint8, device=q.device)
            m.weight_q = q.to(torch.uint8)
        m.register_buffer("weight_packed", packed)
        m.register_buffer("scales_and_zeros", sz.to(dtype).contiguous())
        m.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (N, K) weight these bytes stand for (through the kernel: x = identity)."""
        dtype = dtype or self.compute_dtype
        if self.weight_q is not None:
            return dequantize_int4(self.weight_q, self.scales_and_zeros, self.group_size).to(dtype)
        eye = torch.eye(self.in_features, dtype=self.compute_dtype, device=self.weight_packed.device)
        wt = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_packed, self.group_size, self.scales_and_zeros)
        return wt.t().to(dtype)  # (N, K)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)  # (M, K)
        if self.weight_q is None:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight_packed, self.group_size,
                                                           self.scales_and_zeros)  # (M, N)  # fmt: skip
        else:
            y = x2 @ self.dequantize().t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"


class Int4PairLinear(nn.Module):
    """W ~= A + B, both int4 with groups of 32: B holds what A's rounding lost.

    About 8.8 bits of precision per group (A's step / 15 on the residual) through the
    same fast int4 kernel, 1.25 bytes per parameter. Used for an output head whose
    8-bit source (a GGUF Q8_0 table) loses too much in per-channel int8 or plain int4.
    """

    bits = 8

    def __init__(self, main: Int4Linear, residual: Int4Linear):
        super().__init__()
        self.main, self.residual = main, residual
        self.in_features, self.out_features = main.in_features, main.out_features
        self.group_size, self.compute_dtype = main.group_size, main.compute_dtype

    @classmethod
    def from_float(cls, w, bias: torch.Tensor | None = None, *, group_size: int = 32,
                   dtype: torch.dtype = torch.bfloat16, name: str = "") -> Int4PairLinear:  # fmt: skip
        """w: an (N, K) tensor, or anything that hands out float rows by slice (w[a:b], w.shape)."""
        N, K = w.shape
        check_linear_shapes("int4", K, N, group_size, name)
        q1 = torch.empty(N, K, dtype=torch.uint8)
        q2 = torch.empty(N, K, dtype=torch.uint8)
        sz1 = torch.empty(K // group_size, N, 2, dtype=dtype)
        sz2 = torch.empty(K // group_size, N, 2, dtype=dtype)
        for r in range(0, N, ROW_CHUNK):
            wr = w[r : r + ROW_CHUNK].float()
            a, sa = quantize_int4(wr, group_size, dtype)
            rest = wr - dequantize_int4(a, sa, group_size)
            b, sb = quantize_int4(rest, group_size, dtype)
            q1[r : r + ROW_CHUNK], sz1[:, r : r + ROW_CHUNK] = a, sa
            q2[r : r + ROW_CHUNK], sz2[:, r : r + ROW_CHUNK] = b, sb
        main = Int4Linear.from_quantized(q1, sz1, bias, group_size=group_size, dtype=dtype, name=name)
        return cls(main, Int4Linear.from_quantized(q2, sz2, group_size=group_size, dtype=dtype, name=name))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.main.dequantize(torch.float32).add_(self.residual.dequantize(torch.float32)).to(dtype or self.compute_dtype)

    @property
    def nbytes(self) -> int:
        return self.main.nbytes + self.residual.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)  # (M, K)
        y = self.main(x2).float() + self.residual(x2).float()  # (M, N)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 + int4 residual, group {self.group_size}"
