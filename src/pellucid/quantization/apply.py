"""Quantize a loaded model by swapping its nn.Linear modules (models/ never imports this).

`quantize_model(model, "int4")` replaces every linear layer, the tied output head
included, with an Int8Linear or Int4Linear built from the float weights. The token
embedding stays a floating-point table: the lookup needs rows, not a matmul.
`source(name)` may supply each weight in float32 straight from the file, so a quantized
load never holds the whole float model and Q4 blocks survive bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from pellucid import kernels
from pellucid.errors import PellucidError
from pellucid.quantization.blocks import BlockEmbedding, BlockLinear, quantize_blocks
from pellucid.quantization.embedding import RowEmbedding
from pellucid.quantization.int4 import Int4Linear, Int4PairLinear
from pellucid.quantization.int8 import Int8Linear
from pellucid.quantization.kernels import check_linear_shapes, kernel_dtype
from pellucid.runtime import FLOAT_FORMATS, FORMATS, QUANT_FORMATS  # noqa: F401  (the format names live in runtime)

log = logging.getLogger("pellucid")


A8_SUFFIX = "-a8"  # int4-a8, int8-a8, int4-g64-a8: the same weights on 8-bit activations


def parse_quant(quant: str | None) -> tuple[str | None, int]:
    """'int4' -> ('int4', 32); 'int4-g64' -> ('int4', 64); 'int8' -> ('int8', 0); None/'none' -> (None, 0);
    a trailing '-a8' (8-bit activations, see activation_bits) does not change the weights."""
    if quant is None or quant in ("", "none", "None"):
        return None, 0
    fmt, _, g = quant.removesuffix(A8_SUFFIX).partition("-g")
    if fmt not in QUANT_FORMATS or (g and (fmt != "int4" or not g.isdigit())):
        raise PellucidError(f"quant {quant!r} is not one of: none, int8, int4 (int4-g32/-g64/-g128 for a group size; "
                            f"'{A8_SUFFIX}' after any of them for 8-bit activations)", param="quant")  # fmt: skip
    return fmt, (int(g) if g else 32) if fmt == "int4" else 0


def activation_bits(quant: str | None) -> int:
    """8 for a format ending in '-a8' (block layers quantize their inputs to int8 per block, as
    llama.cpp does: faster prefill and batches, llama.cpp's fidelity), else 16 (the default:
    int16 per block, float32's fidelity)."""
    return 8 if quant and parse_quant(quant)[0] and quant.endswith(A8_SUFFIX) else 16


def quantize_model(model: nn.Module, quant: str, *, source: Callable[[str], torch.Tensor] | None = None,
                   source_blocks: Callable[[str], tuple | None] | None = None, dtype: torch.dtype | None = None,
                   head: str | None = "auto", embedding: bool = True, skip: tuple[str, ...] = ()) -> nn.Module:  # fmt: skip
    """Swap each nn.Linear of `model` for its `quant` version, in place; returns `model`.

    With pellucid's CPU kernels (x86 with AVX2, the usual case) every layer becomes a
    block layer (quantization/blocks.py): "int4" uses each tensor the file stores in
    blocks where it lies (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K: no conversion, no copy) and
    quantizes float tensors to Q4_1 (groups of `-gN`); "int8" keeps Q8_0 tensors and
    quantizes the others' values to Q8_0. The output head ("auto") is the file's blocks
    or Q8_0, and a tied embedding reads the head's own bytes.
    Without the kernels: torch's weight-only int8/int4 layers (Int8Linear, Int4Linear; an
    int4 pair for the head), with `dtype` their input type (default bfloat16).

    source: parameter name -> float32 weight (default: the module's own); it may also
    return a row source (w[a:b], w.shape) for large tables. source_blocks: parameter
    name -> (data uint8 (N, row bytes), GGML type, out_index or None) for a tensor the file
    stores, `out_index` saying where each stored row's output goes in our order; or None.
    """
    fmt, group = parse_quant(quant)
    if fmt is None:
        return model
    act = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dev.type in ("cpu", "meta") and kernels.available():
        _to_blocks(model, fmt, group, source, source_blocks, head, embedding, skip, act)
        if activation_bits(quant) == 8:
            for m in model.modules():
                if isinstance(m, BlockLinear):
                    m.set_activation_bits(8)
        return model
    if activation_bits(quant) == 8:
        log.warning("quant %r: 8-bit activations need pellucid's CPU kernels (not available here); "
                    "the weights are %s, the activations stay %s", quant, fmt, str(act).removeprefix("torch."))
    dtype = dtype or kernel_dtype(act)
    head_fmt = {"auto": "int4x2" if fmt == "int4" else "int8", "same": quant}.get(head, head)  # type: ignore[arg-type]
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}  # a tied weight keeps its first name
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]
    tied_kept = False
    for name, lin in linears:
        layer_fmt, layer_group = fmt, group
        if name.endswith("lm_head"):
            if head_fmt is None:
                tied_kept = id(lin.weight) in {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
                continue
            layer_fmt = head_fmt
            layer_group = parse_quant(head_fmt.replace("x2", ""))[1] or group or 32
        wname = names.get(id(lin.weight), f"{name}.weight")
        w = _float_weight(source, wname, lin)
        bias = None
        if lin.bias is not None:
            bias = source(f"{name}.bias") if source is not None else lin.bias.detach()
        if layer_fmt in ("int4", "int4x2") and not int4_fits(lin.in_features, lin.out_features, layer_group):
            layer_fmt = "int8"  # e.g. a vocabulary that is not a multiple of 16: per-channel int8 has no constraint
        if layer_fmt == "int8":
            new = Int8Linear.from_float(w, bias, dtype)
        elif layer_fmt == "int4x2":
            new = Int4PairLinear.from_float(w, bias, group_size=layer_group, dtype=dtype, name=name)
        else:
            new = Int4Linear.from_float(w, bias, group_size=layer_group, dtype=dtype, name=name)
        _set_module(model, name, new)
        del w
    if embedding and not tied_kept:
        for name, emb in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]:
            store = torch.bfloat16 if emb.weight.dtype == torch.float32 else emb.weight.dtype
            new = RowEmbedding(emb.num_embeddings, emb.embedding_dim, store_dtype=store, out_dtype=emb.weight.dtype,
                               device=None if emb.weight.device.type == "meta" else emb.weight.device)  # fmt: skip
            wname = names.get(id(emb.weight), f"{name}.weight")
            new.fill(source(wname) if source is not None else emb.weight.detach())
            _set_module(model, name, new)
    return model


def _float_weight(source, wname: str, lin: nn.Linear):
    w = source(wname) if source is not None else lin.weight.detach()
    if tuple(w.shape) != tuple(lin.weight.shape):
        raise PellucidError(f"weight {wname!r} has shape {tuple(w.shape)}, expected {tuple(lin.weight.shape)}")
    if isinstance(w, torch.Tensor) and lin.weight.device.type != "meta":
        w = w.to(lin.weight.device)
    return w


def _to_blocks(model: nn.Module, fmt: str, group: int, source, source_blocks, head: str | None, embedding: bool,
               skip: tuple[str, ...], act: torch.dtype) -> nn.Module:  # fmt: skip
    """quantize_model with pellucid's CPU kernels: block layers (see quantize_model)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    embeds = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]
    shared: dict[int, BlockLinear] = {}  # a tied table's id -> its head, whose bytes the embedding reads
    kept: set[int] = set()
    for name, lin in linears:
        is_head = name.endswith("lm_head")
        if is_head and head is None:
            kept.add(id(lin.weight))  # a tied table stays the float table the head reads
            continue
        wname = names.get(id(lin.weight), f"{name}.weight")
        bias = lin.bias.detach() if lin.bias is not None else None
        if bias is not None and source is not None:
            bias = source(f"{name}.bias")
        if lin.in_features % 32:
            continue  # no block layout: the layer stays as it is
        stored = source_blocks(wname) if source_blocks is not None else None
        if stored is not None and (stored[1] not in kernels.BLOCK_TYPES or (fmt == "int8" and stored[1] != kernels.Q8_0)):
            stored = None  # a float tensor, or int8 asked of a 4-bit one: quantize its values
        if stored is not None:
            data, qtype, out_index = stored
            new = BlockLinear(data, qtype, lin.in_features, bias, out_index)
        else:
            bits = 8 if fmt == "int8" or is_head else 4
            new = BlockLinear.from_float(_float_weight(source, wname, lin), bias, bits=bits, group_size=group)
        if is_head and id(lin.weight) in embeds and new.out_index is None:
            shared[id(lin.weight)] = new
        _set_module(model, name, new)
    if not embedding:
        return model
    for name, emb in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]:
        if emb.embedding_dim % 32 or id(emb.weight) in kept:
            continue
        tied_head = shared.get(id(emb.weight))
        if tied_head is not None:
            new = BlockEmbedding(tied_head.data, tied_head.qtype, emb.embedding_dim, act)
        else:
            wname = names.get(id(emb.weight), f"{name}.weight")
            stored = source_blocks(wname) if source_blocks is not None else None
            if stored is not None and stored[2] is None and stored[1] in kernels.ROW_TYPES:
                new = BlockEmbedding(stored[0], stored[1], emb.embedding_dim, act)
            else:
                w = source(wname) if source is not None else emb.weight.detach()
                new = BlockEmbedding(quantize_blocks(w, kernels.Q8_0), kernels.Q8_0, emb.embedding_dim, act)
        _set_module(model, name, new)
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
    """Name -> quantized linear layer (an int4 pair counts once, not with its two halves)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, Int8Linear | Int4Linear | Int4PairLinear | BlockLinear) and not any(n.startswith(p + ".") for p in out):
            out[n] = m
    return out


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent weights (tied tensors counted once; no rotary tables)."""
    seen, total = set(), 0
    for mod in model.modules():
        tensors = list(mod._parameters.values())
        if isinstance(mod, Int8Linear | Int4Linear | RowEmbedding | BlockLinear | BlockEmbedding):
            tensors += [b for b in mod._buffers.values()]
            if isinstance(mod, Int4Linear) and mod.weight_q is not None:
                tensors.append(mod.weight_q)
        for t in tensors:
            if t is None or t.data_ptr() in seen or t.numel() == 0:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total

