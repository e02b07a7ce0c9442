"""load_model: a file or folder -> architecture -> config -> model -> tokenizer and template -> format.

The one place that assembles a model. The readers (weights/gguf.py, weights/safetensors.py)
know nothing about architectures; each architecture's name table says which stored tensor
fills which parameter; quantization swaps the layers as they are read; the fused CPU path
is packed last. HF folders: loading/hf.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from pellucid import kernels, registry, runtime
from pellucid.errors import PellucidError
from pellucid.loading.common import (
    DTYPES,
    LoadedModel,
    build_empty,
    build_meta,
    keep_float32_buffers,
    layer_index,
    materialize,
    no_random_init,
    parse_dtype,
    template_key,
)
from pellucid.loading.hf import load_hf_folder
from pellucid.models import architecture
from pellucid.models.decoder import pack_for_cpu_ops
from pellucid.models.layers import ModelConfig
from pellucid.progress import Progress
from pellucid.quantization.apply import parse_quant, quantize_model
from pellucid.text.gguf import gguf_text
from pellucid.weights.gguf import GGUFFile

log = logging.getLogger("pellucid")

__all__ = ["DTYPES", "LoadedModel", "build_empty", "gguf_architecture", "gguf_tensor_name", "gguf_text", "load_model",
           "no_random_init", "parse_dtype"]  # fmt: skip

def load_model(name_or_path: str | Path = registry.DEFAULT_MODEL, *, dtype: str | torch.dtype = runtime.DEFAULT_DTYPE,
               device: str = "cpu", max_len: int | None = None, quant: str | None = None,
               progress: Progress | None = None) -> LoadedModel:  # fmt: skip
    """Load a registry name, a .gguf file or an HF folder into an eval-mode model.

    quant ("int8", "int4", "int4-g64", ...) swaps the linear layers for weight-only
    quantized ones (pellucid.quantization), built from each float32 weight as it is read;
    "auto" picks the format by the model's measured quality (pellucid.runtime.resolve_quant).
    dtype "auto" is decided by pellucid.runtime for this format and device. `progress`
    (pellucid.progress.Progress) is told each phase: the tensors, the tokenizer, the kernels.
    """
    t0 = time.perf_counter()
    quant, why = runtime.resolve_quant(quant, str(name_or_path))
    if why:
        log.warning("%s", why)
    dt = parse_dtype(runtime.resolve_dtype(dtype, quant, device) if isinstance(dtype, str) else dtype, device)
    if quant is not None:
        if parse_quant(quant)[0] is None:  # "none"
            quant = None
    path = registry.resolve(name_or_path)
    if path.is_dir():
        lm = load_hf_folder(path, dt, device, max_len, progress)
        if quant:
            if progress is not None:
                progress.start(f"quantizing to {quant}")
            quantize_model(lm.model, quant)
    else:  # a single file must be GGUF; the reader checks the magic and says so otherwise
        lm = _load_gguf(path, dt, device, max_len, quant, progress)
    lm.quant = quant
    if device == "cpu":
        if progress is not None:
            progress.start("pellucid's CPU kernels")
        if kernels.available():  # builds them on a machine's first load
            pack_for_cpu_ops(lm.model)
    _trim_heap()
    lm.load_seconds = time.perf_counter() - t0
    return lm


def _load_gguf(path: Path, dt: torch.dtype, device: str, max_len: int | None, quant: str | None = None,
               progress: Progress | None = None) -> LoadedModel:  # fmt: skip
    if progress is not None:
        progress.start("reading the header")
    f = GGUFFile(path)
    mod, cfg = gguf_architecture(f)
    arch = cfg.arch
    model = build_meta(mod, cfg, max_len, dt)  # given memory after the layers are swapped (materialize)
    storage, shapes = {}, {}
    seen: set[str] = set()
    if progress is not None:
        progress.start("mapping the tensors" if quant else f"reading the tensors as {str(dt).removeprefix('torch.')}",
                       len(f.tensors))  # fmt: skip

    def tick(src: str) -> None:
        if progress is not None and src not in seen:
            seen.add(src)
            progress.advance()

    last: dict[str, torch.Tensor] = {}  # a tied head asks for the embedding just before the embedding itself

    def source(name: str) -> torch.Tensor | RowSource:  # our parameter name -> float32 tensor in our layout
        if name in last:
            return last.pop(name)
        src = gguf_tensor_name(mod, f, name)
        tick(src)
        info = f.tensors[src]
        storage[name], shapes[name] = info.qtype.name, info.shape
        if len(info.shape) == 2 and info.numel >= RowSource.MIN_NUMEL and _row_map(mod, cfg, name, info.shape[0]) is not None \
                and torch.equal(_row_map(mod, cfg, name, info.shape[0]), torch.arange(info.shape[0])):  # fmt: skip
            w = RowSource(f, src, info.shape)  # an embedding table: never whole in float32
        else:
            w = mod.from_gguf_tensor(name, f.load(src, torch.float32), cfg)
        last.clear()
        last[name] = w
        return w

    def source_blocks(name: str):  # the file's bytes for our parameter, used where they lie (see quantize_model)
        src = gguf_tensor_name(mod, f, name)
        tick(src)
        info = f.tensors[src]
        if int(info.qtype) not in kernels.ROW_TYPES or len(info.shape) != 2:
            return None
        rows = _row_map(mod, cfg, name, info.shape[0])
        if rows is None:
            return None
        storage[name], shapes[name] = info.qtype.name, info.shape
        data, n = f.view(src), rows.shape[0]
        if torch.equal(rows, torch.arange(rows[0], rows[0] + n)):  # all rows, or a contiguous part of them
            return data[int(rows[0]) : int(rows[0]) + n], int(info.qtype), None
        if n == info.shape[0] and torch.equal(torch.sort(rows).values, torch.arange(n)):
            return data, int(info.qtype), torch.argsort(rows)  # stored row s is our row out_index[s]
        return data[rows].contiguous(), int(info.qtype), None  # any other selection: those rows, copied

    with torch.no_grad():
        if quant:  # swap the linear layers before any float weight of theirs is touched
            quantize_model(model, quant, source=source, source_blocks=source_blocks)
        materialize(model, device)
        for name, p in dict(model.named_parameters()).items():  # tied weights appear once
            w = source(name)
            if tuple(w.shape) != tuple(p.shape):
                raise PellucidError(f"{path}: tensor {gguf_tensor_name(mod, f, name)!r} has shape {tuple(w.shape)}, expected {tuple(p.shape)} for {arch!r}")
            if isinstance(w, RowSource):
                for a in range(0, p.shape[0], RowSource.CHUNK):
                    p[a : a + RowSource.CHUNK].copy_(w[a : a + RowSource.CHUNK])
            else:
                p.copy_(w)
    model.eval()  # built in `dt` already (quantized layers keep their own types)
    keep_float32_buffers(model)
    if progress is not None:
        progress.start(f"the tokenizer ({len(f.get('tokenizer.ggml.tokens') or ()):,} pieces)")
    tok, chat = gguf_text(f.metadata)
    return LoadedModel(model, tok, chat, cfg, path, "gguf",
                       storage, shapes, metadata={k: v for k, v in f.metadata.items() if not k.startswith("tokenizer.ggml.")})  # fmt: skip


def _trim_heap() -> None:
    """glibc: hand the heap pages that loading's temporaries left free back to the system (~50 MiB)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RowSource:
    """A large 2-D tensor of a GGUF file that hands out float32 rows a block at a time."""

    MIN_NUMEL = 1 << 23  # 8M values (32 MiB in float32): embedding tables and output heads
    CHUNK = 4096

    def __init__(self, f, name: str, shape: tuple[int, int]):
        self.f, self.name, self.shape = f, name, tuple(shape)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def __getitem__(self, rows: slice) -> torch.Tensor:
        assert isinstance(rows, slice) and rows.step is None, rows
        return self.f.load_rows(self.name, rows.start or 0, self.shape[0] if rows.stop is None else rows.stop)


def _row_map(mod, cfg, name: str, rows: int) -> torch.Tensor | None:
    """Which stored row each of our rows is, if the architecture's GGUF transform only moves rows."""
    idx = torch.arange(rows, dtype=torch.float64)
    out = mod.from_gguf_tensor(name, torch.stack([idx, 2 * idx + 1], dim=1), cfg)
    if out.dim() != 2 or out.shape[1] != 2 or not torch.equal(out[:, 1], 2 * out[:, 0] + 1):
        return None
    if not torch.equal(out[:, 0], out[:, 0].round()) or out[:, 0].min() < 0 or out[:, 0].max() >= rows:
        return None
    return out[:, 0].long()


def gguf_architecture(f) -> tuple[object, ModelConfig]:
    """A parsed GGUFFile -> (architecture module, config); no tensors are read."""
    path, arch = f.path, f.get("general.architecture")
    if arch is None:
        raise PellucidError(f"{path}: no general.architecture in the metadata; is this a model file?")
    mod = architecture(str(arch))
    try:
        cfg = mod.config_from_gguf(f.metadata, str(arch))
    except KeyError as e:
        raise PellucidError(f"{path}: metadata key {e.args[0]!r} is missing for architecture {arch!r}") from None
    cfg.tied_embeddings = "output.weight" not in f.tensors
    return mod, cfg


def gguf_tensor_name(mod, f, name: str) -> str:
    """The GGUF tensor that fills our parameter `name` (checked to exist in file `f`)."""
    tmpl = mod.GGUF_NAMES.get(template_key(name))
    if tmpl is None:
        raise PellucidError(f"{f.path}: no GGUF name for parameter {name!r} of {f.get('general.architecture')!r}")
    layer = layer_index(name)
    src = tmpl.replace("{L}", layer) if layer is not None else tmpl
    if src not in f.tensors:
        raise PellucidError(f"{f.path}: tensor {src!r} is missing (needed for {name}).")
    return src
