"""pellucid's own CPU kernels, built on first use: quantized matmuls (cpu_kernels.cpp) and
the fused decode ops (cpu_ops.cpp: norms, rotary + cache write + attention, gated MLP).

torch's weight-only CPU kernels are written for AVX-512: on an AVX2 machine they run
float32 inputs 16-30x slower than bfloat16 ones and even the bfloat16 path widens each
weight through emulated bfloat16 arithmetic. These kernels widen int8 / 4-bit weights to
float32 in registers and run at close to the memory bandwidth for a decode step.

Built once per machine and torch version with torch.utils.cpp_extension (g++ and ninja)
into $PELLUCID_HOME/kernels/, then loaded in a few milliseconds. They register the ops
`torch.ops.pellucid.int8_mm` and `torch.ops.pellucid.int4_mm` (with fake versions, so
torch.compile sees through them). Where they cannot be built or the CPU lacks AVX2 and
FMA, `available()` is False and the layers use torch's kernels. PELLUCID_CPU_KERNELS=0
turns them off.
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
EXTENSIONS = {"pellucid_cpu_kernels": HERE / "cpu_kernels.cpp", "pellucid_cpu_ops": HERE / "cpu_ops.cpp"}
# AVX2 + FMA is the baseline; AVX-512 / VNNI / BF16 code is compiled per function
# (target attributes) and chosen at run time from the CPU found. No FMA contraction: every
# sum is written in one order, so a row's result never depends on the code path around it.
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]


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
    """True once the kernels are built and loaded (building them the first time, ~30 s)."""
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
        if name in _loaded or not source.exists():
            continue
        d = build_dir(name, source)
        so = d / f"{name}.so"
        if not so.exists():
            from rich.console import Console
            from torch.utils import cpp_extension

            with Console(stderr=True).status(f"building pellucid's CPU kernels: {source.name} (once per machine, ~30 s)"):
                cpp_extension.load(
                    name=name, sources=[str(source)], build_directory=str(d), is_python_module=False,
                    extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False,
                )  # fmt: skip
        else:
            torch.ops.load_library(str(so))
        _loaded.add(name)
    _register_fakes()


def _register_fakes() -> None:
    @torch.library.register_fake("pellucid::int8_mm")
    def _(x, w, scale):
        return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("pellucid::int4_mm")
    def _(x, qs, d, mn, group):
        return x.new_empty((x.shape[0], qs.shape[0]), dtype=torch.float32)
