"""Drafters: prompt lookup (n-grams of the context) and a draft model over the same vocabulary."""

from __future__ import annotations

import copy
import dataclasses
from typing import Protocol

import torch
from torch import nn

from pellucid.engine.kv_cache import KVCache, cache_dtype
from pellucid.engine.speculative.rule import Draft, DraftChain
from pellucid.errors import PellucidError
from pellucid.models.layers import ForwardContext
from pellucid.runtime import ENGINE

# -- drafters -------------------------------------------------------------------------------


class Drafter(Protocol):
    name: str

    def begin(self, prompt_ids: list[int], capacity: int) -> None:
        """A new request starts with these prompt ids and may reach `capacity` positions."""

    def propose(self, ids: list[int], k: int, chain: DraftChain) -> Draft:
        """Up to k tokens that might follow ids (the prompt and the output so far)."""


class NgramDrafter:
    """Prompt lookup: find the context's last n-gram earlier in the prompt + output (the
    longest n first, the latest occurrence) and propose the tokens that followed it.

    When the target replaced a drafted token (a fixed typo, a changed word) the context's
    last n-gram is often new; before falling back to a 1-gram the drafter then resumes
    copying just after the replaced token (a one-token substitution), or just after the
    replacement itself when it appears a few tokens further on in the source (a deletion).
    """

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise PellucidError(f"n-gram sizes must satisfy 1 <= min ({min_ngram}) <= max ({max_ngram})", param="ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.begin([])

    def begin(self, prompt_ids: list[int], capacity: int = 0) -> None:
        # index[n][n-gram] = position of the token that followed its latest occurrence
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(self.max_ngram + 1)]
        self._ids: list[int] = []
        self._last: tuple[int, int, bool] | None = None  # (copied from, context length then, a confident copy)

    def _extend(self, ids: list[int]) -> None:
        if len(ids) < len(self._ids) or (self._ids and ids[len(self._ids) - 1] != self._ids[-1]):
            self.begin([])  # not a continuation of what we indexed: start over
        start = len(self._ids)
        for end in range(max(start, 1), len(ids)):  # ids[end] follows the n-grams ending before it
            for n in range(1, min(self.max_ngram, end) + 1):
                self._index[n][tuple(ids[end - n : end])] = end
        self._ids = list(ids)

    def _resume(self, ids: list[int]) -> int | None:
        """Where the last copy continues: past the accepted tokens, and past one replaced token."""
        if self._last is None:
            return None
        src, at, confident = self._last
        a = 0
        while at + a < len(ids) and src + a < at and ids[at + a] == ids[src + a]:
            a += 1
        if a == 0 and not confident:  # a 1-gram guess that failed at once: nothing was being copied
            return None
        if at + a == len(ids):  # everything since matched the source: go on copying
            pos = src + a
        elif at + a + 1 == len(ids):  # the last token replaced the source's token at src + a
            pos = src + a + 1
            ahead = ids[src + a + 1 : min(src + a + 4, at)]  # ... or the target skipped ahead to it
            if ids[-1] in ahead:
                pos = src + a + 2 + ahead.index(ids[-1])
        else:
            return None
        return pos if pos < len(ids) else None

    def propose(self, ids: list[int], k: int, chain: DraftChain | None = None) -> Draft:
        self._extend(ids)
        resume = self._resume(ids)
        found, confident = None, False
        for n in range(min(self.max_ngram, len(ids)), self.min_ngram - 1, -1):
            if n == 1 and resume is not None:
                break
            found = self._index[n].get(tuple(ids[-n:]))
            if found is not None:
                confident = n > 1
                break
        if found is None and resume is not None:
            found, confident = resume, True
        self._last = (found, len(ids), confident) if found is not None else None
        return Draft(ids[found : found + k]) if found is not None else Draft([])


class ModelDrafter:
    """A draft model over the target's vocabulary, run autoregressively k steps a round.

    `model` is any callable tokens (1, T) -> logits (1, T, V'), V' >= the target's V. If it
    takes a ForwardContext and has a `cfg` (every pellucid model does), it gets its own
    one-slot KV cache and is fed only the tokens it has not seen; otherwise it recomputes
    the whole context each step.
    """

    name = "model"

    def __init__(self, model, *, vocab_size: int, max_len: int | None = None, prefill_chunk: int = ENGINE.prefill_chunk,
                 name: str = "model"):  # fmt: skip
        self.model = model.model if hasattr(model, "tokenizer") and hasattr(model, "model") else model
        self.vocab_size = vocab_size
        self.prefill_chunk = prefill_chunk
        self.name = name
        self.cfg = getattr(self.model, "cfg", None)
        self.max_len = max_len or getattr(self.cfg, "context_length", 0)  # (used only with a cache, which needs cfg)
        self.use_cache = isinstance(self.model, nn.Module) and self.cfg is not None and hasattr(self.cfg, "n_kv_heads")
        if self.cfg is not None and getattr(self.cfg, "vocab_size", vocab_size) < vocab_size:
            raise PellucidError(f"the draft model's vocabulary ({self.cfg.vocab_size}) is smaller than the target's "
                                f"({vocab_size}); a draft model must share the target's tokenizer", param="draft_model")  # fmt: skip
        self.cache: KVCache | None = None
        self._computed: list[int] = []  # ids whose keys/values are in the cache, in order
        self.forwards = 0

    def _device(self) -> torch.device:
        if isinstance(self.model, nn.Module):
            return next(self.model.parameters()).device
        return torch.device("cpu")

    def _ensure_cache(self, need: int) -> None:
        if self.cache is not None and self.cache.max_len >= need:
            return
        size = min(self.max_len, -(-need // 256) * 256)
        kv = cache_dtype(self.model)
        self.cache = KVCache(self.cfg, 1, size, kv, self._device())
        self._computed = []

    def begin(self, prompt_ids: list[int], capacity: int = 0) -> None:
        """Size the cache for the request and prefill it with all but the last prompt token."""
        self._computed = []
        if self.use_cache:
            self._ensure_cache(max(capacity, len(prompt_ids) + 1))
            if len(prompt_ids) > 1:
                self._feed(prompt_ids[:-1])

    def _feed(self, ids: list[int]) -> torch.Tensor:
        """Run the not yet computed part of ids through the cached model; last row's logits (V,)."""
        n = 0
        limit = min(len(self._computed), len(ids) - 1)
        while n < limit and self._computed[n] == ids[n]:
            n += 1
        self._computed = self._computed[:n]  # rollback: forget what the target rejected
        dev = self._device()
        logits = None
        while n < len(ids):
            chunk = ids[n : n + self.prefill_chunk]
            ctx = ForwardContext(input_pos=torch.arange(n, n + len(chunk), device=dev)[None], cache=self.cache,
                                 slots=torch.zeros(1, dtype=torch.long, device=dev), kv_len=n + len(chunk))  # fmt: skip
            logits = self.model(torch.tensor([chunk], device=dev), ctx, last_only=True)[0]  # (V',)
            self.forwards += 1
            self._computed += chunk
            n += len(chunk)
        return logits

    def propose(self, ids: list[int], k: int, chain: DraftChain) -> Draft:
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        if k <= 0:
            return Draft([])
        if self.use_cache:
            self._ensure_cache(len(ids) + k)
            if self.cache.max_len < len(ids) + k:
                k = self.cache.max_len - len(ids)
        dev = self._device()
        for _ in range(k):
            seq = ids + drafts
            if self.use_cache:
                logits = self._feed(seq)
            else:
                out = self.model(torch.tensor([seq], device=dev))
                self.forwards += 1
                logits = out[0, -1] if out.dim() == 3 else out[0]
            tok, q = chain.pick(logits[: self.vocab_size].float(), drafts)
            drafts.append(tok)
            if q is not None:
                qs.append(q)
        return Draft(drafts, torch.stack(qs) if qs else None)


def truncated(model: nn.Module, n_layers: int) -> nn.Module:
    """The same model running only its first n_layers blocks, sharing every weight: a draft
    model that costs no memory (early exit through the final norm and output head)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "cfg"):
        raise PellucidError("only pellucid decoder models (with .blocks and .cfg) can be truncated", param="draft_layers")
    if not 1 <= n_layers <= len(blocks):
        raise PellucidError(f"draft_layers = {n_layers} is out of range; allowed: 1..{len(blocks)}", param="draft_layers")
    d = copy.copy(model)
    d._modules = dict(model._modules)  # its own module table; the modules themselves are shared
    d.blocks = nn.ModuleList(list(blocks)[:n_layers])
    d.cfg = dataclasses.replace(model.cfg, n_layers=n_layers)
    return d
