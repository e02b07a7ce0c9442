"""load_model: a file or folder -> architecture -> config -> model with its tensors.

The readers (gguf.py, safetensors.py) know nothing about architectures; each
architecture's name table says which stored tensor fills which parameter.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pellucid import registry, runtime
from pellucid.errors import PellucidError
from pellucid.models import architecture
from pellucid.models.decoder import pack_for_cpu_ops
from pellucid.models.layers import ModelConfig
from pellucid.quantization import cpu
from pellucid.text.chat_template import ChatTemplate
from pellucid.text.tokenizer import Tokenizer

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    config: ModelConfig
    path: Path
    format: str  # "gguf" or "hf"
    storage: dict[str, str] = field(default_factory=dict)  # our parameter name -> stored type (Q4_1, F32, ...)
    stored_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    load_seconds: float = 0.0
    metadata: dict = field(default_factory=dict)
    quant: str | None = None  # weight-only format of the linear layers (None: all in `dtype`)


def parse_dtype(name: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    """A dtype name; "auto" is bfloat16 where the device computes it natively, else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return DTYPES[runtime.resolve_dtype("auto", None, device)]
    if name not in DTYPES:
        raise PellucidError(f"dtype {name!r} is not one of: auto, float32, bfloat16, float16", param="dtype")
    return DTYPES[name]


def _template_key(name: str) -> str:
    return re.sub(r"\.(\d+)\.", ".{L}.", name, count=1)


def _layer(name: str) -> str | None:
    m = re.search(r"\.(\d+)\.", name)
    return m.group(1) if m else None


def load_model(name_or_path: str | Path = registry.DEFAULT_MODEL, *, dtype: str | torch.dtype = runtime.DEFAULT_DTYPE,
               device: str = "cpu", max_len: int | None = None, quant: str | None = None) -> LoadedModel:  # fmt: skip
    """Load a registry name, a .gguf file or an HF folder into an eval-mode model.

    quant ("int8", "int4", "int4-g64", ...) swaps the linear layers for weight-only
    quantized ones (pellucid.quantization), built from each float32 weight as it is read.
    dtype "auto" is decided by pellucid.runtime for this format and device.
    """
    t0 = time.perf_counter()
    _return_big_blocks()
    dt = parse_dtype(runtime.resolve_dtype(dtype, quant, device) if isinstance(dtype, str) else dtype, device)
    if quant is not None:
        from pellucid.quantization.apply import parse_quant, quantize_model

        if parse_quant(quant)[0] is None:  # "none"
            quant = None
    path = registry.resolve(name_or_path)
    if path.is_dir():
        from pellucid.weights.hf import load_hf_folder

        lm = load_hf_folder(path, dt, device, max_len)
        if quant:
            quantize_model(lm.model, quant)
    else:  # a single file must be GGUF; the reader checks the magic and says so otherwise
        lm = _load_gguf(path, dt, device, max_len, quant)
    lm.quant = quant
    if device == "cpu" and cpu.available():  # builds pellucid's CPU kernels on a machine's first load
        pack_for_cpu_ops(lm.model)
    lm.load_seconds = time.perf_counter() - t0
    return lm


def build_empty(mod, cfg: ModelConfig, device: str, max_len: int | None, dtype: torch.dtype | None = None) -> nn.Module:
    """Instantiate without spending time on random init, then compute the buffers."""
    with torch.device("meta"), _no_random_init(mod.MODEL):
        model = mod.MODEL(cfg, max_len=max_len)
    if dtype is not None:
        model = model.to(dtype)  # on meta: no memory, and no float32 copy to convert later
    model = model.to_empty(device=device)
    model.init_buffers()
    return model


def _load_gguf(path: Path, dt: torch.dtype, device: str, max_len: int | None, quant: str | None = None) -> LoadedModel:
    from pellucid.weights.gguf import GGUFFile

    f = GGUFFile(path)
    mod, cfg = gguf_architecture(f)
    arch = cfg.arch
    model = build_empty(mod, cfg, device, max_len, dt)
    storage, shapes = {}, {}

    last: dict[str, torch.Tensor] = {}  # a tied head asks for the embedding just before the embedding itself

    def source(name: str) -> torch.Tensor | RowSource:  # our parameter name -> float32 tensor in our layout
        if name in last:
            return last.pop(name)
        src = gguf_tensor_name(mod, f, name)
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

    def source_blocks(name: str):  # the file's quantized blocks in our row order, or None
        src = gguf_tensor_name(mod, f, name)
        blocks = f.blocks(src)
        rows = _row_map(mod, cfg, name, f.tensors[src].shape[0]) if blocks is not None else None
        if rows is None:
            return None
        storage[name], shapes[name] = f.tensors[src].qtype.name, f.tensors[src].shape
        if torch.equal(rows, torch.arange(rows.shape[0])):
            return blocks
        return tuple(b if b is None or isinstance(b, str) else b[rows] for b in blocks)

    with torch.no_grad():
        if quant:  # swap the linear layers before any float weight of theirs is touched
            from pellucid.quantization.apply import quantize_model

            quantize_model(model, quant, source=source, source_blocks=source_blocks)
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
    _keep_float32_buffers(model)
    tok = Tokenizer.from_gguf(f.metadata)
    bos = tok.piece(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.piece(tok.eos_id) if tok.eos_id is not None else ""
    tmpl_src = f.get("tokenizer.chat_template") or getattr(mod, "CHAT_TEMPLATE", None)  # e.g. Gemma GGUFs carry none
    return LoadedModel(model, tok, ChatTemplate(tmpl_src, bos_token=bos, eos_token=eos), cfg, path, "gguf",
                       storage, shapes, metadata={k: v for k, v in f.metadata.items() if not k.startswith("tokenizer.ggml.")})  # fmt: skip


@contextlib.contextmanager
def _no_random_init(model_cls):
    """Skip nn.init and the buffers while building on the meta device: computing on meta goes
    through torch's reference ops, whose first use imports torch._dynamo (over a second and
    ~70 MB resident), only to fill tensors that the checkpoint and init_buffers() overwrite."""
    names = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda t, *a, **k: t)
    had_own = "init_buffers" in model_cls.__dict__
    real_init_buffers = model_cls.__dict__.get("init_buffers")
    model_cls.init_buffers = lambda self: None  # build_empty calls the real one on the real device
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)
        if had_own:
            model_cls.init_buffers = real_init_buffers
        else:
            del model_cls.init_buffers


_MALLOC_SET = False


def _return_big_blocks() -> None:
    """glibc: serve blocks of 1 MiB and more from their own mappings, returned on free.

    Loading makes many short-lived buffers of a few MiB; glibc's adaptive threshold would
    keep them in the heap, where the freed pages stay resident (a quarter GiB of peak memory
    for a 135M model). Small allocations, all a decode step makes, are untouched.
    """
    global _MALLOC_SET
    if _MALLOC_SET:
        return
    _MALLOC_SET = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
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
    tmpl = mod.GGUF_NAMES.get(_template_key(name))
    if tmpl is None:
        raise PellucidError(f"{f.path}: no GGUF name for parameter {name!r} of {f.get('general.architecture')!r}")
    layer = _layer(name)
    src = tmpl.replace("{L}", layer) if layer is not None else tmpl
    if src not in f.tensors:
        raise PellucidError(f"{f.path}: tensor {src!r} is missing (needed for {name}).")
    return src


def _keep_float32_buffers(model: nn.Module) -> None:
    """Computed tables (non-persistent buffers: rotary) stay float32; stored tensors (quantized scales) keep theirs."""
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if name not in mod._non_persistent_buffers_set:
                continue
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                mod._buffers[name] = buf.float()
