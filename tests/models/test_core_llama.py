"""The llama forward pass, the KV cache and the engine on tiny random models."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_hf_llama, write_llama_gguf

from pellucid.api import LLM
from pellucid.loading import load_model
from pellucid.sampling.params import SamplingParams


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request, tmp_path_factory):
    hf = tiny_hf_llama(seed=2, tied=request.param, rope_theta=500.0)
    path = write_llama_gguf(hf, tmp_path_factory.mktemp("llama") / "tiny.gguf")
    return hf, load_model(path, dtype="float32")


def test_logits_match_transformers(pair):
    hf, lm = pair
    torch.manual_seed(0)
    x = torch.randint(0, hf.config.vocab_size, (3, 17))
    with torch.no_grad():
        ref = hf(x).logits
        ours = lm.model(x)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_tied_embeddings(pair):
    hf, lm = pair
    assert lm.config.tied_embeddings == hf.config.tie_word_embeddings
    assert (lm.model.lm_head.weight is lm.model.embed.weight) == hf.config.tie_word_embeddings


def test_cached_decode_equals_full_recompute(pair):
    _, lm = pair
    llm = LLM(loaded=lm, max_batch=2, max_len=128)
    prompt = [5, 70, 80, 90, 100, 7]
    # Step the engine by hand and compare each step's logits with a full forward.
    from pellucid.engine.kv_cache import KVCache
    from pellucid.models.layers import ForwardContext

    cache = KVCache(lm.config, 2, 64, torch.float32)
    seq = list(prompt)
    with torch.no_grad():
        ctx = ForwardContext(torch.arange(len(seq))[None], cache, torch.tensor([1]), len(seq))
        step = lm.model(torch.tensor([seq]), ctx)[0, -1]
        for _ in range(10):
            full = lm.model(torch.tensor([seq]))[0, -1]
            assert (step - full).abs().max() < 1e-4
            tok = int(full.argmax())
            seq.append(tok)
            p = len(seq) - 1
            ctx = ForwardContext(torch.tensor([[p]]), cache, torch.tensor([1]), p + 1)
            step = lm.model(torch.tensor([[tok]]), ctx)[0, -1]
    # And the engine with and without the cache agrees on greedy tokens.
    no_cache = LLM(loaded=lm, max_batch=2, max_len=128, use_cache=False)
    a = llm.generate(prompt, temperature=0, max_tokens=12, ignore_eos=True)
    b = no_cache.generate(prompt, temperature=0, max_tokens=12, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12


def test_batched_generation_equals_one_at_a_time(pair):
    _, lm = pair
    llm = LLM(loaded=lm, max_batch=4, max_len=128)
    prompts = ["the cat", "in the end", "a", "there are the"]
    alone = [llm.generate(p, temperature=0, max_tokens=8, ignore_eos=True).token_ids for p in prompts]
    together = [c.token_ids for c in llm.generate(prompts, temperature=0, max_tokens=8, ignore_eos=True)]
    assert together == alone


def test_chunked_prefill_equals_whole_prefill(pair):
    _, lm = pair
    whole = LLM(loaded=lm, max_len=128)
    chunked = LLM(loaded=lm, max_len=128)
    chunked.engine.prefill_chunk = 3
    prompt = list(range(10, 40))
    assert whole.generate(prompt, temperature=0, max_tokens=6, ignore_eos=True).token_ids == \
        chunked.generate(prompt, temperature=0, max_tokens=6, ignore_eos=True).token_ids


def test_seeded_sampling_is_reproducible(pair):
    _, lm = pair
    llm = LLM(loaded=lm, max_len=128)
    p = SamplingParams(temperature=1.0, seed=123, max_tokens=10, ignore_eos=True)
    a = llm.generate("the", p).token_ids
    b = llm.generate("the", p).token_ids
    c = llm.generate("the", SamplingParams(temperature=1.0, seed=124, max_tokens=10, ignore_eos=True)).token_ids
    assert a == b and a != c


def test_finish_reasons(pair):
    _, lm = pair
    llm = LLM(loaded=lm, max_len=64)
    c = llm.generate("the", temperature=0, max_tokens=5, ignore_eos=True)
    assert c.finish_reason == "length" and c.completion_tokens == 5
    eos = lm.tokenizer.eos_id
    forced = llm.generate("the", temperature=0, max_tokens=5, logit_bias={eos: 100.0})
    assert forced.finish_reason == "stop" and forced.token_ids == [eos] and forced.text == ""


def test_context_overflow_is_a_clear_error(pair):
    from pellucid.errors import PellucidError

    _, lm = pair
    llm = LLM(loaded=lm, max_len=32)
    with pytest.raises(PellucidError, match=r"context window is 32 tokens; the prompt has 30 tokens and max_tokens asks for 10"):
        llm.generate(list(range(10, 40)), max_tokens=10)
    with pytest.raises(PellucidError, match="prompt has 40 tokens"):
        llm.generate(list(range(10, 50)), max_tokens=1)
