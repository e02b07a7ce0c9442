"""The model's architecture and its weights, grouped as the concept note draws them.

Token embeddings; N transformer layers of self-attention (Wq, Wk, Wv, Wo), feed-forward
matrices and norms; the output layer (tied to the embeddings or not). For every weight:
shape, storage type in the file (Q4_1, Q8_0, F32, ...), parameter count, bytes in the
file and bytes in memory at the compute dtype.

From a GGUF file the table is read from the tensor directory alone: the model is built
on the meta device (no memory, no weights), so its parameter names, shapes and count are
exactly those of the loaded model. Roles come from module names and types, so new
architectures get a table without changes here.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from pellucid.errors import PellucidError
from pellucid.steering import ranges

# module leaf name -> the concept note's symbol
ROLES = {
    "q_proj": "Wq", "k_proj": "Wk", "v_proj": "Wv", "o_proj": "Wo", "qkv_proj": "Wqkv",
    "gate_proj": "W_gate", "up_proj": "W_up", "down_proj": "W_down", "fc_in": "W_in", "fc_out": "W_out",
}  # fmt: skip
SECTIONS = (
    "token embeddings",
    "position embeddings",
    "layers",
    "final norm",
    "output layer",
    "other",
)
PARTS = ("", "attention", "feed-forward", "norms", "other")


@dataclass
class ArchInfo:
    name: str
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    context_length: int
    positions: str  # "RoPE (base 100000)" or "learned"
    rope_base: float | None
    norm: str  # "RMSNorm (eps 1e-05)"
    activation: str  # "SwiGLU (SiLU)"
    tied_embeddings: bool


@dataclass
class WeightRow:
    """One parameter (or, collapsed, the same parameter of several layers)."""

    name: str  # blocks.0.attn.q_proj.weight, or blocks.{0-29}.attn.q_proj.weight
    section: str  # one of SECTIONS
    part: str  # attention | feed-forward | norms | "" outside the layers
    component: str  # Wq, W_down, attention_norm, ...
    shape: tuple[int, ...]
    storage: str  # Q4_1, F32, ... ("Q4_K x24, Q6_K x6" when collapsed rows differ)
    params: int
    stored_bytes: int
    memory_bytes: int
    layers: list[int] = field(default_factory=list)
    tied_to: str = ""  # the parameter this one shares storage with (counted once, there)


@dataclass
class WeightGroup:
    label: str  # "token embeddings", "blocks.0-29 (x30)", "blocks.3", "output layer"
    section: str
    rows: list[WeightRow]
    params: int
    stored_bytes: int
    memory_bytes: int


@dataclass
class WeightsReport:
    model: str
    path: str
    format: str  # gguf | hf
    memory_dtype: str
    arch: ArchInfo
    rows: list[WeightRow]  # one per parameter, tied ones included with 0 params
    file_bytes: int
    total_params: int = 0
    total_stored_bytes: int = 0
    total_memory_bytes: int = 0

    def __post_init__(self) -> None:
        self.total_params = sum(r.params for r in self.rows)
        self.total_stored_bytes = sum(r.stored_bytes for r in self.rows)
        self.total_memory_bytes = sum(r.memory_bytes for r in self.rows)

    def groups(self, per_layer: bool = False) -> list[WeightGroup]:
        """Rows grouped by section; layers collapsed into one group unless `per_layer`."""
        out = []
        for section in SECTIONS:
            rows = [r for r in self.rows if r.section == section]
            if not rows:
                continue
            if section != "layers":
                out.append(_group(section, section, rows))
            elif per_layer:
                for i in sorted({r.layers[0] for r in rows}):
                    out.append(_group(f"blocks.{i}", section, [r for r in rows if r.layers == [i]]))
            else:
                n = self.arch.n_layers
                out.append(_group(f"blocks.0-{n - 1} (x{n})", section, collapse_layers(rows)))
        return out

    def by_part(self) -> dict[str, int]:
        """Parameters in the concept note's boxes: embeddings, attention, feed-forward, norms, output."""
        out: dict[str, int] = Counter()
        for r in self.rows:
            key = r.part if r.section == "layers" else r.section
            out[
                {"position embeddings": "token embeddings", "final norm": "norms"}.get(key, key)
            ] += r.params
        return dict(out)

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        def row(r: WeightRow) -> dict[str, Any]:
            d = asdict(r)
            d["shape"] = list(r.shape)
            return d

        return {
            "model": self.model,
            "path": self.path,
            "format": self.format,
            "memory_dtype": self.memory_dtype,
            "architecture": asdict(self.arch),
            "groups": [
                {
                    "label": g.label,
                    "section": g.section,
                    "params": g.params,
                    "stored_bytes": g.stored_bytes,
                    "memory_bytes": g.memory_bytes,
                    "rows": [row(r) for r in g.rows],
                }
                for g in self.groups(per_layer)
            ],  # fmt: skip
            "by_part": self.by_part(),
            "total": {
                "params": self.total_params,
                "stored_bytes": self.total_stored_bytes,
                "memory_bytes": self.total_memory_bytes,
            },
            "file_bytes": self.file_bytes,
        }


def _group(label: str, section: str, rows: list[WeightRow]) -> WeightGroup:
    return WeightGroup(label, section, rows, sum(r.params for r in rows), sum(r.stored_bytes for r in rows),
                       sum(r.memory_bytes for r in rows))  # fmt: skip


def collapse_layers(rows: list[WeightRow]) -> list[WeightRow]:
    """The same parameter across layers -> one row with summed counts and bytes."""
    by_key: dict[tuple[str, tuple[int, ...]], list[WeightRow]] = {}
    for r in rows:
        key = (re.sub(r"^blocks\.\d+\.", "", r.name), r.shape)
        by_key.setdefault(key, []).append(r)
    out = []
    for (rest, shape), rs in by_key.items():
        layers = sorted(i for r in rs for i in r.layers)
        kinds = Counter(r.storage for r in rs)
        storage = (
            next(iter(kinds))
            if len(kinds) == 1
            else ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
        )
        out.append(WeightRow(
            name=f"blocks.{{{ranges(layers)}}}.{rest}", section=rs[0].section, part=rs[0].part,
            component=rs[0].component, shape=shape, storage=storage, params=sum(r.params for r in rs),
            stored_bytes=sum(r.stored_bytes for r in rs), memory_bytes=sum(r.memory_bytes for r in rs),
            layers=layers, tied_to=rs[0].tied_to,
        ))  # fmt: skip
    return out


def stored_nbytes(qtype: str, numel: int) -> int:
    """Bytes of `numel` values stored as a GGML type (F32, BF16, Q4_1, Q6_K, ...)."""
    qtype = TORCH_NAMES.get(qtype.lower(), qtype)
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype.upper()]]
    except KeyError:
        raise PellucidError(f"unknown storage type {qtype!r}") from None
    return numel // block * size


TORCH_NAMES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int8": "I8",
}


# -- classification of parameters ---------------------------------------------------------


def _classify(model: nn.Module, name: str, vocab: int) -> tuple[str, str, str, list[int]]:
    """(section, part, component, layers) of a parameter, from its module's name and type."""
    mod_name, _, kind = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    leaf = mod_name.rpartition(".")[2]
    suffix = "" if kind == "weight" else f" {kind}"
    m = re.match(r"blocks\.(\d+)\.(.*)$", mod_name)
    if m:
        rest = m.group(2)
        is_norm = "norm" in type(mod).__name__.lower() or "norm" in leaf
        part = (
            "norms"
            if is_norm
            else (
                "attention"
                if rest.startswith("attn")
                else "feed-forward"
                if rest.startswith("mlp")
                else "other"
            )
        )
        component = "norm" if not rest else (ROLES.get(leaf, rest) if not is_norm else rest)
        return "layers", part, component + suffix, [int(m.group(1))]
    if isinstance(mod, nn.Embedding):
        section = "token embeddings" if mod.num_embeddings == vocab else "position embeddings"
        return section, "", "W_E" + suffix, []
    if isinstance(mod, nn.Linear) and mod.out_features == vocab:
        return "output layer", "", "W_U" + suffix, []
    if "norm" in type(mod).__name__.lower() or "norm" in leaf:
        return "final norm", "", (mod_name or "norm") + suffix, []
    return "other", "", name, []


def _tied(model: nn.Module) -> dict[str, str]:
    """Parameter name -> the name it shares storage with, for the duplicates."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _rows(model: nn.Module, vocab: int, storage: dict[str, str], stored_bytes: dict[str, int],
          memory_size: dict[str, int]) -> list[WeightRow]:  # fmt: skip
    tied = _tied(model)
    rows = []
    for name, p in model.named_parameters(remove_duplicate=False):
        section, part, component, layers = _classify(model, name, vocab)
        if name in tied:
            src = tied[name]
            rows.append(WeightRow(name, section, part, component, tuple(p.shape), storage.get(src, ""), 0, 0, 0,
                                  layers, tied_to=src))  # fmt: skip
            continue
        n = p.numel()
        rows.append(WeightRow(name, section, part, component, tuple(p.shape), storage.get(name, ""), n,
                              stored_bytes.get(name, 0), n * memory_size[name], layers))  # fmt: skip
    # the note's order: sections, then per layer attention, feed-forward, norms
    return sorted(
        rows, key=lambda r: (SECTIONS.index(r.section), r.layers[:1], PARTS.index(r.part))
    )


def arch_info(model: nn.Module, cfg: Any) -> ArchInfo:
    """The hyperparameters a person asks about first, read off the config and the modules."""
    norm = next((m for m in model.modules() if "norm" in type(m).__name__.lower()), None)
    norm_s = type(norm).__name__ if norm is not None else "none"
    eps = getattr(norm, "eps", None)
    if eps is not None:
        norm_s += f" (eps {float(eps):.0e})"
    mlp = getattr(model.blocks[0], "mlp", None)
    act = (
        getattr(mlp, "act", None)
        or getattr(cfg, "act", None)
        or getattr(cfg, "activation", None)
        or "?"
    )
    if mlp is not None and hasattr(mlp, "gate_proj"):
        activation = {
            "silu": "SwiGLU (SiLU)",
            "gelu": "GeGLU (GELU)",
            "gelu_tanh": "GeGLU (GELU tanh)",
        }.get(act, f"gated {act}")
    else:
        activation = {"gelu": "GELU", "gelu_tanh": "GELU (tanh)", "relu": "ReLU"}.get(act, str(act))
    learned = any(
        isinstance(m, nn.Embedding) and m.num_embeddings != cfg.vocab_size for m in model.modules()
    )
    rope = None if learned else float(cfg.rope_base)
    return ArchInfo(
        name=getattr(cfg, "name", "") or "", architecture=cfg.arch, n_layers=cfg.n_layers, d_model=cfg.d_model,
        n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, d_ff=cfg.d_ff,
        vocab_size=cfg.vocab_size, context_length=cfg.context_length,
        positions="learned" if learned else f"RoPE (base {rope:g})", rope_base=rope, norm=norm_s,
        activation=activation, tied_embeddings=bool(cfg.tied_embeddings),
    )  # fmt: skip


# -- entry point ----------------------------------------------------------------------------


def weights_report(source: Any, *, dtype: str = "bfloat16") -> WeightsReport:
    """Architecture and weights table of a model name, .gguf path, LoadedModel or LLM.

    For a name or .gguf path nothing is loaded: memory bytes are at `dtype`. For a loaded
    model, memory bytes are those of its parameters as they are.
    """
    from pellucid.loading import LoadedModel, load_model, parse_dtype

    loaded = getattr(source, "loaded", source)  # an LLM -> its LoadedModel
    if isinstance(loaded, LoadedModel):
        return _from_loaded(loaded)
    if not isinstance(source, (str, Path)):
        raise PellucidError(f"cannot inspect a {type(source).__name__}", param="model")
    from pellucid import registry

    path = registry.resolve(source)
    if path.is_file():  # a single file is GGUF; the reader checks the magic
        return _from_gguf(path, str(source), parse_dtype(dtype))
    return _from_loaded(load_model(path, dtype=dtype), str(source))


def _from_gguf(path: Path, name: str, dt: torch.dtype) -> WeightsReport:
    from pellucid.loading import gguf_architecture, gguf_tensor_name, no_random_init
    from pellucid.weights.gguf import GGUFFile

    f = GGUFFile(path)
    mod, cfg = gguf_architecture(f)
    with torch.device("meta"), no_random_init(mod.MODEL):  # no init, no reference ops on meta
        model = mod.MODEL(cfg)
    model.init_buffers()  # ties the output head; the rotary tables are small CPU tensors
    storage, stored = {}, {}
    for pname, p in model.named_parameters():
        info = f.tensors[gguf_tensor_name(mod, f, pname)]
        # a fused tensor (GPT-2's attn_qkv) fills several parameters: each gets its share
        storage[pname], stored[pname] = info.qtype.name, info.nbytes * p.numel() // info.numel
    size = torch.empty((), dtype=dt).element_size()
    memory = {n: size for n, _ in model.named_parameters()}
    rows = _rows(model, cfg.vocab_size, storage, stored, memory)
    return WeightsReport(name, str(path), "gguf", str(dt).removeprefix("torch."), arch_info(model, cfg), rows,
                         path.stat().st_size)  # fmt: skip


def _from_loaded(lm: Any, name: str | None = None) -> WeightsReport:
    model = lm.model
    params = dict(model.named_parameters())
    stored = {
        n: stored_nbytes(lm.storage[n], p.numel()) if n in lm.storage else 0
        for n, p in params.items()
    }
    memory = {n: p.element_size() for n, p in params.items()}
    rows = _rows(model, lm.config.vocab_size, lm.storage, stored, memory)
    dtypes = {str(p.dtype).removeprefix("torch.") for p in params.values()}
    path = Path(lm.path)
    file_bytes = (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.glob("*.safetensors"))
    )
    return WeightsReport(name or path.name, str(path), lm.format, "/".join(sorted(dtypes)), arch_info(model, lm.config),
                         rows, file_bytes)  # fmt: skip
