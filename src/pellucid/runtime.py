"""The one place that decides defaults: format, activation dtype, threads, and which kernels run.

The Python API (`LLM`), every CLI command and `pellucid serve` load a model through these
defaults, so all three serve the same model in the same format unless told otherwise.
"""

from __future__ import annotations

import gc
import os
import threading
from dataclasses import dataclass

DEFAULT_QUANT = "auto"  # per model: the first of FORMAT_ORDER that passes the quality rule (resolve_quant)
DEFAULT_DTYPE = "auto"
FORMAT_ORDER = ("int4", "int8")  # fastest first; when none passes, float weights ("none")
# weight formats: quantized ones (pellucid.quantization) and float ones
QUANT_FORMATS = ("int8", "int4")
FLOAT_FORMATS = ("float32", "float16", "bfloat16")
FORMATS = FLOAT_FORMATS + QUANT_FORMATS



@dataclass(frozen=True)
class EngineConfig:
    """The engine's defaults, read by the Engine, `LLM`, the server's config, the serve flags
    and the YAML config alike (each may override a field; none writes its own number)."""

    max_batch: int = 4  # requests decoded together (KV-cache slots) for the Python API and one-shot commands
    serve_max_batch: int = 16  # the same for `pellucid serve`
    kv_memory_fraction: float = 0.25  # KV-cache budget when none is asked for: this share of the memory available at start
    prefill_chunk: int = 512  # prompt tokens per step while no request is generating
    step_tokens: int = 128  # tokens per step (generated + prompt) while some are
    prefix_cache_mib: int = 1024  # of the KV-cache budget, at most this for finished requests' keys and values kept for reuse
    max_waiting: int = 256  # the server's waiting requests beyond which new ones get 429

    def context(self, model_context: int, asked: int | None = None) -> int:
        """The context window served: the one asked for, else the model's."""
        return asked or model_context

    def kv_cache_mib(self, available: int | None = None) -> int:
        """The KV-cache budget when none is asked for: kv_memory_fraction of `available` bytes
        (default: the memory available now)."""
        avail = available_memory() if available is None else available
        return max(64, int(avail * self.kv_memory_fraction) >> 20)


ENGINE = EngineConfig()

# The server's event loop: asyncio's own, not uvloop (which uvicorn picks when installed).
# uvloop writes to the socket holding the GIL, so each streamed token's write stalls the
# engine thread's Python; asyncio's sock.send lets it go. Measured (benchmarks/server.py,
# SmolLM2, two alternating rounds, 2-core AVX-512 host, 2026-12-05): 1 client 142.5/168.0
# tok/s against uvloop's 132.7/155.4, 16 clients 481.2/501.3 against 413.0/417.9.
EVENT_LOOP = "asyncio"

# The quality rule: a quantized format is a model's default only if its mean KL from float32
# is no worse than llama.cpp's on the same file. Measured with `pellucid quantize-report MODEL
# --tokens 1024 --window 256 --peer-python ...` (BENCHMARKS.md); a model not listed gets int4.
MEASURED_KL: dict[str, dict[str, float]] = {
    "smollm2-135m-instruct": {"llama.cpp": 0.00426, "int4": 1.6e-7},
    "gemma3-270m": {"llama.cpp": 0.0187, "int4": 2.1e-7},
    "qwen2.5-coder-1.5b-instruct": {"llama.cpp": 0.0132, "int4": 6.8e-8},  # --tokens 4096 --window 512
}


def resolve_quant(quant: str | None, model: str) -> tuple[str | None, str]:
    """"auto" -> (the format for `model` by the quality rule, why it is not int4 or ""); "auto-a8" -> that
    format with 8-bit activations; other values unchanged ("none" -> None)."""
    if quant in (None, "", "none", "None"):
        return None, ""
    if quant == "auto-a8":  # the same choice, on 8-bit activations (quantized weights only)
        fmt, why = resolve_quant("auto", model)
        return (fmt and fmt + "-a8"), why
    if quant != "auto":
        return quant, ""
    kl = MEASURED_KL.get(str(model))
    if kl is None:
        return FORMAT_ORDER[0], ""
    for fmt in FORMAT_ORDER:
        if fmt in kl and kl[fmt] <= kl["llama.cpp"]:
            if fmt == FORMAT_ORDER[0]:
                return fmt, ""
            return fmt, (f"{model}: int4 fails the quality rule (mean KL {kl.get('int4')} from float32 > llama.cpp's "
                         f"{kl['llama.cpp']}); using {fmt}")  # fmt: skip
    return None, f"{model}: no quantized format passes the quality rule (llama.cpp's KL {kl['llama.cpp']}); using float weights"


def physical_cores() -> int:
    """CPU cores this process may use, counting each physical core once (SMT siblings share)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") as f:
            sib = f.read().strip()
        per_core = sum(len(range(int(a), int(b) + 1)) if "-" in part else 1
                       for part in sib.split(",") for a, _, b in [part.partition("-")])  # fmt: skip
    except (OSError, ValueError):
        per_core = 1
    return max(1, n // max(1, per_core))


def available_memory() -> int:
    """Bytes this process could still use: the system's MemAvailable, or its cgroup's room where less."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                room = int(limit) - int(g.read())
                avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 << 30
    return max(avail, 0)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split(":")[-1].split())
    except OSError:
        return set()


def native_bf16(device: str = "cpu") -> bool:
    """bfloat16 matrix arithmetic in hardware (AVX-512 BF16 / AMX on CPU; Ampere+ on CUDA)."""
    if device != "cpu":
        import torch  # runtime stays torch-free to import: weightless commands never load torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(dtype: str, quant: str | None, device: str = "cpu") -> str:
    """"auto" -> the activation dtype for this format on this device.

    Quantized on CPU: float32 (pellucid's kernels take float32 activations and quantize
    them per block themselves). Float formats: bfloat16 where the hardware computes it
    natively, else float32 (emulated bfloat16 is 2-5x slower than float32).
    """
    if dtype != "auto":
        return dtype
    if quant not in (None, "", "none") and device == "cpu":
        return "float32"
    return "bfloat16" if native_bf16(device) else "float32"


def kernels(device: str = "cpu", quant: str | None = None) -> str:
    """Which kernels a quantized model (of format `quant`) runs on here, in words (printed by bench and serve)."""
    if device != "cpu":
        return f"torch's kernels on {device}"
    from pellucid import kernels

    if not kernels.available():
        return "torch's kernels (pellucid's CPU kernels unavailable)"
    from pellucid.quantization.apply import activation_bits

    acts = f"int{activation_bits(quant)}"
    return f"pellucid CPU kernels ({kernels.isa()}, the file's blocks in place, {acts} activations per block)"


_helper = threading.local()


def helper_thread() -> None:
    """Keep this thread's torch ops on this thread: an OpenMP team of one.

    The server tokenizes and builds requests on worker threads while the engine thread runs
    the model. A worker that runs one parallel torch op keeps an OpenMP team alive for the
    life of the thread; with more OpenMP threads than cores libgomp stops spinning between
    parallel regions, and the engine's steps ran ~25% slower (1.5B decode: 30 vs 41 tok/s,
    measured). torch.set_num_threads is process-wide, so this sets the calling thread's own
    OpenMP thread count instead, once per thread.
    """
    if getattr(_helper, "done", False):
        return
    _helper.done = True
    import ctypes

    import torch

    torch.get_num_threads()  # torch's own per-thread setup first (it would reset what follows)
    if not os.path.exists("/proc/self/maps"):
        return
    with open("/proc/self/maps") as maps:
        lib = next((line.split()[-1] for line in maps if "libgomp" in line), None)
    if lib is not None:
        try:
            ctypes.CDLL(lib).omp_set_num_threads(1)
        except (OSError, AttributeError):
            pass


# -- a command's start-up --------------------------------------------------------------------
_GC_DEFAULT = gc.get_threshold()


def quick_start() -> None:
    """A command's start-up (torch's import, the model's load) makes a few hundred thousand
    objects that live until the process ends, and the cycle collector's passes over them
    cost about 0.4 s of a 2 s start; until `started()` it passes rarely."""
    gc.set_threshold(50_000, 20, 100)


def started() -> None:
    """Start-up is over: what it made leaves the collector's sight for good (gc.freeze: later
    collections, the exit's included, skip it; the exit alone was ~0.4 s with torch loaded),
    and collections run as usual again."""
    gc.freeze()
    gc.set_threshold(*_GC_DEFAULT)
