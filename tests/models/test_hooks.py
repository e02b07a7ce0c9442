"""Hook points on the real default model: reading changes nothing, replacing changes exactly
what a hand calculation says; run_with_cache and the ActivationCache views."""

from __future__ import annotations

import pytest
import torch

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model(real_lm):
    return real_lm.model


@pytest.fixture(scope="module")
def tokens(real_lm):
    return torch.tensor([real_lm.tokenizer.encode(PROMPT)])


@pytest.fixture(scope="module")
def base(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.fixture(scope="module")
def cache(model, tokens):
    return model.run_with_cache(tokens)


def test_hook_points_named_by_path(model):
    names = model.hook_points
    n = len(model.blocks)
    for i in (0, n - 1):
        for suffix in ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern",
                       "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_post", "hook_mlp_out",
                       "hook_resid_post"):  # fmt: skip
            assert f"blocks.{i}.{suffix}" in names
    assert "hook_embed" in names
    assert all(p.name == k for k, p in names.items())


def test_hooks_doing_nothing_give_bit_identical_logits(model, tokens, base):
    seen = []

    def noop(x, hook):
        seen.append(hook.name)

    with (
        torch.no_grad(),
        model.hooks([(lambda n: True, noop)]),
    ):  # every hook point, hook_pattern included
        hooked = model(tokens)
    assert len(set(seen)) == len(model.hook_points)
    assert torch.equal(hooked, base)
    assert not any(p.active for p in model.hook_points.values())  # detached on exit


def test_run_with_cache_records_everything_and_changes_nothing(cache, base, tokens):
    assert torch.equal(cache.logits, base)
    assert torch.equal(cache.tokens, tokens)
    T = tokens.shape[1]
    assert cache["blocks.3.attn.hook_pattern"].shape == (1, 9, T, T)
    assert cache["pattern", 3] is cache["blocks.3.attn.hook_pattern"]
    assert cache["z", 0].shape == (1, T, 9, 64)
    assert cache["post", 0].shape == (1, T, 1536)
    assert cache["resid_post", 29].shape == (1, T, 576)
    with pytest.raises(KeyError, match="not recorded"):
        cache["resid_post", 30]


def test_run_with_cache_subset(model, tokens):
    c = model.run_with_cache(tokens, ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_out"])
    assert sorted(c) == ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_out"]
    with pytest.raises(KeyError, match="no hook point"):
        model.run_with_cache(tokens, ["blocks.0.hook_nothing"])


def test_attention_rows_sum_to_one_and_are_causal(cache):
    for i in (0, 15, 29):
        p = cache["pattern", i][0]  # (H, T, T)
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[:2]), atol=1e-5)
        assert torch.all(p.triu(1) == 0)
        assert torch.all(p >= 0)


def test_residual_stream_adds_up(cache):
    n = cache.n_layers
    for i in (0, n - 1):
        assert torch.equal(cache["resid_mid", i], cache["resid_pre", i] + cache["attn_out", i])
        assert torch.equal(cache["resid_post", i], cache["resid_mid", i] + cache["mlp_out", i])
    parts, labels = cache.decompose_resid()
    assert labels[:3] == ["embed", "0_attn", "0_mlp"] and len(labels) == 1 + 2 * n
    final = cache["resid_post", n - 1]
    assert torch.allclose(parts.sum(0), final, rtol=1e-4, atol=1e-3 * final.abs().max())
    acc, labels = cache.accumulated_resid()
    assert labels[0] == "embed" and labels[-1] == str(n - 1) and acc.shape[0] == n + 1
    assert torch.equal(acc[0], cache["hook_embed"])


def test_logit_lens_last_stage_is_the_model_output(model, tokens, cache, base):
    lens, labels = cache.logit_lens(pos=None)
    assert lens.shape == (31, *base.shape)
    assert torch.equal(lens[-1], base)
    last, _ = cache.logit_lens()  # default: the last position, as the model's last_only forward
    with torch.no_grad():
        assert torch.equal(last[-1], model(tokens, last_only=True))
    assert torch.allclose(last[-1], base[:, -1], atol=1e-4)


def test_zeroing_last_mlp_out_removes_exactly_that_output(model, tokens, cache):
    n = len(model.blocks)
    zero = [(f"blocks.{n - 1}.hook_mlp_out", lambda x, hook: torch.zeros_like(x))]
    ablated = model.run_with_cache(tokens, [f"blocks.{n - 1}.hook_resid_post"], hooks=zero)
    # the final residual loses exactly the MLP's output: it is the stream before the MLP
    assert torch.equal(ablated["resid_post", n - 1], cache["resid_mid", n - 1])
    diff = cache["resid_post", n - 1] - ablated["resid_post", n - 1]
    assert torch.allclose(diff, cache["mlp_out", n - 1], atol=1e-4)
    with torch.no_grad():
        expected = model.unembed(model.norm(cache["resid_mid", n - 1]))
    assert torch.equal(ablated.logits, expected)


def test_scaling_one_head_changes_attn_out_by_hand_computation(model, tokens, cache):
    layer, head, alpha = 7, 4, 3.0

    def scale(z, hook):
        z = z.clone()
        z[:, :, head] *= alpha  # (B, T, H, D)
        return z

    hooked = model.run_with_cache(
        tokens, [f"blocks.{layer}.hook_attn_out"], hooks=[(f"blocks.{layer}.attn.hook_z", scale)]
    )
    D = model.cfg.head_dim
    wo = model.blocks[layer].attn.o_proj.weight[:, head * D : (head + 1) * D]  # (E, D)
    expected = cache["attn_out", layer] + (alpha - 1) * cache["z", layer][:, :, head] @ wo.T
    assert torch.allclose(hooked["attn_out", layer], expected, atol=1e-4)
    assert not torch.allclose(hooked.logits, cache.logits, atol=1e-3)


def test_replacing_a_pattern_gives_the_hand_computed_head_output(model, tokens, cache):
    layer, head = 5, 2

    def attend_to_first(p, hook):
        p = p.clone()
        p[:, head] = 0.0
        p[:, head, :, 0] = 1.0  # (B, H, T, L): every query reads position 0 only
        return p

    hooked = model.run_with_cache(
        tokens,
        [f"blocks.{layer}.attn.hook_z"],
        hooks=[(f"blocks.{layer}.attn.hook_pattern", attend_to_first)],
    )
    kv = head // (model.cfg.n_heads // model.cfg.n_kv_heads)
    v0 = cache["v", layer][:, 0, kv]  # (B, D) value of the first token for this head's KV group
    z = hooked["z", layer][:, :, head]  # (B, T, D)
    assert torch.allclose(z, v0[:, None].expand_as(z), atol=1e-5)
    other = [h for h in range(model.cfg.n_heads) if h != head]
    assert torch.allclose(
        hooked["z", layer][:, :, other], cache["z", layer][:, :, other], atol=1e-5
    )


def test_in_place_edit_of_the_pattern_is_seen(model, tokens, base):
    def halve(p, hook):
        p.mul_(0.5)  # in place, returns None

    with torch.no_grad(), model.hooks([("blocks.2.attn.hook_pattern", halve)]):
        edited = model(tokens)
    assert (edited - base).abs().max() > 1e-3


def test_hooks_detach_after_an_error(model, tokens):
    def boom(x, hook):
        raise RuntimeError("boom")

    with (
        pytest.raises(RuntimeError, match="boom"),
        torch.no_grad(),
        model.hooks([("blocks.0.hook_mlp_out", boom)]),
    ):
        model(tokens)
    assert not model.hook_points["blocks.0.hook_mlp_out"].active


def test_replacement_of_the_wrong_shape_is_refused(model, tokens):
    with pytest.raises(AssertionError, match="hook_mlp_out"), torch.no_grad():
        with model.hooks([("blocks.0.hook_mlp_out", lambda x, hook: x[:, :1])]):
            model(tokens)
