"""Every step of the sampler chain on hand-checkable numbers, plus property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pellucid.sampling import processors as P

NEG = float("-inf")


def logits_of(probs) -> torch.Tensor:
    return torch.log(torch.tensor([probs], dtype=torch.float32))  # (1, V)


def probs_of(logits: torch.Tensor) -> list[float]:
    return torch.softmax(logits, dim=-1)[0].tolist()


# -- hand-checkable cases -------------------------------------------------------------------
def test_top_k_3_of_four():
    out = P.apply_top_k(logits_of([0.1, 0.2, 0.3, 0.4]), torch.tensor([3]))
    assert probs_of(out) == pytest.approx([0.0, 2 / 9, 3 / 9, 4 / 9], abs=1e-6)  # 0.222, 0.333, 0.444
    assert out[0, 0] == NEG


def test_top_k_zero_and_large_k_are_off():
    x = logits_of([0.1, 0.2, 0.3, 0.4])
    assert torch.equal(P.apply_top_k(x, torch.tensor([0])), x)
    assert torch.equal(P.apply_top_k(x, torch.tensor([10])), x)


def test_top_k_per_row():
    x = torch.cat([logits_of([0.1, 0.2, 0.3, 0.4]), logits_of([0.4, 0.3, 0.2, 0.1])])
    out = P.apply_top_k(x, torch.tensor([1, 2]))
    assert torch.isfinite(out).tolist() == [[False, False, False, True], [True, True, False, False]]


def test_top_p_keeps_the_token_that_crosses():
    x = logits_of([0.1, 0.2, 0.3, 0.4])
    # 0.4 < 0.5, 0.4 + 0.3 = 0.7 >= 0.5: keep {0.4, 0.3} -> [0, 0, 3/7, 4/7]
    assert probs_of(P.apply_top_p(x, torch.tensor([0.5]))) == pytest.approx([0, 0, 3 / 7, 4 / 7], abs=1e-6)
    # reaching p exactly is enough: 0.4 + 0.3 = 0.7
    assert probs_of(P.apply_top_p(x, torch.tensor([0.7]))) == pytest.approx([0, 0, 3 / 7, 4 / 7], abs=1e-6)
    # a hair more needs the next token
    assert probs_of(P.apply_top_p(x, torch.tensor([0.71]))) == pytest.approx([0, 2 / 9, 3 / 9, 4 / 9], abs=1e-6)
    # p below the top probability keeps the top token alone
    assert probs_of(P.apply_top_p(x, torch.tensor([0.1]))) == pytest.approx([0, 0, 0, 1], abs=1e-6)
    assert torch.equal(P.apply_top_p(x, torch.tensor([1.0])), x)


def test_top_p_partial_width_equals_sort():
    torch.manual_seed(0)
    x = torch.randn(3, 1000) * 4
    p = torch.tensor([0.5, 0.9, 0.99])
    full = P.apply_top_p(x, p)
    width = P.nucleus_width(x, p)
    assert width < 1000
    assert torch.equal(P.apply_top_p(x, p, width), full)


def test_min_p_keeps_p_at_least_min_p_times_max():
    x = logits_of([0.1, 0.2, 0.3, 0.4])
    # threshold 0.5 * 0.4 = 0.2: keep 0.2 (equal), 0.3, 0.4 -> [0, 2/9, 3/9, 4/9]
    assert probs_of(P.apply_min_p(x, torch.tensor([0.5]))) == pytest.approx([0, 2 / 9, 3 / 9, 4 / 9], abs=1e-6)
    # threshold 0.8 * 0.4 = 0.32: keep 0.4 only
    assert probs_of(P.apply_min_p(x, torch.tensor([0.8]))) == pytest.approx([0, 0, 0, 1], abs=1e-6)
    assert torch.equal(P.apply_min_p(x, torch.tensor([0.0])), x)


def test_temperature_scales_logits():
    x = logits_of([0.1, 0.2, 0.3, 0.4])
    out = P.apply_temperature(x, torch.tensor([0.5]))
    expected = np.array([0.1, 0.2, 0.3, 0.4]) ** 2  # p^(1/T), renormalised
    assert probs_of(out) == pytest.approx((expected / expected.sum()).tolist(), abs=1e-6)
    hot = P.apply_temperature(x, torch.tensor([1e6]))
    assert probs_of(hot) == pytest.approx([0.25] * 4, abs=1e-5)


def test_greedy_is_argmax():
    assert P.greedy(torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0]])).tolist() == [1, 0]


def test_logit_bias_adds_and_bans():
    x = torch.zeros(2, 4)
    out = P.apply_logit_bias(x, torch.tensor([0, 0, 1]), torch.tensor([1, 2, 3]), torch.tensor([5.0, -100.0, -99.0]))
    assert out.tolist() == [[0.0, 5.0, NEG, 0.0], [0.0, 0.0, 0.0, -99.0]]
    assert x.eq(0).all()  # the input is not changed


def test_penalties_equal_the_openai_formula():
    # constructed counts: token 1 generated 3 times, token 2 once, token 0 never
    x = torch.tensor([[2.0, 1.5, -0.5, 0.25]])
    counts = {1: 3, 2: 1}
    f, pres = 0.5, 0.3
    out = P.apply_frequency_presence(
        x, torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([3.0, 1.0]),
        torch.tensor([f, f]), torch.tensor([pres, pres]),
    )  # fmt: skip
    expected = [v - counts.get(j, 0) * f - (counts.get(j, 0) > 0) * pres for j, v in enumerate(x[0].tolist())]
    assert out[0].tolist() == pytest.approx(expected)
    assert expected == pytest.approx([2.0, 1.5 - 1.5 - 0.3, -0.5 - 0.5 - 0.3, 0.25])


def test_negative_penalties_encourage():
    out = P.apply_frequency_presence(torch.zeros(1, 3), torch.tensor([0]), torch.tensor([2]), torch.tensor([2.0]),
                                     torch.tensor([-1.0]), torch.tensor([-0.5]))  # fmt: skip
    assert out.tolist() == [[0.0, 0.0, 2.5]]


def test_repetition_penalty_divides_positive_multiplies_negative():
    x = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    out = P.apply_repetition_penalty(x, torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([2.0, 2.0]))
    assert out.tolist() == [[1.0, -4.0, 3.0, -1.0]]  # unseen tokens 2 and 3 untouched


def test_mask_and_bans():
    x = torch.zeros(1, 4)
    assert P.apply_mask(x, torch.tensor([[True, False, True, False]])).tolist() == [[0.0, NEG, 0.0, NEG]]
    assert P.apply_bans(x, torch.tensor([0]), torch.tensor([3])).tolist() == [[0.0, 0.0, 0.0, NEG]]


def test_draw_inverse_cdf():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]] * 5)
    u = torch.tensor([0.0, 0.099, 0.1, 0.69, 0.9999999])
    assert P.draw(probs, u).tolist() == [0, 0, 2, 2, 3]
    # unnormalised weights work the same; a zero-probability token is never drawn
    assert P.draw(probs * 7, u).tolist() == [0, 0, 2, 2, 3]


# -- properties of the filters -----------------------------------------------------------------
logit_rows = st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=2, max_size=40, unique=True)


def _check_distribution(filtered: torch.Tensor, original: torch.Tensor) -> np.ndarray:
    probs = torch.softmax(filtered, dim=-1)[0].double().numpy()
    assert np.isfinite(probs).all() and (probs >= 0).all()
    assert probs.sum() == pytest.approx(1.0, abs=1e-5)  # a distribution
    assert int(original[0].argmax()) in np.flatnonzero(np.isfinite(filtered[0].numpy()))  # argmax survives
    assert (probs[~np.isfinite(filtered[0].numpy())] == 0).all()  # nothing outside the kept set has mass
    return probs


@settings(max_examples=150, deadline=None)
@given(logit_rows, st.integers(1, 50))
def test_top_k_property(row, k):
    x = torch.tensor([row])
    out = P.apply_top_k(x, torch.tensor([k]))
    _check_distribution(out, x)
    kept = np.flatnonzero(np.isfinite(out[0].numpy()))
    assert len(kept) == min(k, len(row))
    assert min(row[i] for i in kept) >= max((row[i] for i in range(len(row)) if i not in kept), default=-math.inf)


@settings(max_examples=150, deadline=None)
@given(logit_rows, st.floats(0.01, 1.0))
def test_top_p_property(row, p):
    x = torch.tensor([row])
    out = P.apply_top_p(x, torch.tensor([p]))
    _check_distribution(out, x)
    full = torch.softmax(x, dim=-1)[0].double().numpy()
    kept = np.isfinite(out[0].numpy())
    mass = full[kept].sum()
    assert mass >= p - 1e-5 or kept.all()  # reaches p
    assert mass - full[kept].min() < p + 1e-5  # and is the smallest such set
    assert full[kept].min() >= full[~kept].max(initial=0)  # the most likely ones


@settings(max_examples=150, deadline=None)
@given(logit_rows, st.floats(0.0, 1.0))
def test_min_p_property(row, min_p):
    x = torch.tensor([row])
    out = P.apply_min_p(x, torch.tensor([min_p]))
    _check_distribution(out, x)
    full = torch.softmax(x, dim=-1)[0].double().numpy()
    kept = np.isfinite(out[0].numpy())
    assert (full[kept] >= min_p * full.max() * (1 - 1e-5)).all()
    assert (full[~kept] < min_p * full.max() * (1 + 1e-5)).all()


@settings(max_examples=100, deadline=None)
@given(logit_rows, st.integers(0, 50), st.floats(0.01, 1.0), st.floats(0.0, 1.0), st.floats(0.05, 5.0))
def test_filters_chained_property(row, k, p, min_p, t):
    x = torch.tensor([row])
    out = P.apply_min_p(P.apply_top_p(P.apply_top_k(P.apply_temperature(x, torch.tensor([t])), torch.tensor([k])),
                                      torch.tensor([p])), torch.tensor([min_p]))  # fmt: skip
    _check_distribution(out, x)


def test_typical_p_keeps_the_tokens_nearest_the_entropy():
    """Probabilities 0.4, 0.3, 0.2, 0.1: entropy 1.2799 nats; surprisals 0.916, 1.204, 1.609,
    2.303 are 0.364, 0.076, 0.330, 1.023 from it, so the order is 0.3, 0.2, 0.4, 0.1."""
    x = logits_of([0.4, 0.3, 0.2, 0.1])
    kept = lambda p: [i for i, v in enumerate(P.apply_typical_p(x, torch.tensor([p]))[0].tolist()) if v > NEG]  # noqa: E731
    assert kept(0.25) == [1]  # the most typical alone reaches 0.25
    assert kept(0.5) == [1, 2]  # 0.3 then 0.2 reach 0.5
    assert kept(0.75) == [0, 1, 2]
    assert kept(1.0) == [0, 1, 2, 3]  # 1 = off


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9, 0.95])
def test_typical_p_equals_transformers(mass):
    """The same kept set as transformers' TypicalLogitsWarper on random rows (no ties)."""
    tf = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(int(mass * 100))
    for scale in (0.5, 1.0, 3.0):
        x = torch.randn(8, 300) * scale
        ours = P.apply_typical_p(x, torch.full((8,), mass)) > NEG
        ref = tf.TypicalLogitsWarper(mass=mass)(None, x.clone()) > NEG
        assert torch.equal(ours, ref)
