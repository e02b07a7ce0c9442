"""The generation loop in one page: read this first.

`generate_step` runs one sequence: the prompt goes through the model in chunks, each
writing its keys and values into the KV cache, then every new token is fed back alone.
The model's forward takes a ForwardContext (which positions, which cache slot); the
sampler turns the last position's logits into a token. That is all of generation.

The batching Engine (engine/engine.py) runs these same pieces for many requests at
once: it schedules prefill chunks and one decode token per running request into each
step, and adds stop strings, detokenizing and finish reasons at the request's edge. Both
give the same greedy tokens (tests/engine/test_generate.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from pellucid.engine.kv_cache import KVCache
from pellucid.models.layers import ForwardContext
from pellucid.runtime import ENGINE
from pellucid.sampling.sampler import SequenceSampler, sample


@torch.inference_mode()
def generate_step(model: nn.Module, prompt_ids: list[int], sampler: SequenceSampler, cache: KVCache, *,
                  slot: int = 0, prefill_chunk: int = ENGINE.prefill_chunk) -> Iterator[int]:  # fmt: skip
    """Yield one token id at a time until the cache is full; the caller decides when to stop."""
    device = cache.k.device
    slots = torch.tensor([slot], device=device)
    logits = None
    for start in range(0, len(prompt_ids), prefill_chunk):  # prefill: the prompt, a chunk at a time
        chunk = prompt_ids[start : start + prefill_chunk]
        end = start + len(chunk)
        ctx = ForwardContext(torch.arange(start, end, device=device)[None], cache, slots, end)
        logits = model(torch.tensor([chunk], device=device), ctx, last_only=True)  # (1, V)
    pos = len(prompt_ids)
    while logits is not None:
        token = int(sample(logits, [sampler]).tokens[0])  # penalties, bias, constraint, then the draw
        sampler.accept(token)
        yield token
        if pos >= cache.max_len:
            return
        ctx = ForwardContext(torch.tensor([[pos]], device=device), cache, slots, pos + 1)
        logits = model(torch.tensor([[token]], device=device), ctx, last_only=True)  # decode: one token
        pos += 1
