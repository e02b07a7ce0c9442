"""Weight-only int8, one scale per output channel (row).

w[n, k] ~= q[n, k] * scale[n], q in [-127, 127]. Activations stay in floating point.
Kernel: `aten._weight_int8pack_mm` (bfloat16 activations: torch's CPU kernel is 16-30x
slower with float32 ones), the layer for devices where pellucid's own kernels
(pellucid.kernels, quantization/blocks.py) do not run. Bytes per parameter: 1 + 2 / in_features.
"""

from __future__ import annotations

import torch
from torch import nn

from pellucid.quantization.kernels import check_linear_shapes, has_kernel

KERNEL = "aten._weight_int8pack_mm"


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q (N, K) int8, scales (N,) in `scale_dtype` (rounded before q is chosen)."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int8, device=w.device)
    scales = torch.empty(N, dtype=scale_dtype, device=w.device)
    for r in range(0, N, 4096):  # a block of rows at a time: bounds the float temporaries
        wr = w[r : r + 4096].float()
        s = (wr.abs().amax(dim=1) / 127.0).clamp_(min=1e-10).to(scale_dtype)  # (n,)
        scales[r : r + 4096] = s
        q[r : r + 4096] = (wr / s.float()[:, None]).round_().clamp_(-127, 127)  # not in place: wr may be w
    return q, scales


class Int8Linear(nn.Module):
    """A drop-in for nn.Linear holding int8 weights and per-row scales."""

    bits = 8

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None):  # fmt: skip
        super().__init__()
        check_linear_shapes("int8", in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        self.register_buffer("weight_q", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.use_kernel = True

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        N, K = w.shape
        m = cls(K, N, bias=bias is not None, dtype=dtype, device=w.device)
        m.weight_q, m.scales = quantize_int8(w, dtype)
        if bias is not None:
            m.bias = bias.detach().to(dtype)
        m.use_kernel = has_kernel("int8", w.device)
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (N, K) weight these bytes stand for."""
        dtype = dtype or self.compute_dtype
        return (self.weight_q.float() * self.scales.float()[:, None]).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)  # (M, K)
        if self.use_kernel:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_q, self.scales)  # (M, N)
        else:  # a device without the kernel: correct, not fast
            y = x2 @ self.dequantize().t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"
