"""Which weight-only kernels exist on a device, and the shapes they accept.

The aten kernels check little on their own (a mis-shaped int4 call has produced NaNs
in some builds), so every quantized layer is checked here when it is built.
"""

from __future__ import annotations

import functools

import torch

from pellucid.errors import PellucidError

INT4_GROUP_SIZES = (32, 64, 128, 256)


def check_linear_shapes(fmt: str, in_features: int, out_features: int, group_size: int | None = None,
                        name: str = "") -> None:  # fmt: skip
    """Raise PellucidError when a (out_features, in_features) weight cannot use `fmt`'s kernel."""
    where = f" ({name})" if name else ""
    if in_features < 1 or out_features < 1:
        raise PellucidError(f"{fmt}: weight{where} has shape ({out_features}, {in_features}); both sizes must be >= 1", param="quant")
    if fmt == "int8":
        return
    if fmt != "int4":
        raise PellucidError(f"unknown weight format {fmt!r}: use int8 or int4", param="quant")
    if group_size not in INT4_GROUP_SIZES:
        raise PellucidError(f"int4 group size {group_size} is not one of {INT4_GROUP_SIZES}", param="group_size")
    if in_features % group_size:
        raise PellucidError(
            f"int4: weight{where} has {in_features} input features, not a multiple of the group size {group_size}",
            param="group_size",
        )  # fmt: skip
    if out_features % 16:
        raise PellucidError(f"int4: weight{where} has {out_features} output features, not a multiple of 16", param="quant")


@functools.cache
def has_kernel(fmt: str, device: str | torch.device) -> bool:
    """True if the weight-only `fmt` kernel runs on `device` (probed once on a tiny input)."""
    dev = torch.device(device)
    try:
        x = torch.randn(2, 64, dtype=torch.bfloat16, device=dev)
        if fmt == "int8":
            w = torch.randint(-127, 128, (16, 64), dtype=torch.int8, device=dev)
            y = torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(16, dtype=torch.bfloat16, device=dev))
        elif fmt == "int4":
            if dev.type != "cpu":  # the CUDA kernel has another packing (tinygemm); not wired here
                return False
            q = torch.randint(0, 16, (16, 64), dtype=torch.int32, device=dev)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            sz = torch.ones(2, 16, 2, dtype=torch.bfloat16, device=dev)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        else:
            return False
        return bool(torch.isfinite(y).all())
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


def kernel_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """The input type the weight-only kernels run on: bfloat16 (they are 16-30x slower in
    float32), or float16 when the model computes in float16."""
    return torch.float16 if activation_dtype == torch.float16 else torch.bfloat16
