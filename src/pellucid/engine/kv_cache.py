"""The key/value cache: one pool of memory under a budget, that requests draw from as they grow.

One tensor each for keys and values, (layers, S slots, K heads, max_len, D). A request
owns one slot for its lifetime; its token at position p lives at [:, slot, :, p]. Memory
per token position: 2 x layers x K x D x bytes per element.

Every slot can reach the whole context window, yet memory is spent only on the positions
written. On Linux CPU the tensors are one reserved mapping (address space, no memory):
the kernel gives a page memory when it is first written, and `trim` gives a slot's pages
back (madvise). The operating system's page table is the block table, as in vAttention
(Prabhu et al., 2024): the attention kernel reads each slot's positions in one run, as
before, while memory is handed out in pages of a few positions, as vLLM's paged cache and
llama.cpp's unified cache hand it out in blocks. `extent[slot]` counts the positions a slot
may hold memory for; their sum stays within `budget` tokens (the engine reserves before a
step writes, and frees or preempts when the pool is full). Elsewhere (CUDA, other systems)
the tensors are allocated whole and the engine sizes them to the budget.

A released slot may keep its keys and values: `held[slot]` records the token ids they
belong to, so a later request whose prompt starts with those tokens can take the slot and
skip computing them (the prefix cache; the engine does the matching). Held positions count
against the budget and, together, against `held_limit`; the least recently released go
first when room is needed.
"""

from __future__ import annotations

import mmap
import sys

import torch

from pellucid.models.layers import ModelConfig

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python 3.11's mmap module lacks the name


class KVCache:
    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu", *, budget: int | None = None, held_limit: int | None = None,
                 lazy: bool | None = None):  # fmt: skip
        """budget: tokens of memory all slots together may hold (None: n_slots x max_len);
        held_limit: of those, tokens kept in released slots for reuse (None: the budget);
        lazy: memory on demand (None: where the device allows it, lazy_memory)."""
        self.cfg = cfg
        self.shape = (cfg.n_layers, n_slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.lazy = lazy_memory(device) if lazy is None else lazy and lazy_memory(device)
        self.k, self._k_map = _tensor(self.shape, dtype, device, self.lazy)
        self.v, self._v_map = _tensor(self.shape, dtype, device, self.lazy)
        self.n_slots, self.max_len = n_slots, max_len
        self.budget = n_slots * max_len if budget is None else budget
        self.held_limit = self.budget if held_limit is None else min(held_limit, self.budget)
        self.k_layers, self.v_layers = list(self.k.unbind(0)), list(self.v.unbind(0))  # (S, K, max_len, D) each
        self.free = list(range(n_slots))  # least recently released first
        self.held: dict[int, list[int]] = {}  # free slot -> the token ids its positions 0.. still hold
        self.held_key: dict[int, bytes | None] = {}  # free slot -> the steering they were computed under
        self.extent = [0] * n_slots  # positions 0.. of each slot that may hold memory
        self.used = 0  # sum of extent: tokens of the budget drawn
        self.held_tokens = 0  # of those, in released slots

    @property
    def bytes_per_token(self) -> int:
        return self.cfg.kv_bytes_per_token(self.k.element_size())

    @property
    def nbytes(self) -> int:
        """Memory the cache holds: what its slots have drawn (lazy), else the whole tensors."""
        if self.lazy:
            return self.used * self.bytes_per_token
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def room(self) -> int:
        """Tokens a running request could still draw, released slots' positions given back first."""
        return self.budget - self.used + self.held_tokens

    # -- slots -----------------------------------------------------------------------------
    def allocate(self) -> int:
        """A free slot, one that holds nothing if there is one, else the least recently released."""
        if not self.free:
            raise RuntimeError("no free KV-cache slot")
        empty = next((s for s in self.free if s not in self.held), None)
        return self.take(self.free[0] if empty is None else empty, 0)

    def take(self, slot: int, keep: int) -> int:
        """Allocate this free slot, its positions 0..keep-1 kept (they hold `held[slot]`'s first tokens)."""
        self.free.remove(slot)
        self._unhold(slot)
        self.trim(slot, keep)
        return slot

    def release(self, slot: int, tokens: list[int] | None = None, key: bytes | None = None) -> None:
        """Free `slot`; `tokens`: the ids whose keys and values its positions 0.. hold, kept for reuse
        by a request steered the same way (`key`: pellucid.steering.Steer.key, None: unsteered)."""
        assert slot not in self.free, f"slot {slot} released twice"
        self.free.append(slot)
        tokens = tokens[: self.held_limit] if tokens else None
        self.trim(slot, len(tokens) if tokens else 0)
        if not tokens:
            return
        self.held[slot], self.held_key[slot] = tokens, key
        self.held_tokens += len(tokens)
        while self.held_tokens > self.held_limit:
            self.evict()

    def evict(self) -> bool:
        """Give back the memory of the least recently released slot that holds tokens. False: none does."""
        slot = next((s for s in self.free if s in self.held), None)
        if slot is None:
            return False
        self._unhold(slot)
        self.trim(slot, 0)
        return True

    def _unhold(self, slot: int) -> None:
        self.held_tokens -= len(self.held.pop(slot, ()))
        self.held_key.pop(slot, None)

    @property
    def used_slots(self) -> int:
        return self.n_slots - len(self.free)

    # -- memory ----------------------------------------------------------------------------
    def reserve(self, slot: int, end: int) -> bool:
        """Let `slot` hold positions 0..end-1, released slots' memory given back as needed.
        False (nothing changed but those give-backs): the budget has no room for it."""
        need = end - self.extent[slot]
        if need <= 0:
            return True
        while self.used + need > self.budget:
            if not self.evict():
                return False
        self.extent[slot] = end
        self.used += need
        return True

    def trim(self, slot: int, n: int) -> None:
        """Positions n.. of `slot` give their memory back (lazy: to the system, in whole pages)."""
        have = self.extent[slot]
        if n >= have:
            return
        if self.lazy:
            L, S, K, M, D = self.shape
            row = D * self.k.element_size()  # bytes per position
            page = mmap.PAGESIZE
            for mapping in (self._k_map, self._v_map):
                for layer in range(L):
                    for head in range(K):
                        base = ((layer * S + slot) * K + head) * M * row
                        lo = -(-(base + n * row) // page) * page  # whole pages only: never a kept position's,
                        hi = -(-(base + have * row) // page) * page  # nor the next row's
                        if hi > base + M * row:
                            hi = (base + M * row) // page * page
                        if hi > lo:
                            mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        self.extent[slot] = n
        self.used -= have - n

    def copy_prefix(self, src: int, dst: int, n: int) -> bool:
        """Positions 0..n-1 of slot `src` into slot `dst`, every layer. False: no room for them."""
        if not self.reserve(dst, n):
            return False
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        return True

    def update(self, layer: int, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Write k, v (B, T, K, D) at `pos` (B, T) of `slots` (B,); return (B, K, kv_len, D) views."""
        kc, vc = self.k[layer], self.v[layer]  # (S, K, max_len, D)
        kc[slots[:, None], :, pos] = k.to(kc.dtype)
        vc[slots[:, None], :, pos] = v.to(vc.dtype)
        if slots.shape[0] == 1:
            s = slots[0]
            return kc[s, :, :kv_len].unsqueeze(0), vc[s, :, :kv_len].unsqueeze(0)
        return kc[slots, :, :kv_len], vc[slots, :, :kv_len]


def cache_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model's keys and values are cached in: its parameters' float type, else bfloat16."""
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16


def lazy_memory(device: str | torch.device) -> bool:
    """Whether a cache on `device` spends memory only on the pages written (Linux CPU)."""
    return torch.device(device).type == "cpu" and sys.platform == "linux"


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, device, lazy: bool) -> tuple[torch.Tensor, mmap.mmap | None]:
    """A zero tensor: lazy, a view of a reserved anonymous mapping (its pages are zero until
    written, and count against no commit limit); else allocated and zeroed whole."""
    if not lazy:
        return torch.zeros(shape, dtype=dtype, device=device), None
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    mapping = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    # Pages of 4 KiB, not 2 MiB transparent huge pages: a huge page would give one short
    # request's (layer, head) row 2 MiB at its first write.
    try:
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    except OSError:  # a kernel without transparent huge pages has none to refuse
        pass
    t = torch.frombuffer(mapping, dtype=dtype, count=torch.Size(shape).numel()) if nbytes else torch.empty(0, dtype=dtype)
    return t.view(shape), mapping
