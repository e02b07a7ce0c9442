"""The sampler: logits (B, V) -> one token per row, each row with its own parameters.

The chain, in this order (DESIGN.md "Semantics"; each step is a function in processors.py):

1. logit_bias      logit[j] += bias[j]; a bias of -100 bans j (logit -inf).
2. penalties       repetition (prompt + output, once per distinct token: positive logits
                   divided by r, negative ones multiplied), then OpenAI's
                   logit[j] -= count[j] * frequency + (count[j] > 0) * presence,
                   counting generated tokens only.
3. mask            the constraint's allowed tokens (structured output), and, until
                   min_tokens tokens exist, no end-of-generation or stop_token_ids token.
4. greedy          temperature == 0: the argmax of the logits so far; the row stops here.
5. temperature     logit / T.
6. top_k           keep the k most likely tokens.
7. top_p           keep the smallest most-likely set whose probability reaches p.
8. min_p           keep tokens with p >= min_p * p_max.
9. draw            inverse CDF with one uniform number from the request's own seeded
                   torch.Generator, so a row's token never depends on the other rows.

Steps whose parameters are neutral for the whole batch are skipped. There is no host
sync: `tokens` stays on the logits' device until the engine reads it. logprobs come from
the raw model distribution (log_softmax of the input logits) unless `processed_logprobs`,
then from the distribution the token was drawn from (for greedy rows: after step 3).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from pellucid.sampling import processors as P
from pellucid.sampling.params import SamplingParams

STAGES = ("raw", "logit_bias", "penalties", "mask", "temperature", "top_k", "top_p", "min_p")


class SequenceSampler:
    """Per-request sampling state: the seeded generator, token counts for the penalties,
    the constraint; advances with `accept(token)`."""

    def __init__(self, params: SamplingParams, *, vocab_size: int, prompt_ids: Iterable[int] = (),
                 eog_ids: Iterable[int] = frozenset(), constraint=None):  # fmt: skip
        params.check_vocab(vocab_size)
        self.params = params
        self.vocab_size = vocab_size
        self.eog_ids = frozenset(eog_ids)
        self.constraint = constraint
        self.generator = torch.Generator()
        if params.seed is None:
            self.seed = self.generator.seed()  # fresh, and recorded so a run can be replayed
        else:
            self.seed = params.seed
            self.generator.manual_seed(params.seed)
        self.output_ids: list[int] = []
        self.greedy = params.temperature == 0
        # Sparse, per-request pieces of the batch tensors, built once.
        self.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        self.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eog_ids))
        self.min_tokens_bans = torch.tensor(sorted(ends), dtype=torch.long) if params.min_tokens > 0 else None
        self.counts: torch.Tensor | None = None  # (V,) float32, generated tokens
        self.seen: torch.Tensor | None = None  # (V,) bool, prompt + generated tokens
        if params.frequency_penalty != 0 or params.presence_penalty != 0:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32)
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            ids = [i for i in prompt_ids if 0 <= i < vocab_size]
            if ids:
                self.seen[torch.tensor(ids, dtype=torch.long)] = True

    def accept(self, token: int) -> None:
        """The engine chose `token` for this request: advance the stateful steps."""
        self.output_ids.append(token)
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        if self.constraint is not None:
            self.constraint.accept(token)

    def uniform(self) -> float:
        """The next uniform number in [0, 1) from this request's generator."""
        return float(torch.rand((), generator=self.generator))

    @property
    def bans_active(self) -> bool:
        return self.min_tokens_bans is not None and len(self.output_ids) < self.params.min_tokens

    def _state_on(self, device: torch.device) -> None:
        if self.counts is not None and self.counts.device != device:
            self.counts = self.counts.to(device)
        if self.seen is not None and self.seen.device != device:
            self.seen = self.seen.to(device)


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None = None  # (B,) log-probability of the chosen token
    top_ids: torch.Tensor | None = None  # (B, k), k = the largest top_logprobs in the batch
    top_logprobs: torch.Tensor | None = None  # (B, k)


Trace = Callable[[str, torch.Tensor], None]


def sample(logits: torch.Tensor, seqs: list[SequenceSampler], trace: Trace | None = None) -> SampleOutput:
    """One token for each row of logits (B, V), row i drawn with seqs[i]'s parameters.

    `trace(stage, logits)`, when given, sees the logits after every stage in STAGES (a
    skipped stage shows the logits unchanged); `pellucid next-token` is built on it.
    """
    B, V = logits.shape
    assert len(seqs) == B, (len(seqs), B)
    dev = logits.device
    raw = logits.float()  # (B, V)
    params = [s.params for s in seqs]
    note = trace or (lambda stage, x: None)
    x = raw
    note("raw", x)

    # 1. logit_bias
    biased = [i for i, s in enumerate(seqs) if len(s.bias_ids)]
    if biased:
        rows = torch.cat([torch.full((len(seqs[i].bias_ids),), i, dtype=torch.long) for i in biased])
        ids = torch.cat([seqs[i].bias_ids for i in biased])
        vals = torch.cat([seqs[i].bias_values for i in biased])
        x = P.apply_logit_bias(x, rows.to(dev), ids.to(dev), vals.to(dev))
    note("logit_bias", x)

    # 2. penalties
    use_counts = any(s.counts is not None for s in seqs)
    use_seen = any(s.seen is not None for s in seqs)
    if use_counts or use_seen:
        for s in seqs:
            s._state_on(dev)
        counts = seen = None
        if use_counts:
            zero = torch.zeros(V, dtype=torch.float32, device=dev)
            counts = torch.stack([s.counts if s.counts is not None else zero for s in seqs])  # (B, V)
        if use_seen:
            none = torch.zeros(V, dtype=torch.bool, device=dev)
            seen = torch.stack([s.seen if s.seen is not None else none for s in seqs])  # (B, V)
        x = P.apply_penalties(x, counts, seen, _col([p.frequency_penalty for p in params], dev),
                              _col([p.presence_penalty for p in params], dev),
                              _col([p.repetition_penalty for p in params], dev))  # fmt: skip
    note("penalties", x)

    # 3. mask: the constraint, and no end token before min_tokens
    masks = [s.constraint.allowed_mask() if s.constraint is not None else None for s in seqs]
    if any(m is not None for m in masks):
        x = P.apply_mask(x, _allowed(masks, V, dev))
    banned = [i for i, s in enumerate(seqs) if s.bans_active]
    if banned:
        rows = torch.cat([torch.full((len(seqs[i].min_tokens_bans),), i, dtype=torch.long) for i in banned])
        ids = torch.cat([seqs[i].min_tokens_bans for i in banned])
        unbanned = x
        x = P.apply_bans(x, rows.to(dev), ids.to(dev))
        x = torch.where(_alive(x), x, unbanned)  # a row with nothing else left may end
    if biased or banned or any(m is not None for m in masks):
        x = torch.where(_alive(x), x, raw)  # nothing left at all: fall back to the raw row
    note("mask", x)
    masked = x

    # 4. greedy rows are decided here
    greedy_rows = [s.greedy for s in seqs]
    n_greedy = sum(greedy_rows)
    greedy_tokens = P.greedy(x) if n_greedy else None
    if n_greedy == B and trace is None:
        return _output(greedy_tokens, raw, masked, masked, seqs)

    # 5-8. temperature, top_k, top_p, min_p (greedy rows get neutral values)
    temps = [1.0 if s.greedy else p.temperature for s, p in zip(seqs, params, strict=True)]
    if any(t != 1.0 for t in temps):
        x = P.apply_temperature(x, _col(temps, dev))
    note("temperature", x)
    ks = [0 if s.greedy or p.top_k >= V else p.top_k for s, p in zip(seqs, params, strict=True)]
    if any(ks):
        x = P.apply_top_k(x, torch.tensor(ks, dtype=torch.long, device=dev), kmax=max(ks))
    note("top_k", x)
    ps = [1.0 if s.greedy else p.top_p for s, p in zip(seqs, params, strict=True)]
    if any(p < 1.0 for p in ps):
        # After top_k a row has at most k finite logits: a partial selection replaces the sort.
        width = V if any(p < 1.0 and k == 0 for p, k in zip(ps, ks, strict=True)) else max(ks)
        x = P.apply_top_p(x, _col(ps, dev), width=width)
    note("top_p", x)
    mps = [0.0 if s.greedy else p.min_p for s, p in zip(seqs, params, strict=True)]
    if any(mps):
        x = P.apply_min_p(x, _col(mps, dev))
    note("min_p", x)

    # 9. draw
    probs = torch.softmax(x, dim=-1)  # (B, V)
    u = torch.tensor([0.0 if s.greedy else s.uniform() for s in seqs], dtype=torch.float32).to(dev)
    tokens = P.draw(probs, u)
    if n_greedy:
        tokens = torch.where(torch.tensor(greedy_rows, device=dev), greedy_tokens, tokens)
        x = torch.where(torch.tensor(greedy_rows, device=dev)[:, None], masked, x)
    return _output(tokens, raw, masked, x, seqs)


def _output(tokens: torch.Tensor, raw: torch.Tensor, masked: torch.Tensor, final: torch.Tensor,
            seqs: list[SequenceSampler]) -> SampleOutput:  # fmt: skip
    """Attach logprobs: raw by default, the processed distribution where asked."""
    if not any(s.params.logprobs for s in seqs):
        return SampleOutput(tokens)
    processed = [s.params.processed_logprobs for s in seqs]
    if all(processed):
        lp = final.log_softmax(dim=-1)
    elif not any(processed):
        lp = raw.log_softmax(dim=-1)
    else:
        which = torch.tensor(processed, device=raw.device)[:, None]
        lp = torch.where(which, final.log_softmax(dim=-1), raw.log_softmax(dim=-1))  # (B, V)
    chosen = lp.gather(1, tokens[:, None]).squeeze(1)  # (B,)
    k = max(s.params.top_logprobs for s in seqs)
    if k == 0:
        return SampleOutput(tokens, chosen)
    top_lp, top_ids = lp.topk(k, dim=-1)  # (B, k)
    return SampleOutput(tokens, chosen, top_ids, top_lp)


def _col(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)  # (B,)


def _alive(x: torch.Tensor) -> torch.Tensor:
    """(B, 1) bool: the row still has a token with a finite logit."""
    return x.amax(dim=-1, keepdim=True) > P.NEG_INF


def _allowed(masks: list, V: int, device: torch.device) -> torch.Tensor:
    """Stack the constraints' (V,) masks into (B, V); None = everything allowed."""
    rows = []
    for m in masks:
        if m is None:
            rows.append(torch.ones(V, dtype=torch.bool, device=device))
            continue
        m = torch.as_tensor(m, dtype=torch.bool).to(device).reshape(-1)
        if m.numel() != V:  # a tokenizer vocabulary smaller or larger than the model's head
            fixed = torch.zeros(V, dtype=torch.bool, device=device)
            n = min(V, m.numel())
            fixed[:n] = m[:n]
            m = fixed
        rows.append(m)
    return torch.stack(rows)

