"""The sampler: logits (B, V) -> one token per row, each row with its own parameters.

The chain, in this order (docs/generation.md, "The chain, in order"; each step is a function in processors.py):

1. logit_bias      logit[j] += bias[j]; a bias of -100 bans j (logit -inf).
2. penalties       repetition (prompt + output, once per distinct token: a positive logit
                   is divided by r, a negative one multiplied), then OpenAI's
                   logit[j] -= count[j] * frequency + (count[j] > 0) * presence,
                   counting generated tokens only.
3. mask            the constraint's allowed tokens (structured output), and, until
                   min_tokens tokens exist, no end-of-generation or stop_token_ids token.
                   A row left with no token at all falls back to its raw logits.
4. greedy          temperature == 0: the argmax of the logits so far; the row stops here.
5. temperature     logit / T.
6. top_k           keep the k most likely tokens.
7. top_p           keep the smallest most-likely set whose probability reaches p (the
                   token that crosses p included).
8. min_p           keep tokens with p >= min_p * p_max.
9. typical_p       keep the tokens whose surprisal is closest to the entropy, until their
                   probability reaches p (locally typical sampling).
10. draw           inverse CDF with one uniform number from the request's own seeded
                   torch.Generator, so a row's token never depends on the other rows.

Speed: steps whose parameters are neutral for the whole batch are skipped; steps 1-3
touch only the tokens they change; when every sampled row truncates (top_k or top_p),
steps 5-10 run on each row's few candidates instead of the whole vocabulary (the "sorted"
path; the dense path gives the same tokens). No host sync on an accelerator: `tokens`
stays on the logits' device until the engine reads it.

logprobs come from the raw model distribution (log_softmax of the input logits) unless
`processed_logprobs`; then from the distribution the token was drawn from (for a greedy
row: after step 3).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from pellucid.sampling import processors
from pellucid.sampling.constraints import Constraint, allowed_masks, bitmasks
from pellucid.sampling.params import SamplingParams

STAGES = ("raw", "logit_bias", "penalties", "mask", "temperature", "top_k", "top_p", "min_p", "typical_p")


class _Tokens:
    """A growing set of distinct token ids with a count each, in numpy buffers (cheap to
    append to, zero-copy to hand to torch)."""

    def __init__(self) -> None:
        self.pos: dict[int, int] = {}
        self.ids = np.empty(64, dtype=np.int64)
        self.counts = np.empty(64, dtype=np.float32)

    def add(self, token: int) -> None:
        i = self.pos.get(token)
        if i is not None:
            self.counts[i] += 1
            return
        n = len(self.pos)
        if n == len(self.ids):
            self.ids = np.concatenate([self.ids, np.empty_like(self.ids)])
            self.counts = np.concatenate([self.counts, np.empty_like(self.counts)])
        self.pos[token] = n
        self.ids[n] = token
        self.counts[n] = 1

    def __len__(self) -> int:
        return len(self.pos)


class SequenceSampler:
    """Per-request sampling state: the seeded generator, the tokens the penalties count,
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
        self.bias_ids = np.array(list(params.logit_bias), dtype=np.int64)
        self.bias_values = np.array(list(params.logit_bias.values()), dtype=np.float32)
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eog_ids))
        self.min_tokens_bans = np.array(sorted(ends), dtype=np.int64) if params.min_tokens > 0 and ends else None
        # generated tokens (frequency/presence) and prompt + generated tokens (repetition)
        self.generated = _Tokens() if params.frequency_penalty != 0 or params.presence_penalty != 0 else None
        self.seen: _Tokens | None = None
        if params.repetition_penalty != 1:
            self.seen = _Tokens()
            for t in prompt_ids:
                if 0 <= t < vocab_size:
                    self.seen.add(t)

    def accept(self, token: int) -> None:
        """The engine chose `token` for this request: advance the stateful steps."""
        self.output_ids.append(token)
        if self.generated is not None:
            self.generated.add(token)
        if self.seen is not None:
            self.seen.add(token)
        if self.constraint is not None:
            self.constraint.accept(token)

    def uniform(self) -> float:
        """The next uniform number in [0, 1) from this request's generator."""
        return float(torch.rand((), generator=self.generator))

    @property
    def bans_active(self) -> bool:
        return self.min_tokens_bans is not None and len(self.output_ids) < self.params.min_tokens


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None = None  # (B,) log-probability of the chosen token
    top_ids: torch.Tensor | None = None  # (B, k), k = the largest top_logprobs in the batch
    top_logprobs: torch.Tensor | None = None  # (B, k)


Trace = Callable[[str, torch.Tensor], None]


def sample(logits: torch.Tensor, seqs: list[SequenceSampler], trace: Trace | None = None, *,
           sorted_path: bool | None = None) -> SampleOutput:  # fmt: skip
    """One token for each row of logits (B, V), row i drawn with seqs[i]'s parameters.

    `trace(stage, logits)`, when given, sees the dense logits after every stage in STAGES
    (a skipped stage shows them unchanged); `pellucid next-token` is built on it.
    `sorted_path`: force (True) or forbid (False) the candidates-only path; by default it
    is taken whenever it applies and nothing is traced.
    """
    B, V = logits.shape
    assert len(seqs) == B, (len(seqs), B)
    raw = logits.float()  # (B, V)
    note = (lambda stage, y: trace(stage, y.clone())) if trace is not None else _no_note  # later steps edit in place
    note("raw", raw)
    x, bans = _bias_and_penalties(raw, seqs, note)  # 1-2
    masked = _constrain(x, raw, seqs, bans, note)  # 3
    samp = [i for i, s in enumerate(seqs) if not s.greedy]
    if not samp:  # 4. greedy rows are decided here
        return _output(processors.greedy(masked), raw, masked, masked, seqs)
    return _draw(masked, raw, seqs, samp, note, sorted_path, trace is None)  # 5-10


def _no_note(stage: str, y: torch.Tensor) -> None:
    pass


def _bias_and_penalties(raw: torch.Tensor, seqs: list[SequenceSampler], note) -> tuple[torch.Tensor, bool]:
    """Steps 1-2 on one private copy of the logits (raw stays as it is), touching only the
    tokens concerned; also whether a bias banned a token (a row may have none left)."""
    dev = raw.device
    x = raw

    def own() -> torch.Tensor:
        return x if x is not raw else raw.clone()

    bans = False
    biased = [i for i, s in enumerate(seqs) if len(s.bias_ids)]
    if biased:
        rows, ids, vals = _flat([(i, seqs[i].bias_ids, seqs[i].bias_values) for i in biased], dev)
        x = processors.apply_logit_bias(own(), rows, ids, vals, inplace=True)
        bans = any((seqs[i].bias_values <= processors.BIAS_BAN).any() for i in biased)
    note("logit_bias", x)
    rep = [i for i, s in enumerate(seqs) if s.seen is not None and len(s.seen)]
    if rep:
        rows, ids, r = _flat([(i, s.ids[: len(s)], np.full(len(s), seqs[i].params.repetition_penalty, np.float32))
                              for i in rep for s in [seqs[i].seen]], dev)  # fmt: skip
        x = processors.apply_repetition_penalty(own(), rows, ids, r, inplace=True)
    gen = [i for i, s in enumerate(seqs) if s.generated is not None and len(s.generated)]
    if gen:
        parts, fp = [], []
        for i in gen:
            g, p = seqs[i].generated, seqs[i].params
            parts.append((i, g.ids[: len(g)], g.counts[: len(g)]))
            fp.append(np.repeat(np.array([[p.frequency_penalty, p.presence_penalty]], np.float32), len(g), axis=0))
        rows, ids, counts = _flat(parts, dev)
        f_p = torch.from_numpy(np.concatenate(fp)).to(dev)  # (N, 2)
        x = processors.apply_frequency_presence(own(), rows, ids, counts, f_p[:, 0], f_p[:, 1], inplace=True)
    note("penalties", x)
    return x, bans


def _constrain(x: torch.Tensor, raw: torch.Tensor, seqs: list[SequenceSampler], check_alive: bool, note) -> torch.Tensor:
    """Step 3: the grammar's mask and min_tokens' bans; a row left with no token at all
    falls back to its raw logits."""
    dev, V = x.device, x.shape[1]
    constraints = [s.constraint for s in seqs]
    alive = None  # (B, 1) bool once known
    if any(c is not None for c in constraints):
        if _one_pass(constraints, x):  # the bitmask applied in C++, no (B, V) bool mask
            x, kept = torch.ops.pellucid.apply_bitmask(x, bitmasks(constraints, V), processors.NEG_INF)
            alive = kept[:, None]
        else:
            x = processors.apply_mask(x, _allowed(constraints, V, dev))
        check_alive = True
    banned = [i for i, s in enumerate(seqs) if s.bans_active]
    if banned:
        rows, ids = _flat([(i, seqs[i].min_tokens_bans) for i in banned], dev)
        x = x if x is not raw else raw.clone()
        saved = x[rows, ids]  # (N,)
        processors.apply_bans(x, rows, ids, inplace=True)
        # a row with nothing else left may end: put its end tokens back
        x.index_put_((rows, ids), torch.where(_alive(x)[rows, 0], processors.NEG_INF, saved))
        alive = None  # bans changed the rows
    if check_alive:
        alive = _alive(x) if alive is None else alive
        if dev.type != "cpu" or not bool(alive.all()):  # on the CPU a check is cheaper than a pass
            x = torch.where(alive, x, raw)  # nothing left at all: fall back to the raw row
    note("mask", x)
    return x


def _draw(masked: torch.Tensor, raw: torch.Tensor, seqs: list[SequenceSampler], samp: list[int], note,
          sorted_path: bool | None, untraced: bool) -> SampleOutput:  # fmt: skip
    """Steps 5-10 for the sampled rows `samp` (the others greedy): temperature, top-k, top-p,
    min-p, typical-p and the seeded draw, on the sorted candidates where that applies."""
    B, V = masked.shape
    dev = masked.device
    params = [seqs[i].params for i in samp]
    temps = [p.temperature for p in params]
    ks = [p.top_k if p.top_k < V else 0 for p in params]
    ps = [p.top_p for p in params]
    mps = [p.min_p for p in params]
    tps = [p.typical_p for p in params]
    xs = masked if len(samp) == B else masked[torch.tensor(samp, device=dev)]  # (S, V) the sampled rows
    u = torch.tensor([seqs[i].uniform() for i in samp], dtype=torch.float32).to(dev)  # (S,)
    truncating = all(k > 0 or p < 1.0 for k, p in zip(ks, ps, strict=True))
    if sorted_path is None:  # a host sync decides the width: for the CPU only
        sorted_path = truncating and untraced and dev.type == "cpu"
    done = None
    if sorted_path and truncating:
        done = _sample_sorted(xs, temps, ks, ps, mps, tps, u, need_dense=_wants_processed(seqs))
    toks, final = done or _sample_dense(xs, temps, ks, ps, mps, tps, u, note if len(samp) == B else None)
    if len(samp) == B:
        return _output(toks, raw, masked, final, seqs)
    idx = torch.tensor(samp, device=dev)
    gidx = torch.tensor([i for i, s in enumerate(seqs) if s.greedy], device=dev)
    tokens = torch.empty(B, dtype=torch.long, device=dev).index_copy_(0, idx, toks)
    tokens.index_copy_(0, gidx, processors.greedy(masked[gidx]))
    if final is not None:
        final = masked.index_copy(0, idx, final)
    return _output(tokens, raw, masked, final, seqs)


def _sample_dense(x: torch.Tensor, temps, ks, ps, mps, tps, u: torch.Tensor, note) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 5-10 on the whole vocabulary: (S, V) -> tokens (S,), final logits (S, V)."""
    note = note or (lambda stage, x: None)
    dev = x.device
    if any(t != 1.0 for t in temps):
        x = processors.apply_temperature(x, _col(temps, dev))
    note("temperature", x)
    if any(ks):
        x = processors.apply_top_k(x, torch.tensor(ks, device=dev), kmax=max(ks))
    note("top_k", x)
    if any(p < 1.0 for p in ps):
        p = _col(ps, dev)
        if all(k > 0 for k, pp in zip(ks, ps, strict=True) if pp < 1.0):
            width = max(ks)  # after top_k a row has at most k finite logits
        elif x.device.type == "cpu":
            width = processors.nucleus_width(x, p)  # a partial selection instead of a sort
        else:
            width = None  # a sort is cheap on an accelerator, a host sync is not
        x = processors.apply_top_p(x, p, width)
    note("top_p", x)
    if any(mps):
        x = processors.apply_min_p(x, _col(mps, dev))
    note("min_p", x)
    if any(tp < 1.0 for tp in tps):
        x = processors.apply_typical_p(x, _col(tps, dev))
    note("typical_p", x)
    return processors.draw(_weights(x), u), x


def _sample_sorted(x: torch.Tensor, temps, ks, ps, mps, tps, u: torch.Tensor, *,
                   need_dense: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:  # fmt: skip
    """Steps 5-10 on each row's top-W candidates (every row has top_k or top_p): the same
    tokens as the dense path at the cost of one top-W selection. Returns tokens (S,) and,
    if asked, the final dense logits (S, V); None when a row's kept set might reach past
    its W candidates (ties at the edge), for the dense path to decide."""
    S, V = x.shape
    dev = x.device
    t = _col(temps, dev)
    p = _col(ps, dev)
    nucleus_rows = [i for i, k in enumerate(ks) if k == 0]  # top_p without top_k
    width = max(ks)
    log_total = None
    if nucleus_rows:
        sel = torch.tensor(nucleus_rows, device=dev)
        z = x[sel] / t[sel, None]  # (R, V)
        width = max(width, processors.nucleus_width(z, p[sel]))
        log_total = torch.full((S,), float("nan"), device=dev).index_copy(0, sel, z.logsumexp(dim=-1))
    width = min(V, width + width // 4 + 16)  # slack, so that ties rarely reach the edge
    vals, idx = x.topk(width, dim=-1)  # (S, W), most likely first
    vals = vals / t[:, None]
    if any(ks):
        vals = processors.sorted_top_k(vals, torch.tensor(ks, device=dev))
    if any(pp < 1.0 for pp in ps):
        total = vals.logsumexp(dim=-1)  # rows with top_k: renormalised over the k kept
        if log_total is not None:
            total = torch.where(torch.isnan(log_total), total, log_total)
        vals = processors.sorted_top_p(vals, p, total)
    if any(mps):
        vals = processors.sorted_min_p(vals, _col(mps, dev))
    if width < V and bool(torch.isfinite(vals[:, -1]).any()):
        return None  # the last candidate survived: tokens past it may tie with it
    if any(tp < 1.0 for tp in tps):  # on the same kept tokens as the dense path: every one past the candidates is cut
        vals = processors.apply_typical_p(vals, _col(tps, dev))
    # draw over the candidates in token-id order, as the dense path does: the same u gives
    # the same token on both paths
    order = idx.argsort(dim=-1)  # (S, W)
    by_id = idx.gather(1, order)
    pos = processors.draw(_weights(vals.gather(1, order)), u)  # (S,)
    tokens = by_id.gather(1, pos[:, None]).squeeze(1)
    final = processors.scatter_sorted(x, idx, vals) if need_dense else None
    return tokens, final


def _weights(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised probabilities exp(x - max): elementwise, so equal on both paths."""
    return (x - x.amax(dim=-1, keepdim=True)).exp()


def _wants_processed(seqs: list[SequenceSampler]) -> bool:
    return any(s.params.logprobs and s.params.processed_logprobs for s in seqs)


def _output(tokens: torch.Tensor, raw: torch.Tensor, masked: torch.Tensor, final: torch.Tensor | None,
            seqs: list[SequenceSampler]) -> SampleOutput:  # fmt: skip
    """Attach logprobs: raw by default, the processed distribution where asked."""
    wants = [s.params.logprobs for s in seqs]
    if not any(wants):
        return SampleOutput(tokens)
    processed = [s.params.processed_logprobs for s in seqs]
    if not any(processed):
        src = raw
    else:
        assert final is not None
        src = final if all(processed) else torch.where(torch.tensor(processed, device=raw.device)[:, None], final, raw)
    # (B, 1): log-probs without a (B, V) log_softmax. Row by row: torch reduces a (B, V) batch in
    # another order than one row, and a request's log-probs must not depend on its batch.
    log_total = torch.cat([row.logsumexp(dim=-1, keepdim=True) for row in src.split(1)])
    chosen = (src.gather(1, tokens[:, None]) - log_total).squeeze(1)  # (B,)
    k = max(s.params.top_logprobs for s in seqs)
    if k == 0:
        return SampleOutput(tokens, chosen)
    top_vals, top_ids = src.topk(k, dim=-1)  # (B, k)
    return SampleOutput(tokens, chosen, top_ids, top_vals - log_total)


def _flat(parts: list[tuple], device: torch.device) -> tuple[torch.Tensor, ...]:
    """[(row, ids (n,), *values (n,))...] -> rows (N,), ids (N,), *values (N,) on device."""
    n = [len(p[1]) for p in parts]
    rows = np.repeat(np.array([p[0] for p in parts], dtype=np.int64), n)
    cols = [np.concatenate([p[j] for p in parts]) for j in range(1, len(parts[0]))]
    return tuple(torch.from_numpy(a).to(device) for a in (rows, *cols))


def _col(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)  # (B,)


def _alive(x: torch.Tensor) -> torch.Tensor:
    """(B, 1) bool: the row still has a token with a finite logit."""
    return x.amax(dim=-1, keepdim=True) > processors.NEG_INF


def _grammars(constraints: list, V: int) -> bool:
    """Every constraint a grammar Constraint over V tokens (None: no constraint): the batch has one bitmask."""
    return all(c is None or (isinstance(c, Constraint) and c.vocab_size == V) for c in constraints)


def _one_pass(constraints: list, x: torch.Tensor) -> bool:
    """Whether pellucid::apply_bitmask can mask x: float32 on the CPU with the op loaded, one bitmask."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and hasattr(torch.ops.pellucid, "apply_bitmask")
            and _grammars(constraints, x.shape[1]))  # fmt: skip


def _allowed(constraints: list, V: int, device: torch.device) -> torch.Tensor:
    """(B, V) bool: each row's allowed tokens, every token for a row without a constraint."""
    if _grammars(constraints, V):  # one bitmask, unpacked once
        return allowed_masks(constraints, V).to(device)
    rows = []
    for c in constraints:  # any object with allowed_mask() (None: every token)
        m = c.allowed_mask() if c is not None else None
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
