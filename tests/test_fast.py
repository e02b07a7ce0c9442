"""The fast decode step: the same logits and greedy tokens as the eager model, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from tiny import greedy, tiny_hf_llama, write_llama_gguf

from pellucid.engine.engine import Engine
from pellucid.engine.fast import FastDecoder, physical_cores, supports
from pellucid.engine.kv_cache import KVCache
from pellucid.models.layers import ForwardContext


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from pellucid.weights.load import load_model

    hf = tiny_hf_llama(seed=7, layers=2, d_model=64, heads=4, kv_heads=2, d_ff=128)
    return load_model(write_llama_gguf(hf, tmp_path_factory.mktemp("fast") / "tiny.gguf"), dtype="float32")


PROMPTS = [[5, 60, 61, 62, 70], [9, 8, 7], [100, 120, 140, 160, 180, 200, 220, 240, 250]]


def test_supports_llama_only(tiny_lm):
    assert supports(tiny_lm.model)
    assert not supports(torch.nn.Linear(2, 2))
    assert physical_cores() >= 1


@torch.inference_mode()
def test_step_matches_the_model_at_mixed_positions(tiny_lm):
    """Three sequences at different positions in one step: same logits, same cache writes."""
    m, cfg = tiny_lm.model, tiny_lm.config
    caches = [KVCache(cfg, 3, 32, torch.float32) for _ in range(2)]
    lens = [5, 3, 9]
    for cache in caches:
        for s, n in enumerate(lens):
            ids = torch.tensor([PROMPTS[s][:n]])
            m(ids, ForwardContext(torch.arange(n)[None], cache, torch.tensor([s]), n))
    tokens = torch.tensor([[11], [12], [13]])
    pos = torch.tensor(lens)[:, None]
    slots = torch.tensor([0, 1, 2])
    eager = m(tokens, ForwardContext(pos, caches[0], slots, max(lens) + 1), last_only=True)
    fast = FastDecoder(m, compile=False)(tokens, ForwardContext(pos, caches[1], slots, max(lens) + 1))
    assert fast.shape == eager.shape == (3, cfg.vocab_size)
    assert torch.allclose(fast, eager, atol=1e-4, rtol=1e-4)
    assert torch.allclose(caches[0].k, caches[1].k, atol=1e-5) and torch.allclose(caches[0].v, caches[1].v, atol=1e-5)


def test_uncompiled_step_gives_the_eager_greedy_tokens(tiny_lm):
    eager = greedy(Engine(tiny_lm, max_batch=3, max_len=64), PROMPTS, 24)
    eng = Engine(tiny_lm, max_batch=3, max_len=64)
    eng._decode_fn = FastDecoder(tiny_lm.model, compile=False)
    assert greedy(eng, PROMPTS, 24) == eager


@pytest.mark.slow
def test_compiled_step_gives_the_eager_greedy_tokens(tiny_lm, tmp_path, monkeypatch):
    """torch.compile (inductor, freezing, C++ wrapper): batch 1 and a dynamic batch of 3."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager = greedy(Engine(tiny_lm, max_batch=3, max_len=64), PROMPTS, 16)
    eng = Engine(tiny_lm, max_batch=3, max_len=64)
    fast = FastDecoder(tiny_lm.model, compile=True, max_autotune=False)
    eng._decode_fn = fast
    assert greedy(eng, PROMPTS[:1], 16) == eager[:1]
    assert greedy(eng, PROMPTS, 16) == eager
    assert set(fast.stats.compile_seconds) == {"b1", "bN"}


def test_fast_step_on_the_real_model(real_llm):
    """float32 weights: the fast step's greedy tokens are the eager model's."""
    ids = real_llm.tokenizer.encode("The three primary colours are")
    eager = greedy(real_llm.engine, [ids], 12)
    eng = Engine(real_llm.loaded, max_batch=1, max_len=64)
    eng._decode_fn = FastDecoder(real_llm.model, compile=False)
    assert greedy(eng, [ids], 12) == eager
