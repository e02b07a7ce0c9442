"""GGUF reader: metadata, tensor directory, and dequantized tensors.

The header is parsed here with `struct` and numpy because `gguf.GGUFReader` spends about
5 s building Python objects for a 49k-token vocabulary. Tensors are views of the mapped
file (`view`), read in place by pellucid's kernels; `load` dequantizes through the
kernels too, or through llama.cpp's own `gguf` package without them. Reading the header
imports no torch (commands that only count tokens never load it). The file is untrusted input: every count, length and
offset is checked against limits and against the file's size before it is used.
This module knows nothing about architectures.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pellucid.errors import PellucidError

if TYPE_CHECKING:
    import torch

MAGIC = b"GGUF"
MAX_STRING = 64 << 20  # one metadata string (a chat template is a few KiB)
MAX_ARRAY = 16 << 20  # entries in one metadata array (vocabularies are ~10^5)
MAX_TENSORS = 1 << 16
MAX_DIMS = 4

# GGUF metadata value types -> (struct format, numpy dtype)
_SCALARS = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")

class GGMLQuantizationType(enum.IntEnum):
    """ggml's tensor types (ids as in ggml.h and gguf-py), kept here: importing the gguf package
    costs ~0.12 s of every start, and only a type the kernels cannot read needs it."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


_T = GGMLQuantizationType
# type -> (values per block, bytes per block), ggml's sizes (checked against gguf-py's in the tests)
GGML_QUANT_SIZES = {
    _T.F32: (1, 4), _T.F16: (1, 2), _T.Q4_0: (32, 18), _T.Q4_1: (32, 20), _T.Q5_0: (32, 22), _T.Q5_1: (32, 24),
    _T.Q8_0: (32, 34), _T.Q8_1: (32, 40), _T.Q2_K: (256, 84), _T.Q3_K: (256, 110), _T.Q4_K: (256, 144),
    _T.Q5_K: (256, 176), _T.Q6_K: (256, 210), _T.Q8_K: (256, 292), _T.IQ2_XXS: (256, 66), _T.IQ2_XS: (256, 74),
    _T.IQ3_XXS: (256, 98), _T.IQ1_S: (256, 50), _T.IQ4_NL: (32, 18), _T.IQ3_S: (256, 110), _T.IQ2_S: (256, 82),
    _T.IQ4_XS: (256, 136), _T.I8: (1, 1), _T.I16: (1, 2), _T.I32: (1, 4), _T.I64: (1, 8), _T.F64: (1, 8),
    _T.IQ1_M: (256, 56), _T.BF16: (1, 2), _T.TQ1_0: (256, 54), _T.TQ2_0: (256, 66), _T.MXFP4: (32, 17),
    _T.NVFP4: (64, 36), _T.Q1_0: (128, 18),
}  # fmt: skip


def _gguf_dequantize(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    from gguf import GGMLQuantizationType as GgufType
    from gguf.quants import dequantize

    return dequantize(rows, GgufType(int(qtype)))


SUPPORTED_TYPES = {
    GGMLQuantizationType[n]
    for n in (
        "F32 F16 BF16 F64 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K "
        "IQ4_NL IQ4_XS"
    ).split()
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (rows first): GGUF's ne reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise PellucidError(
                f"{self.path}: truncated or corrupt GGUF header (needed {n} bytes at offset "
                f"{self.pos}, file has {len(self.buf)})"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > MAX_STRING:
            raise PellucidError(f"{self.path}: a metadata string of {n:,} bytes exceeds the limit of {MAX_STRING:,}")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary): the same checks as string(), in one tight loop."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack, append = _U64.unpack_from, out.append
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.take(8)  # raises with the offsets
            (n,) = unpack(buf, pos)
            if n > MAX_STRING:
                raise PellucidError(f"{self.path}: a metadata string of {n:,} bytes exceeds the limit of {MAX_STRING:,}")
            pos += 8
            if pos + n > end:
                self.pos = pos
                self.take(n)
            append(str(buf[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if count > MAX_ARRAY:
                raise PellucidError(f"{self.path}: metadata array {key!r} has {count:,} entries (limit {MAX_ARRAY:,})")
            if itype in _SCALARS:
                dt = np.dtype(_SCALARS[itype][1]).newbyteorder("<")
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).copy()
            if itype == _STRING:
                return self.strings(count)
            raise PellucidError(f"{self.path}: metadata array {key!r} has unsupported item type {itype}")
        raise PellucidError(f"{self.path}: metadata key {key!r} has unknown value type {vtype}")


class GGUFFile:
    """A parsed GGUF file: `metadata` (dict), `tensors` (name -> TensorInfo), `load(name)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PellucidError(f"GGUF file {str(self.path)!r} does not exist.")
        size = self.path.stat().st_size
        if size < 24:
            raise PellucidError(f"{self.path}: {size} bytes is too small to be a GGUF file.")
        try:
            # copy-on-write: tensor views are writable numpy arrays (torch wants them so), yet
            # nothing is ever written, so every page stays the file's own, shared and clean
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="c")
        except (OSError, ValueError) as e:
            raise PellucidError(f"{self.path}: cannot map the file: {e}") from e
        cur = _Cursor(memoryview(self._mm), self.path)
        if bytes(cur.take(4)) != MAGIC:
            raise PellucidError(f"{self.path}: not a GGUF file (bad magic; expected 'GGUF').")
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise PellucidError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are).")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_tensors > MAX_TENSORS or n_kv > MAX_TENSORS:
            raise PellucidError(f"{self.path}: implausible header ({n_tensors} tensors, {n_kv} metadata keys)")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"), key)
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > MAX_DIMS:
                raise PellucidError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            ne = [cur.scalar("<Q") for _ in range(n_dims)]
            qt, off = cur.scalar("<I"), cur.scalar("<Q")
            raw.append((name, ne, qt, off))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, qt, off in raw:
            try:
                qtype = GGMLQuantizationType(qt)
            except ValueError:
                raise PellucidError(f"{self.path}: tensor {name!r} has unknown GGML type {qt}") from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            numel = int(np.prod(ne)) if ne else 1
            if ne and ne[0] % block:
                raise PellucidError(f"{self.path}: tensor {name!r} row of {ne[0]} is not a multiple of {qtype.name}'s block {block}")
            nbytes = numel // block * type_size
            start = data_start + off
            if start + nbytes > size:
                raise PellucidError(
                    f"{self.path}: truncated file: tensor {name!r} needs bytes {start:,}..{start + nbytes:,} "
                    f"but the file has {size:,}. Pull or copy it again."
                )
            self.tensors[name] = TensorInfo(name, tuple(reversed(ne)), qtype, start, nbytes)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def view(self, name: str) -> torch.Tensor:
        """A tensor's stored bytes where they lie in the mapped file: uint8 (rows, bytes per row), no copy.

        Its pages are read from disk when first touched and are shared with the page cache
        (and with every process that maps the same file).
        """
        import torch

        t = self.tensors[name]
        rows = t.shape[0] if len(t.shape) >= 2 else 1
        return torch.from_numpy(self._mm[t.offset : t.offset + t.nbytes]).view(rows, -1)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor, read into memory of their own."""
        t = self.tensors[name]
        return self._read(t.offset, t.nbytes)

    def _read(self, offset: int, n: int) -> np.ndarray:
        buf = np.empty(n, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(offset)
            got = fh.readinto(memoryview(buf))
        if got != n:
            raise PellucidError(f"{self.path}: short read ({got} of {n} bytes at offset {offset}); is the file truncated?")
        return buf

    def load_rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor, dequantized (rows are contiguous in the file)."""
        t = self.tensors[name]
        rows, cols = t.shape
        start, stop = max(0, start), min(rows, stop)
        block, type_size = GGML_QUANT_SIZES[t.qtype]
        row_bytes = cols // block * type_size
        part = TensorInfo(name, (stop - start, cols), t.qtype, t.offset + start * row_bytes, (stop - start) * row_bytes)
        return self._load_info(part, dtype)

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dequantize one tensor to `dtype` (default float32), shaped rows-first like PyTorch."""
        if name not in self.tensors:
            raise PellucidError(f"{self.path}: tensor {name!r} is missing.")
        return self._load_info(self.tensors[name], dtype)

    def _load_info(self, t: TensorInfo, dtype: torch.dtype | None) -> torch.Tensor:
        import torch

        from pellucid import (
            kernels,  # the C++ lookup reads every block type in place, at memory speed
        )

        dtype = dtype or torch.float32
        name = t.name
        if t.qtype not in SUPPORTED_TYPES:
            ok = ", ".join(sorted(x.name for x in SUPPORTED_TYPES))
            raise PellucidError(f"{self.path}: tensor {name!r} is stored as {t.qtype.name}, which pellucid cannot read. Supported: {ok}.")
        if int(t.qtype) in kernels.ROW_TYPES and len(t.shape) <= 2 and kernels.available():
            rows = t.shape[0] if len(t.shape) == 2 else 1
            data = torch.from_numpy(self._mm[t.offset : t.offset + t.nbytes]).view(rows, -1)
            return kernels.dequantize(data, int(t.qtype), t.shape[-1]).reshape(t.shape).to(dtype)
        data = self._read(t.offset, t.nbytes)
        if t.qtype == GGMLQuantizationType.F32:
            arr = data.view(np.float32)
        elif t.qtype == GGMLQuantizationType.F16:
            arr = data.view(np.float16)
        elif t.qtype == GGMLQuantizationType.BF16:
            return torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).reshape(t.shape).to(dtype)
        else:  # a fresh array already: no second copy
            return torch.from_numpy(dequantize_blocks(data, t).reshape(t.shape)).to(dtype)
        return torch.from_numpy(arr.reshape(t.shape)).to(dtype)  # our own buffer: no copy needed


def dequantize_blocks(data: np.ndarray, t: TensorInfo) -> np.ndarray:
    """Block-quantized bytes -> float32 values (flat): numpy views for the common layouts, gguf's code for the rest."""
    fast = _NUMPY_DEQUANT.get(t.qtype)
    if fast is not None:
        return fast(np.asarray(data)).reshape(-1)
    block, type_size = GGML_QUANT_SIZES[t.qtype]
    rows = np.asarray(data).reshape(-1, type_size)
    return _gguf_dequantize(rows, t.qtype).reshape(-1)


# Layouts from ggml-common.h, read through numpy structured views (no per-block Python):
#   Q8_0: fp16 d, 32 x int8 q                -> d * q
#   Q4_0: fp16 d, 16 bytes of nibbles        -> d * (q - 8), low nibbles first
#   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles -> d * q + m, low nibbles first
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])


def _nibbles(s: np.ndarray) -> np.ndarray:
    qs = s["qs"]  # (N, 16) uint8
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (N, 32)


def _dequant_q8_0(b: np.ndarray) -> np.ndarray:
    s = b.view(_Q8_0)
    return s["qs"].astype(np.float32) * s["d"].astype(np.float32)[:, None]


def _dequant_q4_0(b: np.ndarray) -> np.ndarray:
    s = b.view(_Q4_0)
    return (_nibbles(s) - np.float32(8.0)) * s["d"].astype(np.float32)[:, None]


def _dequant_q4_1(b: np.ndarray) -> np.ndarray:
    s = b.view(_Q4_1)
    return _nibbles(s) * s["d"].astype(np.float32)[:, None] + s["m"].astype(np.float32)[:, None]


_NUMPY_DEQUANT = {
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
}
