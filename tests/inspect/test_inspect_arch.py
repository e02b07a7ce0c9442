"""The internals tools on every architecture, with tiny random checkpoints written by
transformers: hooks change nothing when idle, the lens ends at the model's own output,
attention is causal (and windowed where the model slides), the weights table counts
every parameter."""

from __future__ import annotations

import pytest
import torch
from tiny_hf import save_hf, tiny_gemma3, tiny_gpt2, tiny_mistral, tiny_qwen2

from pellucid.inspect.attention import attention_patterns
from pellucid.inspect.logit_lens import lens_report
from pellucid.inspect.weights_table import weights_report
from pellucid.loading import load_model

BUILDERS = {
    "gpt2": lambda: tiny_gpt2(seed=1),
    "qwen2": lambda: tiny_qwen2(seed=2),
    "mistral": lambda: tiny_mistral(seed=4, window=4),
    "gemma3": lambda: tiny_gemma3(seed=5, window=4),
}
IDS = [5, 40, 41, 42, 77, 90, 91, 100, 120, 130]


@pytest.fixture(scope="module", params=list(BUILDERS))
def lm(request, tmp_path_factory):
    folder = save_hf(BUILDERS[request.param](), tmp_path_factory.mktemp(request.param))
    return load_model(folder, dtype="float32")


def test_idle_and_reading_hooks_change_nothing(lm):
    x = torch.tensor([IDS])
    with torch.no_grad():
        base = lm.model(x)
        with lm.model.hooks([(lambda n: True, lambda t, h: None)]):
            hooked = lm.model(x)
    assert torch.equal(hooked, base)
    cache = lm.model.run_with_cache(x)
    assert torch.equal(cache.logits, base)
    lens, _ = cache.logit_lens(pos=None)
    assert torch.equal(lens[-1], base)
    parts, _ = cache.decompose_resid()
    final = cache["resid_post", len(lm.model.blocks) - 1]
    assert torch.allclose(parts.sum(0), final, atol=1e-4 * final.abs().max())


def test_lens_and_attention(lm):
    r = lens_report(lm, IDS, k=3)
    with torch.no_grad():
        probs = torch.softmax(lm.model(torch.tensor([IDS]))[0], dim=-1)
    assert torch.equal(r.top_probs[-1], probs.topk(3, dim=-1).values)
    assert len(r.labels) == len(lm.model.blocks) + 1
    a = attention_patterns(lm, IDS)
    T = len(IDS)
    assert torch.allclose(a.patterns.sum(-1), torch.ones(a.patterns.shape[:3]), atol=1e-5)
    assert torch.all(a.patterns.triu(1) == 0)
    for i, block in enumerate(lm.model.blocks):
        window = block.attn.window
        if window is not None:  # sliding layers see only the last `window` positions
            far = torch.ones(T, T, dtype=torch.bool).tril(-window)
            assert torch.all(a.patterns[i][:, far] == 0)


def test_weights_table_counts_every_parameter(lm):
    r = weights_report(lm)
    assert r.total_params == sum(p.numel() for p in lm.model.parameters())
    assert sum(g.params for g in r.groups()) == r.total_params
    sections = {g.section for g in r.groups()}
    assert {"token embeddings", "layers", "final norm", "output layer"} <= sections
    assert "other" not in sections
    comps = {row.component for row in r.rows if row.section == "layers"}
    assert {"Wq", "Wk", "Wv", "Wo", "W_up", "W_down"} <= comps
    if lm.config.arch == "gpt2":
        assert "position embeddings" in sections and r.arch.positions == "learned"
