"""pellucid's own CPU kernels: the C++ sources, their build, the ISA they run and their ops.

- blocks.cpp: matmuls and row lookups on GGUF's block formats (Q4_0, Q4_1, Q5_0, Q8_0,
  Q4_K, Q6_K) read where they lie, in the memory-mapped file; one path per ISA (AVX2,
  AVX-512, AVX-512 VNNI), chosen once when the library loads.
- ops.cpp: the fused decode ops (norms, rotary + cache write + attention, gated MLP).

torch's weight-only CPU kernels are written for AVX-512 bfloat16; these quantize the
float32 activations to int16 per block (32 values, or a K-quant's super-block of 256) and
sum exact integer dot products against the file's own blocks, so a quantized model reads each weight byte once per step and its
results do not depend on the batch.

Built once per machine and torch version with torch.utils.cpp_extension (g++ and ninja)
into $PELLUCID_HOME/kernels/, then loaded in a few milliseconds. Where they cannot be
built or the CPU lacks AVX2 and FMA, `available()` is False and the layers use torch's
kernels. PELLUCID_CPU_KERNELS=0 turns them off; PELLUCID_ISA=avx2|avx512 forces a lower
path than the CPU's.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("pellucid")

HERE = Path(__file__).parent
# extension name -> source; each is built into its own folder named by its source's hash
EXTENSIONS = {"pellucid_blocks": HERE / "blocks.cpp", "pellucid_ops": HERE / "ops.cpp"}
# AVX2 + FMA is the baseline; AVX-512 / VNNI code is compiled per function (target
# pragmas) and chosen at run time from the CPU found. No FMA contraction: every sum is
# written in one order, so a row's result never depends on the code path around it.
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]

# ggml's type ids for the formats the kernels read (gguf.GGMLQuantizationType's values)
F32, F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 8, 12, 14, 30
BLOCK_TYPES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q8_0: "Q8_0", Q4_K: "Q4_K", Q6_K: "Q6_K"}
ROW_TYPES = {**BLOCK_TYPES, F32: "F32", F16: "F16", BF16: "BF16"}  # block_rows reads these too
A8 = 256  # added to a type in block_mm's types: 8-bit activations (as llama.cpp), not the default 16
# (values per block, bytes per block)
BLOCK_SIZES = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22),
               Q8_0: (32, 34), Q4_K: (256, 144), Q6_K: (256, 210)}  # fmt: skip


def row_bytes(qtype: int, k: int) -> int:
    block, size = BLOCK_SIZES[qtype]
    return k // block * size


def _cpu_ok() -> bool:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return False
    return cap in ("AVX2", "AVX512")


def build_dir(name: str, source: Path) -> Path:
    from pellucid.registry import home

    tag = hashlib.sha256(source.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode()).hexdigest()[:12]
    d = home() / "kernels" / f"{name}-{tag}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@functools.cache
def available() -> bool:
    """True once the kernels are built and loaded (building them the first time, ~1 min)."""
    if os.environ.get("PELLUCID_CPU_KERNELS", "1") == "0" or not _cpu_ok():
        return False
    try:
        _load()
    except Exception as e:  # noqa: BLE001  (no compiler, no ninja, a build error: torch's kernels remain)
        log.warning("pellucid CPU kernels unavailable, using torch's: %s", str(e).splitlines()[0] if str(e) else e)
        return False
    return True


_loaded: set[str] = set()


def _load() -> None:
    for name, source in EXTENSIONS.items():
        if name in _loaded:
            continue
        d = build_dir(name, source)
        so = d / f"{name}.so"
        if not so.exists():
            from rich.console import Console
            from torch.utils import cpp_extension

            with Console(stderr=True).status(f"building pellucid's CPU kernels: {source.name} (once per machine, ~1 min)"):
                cpp_extension.load(
                    name=name, sources=[str(source)], build_directory=str(d), is_python_module=False,
                    extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False,
                )  # fmt: skip
        else:
            torch.ops.load_library(str(so))
        _loaded.add(name)
    _register_fakes()


def _register_fakes() -> None:
    @torch.library.register_fake("pellucid::block_mm")
    def _(x, ws, types, bias=None, out_index=None):
        return x.new_empty((x.shape[0], sum(w.shape[0] for w in ws)), dtype=torch.float32)


def isa() -> str:
    """The path the block kernels take here: "avx512_vnni", "avx512" or "avx2" ("" without the kernels)."""
    return torch.ops.pellucid.cpu_isa() if available() else ""


def dequantize(data: torch.Tensor, qtype: int, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a block-format matrix (all, or `rows`) as float32, each value ggml's dequantized value bit for bit."""
    if rows is None:
        rows = torch.arange(data.shape[0])
    return torch.ops.pellucid.block_rows(data, qtype, k, rows)
