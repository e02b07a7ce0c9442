"""Hugging Face folders: config.json + safetensors (single or sharded) + tokenizer.json.

The architecture comes from config.json (`architectures`, else `model_type`) through the
same table as GGUF files; each architecture's HF_NAMES says which stored tensor fills
which parameter, and its optional `from_hf_tensor` reshapes one (GPT-2's Conv1D).
The chat template comes from tokenizer_config.json, chat_template.jinja or
chat_template.json, else the architecture's own. Pickle checkpoints are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pellucid.errors import PellucidError
from pellucid.loading.common import (
    LoadedModel,
    build_empty,
    keep_float32_buffers,
    layer_index,
    template_key,
)
from pellucid.models import ARCHITECTURES, HF_ARCHITECTURES, architecture
from pellucid.text.chat_template import ChatTemplate
from pellucid.text.tokenizer import Tokenizer
from pellucid.weights.safetensors import SafetensorsCheckpoint

# Prefixes a checkpoint may carry or lack around the names in HF_NAMES (base-model saves).
_PREFIXES = ("model.", "transformer.")


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PellucidError(f"{path}: cannot read {what}: {e}") from None
    if not isinstance(data, dict):
        raise PellucidError(f"{path}: {what} must be a JSON object")
    return data


def architecture_key(config: dict, folder: Path) -> str:
    """config.json -> the key of the architecture table (an error lists the supported ones)."""
    archs = config.get("architectures") or []
    for a in archs:
        if a in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[a]
    if archs:
        supported = ", ".join(sorted(HF_ARCHITECTURES))
        raise PellucidError(f"{folder}: unsupported architecture {archs[0]!r} (config.json architectures). Supported: {supported}.")
    key = config.get("model_type")
    if not key:
        raise PellucidError(f"{folder}/config.json names no architecture (neither architectures nor model_type).")
    if key not in ARCHITECTURES:
        architecture(str(key))  # raises, naming it and listing the supported ones
    return str(key)


def rope_type(config: dict) -> str:
    """The rotary variant config.json asks for ("default" when plain)."""
    rp = config.get("rope_parameters") or {}
    for d in (config.get("rope_scaling") or {}, rp, *(v for v in rp.values() if isinstance(v, dict))):
        t = d.get("rope_type") or d.get("type") if isinstance(d, dict) else None
        if t and t != "default":
            return str(t)
    return "default"


def _source_name(ckpt: SafetensorsCheckpoint, tmpl: str, layer: str | None) -> str | None:
    name = tmpl.replace("{L}", layer) if layer is not None else tmpl
    candidates = [name]
    for p in _PREFIXES:
        if name.startswith(p):
            candidates.append(name[len(p) :])
    return next((c for c in candidates if c in ckpt), None)


def chat_template_source(folder: Path, tok_cfg: dict) -> str | None:
    src = tok_cfg.get("chat_template")
    if isinstance(src, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in src if isinstance(t, dict)}
        src = named.get("default") or next(iter(named.values()), None)
    if not src and (folder / "chat_template.jinja").is_file():
        src = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if not src and (folder / "chat_template.json").is_file():
        src = read_json(folder / "chat_template.json", "chat template").get("chat_template")
    return src if isinstance(src, str) and src else None


def _token_text(v) -> str:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else ""


def _eos_ids(*configs: dict) -> set[int]:
    out: set[int] = set()
    for c in configs:
        v = c.get("eos_token_id")
        for i in v if isinstance(v, list) else [v]:
            if isinstance(i, int):
                out.add(i)
    return out


def load_hf_folder(path: Path, dt: torch.dtype, device: str, max_len: int | None, progress=None):
    """An HF folder -> LoadedModel (safetensors memory-mapped, converted to `dt`)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise PellucidError(f"{path}: a Hugging Face model folder needs config.json (and *.safetensors, tokenizer.json).")
    config = read_json(path / "config.json", "config.json")
    key = architecture_key(config, path)
    mod = architecture(key)
    rope = rope_type(config)
    if rope not in getattr(mod, "ROPE_TYPES", ("default",)):
        raise PellucidError(f"{path}/config.json: rotary scaling {rope!r} is not supported for {key!r} (running without it would be silently wrong).")
    try:
        cfg = mod.config_from_hf(config)
    except KeyError as e:
        raise PellucidError(f"{path}/config.json: key {e.args[0]!r} is missing for architecture {key!r}") from None
    ckpt = SafetensorsCheckpoint(path)
    head = mod.HF_NAMES.get("lm_head.weight")
    if head is not None and _source_name(ckpt, head, None) is None:
        cfg.tied_embeddings = True  # saved without a head: it is the embedding
    model = build_empty(mod, cfg, device, max_len)
    transform = getattr(mod, "from_hf_tensor", None)
    storage, shapes = {}, {}
    params = dict(model.named_parameters())
    if progress is not None:
        progress.start("reading the tensors", len(params))
    with torch.no_grad():
        for name, p in params.items():
            if progress is not None:
                progress.advance()
            tmpl = mod.HF_NAMES.get(template_key(name))
            if tmpl is None:
                raise PellucidError(f"{path}: no checkpoint name for parameter {name!r} of {key!r}")
            src = _source_name(ckpt, tmpl, layer_index(name))
            if src is None:
                raise PellucidError(f"{path}: tensor {tmpl.replace('{L}', layer_index(name) or '')!r} is missing (needed for {name}).")
            w = ckpt.load(src, torch.float32)
            if transform is not None:
                w = transform(name, w, cfg)
            if tuple(w.shape) != tuple(p.shape):
                raise PellucidError(f"{path}: tensor {src!r} has shape {tuple(w.shape)}, expected {tuple(p.shape)} for {name} of {key!r}")
            p.copy_(w)
            storage[name] = ckpt.dtype(src)
            shapes[name] = ckpt.shape(src)
    model = model.to(dt).eval()
    keep_float32_buffers(model)

    if progress is not None:
        progress.start("the tokenizer")
    tok = Tokenizer.from_hf_folder(path)
    tok_cfg = read_json(path / "tokenizer_config.json", "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    gen_cfg = read_json(path / "generation_config.json", "generation_config.json") if (path / "generation_config.json").is_file() else {}
    eos = {i for i in _eos_ids(config, gen_cfg) if 0 <= i < tok.vocab_size}
    tok.eog_ids = frozenset(tok.eog_ids | eos)
    template = chat_template_source(path, tok_cfg) or getattr(mod, "CHAT_TEMPLATE", None)
    chat = ChatTemplate(template, bos_token=_token_text(tok_cfg.get("bos_token")), eos_token=_token_text(tok_cfg.get("eos_token")))
    meta = {"config": config, "files": ckpt.files}
    cfg.name = cfg.name or path.name
    return LoadedModel(model, tok, chat, cfg, path, "hf", storage, shapes, metadata=meta)
