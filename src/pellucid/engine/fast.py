"""The fast decode path: one compiled single-token step for llama-family models.

`FastDecoder(model, cache)` is a drop-in for the Engine's decode forward
(`tokens (B, 1), ctx -> logits (B, V)`). It runs the same weights as the eager model
(float or quantized linear layers) through a step written for torch.compile (inductor):

- attention over the cache written elementwise (q*K summed, softmax, p*V summed), so
  inductor fuses each layer's attention into one loop instead of bmm + transposes;
- the key length L is a dynamic dimension (one graph for every position; the mask hides
  cache rows past each sequence's position), the batch is 1 or dynamic (>= 2);
- inductor freezing (weights folded as constants), the C++ wrapper, max-autotune GEMM
  templates; no host sync inside the step;
- compiled lazily on first use (or by `warmup()`), with inductor's cache under
  $PELLUCID_HOME/inductor, so the second process compiles in seconds, not minutes.

Prefill stays eager: it is a few large GEMMs, which compilation barely speeds up.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pellucid.models.layers import ForwardContext


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


def set_threads(n: int | None = None) -> int:
    """Use `n` threads (default: the physical cores) for intra-op parallelism."""
    n = n or physical_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def inductor_cache_dir() -> str:
    """Persist compiled kernels across processes under $PELLUCID_HOME/inductor (set before compiling).

    A TORCHINDUCTOR_CACHE_DIR chosen by the user is kept; torch's own default (a folder in
    /tmp, which importing torch._dynamo writes into the environment) is replaced.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cur = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cur is None or os.path.abspath(cur) == os.path.abspath(default_cache_dir()):
        from pellucid.registry import home

        d = home() / "inductor"
        d.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(d)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def supports(model: nn.Module) -> bool:
    """The fast step is written for the llama block (norm, GQA with rotary, SwiGLU)."""
    from pellucid.models import llama

    return isinstance(model, llama.Llama) and all(type(b) is llama.Block for b in model.blocks)


def decode_step(model: nn.Module, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, kv_pos: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One token per sequence: tokens, pos, slots (B,); caches (layers, S, K, M, D); kv_pos = arange(L).

    Reads the cache, never writes it: each layer attends over the cached positions before
    `pos` plus its new key and value, which are returned for the caller to store, so the
    compiled graph has no mutation (a write inside it made inductor copy whole cache
    layers every step). Returns float32 logits (B, V), new keys and values (layers, B, K, D).
    """
    B = tokens.shape[0]
    x = model.embed(tokens)  # (B, E)
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]  # (B, D)
    before = kv_pos[None, :] < pos[:, None]  # (B, L): the cache rows written by earlier steps
    new_k, new_v = [], []
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        H, K, D = a.n_heads, a.n_kv_heads, a.head_dim
        G = H // K
        h = blk.attention_norm(x)
        q = a.q_proj(h).view(B, 1, H, D)
        k = a.k_proj(h).view(B, 1, K, D)
        v = a.v_proj(h).view(B, 1, K, D)
        q, k = a.qk_transform(q, k)
        q = _rope(q[:, 0], cos, sin)  # (B, H, D) float32
        k = _rope(k[:, 0], cos, sin).to(k_cache.dtype)  # (B, K, D), as stored
        v = v[:, 0].to(v_cache.dtype)
        new_k.append(k)
        new_v.append(v)
        keys = k_cache[i][slots, :, : kv_pos.shape[0]]  # (B, K, L, D)
        values = v_cache[i][slots, :, : kv_pos.shape[0]]  # (B, K, L, D)
        mask = before if a.window is None else before & (pos[:, None] - kv_pos[None, :] < a.window)
        qg = q.view(B, K, G, D).to(k_cache.dtype).float()  # as eager: q is rounded to the cache dtype
        old = (qg[:, :, :, None, :] * keys[:, :, None, :, :].float()).sum(-1) * a.scale  # (B, K, G, L)
        old = old.masked_fill(~mask[:, None, None, :], float("-inf"))
        own = (qg * k.float()[:, :, None, :]).sum(-1, keepdim=True) * a.scale  # (B, K, G, 1)
        p = torch.softmax(torch.cat([old, own], dim=-1), dim=-1)  # (B, K, G, L + 1)
        z = (p[..., :-1, None] * values[:, :, None, :, :].float()).sum(-2) + p[..., -1:] * v.float()[:, :, None, :]
        x = x + a.o_proj(z.reshape(B, H * D).to(x.dtype))  # z: (B, K, G, D)
        h = blk.mlp_norm(x)
        m = blk.mlp
        x = x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
    return model.lm_head(model.norm(x)).float(), torch.stack(new_k), torch.stack(new_v)  # (B, V), (layers, B, K, D)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, D), cos/sin (B, D) -> float32 (B, H, D), rotate-half layout."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return xf * cos[:, None, :] + rotated * sin[:, None, :]


@dataclass
class CompileStats:
    compile_seconds: dict[str, float] = field(default_factory=dict)  # graph -> seconds of its first call
    calls: int = 0


class FastDecoder:
    """The Engine's decode forward, compiled: `fast(tokens (B, 1), ctx) -> logits (B, V)`.

    Graphs: "b1" (batch 1) and "bN" (a dynamic batch >= 2), both with a dynamic key
    length. `warmup(cache)` compiles them now; `start_background(cache)` compiles them in
    a thread on a scratch cache of the same shape (never the live one) while decoding
    goes on eagerly, and swaps them in when ready.
    """

    def __init__(self, model: nn.Module, *, compile: bool = True, max_autotune: bool = False,
                 threads: int | None = None):  # fmt: skip
        if not supports(model):
            raise ValueError(f"the fast decode step supports llama-family models, not {type(model).__name__}")
        self.model = model
        self.compile = compile
        self.threads = set_threads(threads) if threads else torch.get_num_threads()  # torch defaults to the cores
        self.stats = CompileStats()
        self._arange: torch.Tensor | None = None
        self._fns: dict[str, object] = {}
        self._ready: set[str] = set()  # graphs compiled and run once
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # a failed background compile: decoding stays eager
        self._options = {"freezing": True, "cpp_wrapper": True}
        if max_autotune:
            self._options["max_autotune"] = True

    def _fn(self, key: str):
        fn = self._fns.get(key)
        if fn is None:
            if self.compile:
                inductor_cache_dir()
                options = dict(self._options)
                if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):  # guards on every module: ~2 ms a call
                    options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
                fn = torch.compile(decode_step, dynamic=False, fullgraph=True, options=options)
            else:
                fn = decode_step
            self._fns[key] = fn
        return fn

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, ctx: ForwardContext, *, last_only: bool = True) -> torch.Tensor:
        cache = ctx.cache
        assert cache is not None and tokens.shape[1] == 1, f"decode takes one token per row with a cache, got {tuple(tokens.shape)}"
        B = tokens.shape[0]
        key = "b1" if B == 1 else "bN"
        L = max(ctx.kv_len, 2)
        if L >= cache.max_len:  # the whole window: a slice that is no slice would need its own graph
            return self.model(tokens, ctx, last_only=True)
        if self._thread is not None and key not in self._ready:  # still compiling in the background
            return self.model(tokens, ctx, last_only=True)
        return self._run(key, tokens[:, 0], ctx.input_pos[:, 0], ctx.slots, cache.k, cache.v, L, cache.max_len)

    def _run(self, key: str, tok, pos, slots, k, v, L: int, max_len: int) -> torch.Tensor:
        if self._arange is None or self._arange.shape[0] != max_len or self._arange.device != tok.device:
            self._arange = torch.arange(max_len, device=tok.device)
        kv_pos = self._arange[:L]
        torch._dynamo.mark_dynamic(kv_pos, 0, min=2, max=max_len - 1)
        if key == "bN":  # torch 2.13 needs both bounds of a dynamic dim: at most every cache slot
            for t in (tok, pos, slots):
                torch._dynamo.mark_dynamic(t, 0, min=2, max=max(3, k.shape[1]))
        fn = self._fn(key)
        first = key not in self.stats.compile_seconds
        t0 = time.perf_counter() if first else 0.0
        logits, new_k, new_v = fn(self.model, tok, pos, slots, k, v, kv_pos)
        k[:, slots, :, pos] = new_k.transpose(0, 1)  # indexed (B, layers, K, D): each sequence's row `pos`
        v[:, slots, :, pos] = new_v.transpose(0, 1)
        if first:
            self.stats.compile_seconds[key] = time.perf_counter() - t0
        self._ready.add(key)
        self.stats.calls += 1
        return logits

    @torch.inference_mode()
    def warmup(self, cache, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Compile (or load from the disk cache) the graphs for these batch sizes; returns seconds.

        Runs on a scratch cache of the live one's shape and type (torch.empty: the few
        pages it touches are all it costs), so no live slot is ever written.
        """
        t0 = time.perf_counter()
        k = torch.empty_like(cache.k)
        v = torch.empty_like(cache.v)
        for key, B in (("b1", 1), ("bN", 2)):
            if not any((b == 1) == (key == "b1") for b in batch_sizes) or B > cache.k.shape[1] or key in self._ready:
                continue
            z = torch.zeros(B, dtype=torch.long, device=k.device)
            self._run(key, z, z, torch.arange(B, device=k.device), k, v, 2, cache.max_len)
        return time.perf_counter() - t0

    def start_background(self, cache, batch_sizes: tuple[int, ...] = (1, 2)) -> None:
        """Compile in a thread; until a graph is ready its batches decode with the eager model."""
        if not self.compile or self._thread is not None:
            return

        def work() -> None:
            try:
                self.warmup(cache, batch_sizes)
            except Exception as e:  # noqa: BLE001  (any compile failure leaves the eager path in place)
                self.error = e

        self._thread = threading.Thread(target=work, name="pellucid-compile", daemon=True)
        self._thread.start()

    def ensure_compiled(self, cache, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Wait for the background compile, or compile now; returns the seconds waited."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self.wait()
            if self.error is not None:
                raise RuntimeError(f"compiling the decode step failed: {self.error}") from self.error
        self.warmup(cache, batch_sizes)
        return time.perf_counter() - t0

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a background compile has finished; True if every graph is ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.error is None and bool(self._ready)
