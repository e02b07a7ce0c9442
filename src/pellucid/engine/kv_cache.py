"""Preallocated key/value cache, written by index, that remembers what its free slots hold.

One tensor each for keys and values, (layers, S slots, K heads, max_len, D). A request
owns one slot for its lifetime; its token at position p lives at [:, slot, :, p].
Memory per token position: 2 x layers x K x D x bytes per element.

A released slot keeps its keys and values, and `held[slot]` records the token ids they
belong to, so a later request whose prompt starts with those tokens can take the slot
and skip computing them (the prefix cache; the engine does the matching). Free slots are
handed out least recently used first, slots that hold nothing before any.
"""

from __future__ import annotations

import sys

import torch

from pellucid.models.layers import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.cfg = cfg
        shape = (cfg.n_layers, n_slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = _zeros(shape, dtype, device)
        self.v = _zeros(shape, dtype, device)
        self.n_slots, self.max_len = n_slots, max_len
        self.k_layers, self.v_layers = list(self.k.unbind(0)), list(self.v.unbind(0))  # (S, K, max_len, D) each
        self.free = list(range(n_slots))  # least recently released first
        self.held: dict[int, list[int]] = {}  # free slot -> the token ids its positions 0.. still hold
        self.held_key: dict[int, bytes | None] = {}  # free slot -> the steering they were computed under

    @property
    def bytes_per_token(self) -> int:
        return self.cfg.kv_bytes_per_token(self.k.element_size())

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def allocate(self) -> int:
        """A free slot, one that holds nothing if there is one, else the least recently released."""
        if not self.free:
            raise RuntimeError("no free KV-cache slot")
        empty = next((s for s in self.free if s not in self.held), None)
        return self.take(self.free[0] if empty is None else empty)

    def take(self, slot: int) -> int:
        """Allocate this free slot (its positions still hold `held[slot]` until overwritten)."""
        self.free.remove(slot)
        self.held.pop(slot, None)
        self.held_key.pop(slot, None)
        return slot

    def release(self, slot: int, tokens: list[int] | None = None, key: bytes | None = None) -> None:
        """Free `slot`; `tokens`: the ids whose keys and values its positions 0.. hold, kept for reuse
        by a request steered the same way (`key`: pellucid.steering.Steer.key, None: unsteered)."""
        assert slot not in self.free, f"slot {slot} released twice"
        self.free.append(slot)
        if tokens:
            self.held[slot] = tokens
            self.held_key[slot] = key

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Positions 0..n-1 of slot `src` into slot `dst`, every layer."""
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]

    @property
    def used_slots(self) -> int:
        return self.n_slots - len(self.free)

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


FRESH_PAGES = 64 << 20  # glibc serves a block this large from its own new mapping (its threshold is at most 32 MiB)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A zero tensor that costs memory only where it is written.

    On Linux CPU, a block of FRESH_PAGES or more comes from a new anonymous mapping, whose
    pages the kernel hands out zeroed on first touch: torch.empty is already all zeros and
    a cache of 4,096 positions stays out of the resident set until positions are written.
    Smaller blocks (and other devices) are zeroed explicitly.
    """
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type == "cpu" and nbytes >= FRESH_PAGES and sys.platform == "linux":
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)
