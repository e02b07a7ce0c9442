"""Quantize a loaded model by swapping its nn.Linear modules (models/ never imports this).

`quantize_model(model, "int4")` replaces every linear layer, the tied output head
included, with an Int8Linear or Int4Linear built from the float weights. The token
embedding stays a floating-point table: the lookup needs rows, not a matmul.
`source(name)` may supply each weight in float32 straight from the file, so a quantized
load never holds the whole float model and Q4 blocks survive bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pellucid.errors import PellucidError
from pellucid.quantization.int4 import Int4Linear
from pellucid.quantization.int8 import Int8Linear
from pellucid.quantization.kernels import check_linear_shapes

QUANT_FORMATS = ("int8", "int4")
FLOAT_FORMATS = ("float32", "float16", "bfloat16")
FORMATS = FLOAT_FORMATS + QUANT_FORMATS


def parse_quant(quant: str | None) -> tuple[str | None, int]:
    """'int4' -> ('int4', 32); 'int4-g64' -> ('int4', 64); 'int8' -> ('int8', 0); None/'none' -> (None, 0)."""
    if quant is None or quant in ("", "none", "None"):
        return None, 0
    fmt, _, g = quant.partition("-g")
    if fmt not in QUANT_FORMATS or (g and (fmt != "int4" or not g.isdigit())):
        raise PellucidError(f"quant {quant!r} is not one of: none, int8, int4 (int4-g32/-g64/-g128 for a group size)", param="quant")
    return fmt, (int(g) if g else 32) if fmt == "int4" else 0


def quantize_model(model: nn.Module, quant: str, *, source: Callable[[str], torch.Tensor] | None = None,
                   source_q4: Callable[[str], tuple | None] | None = None, dtype: torch.dtype = torch.bfloat16,
                   head: str | None = "same", skip: tuple[str, ...] = ()) -> nn.Module:  # fmt: skip
    """Swap each nn.Linear of `model` for its `quant` version, in place; returns `model`.

    head: the output head's format ("same" as the rest, "int8", "int4", or None to keep
    it as it is). source: parameter name -> float32 weight (defaults to the module's own).
    source_q4: parameter name -> (q, d, m) 4-bit blocks of 32 as stored in a GGUF file, or
    None; int4 with groups of 32 takes those nibbles as they are (no float round trip).
    An int4 layer whose shape the kernel cannot take (a vocabulary that is not a multiple
    of 16) becomes int8.
    """
    fmt, group = parse_quant(quant)
    if fmt is None:
        return model
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}  # a tied weight keeps its first name
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]
    for name, lin in linears:
        is_head = name.endswith("lm_head")
        layer_fmt, layer_group = fmt, group
        if is_head and head != "same":
            if head is None:
                continue
            layer_fmt, layer_group = parse_quant(head)
            layer_group = layer_group or group or 32
        wname = names.get(id(lin.weight), f"{name}.weight")
        if layer_fmt == "int4" and lin.bias is None and layer_group == 32 and source_q4 is not None \
                and int4_fits(lin.in_features, lin.out_features, 32):  # fmt: skip
            blocks = source_q4(wname)
            if blocks is not None:
                _set_module(model, name, Int4Linear.from_q4_blocks(*blocks, dtype=dtype, name=name))
                continue
        w = source(wname) if source is not None else lin.weight.detach()
        if tuple(w.shape) != tuple(lin.weight.shape):
            raise PellucidError(f"weight {wname!r} has shape {tuple(w.shape)}, expected {tuple(lin.weight.shape)}")
        if isinstance(w, torch.Tensor) and lin.weight.device.type != "meta":
            w = w.to(lin.weight.device)
        bias = None
        if lin.bias is not None:
            bias = source(f"{name}.bias") if source is not None else lin.bias.detach()
        if layer_fmt == "int4" and not int4_fits(lin.in_features, lin.out_features, layer_group):
            layer_fmt = "int8"  # e.g. a vocabulary that is not a multiple of 16: per-channel int8 has no constraint
        if layer_fmt == "int8":
            new = Int8Linear.from_float(w, bias, dtype)
        else:
            new = Int4Linear.from_float(w, bias, group_size=layer_group, dtype=dtype, name=name)
        _set_module(model, name, new)
        del w
    return model


def int4_fits(in_features: int, out_features: int, group_size: int) -> bool:
    try:
        check_linear_shapes("int4", in_features, out_features, group_size)
    except PellucidError:
        return False
    return True


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear | Int4Linear)}


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent weights (tied tensors counted once; no rotary tables)."""
    seen, total = set(), 0
    for mod in model.modules():
        tensors = list(mod._parameters.values())
        if isinstance(mod, Int8Linear | Int4Linear):
            tensors += [b for b in mod._buffers.values()]
            if mod.weight_q is not None and isinstance(mod, Int4Linear):
                tensors.append(mod.weight_q)
        for t in tensors:
            if t is None or t.data_ptr() in seen or t.numel() == 0:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def format_label(dtype: str | torch.dtype, quant: str | None) -> str:
    """One name for a format: 'int4' (bf16 activations), 'bfloat16', ..."""
    if quant:
        return quant
    return str(dtype).replace("torch.", "")
