"""GGUF reader: metadata, tensor directory, and dequantized tensors.

The header is parsed here with `struct` and numpy because `gguf.GGUFReader` spends about
5 s building Python objects for a 49k-token vocabulary; block dequantization is left to
llama.cpp's own `gguf` package. The file is untrusted input: every count, length and
offset is checked against limits and against the file's size before it is used.
This module knows nothing about architectures.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as _gguf_dequantize

from pellucid.errors import PellucidError

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
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
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

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor, read into memory of their own.

        Read, not mapped: a loaded model then never keeps the file's pages in its resident
        memory next to the tensors made from them (the map serves the header only).
        """
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

    def load_rows(self, name: str, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor, dequantized (rows are contiguous in the file)."""
        t = self.tensors[name]
        rows, cols = t.shape
        start, stop = max(0, start), min(rows, stop)
        block, type_size = GGML_QUANT_SIZES[t.qtype]
        row_bytes = cols // block * type_size
        part = TensorInfo(name, (stop - start, cols), t.qtype, t.offset + start * row_bytes, (stop - start) * row_bytes)
        return self._load_info(part, dtype)

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize one tensor to `dtype`, shaped rows-first like PyTorch."""
        if name not in self.tensors:
            raise PellucidError(f"{self.path}: tensor {name!r} is missing.")
        return self._load_info(self.tensors[name], dtype)

    def _load_info(self, t: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
        name = t.name
        if t.qtype not in SUPPORTED_TYPES:
            ok = ", ".join(sorted(x.name for x in SUPPORTED_TYPES))
            raise PellucidError(f"{self.path}: tensor {name!r} is stored as {t.qtype.name}, which pellucid cannot read. Supported: {ok}.")
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

    def blocks(self, name: str) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """A 2-D block-quantized tensor as integers and scales, exactly as stored; None for other types.

        ("q4", q, d, m): q (rows, cols) uint8 in 0..15, d and m (rows, cols / 32) float32,
        value = d * q + m (Q4_0, Q4_1, Q4_K). ("q8", q, d, None): q (rows, cols) int8,
        d (rows, cols / bs) float32 with bs 32 (Q8_0, Q5_0) or 16 (Q6_K), value = d * q.
        Every value equals the file's dequantized value bit for bit; no float matrix is built.
        """
        t = self.tensors.get(name)
        if t is None or len(t.shape) != 2 or t.qtype not in _BLOCK_READERS:
            return None
        rows, cols = t.shape
        kind, q, d, m = _BLOCK_READERS[t.qtype](self.raw(name))
        q = q.reshape(rows, cols)
        d = d.reshape(rows, -1)
        return kind, q, d, None if m is None else m.reshape(rows, -1)


def dequantize_blocks(data: np.ndarray, t: TensorInfo) -> np.ndarray:
    """Block-quantized bytes -> float32 values (flat)."""
    fast = _TORCH_DEQUANT.get(t.qtype)
    if fast is not None:
        return fast(np.asarray(data)).numpy()
    block, type_size = GGML_QUANT_SIZES[t.qtype]
    rows = np.asarray(data).reshape(-1, type_size)
    return _gguf_dequantize(rows, t.qtype).reshape(-1)


# The common layouts, read through numpy structured views (no per-block Python, no
# copies of misaligned slices); everything else goes through the gguf package.
# Layouts from ggml-common.h:
#   Q8_0: fp16 d, 32 x int8 q                -> d * q
#   Q4_0: fp16 d, 16 bytes of nibbles        -> d * (q - 8), low nibbles first
#   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles -> d * q + m, low nibbles first
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])


def _scale(s: np.ndarray, field: str) -> torch.Tensor:
    return torch.from_numpy(s[field].astype(np.float32))[:, None]  # (N, 1)


def _nibbles(s: np.ndarray) -> torch.Tensor:
    qs = torch.from_numpy(np.ascontiguousarray(s["qs"]))  # (N, 16) uint8
    q = torch.empty(qs.shape[0], 32, dtype=torch.float32)
    q[:, :16] = qs & 0x0F
    q[:, 16:] = qs >> 4
    return q


def _dequant_q8_0(b: np.ndarray) -> torch.Tensor:
    s = b.view(_Q8_0)
    q = torch.from_numpy(np.ascontiguousarray(s["qs"])).float()
    return q.mul_(_scale(s, "d")).reshape(-1)


def _dequant_q4_0(b: np.ndarray) -> torch.Tensor:
    s = b.view(_Q4_0)
    return _nibbles(s).sub_(8.0).mul_(_scale(s, "d")).reshape(-1)


def _dequant_q4_1(b: np.ndarray) -> torch.Tensor:
    s = b.view(_Q4_1)
    return _nibbles(s).mul_(_scale(s, "d")).add_(_scale(s, "m")).reshape(-1)


_TORCH_DEQUANT = {
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
}


# Integer readers: block bytes -> (kind, q, d, m) with q flat in element order.
# Layouts (ggml-common.h): Q5_0 = fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles
# (value d * (q - 16)); Q4_K = 256 values: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and
# mins for 8 sub-blocks of 32, 128 bytes of nibbles (each 64 values: 32 low, then 32 high);
# Q6_K = 256 values: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one
# per 16 values), fp16 d (value d * scale * (q - 32)).
_Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,))])
_Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (128,))])
_Q6_K = np.dtype([("ql", "u1", (128,)), ("qh", "u1", (64,)), ("scales", "i1", (16,)), ("d", "<f2")])


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).astype(np.float32))


def _int_q4_01(b: np.ndarray, with_min: bool):
    s = b.view(_Q4_1 if with_min else _Q4_0)
    qs = torch.from_numpy(np.ascontiguousarray(s["qs"]))  # (n, 16): element j low nibble, j + 16 high
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1)
    d = _f32(s["d"])
    return "q4", q, d, _f32(s["m"]) if with_min else -8.0 * d


def _int_q8_0(b: np.ndarray):
    s = b.view(_Q8_0)
    return "q8", torch.from_numpy(np.ascontiguousarray(s["qs"])), _f32(s["d"]), None


def _int_q5_0(b: np.ndarray):
    s = b.view(_Q5_0)
    qs = torch.from_numpy(np.ascontiguousarray(s["qs"])).to(torch.int16)  # (n, 16)
    qh = torch.from_numpy(s["qh"].astype(np.int64))[:, None]  # (n, 1)
    bit = (qh >> torch.arange(32)) & 1  # (n, 32): the fifth bit of element j
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1) | (bit << 4).to(torch.int16)
    return "q8", (q - 16).to(torch.int8), _f32(s["d"]), None


def _int_q4_k(b: np.ndarray):
    s = b.view(_Q4_K)
    n = s.shape[0]
    sc = torch.from_numpy(np.ascontiguousarray(s["scales"])).to(torch.int32)  # (n, 12)
    scale = torch.empty(n, 8, dtype=torch.int32)
    mins = torch.empty(n, 8, dtype=torch.int32)
    scale[:, :4], mins[:, :4] = sc[:, 0:4] & 63, sc[:, 4:8] & 63
    scale[:, 4:] = (sc[:, 8:12] & 0x0F) | ((sc[:, 0:4] >> 6) << 4)
    mins[:, 4:] = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    qs = torch.from_numpy(np.ascontiguousarray(s["qs"])).view(n, 4, 32)  # 4 chunks of 64 values
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(n, 256)  # chunk c: 32 low nibbles, then 32 high
    d, dmin = _f32(s["d"])[:, None], _f32(s["dmin"])[:, None]
    return "q4", q, d * scale.float(), -(dmin * mins.float())


def _int_q6_k(b: np.ndarray):
    s = b.view(_Q6_K)
    n = s.shape[0]
    ql = torch.from_numpy(np.ascontiguousarray(s["ql"])).view(n, 2, 2, 32).to(torch.int16)  # half, (l, l + 32)
    qh = torch.from_numpy(np.ascontiguousarray(s["qh"])).view(n, 2, 32).to(torch.int16)
    parts = [  # each half of 128 values: [0:32), [32:64), [64:96), [96:128)
        (ql[:, :, 0] & 0x0F) | ((qh & 3) << 4),
        (ql[:, :, 1] & 0x0F) | (((qh >> 2) & 3) << 4),
        (ql[:, :, 0] >> 4) | (((qh >> 4) & 3) << 4),
        (ql[:, :, 1] >> 4) | (((qh >> 6) & 3) << 4),
    ]
    q = torch.stack(parts, dim=2).reshape(n, 256) - 32
    scales = torch.from_numpy(np.ascontiguousarray(s["scales"])).float()  # (n, 16): one per 16 values
    return "q8", q.to(torch.int8), _f32(s["d"])[:, None] * scales, None


_BLOCK_READERS = {
    GGMLQuantizationType.Q4_0: lambda b: _int_q4_01(b, False),
    GGMLQuantizationType.Q4_1: lambda b: _int_q4_01(b, True),
    GGMLQuantizationType.Q4_K: _int_q4_k,
    GGMLQuantizationType.Q8_0: _int_q8_0,
    GGMLQuantizationType.Q5_0: _int_q5_0,
    GGMLQuantizationType.Q6_K: _int_q6_k,
}
