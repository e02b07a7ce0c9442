"""The acceptance rule: the request's sampling chain row by row, and accept/reject of a draft."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pellucid.engine.request import Request
from pellucid.sampling.processors import draw
from pellucid.sampling.sampler import SequenceSampler, sample

# -- what a round produces ----------------------------------------------------------------


@dataclass
class Draft:
    """Proposed tokens and the distribution each was drawn from (None = point masses)."""

    tokens: list[int]
    probs: torch.Tensor | None = None  # (k, V) q_i, rows sum to 1


# -- the sampling chain, row by row ---------------------------------------------------------

_SCRATCH = torch.Generator()  # forks draw nothing that matters; keep their draws off the request's


def _fork(seq: SequenceSampler) -> SequenceSampler:
    """A copy of a request's sampler state that can advance without touching the original
    (its generator and constraint stay behind: forks draw nothing that counts)."""
    gen, con = seq.generator, seq.constraint
    seq.generator = seq.constraint = None
    try:
        f = copy.deepcopy(seq)
    finally:
        seq.generator, seq.constraint = gen, con
    f.generator = _SCRATCH
    return f


def forks(seq: SequenceSampler, drafts: list[int]) -> list[SequenceSampler]:
    """The sampler as it would stand before each of [d1 .. dk, next]: k + 1 forks (one
    shared fork when no step of the chain depends on the tokens so far)."""
    p = seq.params
    if (p.frequency_penalty == 0 and p.presence_penalty == 0 and p.repetition_penalty == 1
            and len(seq.output_ids) >= p.min_tokens and seq.constraint is None):  # fmt: skip
        return [_fork(seq)] * (len(drafts) + 1)
    cur = _fork(seq)
    rows = [cur]
    for d in drafts:
        cur = _fork(cur)
        cur.accept(d)
        rows.append(cur)
    return rows


@dataclass
class ChainOutput:
    greedy: list[int] | None  # temperature 0: the chain's argmax per row
    probs: torch.Tensor | None  # otherwise (T, V): the distribution each row draws from
    final: torch.Tensor | None  # (T, V) processed logits (for greedy rows: after the mask)


def apply_chain(logits: torch.Tensor, seqs: list[SequenceSampler], *, want_final: bool = False) -> ChainOutput:
    """Run the request's sampling chain (pellucid.sampling) over rows of logits (T, V).

    Row i uses seqs[i] (a fork standing where that row's token would be drawn), so the
    penalties and min_tokens bans see the drafts before it. Greedy rows skip the trace
    (and `final`) unless `want_final`.
    """
    if seqs[0].greedy and not want_final:
        return ChainOutput(sample(logits, seqs).tokens.tolist(), None, None)
    stages: dict[str, torch.Tensor] = {}
    out = sample(logits, seqs, trace=lambda stage, x: stages.__setitem__(stage, x))
    if seqs[0].greedy:
        return ChainOutput(out.tokens.tolist(), None, stages["mask"])
    final = stages["min_p"]
    return ChainOutput(None, torch.softmax(final, dim=-1), final)


def accept_reject(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                  uniform: Callable[[], float]) -> tuple[int, int]:  # fmt: skip
    """The speculative sampling rule over target rows p (k + 1, V) and draft rows q (k, V).

    Returns (number of drafts accepted, the token that follows them). q None means each
    draft was certain (prompt lookup): q_i is a point mass on d_i.
    """
    for i, x in enumerate(drafts):
        px = float(p[i, x])
        qx = float(q[i, x]) if q is not None else 1.0
        if uniform() * qx < px:  # u < p/q, i.e. accept with probability min(1, p/q)
            continue
        if q is not None:
            resid = (p[i] - q[i]).clamp_min(0)
        else:
            resid = p[i].clone()
            resid[x] = 0.0
        if float(resid.sum()) <= 0:  # p == q up to rounding: the residual is empty
            resid = p[i]
        return i, _draw(resid, uniform())
    return len(drafts), _draw(p[len(drafts)], uniform())


def _draw(probs: torch.Tensor, u: float) -> int:
    return int(draw(probs[None], torch.tensor([u]))[0])


class DraftChain:
    """The request's sampling chain as a drafter sees it: pick the next draft token."""

    def __init__(self, req: Request):
        self.req = req
        self.greedy = req.sampler.greedy

    def pick(self, logits: torch.Tensor, drafts: list[int]) -> tuple[int, torch.Tensor | None]:
        """logits (V,) after the context + drafts -> (token, q (V,) or None when greedy)."""
        seq = forks(self.req.sampler, drafts)[-1]
        out = apply_chain(logits[None].float(), [seq])
        if out.greedy is not None:
            return out.greedy[0], None
        q = out.probs[0]
        return _draw(q, self.req.sampler.uniform()), q
