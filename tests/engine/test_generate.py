"""The one-page generation loop gives the Engine's tokens on the real default model."""

from __future__ import annotations

import itertools

import torch
from tiny import greedy

from pellucid.engine.generate import generate_step
from pellucid.engine.kv_cache import KVCache
from pellucid.sampling.params import SamplingParams
from pellucid.sampling.sampler import SequenceSampler


def test_generate_step_equals_the_engine(real_llm):
    ids = real_llm.tokenizer.encode("The three primary colours are")
    want = greedy(real_llm.engine, [ids], 16)[0]
    cache = KVCache(real_llm.config, 1, 64, torch.float32)
    sampler = SequenceSampler(SamplingParams(temperature=0.0), vocab_size=real_llm.config.vocab_size, prompt_ids=ids)
    got = list(itertools.islice(generate_step(real_llm.model, ids, sampler, cache, prefill_chunk=4), 16))
    assert got == want
    assert "red" in real_llm.tokenizer.decode(got).lower() or "blue" in real_llm.tokenizer.decode(got).lower()


def test_generate_step_stops_when_the_cache_is_full(real_llm):
    ids = real_llm.tokenizer.encode("Count: 1, 2, 3,")
    cache = KVCache(real_llm.config, 1, len(ids) + 3, torch.float32)
    sampler = SequenceSampler(SamplingParams(temperature=0.0), vocab_size=real_llm.config.vocab_size, prompt_ids=ids)
    assert len(list(generate_step(real_llm.model, ids, sampler, cache))) == 4  # positions len(ids)..len(ids)+2, and the last token
