"""GPT-2, Qwen2, Mistral and Gemma 3 on tiny random checkpoints written by transformers:
logits, cached decode, the sliding window, parameter counts, hooks, and the engine."""

from __future__ import annotations

import pytest
import torch
from tiny_hf import save_hf, tiny_gemma3, tiny_gpt2, tiny_mistral, tiny_qwen2

from pellucid.api import LLM
from pellucid.engine.kv_cache import KVCache
from pellucid.loading import load_model
from pellucid.models.layers import ForwardContext

BUILDERS = {
    "gpt2": lambda: tiny_gpt2(seed=1),
    "qwen2": lambda: tiny_qwen2(seed=2),
    "qwen2-tied": lambda: tiny_qwen2(seed=3, tied=True),
    "mistral": lambda: tiny_mistral(seed=4, window=4),
    "gemma3": lambda: tiny_gemma3(seed=5, window=4),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request, tmp_path_factory):
    hf = BUILDERS[request.param]()
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, load_model(folder, dtype="float32")


def test_logits_match_transformers(pair):
    name, hf, lm = pair
    x = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(x).logits
        ours = lm.model(x)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-4, name
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_parameter_count_equals_transformers(pair):
    _, hf, lm = pair
    assert sum(p.numel() for p in lm.model.parameters()) == hf.num_parameters()


def test_format_and_storage(pair):
    _, hf, lm = pair
    assert lm.format == "hf"
    assert set(lm.storage.values()) == {"F32"}
    assert lm.config.tied_embeddings == bool(hf.config.tie_word_embeddings)


def test_cached_decode_equals_full_recompute(pair):
    """KV cache + ForwardContext, one token at a time past the sliding window, vs full forwards."""
    _, _, lm = pair
    cache = KVCache(lm.config, 2, 32, torch.float32)
    seq = [5, 70, 80, 90, 100]
    with torch.no_grad():
        ctx = ForwardContext(torch.arange(len(seq))[None], cache, torch.tensor([1]), len(seq))
        step = lm.model(torch.tensor([seq]), ctx)[0, -1]
        for _ in range(10):  # to 15 positions: well past a window of 4
            full = lm.model(torch.tensor([seq]))[0, -1]
            assert (step - full).abs().max() < 1e-4
            tok = int(full.argmax())
            seq.append(tok)
            p = len(seq) - 1
            ctx = ForwardContext(torch.tensor([[p]]), cache, torch.tensor([1]), p + 1)
            step = lm.model(torch.tensor([[tok]]), ctx)[0, -1]


def test_engine_with_and_without_cache_agree(pair):
    _, _, lm = pair
    prompt = [5, 70, 80, 90, 100, 7]
    a = LLM(loaded=lm, max_batch=2, max_len=48).generate(prompt, temperature=0, max_tokens=12, ignore_eos=True)
    b = LLM(loaded=lm, max_batch=2, max_len=48, use_cache=False).generate(prompt, temperature=0, max_tokens=12, ignore_eos=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12


def test_generate_and_chat_doors(pair):
    name, _, lm = pair
    llm = LLM(loaded=lm, max_batch=2, max_len=64)
    out = llm.generate(["the cat", "in the end"], temperature=0, max_tokens=5, ignore_eos=True)
    assert [len(c.token_ids) for c in out] == [5, 5]
    chat = llm.chat([{"role": "user", "content": "hi there"}], temperature=0, max_tokens=4, ignore_eos=True)
    assert len(chat.token_ids) == 4
    assert llm.render_chat([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_hook_points_and_lens_names(pair):
    _, _, lm = pair
    m = lm.model
    names = set(m.hook_points)
    for i in range(len(m.blocks)):
        for h in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
                  "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z", "mlp.hook_post"):  # fmt: skip
            assert f"blocks.{i}.{h}" in names
    x = torch.tensor([[5, 70, 80, 90, 100, 7, 9]])
    seen = {}
    with torch.no_grad(), m.hooks([("blocks.0.attn.hook_pattern", lambda p, h: seen.setdefault("p", p)),
                                   (f"blocks.{len(m.blocks) - 1}.hook_resid_post", lambda r, h: seen.setdefault("r", r))]):  # fmt: skip
        logits = m(x)
    assert torch.allclose(seen["p"].sum(-1), torch.ones(1))  # rows of probabilities
    assert torch.allclose(m.unembed(m.norm(seen["r"])), logits, atol=1e-5)  # the lens' last row is the model
    assert m.embed_tokens(x).shape == (1, 7, lm.config.d_model)


def test_explicit_attention_equals_fast_path(pair):
    """An attached pattern hook switches attention to the explicit path (windows included)."""
    _, _, lm = pair
    x = torch.tensor([[5, 70, 80, 90, 100, 7, 9, 11, 13, 40]])
    with torch.no_grad():
        fast = lm.model(x)
        with lm.model.hooks([(lambda n: n.endswith("hook_pattern"), lambda p, h: p * 1.0)]):
            slow = lm.model(x)
    assert (fast - slow).abs().max() < 1e-4


@pytest.fixture(scope="module")
def mistral_windows(tmp_path_factory):
    hf = tiny_mistral(seed=7, window=4)
    return hf, load_model(save_hf(hf, tmp_path_factory.mktemp("mistral-w")), dtype="float32")


def test_mistral_sliding_window_honoured_past_its_length(mistral_windows):
    hf, lm = mistral_windows
    assert lm.config.sliding_window == 4
    assert all(b.attn.window == 4 for b in lm.model.blocks)
    x = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(x).logits
        ours = lm.model(x)
        for b in lm.model.blocks:
            b.attn.window = None
        unwindowed = lm.model(x)
        for b in lm.model.blocks:
            b.attn.window = 4
    assert (ours - ref).abs().max() < 1e-4
    # the window matters: without it the first 4 positions agree and the later ones do not
    assert (unwindowed[:, :4] - ours[:, :4]).abs().max() < 1e-5
    assert (unwindowed[:, 4:] - ours[:, 4:]).abs().amax(-1).min() > 1e-3


def test_gemma3_layers_alternate_windows_and_rope_bases(tmp_path_factory):
    hf = tiny_gemma3(seed=8, window=4, layers=6)
    lm = load_model(save_hf(hf, tmp_path_factory.mktemp("gemma3-w")), dtype="float32")
    cfg = lm.config
    assert cfg.global_layers == (5,)
    assert [b.attn.window for b in lm.model.blocks] == [4, 4, 4, 4, 4, None]
    assert (cfg.rope_base, cfg.rope_local_base, cfg.query_pre_attn_scalar) == (100_000.0, 1_000.0, 24.0)
    x = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (lm.model(x) - hf(x).logits).abs().max() < 1e-4
