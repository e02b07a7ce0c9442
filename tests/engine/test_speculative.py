"""Speculative decoding on tiny random llamas and synthetic distributions.

Greedy: token for token the target's own greedy output. Sampling: the rejection rule
keeps the target's distribution, checked exactly on the acceptance step and with a
seeded chi-square test (significance 0.001) on the first tokens of whole generations.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pellucid.engine.request import Request
from pellucid.engine.speculative import (
    Draft,
    ModelDrafter,
    NgramDrafter,
    SpeculativeConfig,
    SpeculativeDecoder,
    accept_reject,
    apply_chain,
    truncated,
)
from pellucid.engine.speculative.rule import forks
from pellucid.errors import PellucidError
from pellucid.models.llama import Llama, LlamaConfig
from pellucid.sampling.params import SamplingParams
from pellucid.sampling.sampler import SequenceSampler

ALPHA = 0.001


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, busy machine OpenMP's
    waiting threads make each small op far slower: run these tests on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- helpers ----------------------------------------------------------------------------------


def tiny(seed: int, vocab: int = 8, layers: int = 2) -> SimpleNamespace:
    """A random llama (no tokenizer): enough for the decoding loop."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(arch="llama", vocab_size=vocab, d_model=16, n_layers=layers, n_heads=2, n_kv_heads=1,
                      head_dim=8, d_ff=32, context_length=64)  # fmt: skip
    model = Llama(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # sharper distributions than the default init
    return SimpleNamespace(model=model, tokenizer=None, config=cfg)


def request(prompt: list[int], vocab: int, **kw) -> Request:
    p = SamplingParams(**kw)
    r = Request(prompt, p, SequenceSampler(p, vocab_size=vocab, prompt_ids=prompt), None)
    r.max_len = 64
    return r


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding with full recomputation (no cache): the ground truth."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def chi2_sf(x: float, df: int) -> float:
    """P(chi2_df > x): the regularized upper incomplete gamma Q(df/2, x/2)."""
    a, z = df / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    if z < a + 1:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        n = a
        while abs(term) > 1e-15 * abs(total):
            n += 1
            term *= z / n
            total += term
        return max(0.0, 1.0 - total * math.exp(-z + a * math.log(z) - math.lgamma(a)))
    # continued fraction for Q (modified Lentz)
    tiny_ = 1e-300
    b = z + 1 - a
    c, d = 1 / tiny_, 1 / b
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny_ if abs(d) < tiny_ else d
        c = b + an / c
        c = tiny_ if abs(c) < tiny_ else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(-z + a * math.log(z) - math.lgamma(a)) * h


def chi_square(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic of observed counts against probabilities; cells with an expected
    count under 5 are pooled into one. Returns (statistic, degrees of freedom)."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for key, p in probs.items():
        e, o = p * n, counts.get(key, 0)
        if e < 5:
            pooled_obs += o
            pooled_exp += e
            continue
        stat += (o - e) ** 2 / e
        cells += 1
    unexpected = sum(v for k, v in counts.items() if k not in probs)
    assert unexpected == 0, "drew a sequence the target gives probability 0"
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    return stat, cells - 1


def test_chi2_sf_matches_known_values():
    # textbook critical values: P(chi2_1 > 3.841) = 0.05, P(chi2_10 > 23.209) = 0.01, P(chi2_30 > 59.703) = 0.001
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, abs=2e-4)
    assert chi2_sf(23.209, 10) == pytest.approx(0.01, abs=1e-4)
    assert chi2_sf(59.703, 30) == pytest.approx(0.001, abs=1e-5)
    assert chi2_sf(2.0, 2) == pytest.approx(math.exp(-1.0))


# -- the acceptance step alone ---------------------------------------------------------------


def _uniform(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda: float(torch.rand((), generator=g))


def test_accept_reject_output_follows_p_for_a_model_draft():
    """One draft token x ~ q, then the rule: the token that comes out is distributed as p."""
    p = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04, 0.0])
    q = torch.tensor([0.05, 0.10, 0.30, 0.30, 0.10, 0.05, 0.10])  # q puts mass where p has none
    uniform = _uniform(0)
    g = torch.Generator().manual_seed(1)
    n = 8_000
    counts: dict[int, int] = {}
    accepted = 0
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        k, tok = accept_reject(torch.stack([p, p]), [x], q[None], uniform)
        out = x if k == 1 else tok
        accepted += k
        counts[out] = counts.get(out, 0) + 1
    stat, df = chi_square(counts, {i: float(v) for i, v in enumerate(p) if v > 0}, n)
    assert chi2_sf(stat, df) > ALPHA, (stat, df, counts)
    # acceptance probability is sum_x min(p(x), q(x))
    assert accepted / n == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.02)

    # the power check: taking drafts as they come (no rejection) is caught at once
    naive = {}
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        naive[x] = naive.get(x, 0) + 1
    naive.pop(6, None)
    stat, df = chi_square(naive, {i: float(v) for i, v in enumerate(p) if v > 0}, n)
    assert chi2_sf(stat, df) < 1e-12


def test_accept_reject_with_a_point_mass_draft_and_the_bonus_token():
    """Prompt lookup: q is a point mass; accepted with probability p(x), else p without x."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    uniform = _uniform(2)
    n = 6_000
    first: dict[int, int] = {}
    bonus: dict[int, int] = {}
    for _ in range(n):
        k, tok = accept_reject(p, [1], None, uniform)
        out = 1 if k == 1 else tok
        first[out] = first.get(out, 0) + 1
        assert k == 1 or tok != 1  # a rejected draft never comes back as the replacement
        if k == 1:
            bonus[tok] = bonus.get(tok, 0) + 1
    for counts, row in ((first, p[0]), (bonus, p[1])):
        total = sum(counts.values())
        stat, df = chi_square(counts, {i: float(v) for i, v in enumerate(row)}, total)
        assert chi2_sf(stat, df) > ALPHA, (stat, df, counts)
    assert sum(bonus.values()) / n == pytest.approx(0.3, abs=0.02)


def test_accept_reject_all_accepted_when_p_equals_q():
    p = torch.softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), -1)
    uniform = _uniform(3)
    for _ in range(50):
        drafts = [int(torch.multinomial(p[i], 1)) for i in range(3)]
        k, _ = accept_reject(p, drafts, p[:3], uniform)
        assert k == 3


# -- drafters -----------------------------------------------------------------------------------


def test_ngram_drafter_proposes_what_followed_the_longest_latest_match():
    d = NgramDrafter(max_ngram=3, min_ngram=1)
    ids = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 6, 7]
    # the 3-gram (3, 6, 7) never occurred before; (6, 7) did twice, latest followed by 2
    assert d.propose(ids, 4).tokens == [2, 3, 6, 7]
    assert d.propose(ids + [2], 3).tokens == [3, 6, 7]  # (6, 7, 2) matches: what followed it
    assert d.propose([1, 2, 3], 4).tokens == []  # 3 never occurred before
    assert d.propose([4, 4, 4, 4], 2).tokens == [4]  # the continuation runs into the end
    d2 = NgramDrafter(max_ngram=2, min_ngram=2)
    assert d2.propose([1, 2, 9, 2], 3).tokens == []  # only a 1-gram matches, and 1-grams are off
    with pytest.raises(PellucidError):
        NgramDrafter(max_ngram=1, min_ngram=2)


def test_ngram_drafter_resumes_after_a_replaced_token():
    d = NgramDrafter()
    prompt = [1, 20, 21, 22, 23, 24, 25, 2]
    assert d.propose(prompt + [20, 21], 3).tokens == [22, 23, 24]
    # the target kept 22 and wrote 99 instead of 23 (a fixed typo): no n-gram ends in 99,
    # so copying resumes after the replaced token instead of trusting a 1-gram
    assert d.propose(prompt + [20, 21, 22, 99], 3).tokens == [24, 25, 2]
    # the next round kept 24, 25, 2 and replaced the source's 20 by 7: resume after it again
    assert d.propose(prompt + [20, 21, 22, 99, 24, 25, 2, 7], 2).tokens == [21, 22]
    # a deletion: drafted [22, 23, 24], the target wrote 23 right away (it skipped 22)
    d.begin([])
    assert d.propose(prompt + [20, 21], 3).tokens == [22, 23, 24]
    assert d.propose(prompt + [20, 21, 23], 3).tokens == [24, 25, 2]
    d.begin([])
    assert d.propose([3, 4, 5, 6, 3, 4], 2).tokens == [5, 6]
    assert d.propose([3, 4, 5, 6, 3, 4, 5, 6], 3).tokens == [3, 4, 5]  # n-gram (4, 5, 6) first


def test_ngram_drafter_restarts_on_a_new_sequence():
    d = NgramDrafter()
    assert d.propose([1, 2, 3, 1], 2).tokens == [2, 3]
    assert d.propose([7, 1, 9, 7], 2).tokens == [1, 9]  # not a continuation: index rebuilt
    d.begin([7])
    assert d.propose([7, 2, 7], 2).tokens == [2, 7]


# -- whole generations ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_draft", [1, 4])
def test_greedy_speculation_equals_plain_greedy(num_draft):
    target, other = tiny(0), tiny(1)
    prompt = [1, 2, 3, 1, 2, 3, 4, 5]
    n = 16
    want = reference_greedy(target.model, prompt, n)
    drafters = [NgramDrafter(), ModelDrafter(other.model, vocab_size=8), ModelDrafter(target.model, vocab_size=8),
                ModelDrafter(truncated(target.model, 1), vocab_size=8)]  # fmt: skip
    for drafter in drafters:
        dec = SpeculativeDecoder(target, drafter, num_draft=num_draft)
        req = request(prompt, 8, temperature=0, max_tokens=n)
        outs = list(dec.run(req))
        assert req.output_ids == want, drafter.name
        assert sum(len(o.new_token_ids) for o in outs) == n
        assert outs[-1].finished and req.finish_reason == "length"
        s = dec.stats
        assert s.generated == n and s.rounds == len(outs)
        assert s.accepted <= s.drafted and all(r.emitted == r.drafted[: r.accepted] + [r.token] for r in dec.rounds[:-1])
        assert s.tokens_per_round == pytest.approx(n / s.rounds)
        if getattr(drafter, "model", None) is target.model:
            assert s.acceptance_rate == 1.0  # drafting with the target itself is always right


def test_greedy_with_penalties_and_bias_matches_the_chain_step_by_step():
    """Penalties depend on the tokens before each position; the forks must see the drafts."""
    target = tiny(0)
    prompt = [1, 2, 3, 1, 2, 3, 4, 5]
    kw = dict(temperature=0, max_tokens=20, frequency_penalty=0.7, presence_penalty=0.3, repetition_penalty=1.3,
              logit_bias={4: 1.5})  # fmt: skip
    # reference: one token at a time through the real sampler
    ref = request(prompt, 8, **kw)
    with torch.inference_mode():
        for _ in range(20):
            logits = target.model(torch.tensor([ref.all_ids]))[:, -1]
            tok = int(apply_chain(logits, [ref.sampler]).greedy[0])
            ref.output_ids.append(tok)
            ref.sampler.accept(tok)
    for drafter in (NgramDrafter(), ModelDrafter(tiny(1).model, vocab_size=8)):
        req = request(prompt, 8, **kw)
        list(SpeculativeDecoder(target, drafter, num_draft=4).run(req))
        assert req.output_ids == ref.output_ids


def test_forks_leave_the_request_sampler_alone():
    req = request([1, 2], 8, temperature=1.0, frequency_penalty=1.0, repetition_penalty=1.2, seed=3)
    state = req.sampler.generator.get_state()
    rows = forks(req.sampler, [3, 3, 5])
    assert [r.output_ids for r in rows] == [[], [3], [3, 3], [3, 3, 5]]
    assert req.sampler.output_ids == []
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    got = apply_chain(logits, rows).probs
    # each fork's distribution is the one a sampler that really accepted those tokens gives
    for i, drafts in enumerate([[], [3], [3, 3], [3, 3, 5]]):
        ref = request([1, 2], 8, temperature=1.0, frequency_penalty=1.0, repetition_penalty=1.2, seed=3)
        for t in drafts:
            ref.sampler.accept(t)
        assert torch.allclose(got[i], apply_chain(logits[i : i + 1], [ref.sampler]).probs[0])
    assert not torch.allclose(got[0], got[2])  # the penalties did move
    assert torch.equal(req.sampler.generator.get_state(), state)


def test_stop_token_ids_and_min_tokens_follow_the_engine_rules():
    target = tiny(0)
    prompt = [1, 2, 3, 1, 2, 3, 4, 5]
    want = reference_greedy(target.model, prompt, 24)
    stop_tok = want[5]
    first = want.index(stop_tok)
    req = request(prompt, 8, temperature=0, max_tokens=24, stop_token_ids=[stop_tok])
    dec = SpeculativeDecoder(target, NgramDrafter(), num_draft=4)
    list(dec.run(req))
    assert req.output_ids == want[: first + 1]
    assert (req.finish_reason, req.stop_reason) == ("stop", stop_tok)


def test_sampling_is_reproducible_with_a_seed():
    target, other = tiny(0), tiny(1)
    runs = []
    for _ in range(2):
        req = request([1, 2, 3], 8, temperature=0.8, top_k=5, max_tokens=16, seed=123)
        list(SpeculativeDecoder(target, ModelDrafter(other.model, vocab_size=8), num_draft=3).run(req))
        runs.append(req.output_ids)
    assert runs[0] == runs[1] and len(runs[0]) == 16


def _exact_joint(target, prompt: list[int], vocab: int, n: int, **kw) -> dict[tuple[int, ...], float]:
    """The target's own distribution of its first n sampled tokens, under the chain of kw."""
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    with torch.inference_mode():
        for _ in range(n):
            nxt = {}
            for seq, pr in probs.items():
                r = request(prompt, vocab, **kw)
                for t in seq:
                    r.sampler.accept(t)
                logits = target.model(torch.tensor([prompt + list(seq)]))[:, -1]
                row = apply_chain(logits, [r.sampler]).probs[0]
                for t in range(vocab):
                    if float(row[t]) > 0:
                        nxt[seq + (t,)] = pr * float(row[t])
            probs = nxt
    return probs


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_sampling_keeps_the_target_distribution(draft):
    """Chi-square of the first 3 generated tokens (4^3 = 64 cells, cells with expected
    count < 5 pooled) against the target's exact joint distribution; significance 0.001."""
    vocab = 4
    target, other = tiny(0, vocab, layers=1), tiny(7, vocab, layers=1)
    prompt = [0, 1, 2, 0, 1, 2, 3, 0, 1]  # repeats, so prompt lookup finds drafts
    kw = dict(temperature=1.2, top_k=3, max_tokens=3)
    exact = _exact_joint(target, prompt, vocab, 3, **kw)
    drafter = ModelDrafter(other.model, vocab_size=vocab) if draft == "model" else NgramDrafter()
    dec = SpeculativeDecoder(target, drafter, num_draft=3)
    n = 1000
    counts: dict[tuple[int, ...], int] = {}
    drafted = accepted = 0
    for seed in range(n):
        req = request(prompt, vocab, seed=seed, **kw)
        list(dec.run(req))
        key = tuple(req.output_ids)
        counts[key] = counts.get(key, 0) + 1
        drafted += dec.stats.drafted
        accepted += dec.stats.accepted
    stat, df = chi_square(counts, exact, n)
    assert df >= 10
    assert chi2_sf(stat, df) > ALPHA, (stat, df)
    assert drafted > n and 0 < accepted < drafted  # both branches of the rule were exercised


def test_draft_model_must_share_the_vocabulary_and_config_is_checked():
    with pytest.raises(PellucidError, match="vocabulary"):
        ModelDrafter(tiny(0, vocab=6).model, vocab_size=8)
    with pytest.raises(PellucidError, match="draft"):
        SpeculativeConfig(draft="eagle")
    with pytest.raises(PellucidError, match="num_draft"):
        SpeculativeDecoder(tiny(0), NgramDrafter(), num_draft=0)
    with pytest.raises(PellucidError, match="draft_layers"):
        truncated(tiny(0).model, 5)


def test_a_draft_model_without_a_cache_is_recomputed():
    """Any callable over the same vocabulary can draft: here a plain function, no cache."""
    target = tiny(0)
    calls = []

    def draft_fn(tokens):
        calls.append(tokens.shape[1])
        return target.model(tokens)

    prompt = [1, 2, 3, 4]
    req = request(prompt, 8, temperature=0, max_tokens=12)
    dec = SpeculativeDecoder(target, ModelDrafter(draft_fn, vocab_size=8), num_draft=3)
    list(dec.run(req))
    assert req.output_ids == reference_greedy(target.model, prompt, 12)
    assert dec.stats.acceptance_rate == 1.0 and calls and calls[0] == len(prompt)


def test_context_window_caps_drafts():
    target = tiny(0)
    prompt = list(range(8)) * 7  # 56 tokens of a 64-token window
    req = request(prompt, 8, temperature=0, max_tokens=None)
    dec = SpeculativeDecoder(target, NgramDrafter(), num_draft=6, max_len=64)
    list(dec.run(req))
    assert len(req.all_ids) == 64 and req.finish_reason == "length"
    assert req.output_ids == reference_greedy(target.model, prompt, 8)


def test_draft_object_defaults():
    assert Draft([1, 2]).probs is None
