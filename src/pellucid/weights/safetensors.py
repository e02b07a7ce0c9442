"""safetensors reader: one file or a sharded set with `model.safetensors.index.json`.

Tensors are memory-mapped by the safetensors library (no pickle, no copy until a tensor
is asked for). The index is untrusted input: every shard it names must be a plain file
name inside the folder. This module knows nothing about architectures.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pellucid.errors import PellucidError

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class SafetensorsCheckpoint:
    """All tensors of a folder's safetensors file(s): `keys()`, `shape`, `dtype`, `load`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            self._where = self._read_index(index)
            files = sorted(set(self._where.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
                hint = (f" It has {', '.join(pickles)}: pickle checkpoints can run code when loaded, so pellucid "
                        "refuses them; convert to safetensors first (transformers: save_pretrained(safe_serialization=True)).") if pickles else ""  # fmt: skip
                raise PellucidError(f"{self.folder}: no *.safetensors weights.{hint}")
            self._where = {}
        self._files = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise PellucidError(f"{self.folder}: shard {name!r} named in {INDEX} is missing.")
            try:
                self._files[name] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise PellucidError(f"{path}: not a readable safetensors file: {e}") from None
        if not self._where:
            for name, f in self._files.items():
                for key in f.keys():
                    if key in self._where:
                        raise PellucidError(f"{self.folder}: tensor {key!r} is in both {self._where[key]} and {name}")
                    self._where[key] = name
        else:
            for key, name in self._where.items():
                if key not in self._files[name].keys():
                    raise PellucidError(f"{self.folder}: {INDEX} puts {key!r} in {name}, which does not hold it.")

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise PellucidError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict):
            raise PellucidError(f"{index}: weight_map must be an object of tensor name -> file name")
        for key, name in weight_map.items():
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise PellucidError(f"{index}: tensor {key!r} points at {name!r}; shards must be *.safetensors files in the same folder.")
        return dict(weight_map)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    @property
    def files(self) -> list[str]:
        return list(self._files)

    def _slice(self, key: str):
        if key not in self._where:
            raise PellucidError(f"{self.folder}: tensor {key!r} is missing.")
        return self._files[self._where[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The stored type as safetensors names it: F32, BF16, F16, ..."""
        return str(self._slice(key).get_dtype())

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if key not in self._where:
            raise PellucidError(f"{self.folder}: tensor {key!r} is missing.")
        t = self._files[self._where[key]].get_tensor(key)
        return t if dtype is None else t.to(dtype)
