"""The sampler chain end to end: statistics of the draw, batching, seeds, logprobs, min_tokens,
the constraint hook. No model here (see test_sampling_real.py)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from pellucid.errors import PellucidError
from pellucid.sampling.params import SamplingParams
from pellucid.sampling.sampler import SequenceSampler, sample

# chi-square critical values at significance alpha = 0.001, by degrees of freedom
CHI2_CRIT_0_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}

PROBS = np.array([0.05, 0.08, 0.12, 0.2, 0.25, 0.3])  # distinct, so every filter is hand-checkable
LOGITS = torch.log(torch.tensor(PROBS, dtype=torch.float32))[None]  # (1, 6)


def draws(params: SamplingParams, n_rows: int = 2000, steps: int = 5) -> np.ndarray:
    """n_rows * steps draws: one batch of n_rows requests, each with its own seed."""
    seqs = [SequenceSampler(SamplingParams(**{**vars(params), "seed": 1000 + i}), vocab_size=6) for i in range(n_rows)]
    logits = LOGITS.expand(n_rows, 6)
    out = [sample(logits, seqs).tokens.numpy() for _ in range(steps)]
    return np.bincount(np.concatenate(out), minlength=6)


def expected(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The processed distribution, computed independently in float64."""
    q = PROBS ** (1 / temperature)
    q /= q.sum()
    order = np.argsort(-q)
    keep = np.ones(6, bool)
    if top_k:
        keep[order[top_k:]] = False
    q = np.where(keep, q, 0)
    q /= q.sum()
    if top_p < 1:
        mass, kept = 0.0, np.zeros(6, bool)
        for i in order:
            if mass >= top_p:
                break
            kept[i] = True
            mass += q[i]
        q = np.where(kept, q, 0)
        q /= q.sum()
    if min_p:
        q = np.where(q >= min_p * q.max(), q, 0)
        q /= q.sum()
    return q


def chi_square(counts: np.ndarray, q: np.ndarray) -> tuple[float, int]:
    kept = q > 0
    assert counts[~kept].sum() == 0, f"drew a removed token: {counts} vs {q}"
    n = counts.sum()
    stat = float((((counts[kept] - n * q[kept]) ** 2) / (n * q[kept])).sum())
    return stat, int(kept.sum()) - 1


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0),
        dict(temperature=0.5),
        dict(temperature=2.0),
        dict(top_k=3),
        dict(top_p=0.6),  # 0.3 + 0.25 = 0.55 < 0.6: keeps 0.3, 0.25, 0.2
        dict(min_p=0.5),  # p >= 0.15: keeps 0.2, 0.25, 0.3
        dict(temperature=0.7, top_k=5, top_p=0.8, min_p=0.2),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_draw_follows_the_processed_distribution(kw):
    """Chi-square goodness of fit, 10,000 seeded draws, significance 0.001."""
    counts = draws(SamplingParams(**kw))
    q = expected(**kw)
    stat, df = chi_square(counts, q)
    assert stat < CHI2_CRIT_0_001[df], (stat, df, counts.tolist(), (q * counts.sum()).round(1).tolist())


def test_expected_distribution_by_hand():
    assert expected(top_k=3) == pytest.approx([0, 0, 0, 0.2 / 0.75, 0.25 / 0.75, 0.3 / 0.75])
    assert expected(top_p=0.6) == pytest.approx([0, 0, 0, 0.2 / 0.75, 0.25 / 0.75, 0.3 / 0.75])
    assert expected(min_p=0.5) == pytest.approx([0, 0, 0, 0.2 / 0.75, 0.25 / 0.75, 0.3 / 0.75])


def test_greedy_ignores_the_generator_and_filters():
    seqs = [SequenceSampler(SamplingParams(temperature=0, top_k=2, seed=s), vocab_size=6) for s in range(3)]
    assert sample(LOGITS.expand(3, 6), seqs).tokens.tolist() == [5, 5, 5]


def test_same_seed_same_tokens_different_seed_different():
    def run(seed):
        s = SequenceSampler(SamplingParams(seed=seed), vocab_size=6)
        out = []
        for _ in range(30):
            t = int(sample(LOGITS, [s]).tokens[0])
            s.accept(t)
            out.append(t)
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_a_row_does_not_depend_on_the_other_rows():
    """Same seed and params: the same token whether alone or next to other requests."""
    torch.manual_seed(0)
    x = torch.randn(4, 300) * 2
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=42)
    alone = sample(x[2:3], [SequenceSampler(p, vocab_size=300)]).tokens.tolist()
    others = [SamplingParams(temperature=0), SamplingParams(top_k=5, seed=1), p, SamplingParams(seed=3, min_p=0.1)]
    together = sample(x, [SequenceSampler(q, vocab_size=300) for q in others]).tokens.tolist()
    assert together[2] == alone[0]
    assert together[0] == int(x[0].argmax())


def test_sorted_and_dense_paths_agree():
    """The candidates-only fast path draws exactly the tokens of the dense path."""
    rng = random.Random(0)
    torch.manual_seed(0)
    V = 400
    for trial in range(60):
        B = rng.randint(1, 4)
        x = torch.randn(B, V) * 3
        x[:, :20] = x[:, :20].round()  # ties, as bfloat16 logits have
        params = [SamplingParams(temperature=rng.choice([0.5, 1.0, 1.4]), top_k=rng.choice([0, 3, 20]),
                                 top_p=rng.choice([1.0, 0.9, 0.5]) if b else 0.8, min_p=rng.choice([0.0, 0.05]),
                                 typical_p=rng.choice([1.0, 1.0, 0.9, 0.3]), seed=trial * 10 + b, logprobs=True, processed_logprobs=True, top_logprobs=2)
                  for b in range(B)]  # fmt: skip
        a = sample(x, [SequenceSampler(p, vocab_size=V) for p in params], sorted_path=True)
        b = sample(x, [SequenceSampler(p, vocab_size=V) for p in params], sorted_path=False)
        assert torch.equal(a.tokens, b.tokens)
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_mixed_batch_each_row_its_own_params():
    x = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 3))
    seqs = [
        SequenceSampler(SamplingParams(temperature=0), vocab_size=4),
        SequenceSampler(SamplingParams(top_k=1, seed=0), vocab_size=4),
        SequenceSampler(SamplingParams(logit_bias={0: 100}, temperature=0), vocab_size=4),
    ]
    assert sample(x, seqs).tokens.tolist() == [3, 3, 0]


def test_logit_bias_ban_and_force():
    x = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    banned = SequenceSampler(SamplingParams(logit_bias={3: -100}, seed=0), vocab_size=4)
    forced = SequenceSampler(SamplingParams(logit_bias={0: 100}, seed=0), vocab_size=4)
    assert all(int(sample(x, [banned]).tokens[0]) != 3 for _ in range(300))
    assert all(int(sample(x, [forced]).tokens[0]) == 0 for _ in range(300))


def test_everything_banned_falls_back_to_the_raw_row():
    x = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    s = SequenceSampler(SamplingParams(temperature=0, logit_bias={i: -100 for i in range(4)}), vocab_size=4)
    assert sample(x, [s]).tokens.tolist() == [3]


def test_penalties_through_accept_equal_the_formula():
    V = 8
    x = torch.linspace(-2, 2, V)[None]  # (1, 8)
    p = SamplingParams(temperature=0, frequency_penalty=0.4, presence_penalty=0.3, repetition_penalty=1.5, seed=0)
    prompt = [0, 7]
    s = SequenceSampler(p, vocab_size=V, prompt_ids=prompt)
    generated = [5, 5, 2, 5]
    for t in generated:
        s.accept(t)
    seen: list[torch.Tensor] = []
    sample(x, [s], trace=lambda stage, y: seen.append(y) if stage == "penalties" else None)
    got = seen[0][0].tolist()
    counts = {5: 3, 2: 1}
    for j, v in enumerate(x[0].tolist()):
        if j in set(prompt) | set(generated):  # repetition: once per distinct token, prompt + output
            v = v / 1.5 if v > 0 else v * 1.5
        v -= counts.get(j, 0) * 0.4 + (counts.get(j, 0) > 0) * 0.3  # OpenAI: output only
        assert got[j] == pytest.approx(v, abs=1e-6), j


def test_min_tokens_bans_end_tokens_until_reached():
    x = torch.tensor([[5.0, 0.0, 0.0, 4.0]])  # token 0 is end-of-generation, token 3 a stop token id
    s = SequenceSampler(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3]), vocab_size=4, eog_ids={0})
    first = int(sample(x, [s]).tokens[0])
    s.accept(first)
    second = int(sample(x, [s]).tokens[0])
    s.accept(second)
    third = int(sample(x, [s]).tokens[0])
    assert (first, second, third) == (1, 1, 0)


def test_min_tokens_with_ignore_eos_bans_only_stop_token_ids():
    x = torch.tensor([[5.0, 0.0, 0.0, 4.0]])
    s = SequenceSampler(SamplingParams(temperature=0, min_tokens=2, ignore_eos=True), vocab_size=4, eog_ids={0})
    assert int(sample(x, [s]).tokens[0]) == 0


class OnlyEven:
    """A constraint that allows even token ids, and records what it was told."""

    def __init__(self, V):
        self.V = V
        self.accepted = []

    def allowed_mask(self):
        return torch.arange(self.V) % 2 == 0

    def accept(self, token):
        self.accepted.append(token)


class Unrestricted(OnlyEven):
    def allowed_mask(self):
        return None


def test_constraint_mask_and_accept():
    x = torch.tensor([[0.0, 9.0, 1.0, 8.0], [0.0, 9.0, 1.0, 8.0]])
    c = OnlyEven(4)
    seqs = [SequenceSampler(SamplingParams(temperature=0), vocab_size=4, constraint=c),
            SequenceSampler(SamplingParams(temperature=0), vocab_size=4, constraint=Unrestricted(4))]  # fmt: skip
    toks = sample(x, seqs).tokens.tolist()
    assert toks == [2, 1]
    seqs[0].accept(toks[0])
    assert c.accepted == [2]
    # sampling rows obey the mask too
    s = SequenceSampler(SamplingParams(seed=0), vocab_size=4, constraint=OnlyEven(4))
    assert all(int(sample(x[:1], [s]).tokens[0]) % 2 == 0 for _ in range(200))


def test_logprobs_raw_by_default_processed_on_request():
    x = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    raw = sample(x, [SequenceSampler(SamplingParams(top_k=2, seed=0, top_logprobs=3), vocab_size=4)])
    tok = int(raw.tokens[0])
    assert raw.logprobs[0].item() == pytest.approx(math.log([0.1, 0.2, 0.3, 0.4][tok]), abs=1e-6)
    assert raw.top_ids[0].tolist() == [3, 2, 1]
    assert raw.top_logprobs[0].tolist() == pytest.approx([math.log(0.4), math.log(0.3), math.log(0.2)], abs=1e-6)
    proc = sample(x, [SequenceSampler(SamplingParams(top_k=2, seed=0, top_logprobs=3, processed_logprobs=True), vocab_size=4)])
    assert proc.logprobs[0].item() == pytest.approx(math.log([0, 0, 3 / 7, 4 / 7][tok]), abs=1e-6)
    assert proc.top_logprobs[0].tolist()[:2] == pytest.approx([math.log(4 / 7), math.log(3 / 7)], abs=1e-6)
    assert proc.top_logprobs[0, 2].item() == -math.inf


def test_top_logprobs_width_is_the_batch_maximum():
    x = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 2))
    out = sample(x, [SequenceSampler(SamplingParams(temperature=0, top_logprobs=1), vocab_size=4),
                     SequenceSampler(SamplingParams(temperature=0, top_logprobs=3), vocab_size=4)])  # fmt: skip
    assert out.top_ids.shape == (2, 3)


def test_no_logprobs_unless_asked():
    out = sample(LOGITS, [SequenceSampler(SamplingParams(seed=0), vocab_size=6)])
    assert out.logprobs is None and out.top_ids is None


def test_trace_shows_every_stage_in_order():
    stages = []
    s = SequenceSampler(SamplingParams(top_k=3, seed=0), vocab_size=6)
    sample(LOGITS, [s], trace=lambda name, x: stages.append(name))
    assert stages == ["raw", "logit_bias", "penalties", "mask", "temperature", "top_k", "top_p", "min_p", "typical_p"]


def test_sequence_sampler_checks_token_ids_against_the_vocabulary():
    with pytest.raises(PellucidError, match="logit_bias token id 10 is not in the vocabulary"):
        SequenceSampler(SamplingParams(logit_bias={10: 1}), vocab_size=6)
    with pytest.raises(PellucidError, match="stop_token_ids entry 6"):
        SequenceSampler(SamplingParams(stop_token_ids=[6]), vocab_size=6)


def test_unseeded_requests_record_their_seed():
    a = SequenceSampler(SamplingParams(), vocab_size=6)
    b = SequenceSampler(SamplingParams(seed=a.seed), vocab_size=6)
    assert [a.uniform() for _ in range(3)] == [b.uniform() for _ in range(3)]


def test_min_tokens_yields_when_nothing_else_is_left():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    p = SamplingParams(temperature=0, min_tokens=3, logit_bias={1: -100, 2: -100, 3: -100})
    s = SequenceSampler(p, vocab_size=4, eog_ids={0})
    assert sample(x, [s]).tokens.tolist() == [0]


def test_trace_snapshots_each_stage():
    s = SequenceSampler(SamplingParams(temperature=0, logit_bias={1: 5}, presence_penalty=1.0, min_tokens=2),
                        vocab_size=6, eog_ids={0})  # fmt: skip
    s.accept(1)
    seen = {}
    sample(torch.zeros(1, 6), [s], trace=lambda name, x: seen.__setitem__(name, x[0].tolist()))
    assert seen["logit_bias"] == [0, 5, 0, 0, 0, 0]
    assert seen["penalties"] == [0, 4, 0, 0, 0, 0]
    assert seen["mask"] == [-math.inf, 4, 0, 0, 0, 0]


def test_bitmask_unpacking_reads_bit_i_of_word_w_as_token_32w_plus_i():
    from pellucid.sampling.constraints import unpack_bitmask

    bits = torch.randint(-(2**31), 2**31 - 1, (3, 5), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    got = unpack_bitmask(bits, 150)
    want = torch.tensor([[(int(bits[b, t // 32]) >> (t % 32)) & 1 for t in range(150)] for b in range(3)], dtype=torch.bool)
    assert got.shape == (3, 150) and torch.equal(got, want)
