"""What both loaders (GGUF in loading/__init__.py, HF folders in loading/hf.py) share."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pellucid import runtime
from pellucid.errors import PellucidError
from pellucid.models.layers import ModelConfig
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


def template_key(name: str) -> str:
    return re.sub(r"\.(\d+)\.", ".{L}.", name, count=1)


def layer_index(name: str) -> str | None:
    m = re.search(r"\.(\d+)\.", name)
    return m.group(1) if m else None


def build_meta(mod, cfg: ModelConfig, max_len: int | None, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture's modules on the meta device (shapes and types, no memory), in `dtype`."""
    default = torch.get_default_dtype()
    try:
        if dtype is not None and dtype.is_floating_point:
            torch.set_default_dtype(dtype)  # built in its type: no conversion pass over the parameters later
        with torch.device("meta"), no_random_init(mod.MODEL):
            model = mod.MODEL(cfg, max_len=max_len)
        model.tie_weights()  # before any layer is swapped: a tied head and its table stay one
        return model
    finally:
        torch.set_default_dtype(default)


def materialize(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Give every parameter and buffer still on the meta device uninitialised memory on `device`
    (a tied parameter once), then compute the model's own buffers (rotary tables).

    Direct allocations: nn.Module.to_empty goes through torch's Python reference ops, whose
    first use imports sympy (about 0.5 s of every load)."""
    made: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type == "meta":
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
                mod._parameters[name] = made[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "meta":
                mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    model.init_buffers()
    return model


def build_empty(mod, cfg: ModelConfig, device: str, max_len: int | None, dtype: torch.dtype | None = None) -> nn.Module:
    """Instantiate without spending time on random init, then compute the buffers."""
    return materialize(build_meta(mod, cfg, max_len, dtype), device)


@contextlib.contextmanager
def no_random_init(model_cls):
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


def keep_float32_buffers(model: nn.Module) -> None:
    """Computed tables (non-persistent buffers: rotary) stay float32; stored tensors (quantized scales) keep theirs."""
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if name not in mod._non_persistent_buffers_set:
                continue
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                mod._buffers[name] = buf.float()
