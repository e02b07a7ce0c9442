"""KV cache: memory per token, and recompute-everything mode equal to the cached one."""

from __future__ import annotations

import pytest
import torch
from tiny import greedy, tiny_hf_llama, write_llama_gguf

from pellucid.engine.engine import Engine
from pellucid.engine.kv_cache import KVCache


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from pellucid.loading import load_model

    hf = tiny_hf_llama(seed=5, layers=3, d_model=64, heads=4, kv_heads=2, d_ff=128)
    return load_model(write_llama_gguf(hf, tmp_path_factory.mktemp("kv") / "tiny.gguf"), dtype="float32")


@pytest.mark.parametrize(("dtype", "nbytes"), [(torch.bfloat16, 2), (torch.float32, 4)])
def test_bytes_per_token_is_2_layers_kvheads_headdim_bytes(tiny_lm, dtype, nbytes):
    cfg = tiny_lm.config
    cache = KVCache(cfg, n_slots=2, max_len=32, dtype=dtype)
    assert cache.bytes_per_token == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * nbytes == 2 * 3 * 2 * 16 * nbytes
    assert cache.nbytes == (0 if cache.lazy else cache.bytes_per_token * 2 * 32)  # lazy: only what slots drew
    assert cache.reserve(0, 32) and cache.reserve(1, 32) and cache.nbytes == cache.bytes_per_token * 2 * 32


def test_real_model_kv_bytes_per_token(real_path):
    from pellucid.loading import gguf_architecture
    from pellucid.weights.gguf import GGUFFile

    _, cfg = gguf_architecture(GGUFFile(real_path))
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims, bfloat16: 22.5 KiB per token
    assert KVCache(cfg, 1, 8, torch.bfloat16).bytes_per_token == 2 * 30 * 3 * 64 * 2 == 23040
    assert cfg.kv_bytes_per_token(2) == 23040


def test_no_kv_cache_gives_the_cached_greedy_tokens(tiny_lm):
    prompts = [[5, 60, 61, 62, 70], [9, 8, 7], [100, 120, 140, 160, 180, 200, 220]]
    cached = greedy(Engine(tiny_lm, max_batch=3, max_len=64), prompts, 20)
    recomputed = greedy(Engine(tiny_lm, max_batch=3, max_len=64, use_cache=False), prompts, 20)
    assert Engine(tiny_lm, use_cache=False).cache is None
    assert cached == recomputed


def test_no_kv_cache_on_the_real_model(real_llm):
    ids = real_llm.tokenizer.encode("The three primary colours are")
    cached = greedy(real_llm.engine, [ids], 8)
    recomputed = greedy(Engine(real_llm.loaded, max_batch=1, max_len=64, use_cache=False), [ids], 8)
    assert cached == recomputed
