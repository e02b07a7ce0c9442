"""Steering vectors and activation capture: write to the residual stream and read it, per request.

A steering vector is a direction per layer: after block `i` of the model, every token of a
steered request gets `scale * direction[i]` added to its residual stream (what the next
block reads). Block indices are 0-based and name the same place as llama.cpp's control
vectors, whose file holds `direction.N` for block N's output (llama.cpp never steers block
0, so neither does its file format). Steering lives in the forward itself
(`Decoder.run_blocks`): steered and plain requests share a batch, a plain row is never
touched, and the fused path stays fused.

Capture reads the same place: the residual stream after chosen blocks (after any steering),
at chosen prompt positions, returned with the answer.

Making a vector (`make_vector`): the difference of the mean residual stream over prompts
that show a property and prompts that do not ("contrastive activation addition": Rimsky et
al. 2023, arXiv:2312.06681; "activation addition": Turner et al. 2023, arXiv:2308.10248;
llama.cpp's cvector-generator offers the same as `--method mean`). Per layer it also
records how far the two sets lie apart along the direction (the difference of their mean
projections over the pooled standard deviation): the layers where that is large are the
ones where the property is plainly written.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pellucid.errors import PellucidError, did_you_mean

FILE_LIMIT = 256 * 2**20  # a control-vector file larger than this is refused unread
CAPTURE_LIMIT = 8 * 2**20  # values one request may capture (16 MiB as float16)
SCALE_LIMIT = 1e4
WHAT = ("resid_post",)  # what capture reads: the stream after a block (and after its steering)


@dataclass
class SteeringVector:
    """Directions by block index (0-based), each (d_model,) float32, and where they came from."""

    directions: dict[int, torch.Tensor]
    model_hint: str = ""  # the architecture it was made on (llama.cpp's controlvector.model_hint)
    meta: dict[str, Any] = field(default_factory=dict)  # model, method, n_layers, counts, separation
    name: str = ""

    @property
    def d_model(self) -> int:
        return next(iter(self.directions.values())).numel()

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def norms(self) -> dict[int, float]:
        return {i: float(self.directions[i].norm()) for i in self.layers}

    def save(self, path: str | Path) -> Path:
        """Write llama.cpp's control-vector GGUF (general.architecture = controlvector), atomically."""
        import gguf

        path = Path(path)
        if 0 in self.directions:
            raise PellucidError("a control-vector file cannot hold block 0 (llama.cpp's format starts at block 1); "
                                "leave layer 0 out", param="layers")  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        w = gguf.GGUFWriter(str(tmp), "controlvector")
        w.add_string("controlvector.model_hint", self.model_hint)
        w.add_int32("controlvector.layer_count", len(self.directions))
        for key, value in self.meta.items():
            if isinstance(value, bool | str):
                w.add_string(f"pellucid.{key}", str(value))
            elif isinstance(value, int):
                w.add_int32(f"pellucid.{key}", value)
            elif isinstance(value, float):
                w.add_float32(f"pellucid.{key}", value)
            elif isinstance(value, list | tuple) and value and all(isinstance(v, int | float) for v in value):
                w.add_array(f"pellucid.{key}", [float(v) for v in value])
        for i in self.layers:
            w.add_tensor(f"direction.{i}", self.directions[i].detach().float().cpu().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> SteeringVector:
        """Read a control-vector GGUF (llama.cpp's or pellucid's); refuses anything else, clearly."""
        from pellucid.weights.gguf import GGUFFile

        path = Path(path)
        if not path.is_file():
            raise PellucidError(f"steering vector file {str(path)!r} does not exist", param="vector")
        if path.stat().st_size > FILE_LIMIT:
            raise PellucidError(f"{path}: {path.stat().st_size:,} bytes is more than a control vector may be "
                                f"({FILE_LIMIT:,})", param="vector")  # fmt: skip
        f = GGUFFile(path)
        arch = f.get("general.architecture")
        if arch != "controlvector":
            raise PellucidError(f"{path}: general.architecture is {arch!r}, not 'controlvector': not a steering vector file", param="vector")
        directions: dict[int, torch.Tensor] = {}
        for tname, info in f.tensors.items():
            m = re.fullmatch(r"direction\.(\d+)", tname)
            if m is None:
                continue
            if len(info.shape) != 1:
                raise PellucidError(f"{path}: tensor {tname!r} has shape {list(info.shape)}; a direction is one row", param="vector")
            directions[int(m.group(1))] = f.load(tname).float().clone()
        if not directions:
            raise PellucidError(f"{path}: no direction.N tensors: not a steering vector file", param="vector")
        widths = {v.numel() for v in directions.values()}
        if len(widths) != 1:
            raise PellucidError(f"{path}: directions of different widths {sorted(widths)}", param="vector")
        meta = {k.removeprefix("pellucid."): v for k, v in f.metadata.items() if k.startswith("pellucid.")}
        return cls(directions, str(f.get("controlvector.model_hint", "")), meta, name or path.stem)

    def check_model(self, cfg) -> None:
        """A clear error where this vector does not fit the model (`cfg`: its ModelConfig)."""
        what = f"steering vector {self.name!r}" if self.name else "the steering vector"
        if self.d_model != cfg.d_model:
            raise PellucidError(f"{what} is {self.d_model} wide but this model's residual stream is {cfg.d_model} "
                                f"(made for {self.meta.get('model') or self.model_hint or 'another model'})", param="steer")  # fmt: skip
        if self.model_hint and self.model_hint != cfg.arch:
            raise PellucidError(f"{what} was made for a {self.model_hint!r} model; this one is {cfg.arch!r}", param="steer")
        n = self.meta.get("n_layers")
        if n is not None and int(n) != cfg.n_layers:
            raise PellucidError(f"{what} was made on a {n}-layer model ({self.meta.get('model', '?')}); this one has "
                                f"{cfg.n_layers} layers", param="steer")  # fmt: skip
        bad = [i for i in self.layers if not 0 <= i < cfg.n_layers]
        if bad:
            raise PellucidError(f"{what} has a direction for block {bad[0]}; this model's blocks are 0..{cfg.n_layers - 1}", param="steer")


class SteeringLibrary:
    """The named vectors of a folder (`NAME.gguf`), read once; `--steer-dir` on the server."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else default_dir()
        self._vectors: dict[str, SteeringVector] = {}
        self._bad: dict[str, str] = {}  # NAME.gguf files that are not control vectors: why
        self._stamp: tuple | None = None

    def _scan(self) -> None:
        files = sorted(self.folder.glob("*.gguf")) if self.folder.is_dir() else []
        stamp = tuple((p.name, p.stat().st_mtime_ns) for p in files)
        if stamp == self._stamp:
            return
        vectors, bad = {}, {}
        for p in files:
            try:
                vectors[p.stem] = SteeringVector.load(p)
            except PellucidError as e:
                bad[p.stem] = e.message  # not listed; naming it says why
        self._vectors, self._bad, self._stamp = vectors, bad, stamp

    def names(self) -> list[str]:
        self._scan()
        return sorted(self._vectors)

    def get(self, name: str) -> SteeringVector:
        self._scan()
        if name in self._bad:
            raise PellucidError(f"steering vector {name!r} cannot be used: {self._bad[name]}", param="steer")
        if name not in self._vectors:
            known = self.names()
            hint = did_you_mean(name, known)
            raise PellucidError(f"no steering vector named {name!r} in {self.folder}"
                                + (f"; did you mean {hint!r}?" if hint else "")
                                + (f" Known: {', '.join(known)}." if known else " It holds none (make one: pellucid steer make)."),
                                param="steer", status=400)  # fmt: skip
        return self._vectors[name]

    def describe(self, cfg=None) -> list[dict[str, Any]]:
        """One entry per vector: what GET /v1/steering lists."""
        out = []
        for name in self.names():
            v = self._vectors[name]
            fits = True
            if cfg is not None:
                try:
                    v.check_model(cfg)
                except PellucidError:
                    fits = False
            out.append({"name": name, "layers": v.layers, "d_model": v.d_model, "model_hint": v.model_hint,
                        "model": v.meta.get("model"), "method": v.meta.get("method"), "fits_model": fits,
                        "norms": {str(i): round(n, 4) for i, n in v.norms().items()}})  # fmt: skip
        return out


def default_dir() -> Path:
    from pellucid import registry

    return registry.home() / "steering"


# -- per-request steering ------------------------------------------------------------------------


@dataclass(frozen=True)
class Steer:
    """A request's steering, resolved: block -> the vector added after it (the sum of the items)."""

    layers: dict[int, torch.Tensor]
    key: bytes  # identifies the edit: the prefix cache reuses keys and values only under the same one

    def describe(self) -> dict[str, float]:
        return {str(i): float(v.norm()) for i, v in sorted(self.layers.items())}


_SPEC = re.compile(r"^(?P<name>[^:@]+?)(?::(?P<scale>[^@]+))?(?:@(?P<layers>.+))?$")


def parse_spec(spec: str) -> dict[str, Any]:
    """'NAME[:scale][@layers]' (layers: 6, 4-8 or 4,6,8) -> one steer item."""
    m = _SPEC.match(spec.strip())
    if m is None:
        raise PellucidError(f"steer {spec!r} is not NAME[:scale][@layers] (e.g. formal:4@6-10)", param="steer")
    item: dict[str, Any] = {"vector": m.group("name").strip()}
    if m.group("scale") is not None:
        try:
            item["scale"] = float(m.group("scale"))
        except ValueError:
            raise PellucidError(f"steer {spec!r}: scale {m.group('scale')!r} is not a number", param="steer") from None
    if m.group("layers") is not None:
        item["layers"] = parse_layers(m.group("layers"), what=f"steer {spec!r}")
    return item


def parse_layers(text: str, *, what: str = "layers") -> list[int]:
    """'6', '4-8' or '4,6,8' (or a mix) -> block indices."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise PellucidError(f"{what}: {part!r} is not a layer, a range like 4-8 or a list like 4,6,8", param="layers")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise PellucidError(f"{what}: range {part!r} runs backwards", param="layers")
        out += range(lo, hi + 1)
    return sorted(set(out))


def _items(spec: Any) -> list[dict[str, Any]]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [parse_spec(s) for s in spec.split(";") if s.strip()]
    if isinstance(spec, dict):
        return [spec]
    if isinstance(spec, list | tuple):
        return [x for s in spec for x in _items(s)]
    raise PellucidError(f"steer must be a list of {{vector, layers, scale}} objects or 'NAME[:scale][@layers]', not {type(spec).__name__}",
                        param="steer")  # fmt: skip


def resolve(spec: Any, cfg, library: SteeringLibrary | None = None, *, dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu") -> Steer | None:  # fmt: skip
    """A request's `steer` (items, a spec string, or a SteeringVector) -> the vectors its rows get, or None.

    Each item: `vector` (a name in `library`, a SteeringVector, or a list of d_model floats),
    `layers` (an int or list; default: every layer a named vector has; required for a list of
    floats) and `scale` (default 1). Items with scale 0 are left out, so `scale: 0` is no
    steering at all, bit for bit."""
    if isinstance(spec, SteeringVector):
        spec = {"vector": spec}
    total: dict[int, torch.Tensor] = {}
    for item in _items(spec):
        if not isinstance(item, dict):
            raise PellucidError(f"a steer item must be an object {{vector, layers, scale}}, not {item!r}", param="steer")
        unknown = sorted(set(item) - {"vector", "layers", "scale"})
        if unknown:
            raise PellucidError(f"unknown steer field {unknown[0]!r}; known: layers, scale, vector", param="steer")
        scale = item.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or abs(scale) > SCALE_LIMIT:
            raise PellucidError(f"steer scale {scale!r} must be a finite number within ±{SCALE_LIMIT:g}", param="steer")
        vec = item.get("vector")
        layers = item.get("layers")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = [layers]
        elif isinstance(layers, str):
            layers = parse_layers(layers, what="steer layers")
        elif layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise PellucidError(f"steer layers {layers!r} must be a layer index or a list of them", param="steer")
        if isinstance(vec, str | SteeringVector):
            if isinstance(vec, str) and library is None:
                raise PellucidError(f"steer vector {vec!r}: named vectors need a steering folder", param="steer")
            v = library.get(vec) if isinstance(vec, str) else vec
            v.check_model(cfg)
            layers = v.layers if layers is None else layers
            missing = [i for i in layers if i not in v.directions]
            if missing:
                raise PellucidError(f"steering vector {v.name!r} has no direction for layer {missing[0]}; it has "
                                    f"{ranges(v.layers) or 'none'}", param="steer")  # fmt: skip
            parts = {i: v.directions[i] for i in layers}
        elif isinstance(vec, list):
            if len(vec) != cfg.d_model or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vec):
                raise PellucidError(f"a steer vector given as numbers must be {cfg.d_model} numbers (this model's width); "
                                    f"got {len(vec)}", param="steer")  # fmt: skip
            if not layers:
                raise PellucidError("a steer vector given as numbers needs its layers", param="steer")
            t = torch.tensor(vec, dtype=torch.float32)
            if not torch.isfinite(t).all():
                raise PellucidError("a steer vector holds a number that is not finite", param="steer")
            parts = dict.fromkeys(layers, t)
        else:
            raise PellucidError(f"steer vector must be a name or a list of {cfg.d_model} numbers, not {vec!r}"[:300], param="steer")
        bad = [i for i in parts if not 0 <= i < cfg.n_layers]
        if bad:
            raise PellucidError(f"steer layer {bad[0]} is out of range; this model's layers are 0..{cfg.n_layers - 1}", param="steer")
        if scale == 0:
            continue
        for i, d in parts.items():
            total[i] = total[i] + scale * d if i in total else scale * d
    if not total:
        return None
    h = hashlib.sha256()
    layers = {}
    for i in sorted(total):
        v = total[i].to(dtype)
        h.update(i.to_bytes(4, "little") + v.float().numpy().tobytes())
        layers[i] = v.to(device)
    return Steer(layers, h.digest())


def ranges(xs: Sequence[int]) -> str:
    """Ascending layer indices as text: [0, 1, 2, 5] -> '0-2,5' ('' for none)."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


# -- capture -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capture:
    """What a request reads: the stream after `layers`, at `positions` of its prompt ("last", "all" or indices)."""

    layers: tuple[int, ...]
    positions: str | tuple[int, ...] = "last"

    def resolve(self, n_prompt: int, d_model: int) -> list[int]:
        """The prompt positions read, ascending; refuses what exceeds CAPTURE_LIMIT values."""
        if self.positions == "last":
            pos = [n_prompt - 1]
        elif self.positions == "all":
            pos = list(range(n_prompt))
        else:
            pos = sorted({p + n_prompt if p < 0 else p for p in self.positions})
            bad = [p for p in pos if not 0 <= p < n_prompt]
            if bad:
                raise PellucidError(f"capture position {bad[0] - n_prompt if bad[0] < 0 else bad[0]} is outside the prompt's "
                                    f"{n_prompt} tokens", param="capture")  # fmt: skip
        values = len(pos) * len(self.layers) * d_model
        if values > CAPTURE_LIMIT:
            raise PellucidError(f"capture asks for {len(self.layers)} layers x {len(pos)} positions x {d_model} = {values:,} "
                                f"values; at most {CAPTURE_LIMIT:,} per request (fewer layers or positions)", param="capture")  # fmt: skip
        return pos


def parse_capture(spec: Any, cfg) -> Capture | None:
    """A request's `capture` ({layers, positions, what}) -> Capture, checked against the model."""
    if spec is None:
        return None
    if isinstance(spec, Capture):
        return spec
    if not isinstance(spec, dict):
        raise PellucidError("capture must be an object {layers, positions, what}", param="capture")
    unknown = sorted(set(spec) - {"layers", "positions", "what"})
    if unknown:
        raise PellucidError(f"unknown capture field {unknown[0]!r}; known: layers, positions, what", param="capture")
    what = spec.get("what", "resid_post")
    if what not in WHAT:
        raise PellucidError(f"capture what {what!r} is not one of {', '.join(WHAT)}", param="capture")
    layers = spec.get("layers")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    elif isinstance(layers, str):
        layers = parse_layers(layers, what="capture layers")
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise PellucidError(f"capture layers {layers!r} must be a layer index or a non-empty list of them", param="capture")
    bad = [i for i in layers if not 0 <= i < cfg.n_layers]
    if bad:
        raise PellucidError(f"capture layer {bad[0]} is out of range; this model's layers are 0..{cfg.n_layers - 1}", param="capture")
    positions = spec.get("positions", "last")
    if isinstance(positions, list):
        if not positions or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            raise PellucidError("capture positions must be 'last', 'all' or a non-empty list of indices", param="capture")
        positions = tuple(positions)
    elif positions not in ("last", "all"):
        raise PellucidError(f"capture positions {positions!r} must be 'last', 'all' or a list of indices", param="capture")
    return Capture(tuple(sorted(set(layers))), positions)


def encode(captured: dict[int, torch.Tensor], positions: list[int]) -> dict[str, Any]:
    """Captured rows ({layer: (P, E)}) as JSON: float16, little-endian, base64, shape (layers, positions, E)."""
    layers = sorted(captured)
    arr = torch.stack([captured[i] for i in layers]).to(torch.float16).numpy().astype("<f2")
    return {"what": "resid_post", "layers": layers, "positions": positions, "shape": list(arr.shape), "dtype": "float16",
            "data": base64.b64encode(arr.tobytes()).decode("ascii")}  # fmt: skip


def decode(payload: dict[str, Any]) -> np.ndarray:
    """The array `encode` made (for clients and tests)."""
    raw = base64.b64decode(payload["data"])
    return np.frombuffer(raw, dtype="<f2").reshape(payload["shape"])


# -- making a vector -------------------------------------------------------------------------------


def read_examples(path: str | Path) -> list[str]:
    """One example per line (blank lines skipped; a literal \\n in a line is a newline), as llama.cpp's cvector-generator reads them."""
    path = Path(path)
    if not path.is_file():
        raise PellucidError(f"examples file {str(path)!r} does not exist")
    if path.stat().st_size > 16 * 2**20:
        raise PellucidError(f"{path}: more than 16 MiB of examples")
    lines = [ln.replace("\\n", "\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise PellucidError(f"{path} holds no examples (one per line)")
    return lines


def make_vector(llm, positive: Sequence[str], negative: Sequence[str], *, layers: Iterable[int] | None = None,
                position: str = "mean", name: str = "", progress: Any = None) -> SteeringVector:  # fmt: skip
    """The difference of mean residual streams, positive minus negative, at each of `layers`
    (default: every block but the first). position "mean": each example's mean over its
    tokens but the first (an attention sink); "last": its last token. Runs on the model as it
    serves (its format, fused path)."""
    cap = make_capture(llm.config, positive, negative, layers, position)
    acts = llm.activations(list(positive) + list(negative), cap, progress=progress)  # per text: {layer: (P, E)}
    return from_activations(llm, acts[: len(positive)], acts[len(positive) :], position, name)


def make_capture(cfg, positive: Sequence[str], negative: Sequence[str], layers: Iterable[int] | None, position: str) -> Capture:
    """What making a vector reads of each example; checks the inputs first."""
    if not positive or not negative:
        raise PellucidError("making a steering vector needs positive and negative examples (at least one each)", param="positive")
    if position not in ("mean", "last"):
        raise PellucidError(f"position {position!r} must be 'mean' or 'last'", param="position")
    layers = sorted(set(layers)) if layers is not None else list(range(1, cfg.n_layers))
    bad = [i for i in layers if not 0 < i < cfg.n_layers]
    if bad or not layers:
        raise PellucidError(f"layer {bad[0] if bad else 'none'} cannot be steered from a file; this model's are 1..{cfg.n_layers - 1}",
                            param="layers")  # fmt: skip
    return Capture(tuple(layers), "all" if position == "mean" else "last")


def from_activations(llm, pos_acts: list[dict], neg_acts: list[dict], position: str, name: str = "") -> SteeringVector:
    """The vector from captured streams (each example: {layer: (positions, E)}), with its metadata."""
    cfg = llm.config
    layers = sorted(pos_acts[0])
    # "mean" leaves out each text's first token: the stream there is many times larger than
    # elsewhere (an attention sink) and would swamp the difference with the first words'.
    skip = 1 if position == "mean" else 0

    def pool(a: dict) -> torch.Tensor:
        return torch.stack([(a[i][skip:] if len(a[i]) > skip else a[i]).float().mean(0) for i in layers])  # (L, E)

    pos, neg = torch.stack([pool(a) for a in pos_acts]), torch.stack([pool(a) for a in neg_acts])  # (N, L, E)
    diff = pos.mean(0) - neg.mean(0)  # (L, E)
    separation = []
    for j in range(len(layers)):
        unit = diff[j] / diff[j].norm().clamp_min(1e-12)
        pp, nn = pos[:, j] @ unit, neg[:, j] @ unit
        spread = math.sqrt((float(pp.var(unbiased=False)) + float(nn.var(unbiased=False))) / 2) or 1e-12
        separation.append((float(pp.mean()) - float(nn.mean())) / spread)
    meta = {"model": llm.model_name, "method": "mean_difference", "position": position, "n_layers": cfg.n_layers,
            "positives": len(pos_acts), "negatives": len(neg_acts), "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "separation": separation, "separation_layers": layers}  # fmt: skip
    return SteeringVector({i: diff[j].contiguous() for j, i in enumerate(layers)}, cfg.arch, meta, name)
