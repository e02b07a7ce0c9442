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


def build_empty(mod, cfg: ModelConfig, device: str, max_len: int | None, dtype: torch.dtype | None = None) -> nn.Module:
    """Instantiate without spending time on random init, then compute the buffers."""
    with torch.device("meta"), no_random_init(mod.MODEL):
        model = mod.MODEL(cfg, max_len=max_len)
    if dtype is not None:
        model = model.to(dtype)  # on meta: no memory, and no float32 copy to convert later
    model = model.to_empty(device=device)
    model.init_buffers()
    return model


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
