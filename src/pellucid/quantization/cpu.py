"""pellucid's own CPU kernels for int8 and int4 weights (cpu_kernels.cpp), built on first use.

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

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


def _cpu_ok() -> bool:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        return False
    return cap in ("AVX2", "AVX512")


def build_dir() -> Path:
    from pellucid.registry import home

    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + torch.__version__.encode()).hexdigest()[:12]
    d = home() / "kernels" / f"cpu-{tag}"
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


def _load() -> None:
    if hasattr(torch.ops, "pellucid") and hasattr(torch.ops.pellucid, "int8_mm"):
        return
    d = build_dir()
    so = d / "pellucid_cpu_kernels.so"
    if not so.exists():
        from rich.console import Console
        from torch.utils import cpp_extension

        with Console(stderr=True).status("building pellucid's CPU kernels (once per machine, ~30 s)"):
            cpp_extension.load(
                name="pellucid_cpu_kernels", sources=[str(SOURCE)], build_directory=str(d), is_python_module=False,
                extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
            )  # fmt: skip
    else:
        torch.ops.load_library(str(so))
    _register_fakes()


def _register_fakes() -> None:
    @torch.library.register_fake("pellucid::int8_mm")
    def _(x, w, scale):
        return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("pellucid::int4_mm")
    def _(x, qs, d, mn, group):
        return x.new_empty((x.shape[0], qs.shape[0]), dtype=torch.float32)
