"""The steps of the sampler chain: small pure functions over logits (B, V).

Per-row parameters come as tensors, so rows with different parameters share one call.
A removed token gets the logit -inf. Functions return new logits; `inplace=True` lets the
sampler edit its own private copy instead of copying (B, V) once per step.

Sparse steps (logit_bias, penalties, bans) take flat (rows, ids) index pairs: their cost
grows with the number of tokens they touch, not with the vocabulary. Filters (top_k,
top_p, min_p) also exist in a "sorted" form over the candidates of each row, sorted most
likely first (S, W): the sampler's fast path works on those instead of all V tokens.
The order in which the sampler applies the steps is in sampler.py.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
BIAS_BAN = -100.0  # a bias of -100 bans the token outright
TOP_P_EPS = 1e-6  # mass "reaches" top_p within float rounding
MIN_P_EPS = 1e-6  # p >= min_p * p_max, within float rounding (in log space)


def _target(logits: torch.Tensor, inplace: bool) -> torch.Tensor:
    return logits if inplace else logits.clone()


# -- 1-3: sparse edits on the full vocabulary ------------------------------------------------
def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, *,
                     inplace: bool = False) -> torch.Tensor:  # fmt: skip
    """logits[rows[n], ids[n]] += values[n]; a value of -100 sets the logit to -inf (a ban).

    rows, ids: (N,) int64; values: (N,) float. Each (row, id) pair appears at most once.
    """
    values = values.to(logits.dtype).masked_fill(values <= BIAS_BAN, NEG_INF)
    return _target(logits, inplace).index_put_((rows, ids), values, accumulate=True)


def apply_repetition_penalty(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, penalty: torch.Tensor, *,
                             inplace: bool = False) -> torch.Tensor:  # fmt: skip
    """For each seen (row, id) pair, once: a positive logit is divided by the penalty, a
    negative one multiplied. rows, ids: (N,) int64, distinct pairs; penalty: (N,) > 0."""
    out = _target(logits, inplace)
    v = out[rows, ids]  # (N,)
    out[rows, ids] = torch.where(v > 0, v / penalty, v * penalty)
    return out


def apply_frequency_presence(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                             frequency: torch.Tensor, presence: torch.Tensor, *,
                             inplace: bool = False) -> torch.Tensor:  # fmt: skip
    """OpenAI's penalties: logit[j] -= count[j] * frequency + (count[j] > 0) * presence.

    rows, ids: (N,) int64, the distinct generated tokens of each row; counts: (N,) how often
    each was generated (> 0); frequency, presence: (N,) the row's penalties.
    """
    return _target(logits, inplace).index_put_((rows, ids), -(counts * frequency + presence), accumulate=True)


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Keep only allowed tokens: allowed (B, V) bool."""
    return logits.masked_fill(~allowed, NEG_INF)


def apply_bans(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Set logits[rows[n], ids[n]] to -inf (min_tokens: no end-of-generation or stop token yet)."""
    neg = torch.tensor(NEG_INF, dtype=logits.dtype, device=logits.device)
    return _target(logits, inplace).index_put_((rows, ids), neg)


# -- 4-5 ---------------------------------------------------------------------------------------
def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: (B,) int64."""
    return logits.argmax(dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / temperature; temperature (B,) > 0 (greedy rows never get here)."""
    return logits / temperature[:, None]


# -- 6-8 on sorted candidates (S, W), most likely first -------------------------------------
# Each filter keeps every token at least as likely as its cut-off token (ties included), so
# the kept set depends only on the row's values, never on how a sort orders equal values.
def sorted_top_k(vals: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the k most likely candidates of each row (and any tied with the k-th); k (S,)
    int64, 0 = off."""
    S, W = vals.shape
    k_eff = torch.where((k > 0) & (k < W), k, W)  # (S,)
    kth = vals.gather(1, (k_eff - 1)[:, None])  # (S, 1)
    return vals.masked_fill((vals < kth) & (k > 0)[:, None], NEG_INF)


def sorted_top_p(vals: torch.Tensor, p: torch.Tensor, log_total: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the smallest prefix whose probability reaches p (the crossing token and any tied
    with it included); p (S,), 1 = off. `log_total` (S,): log of the row's total mass when
    the candidates are not all of its finite logits (default: logsumexp of vals)."""
    if log_total is None:
        log_total = vals.logsumexp(dim=-1)
    probs = (vals - log_total[:, None]).exp().double()  # (S, W)
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely candidates
    keep = before < (p.double()[:, None] - TOP_P_EPS)
    keep[:, 0] = True  # the most likely token always survives
    cut = vals.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)  # (S, 1) the crossing value
    return vals.masked_fill((vals < cut) & (p < 1.0)[:, None], NEG_INF)


def sorted_min_p(vals: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep candidates with p >= min_p * p_max; min_p (S,), 0 = off. In logits:
    logit >= max_logit + log(min_p), so no softmax is needed (the first is the max)."""
    threshold = vals[:, :1] + torch.log(min_p.to(vals.dtype))[:, None] - MIN_P_EPS
    return vals.masked_fill(vals < threshold, NEG_INF)


def nucleus_width(logits: torch.Tensor, p: torch.Tensor, sub: int = 4) -> int:
    """An upper bound on how many most-likely tokens top_p keeps in any row (a host int),
    from one pass over the vocabulary instead of a sort.

    Probabilities go into bins by binary exponent, each octave split in `sub` (bins about
    1/sub of an octave wide); the bin where the cumulative mass reaches p holds the
    crossing token, so the nucleus lies among the tokens of that bin and the bins above.
    """
    B, V = logits.shape
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    mant, exp = torch.frexp(probs.clamp(min=2.0**-70))  # probs = mant * 2**exp, mant in [0.5, 1)
    octave = (-exp).clamp_(0, 63)  # tiny and zero probabilities share the last octave
    step = ((mant - 0.5) * (2 * sub)).long().clamp_(0, sub - 1)  # position inside the octave
    nbins = 64 * sub
    rank = octave * sub + (sub - 1 - step)  # 0 = the most likely bin
    flat = (rank + torch.arange(B, device=logits.device)[:, None] * nbins).reshape(-1)
    mass = torch.zeros(B * nbins, dtype=torch.float64, device=logits.device).index_add_(0, flat, probs.reshape(-1).double())
    count = torch.bincount(flat, minlength=B * nbins).view(B, nbins).cumsum(dim=-1)  # (B, nbins)
    reached = mass.view(B, nbins).cumsum(dim=-1) >= (p.double()[:, None] + 1e-5)  # with a margin for rounding
    first = torch.where(reached.any(dim=-1), reached.int().argmax(dim=-1), nbins - 1)  # (B,)
    width = torch.where(p < 1.0, count.gather(1, first[:, None]).squeeze(1), 0)
    return max(1, int(width.max()))


def scatter_sorted(logits: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Dense logits (B, V): vals at idx, -inf elsewhere."""
    return torch.full_like(logits, NEG_INF).scatter_(1, idx, vals)


def _cut_below(logits: torch.Tensor, filtered_sorted: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Apply a filter computed on sorted candidates to dense logits: keep every token at
    least as likely as the least likely surviving candidate (rows where `active`)."""
    cut = filtered_sorted.masked_fill(filtered_sorted == NEG_INF, float("inf")).amin(dim=-1, keepdim=True)  # (B, 1)
    return logits.masked_fill((logits < cut) & active[:, None], NEG_INF)


# -- 6-8 on dense logits (B, V) ---------------------------------------------------------------
def apply_top_k(logits: torch.Tensor, k: torch.Tensor, kmax: int | None = None) -> torch.Tensor:
    """Keep the k most likely tokens of each row, and any tied with the k-th; k (B,) int64,
    0 = off. `kmax` = the largest k in the batch, when the caller knows it without a sync."""
    B, V = logits.shape
    k = torch.where((k > 0) & (k < V), k, 0)
    kmax = min(int(k.max()) if kmax is None else kmax, V)
    if kmax <= 0:
        return logits
    vals, _ = logits.topk(kmax, dim=-1)  # (B, K)
    return _cut_below(logits, sorted_top_k(vals, k), k > 0)


def apply_top_p(logits: torch.Tensor, p: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (the token
    that crosses it, and any tied with it, included); p (B,), 1 = off; probabilities are
    softmax(logits).

    `width`: how many candidates to sort (the nucleus must lie within them, see
    nucleus_width); default: the whole row.
    """
    B, V = logits.shape
    width = V if width is None else max(1, min(width, V))
    if width < V:
        vals, _ = logits.topk(width, dim=-1)  # (B, W)
    else:
        vals, _ = logits.sort(dim=-1, descending=True)  # (B, V)
    return _cut_below(logits, sorted_top_p(vals, p, logits.logsumexp(dim=-1)), p < 1.0)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens with p >= min_p * p_max; min_p (B,), 0 = off."""
    top = logits.amax(dim=-1, keepdim=True)  # (B, 1)
    threshold = top + torch.log(min_p.to(logits.dtype))[:, None] - MIN_P_EPS
    return logits.masked_fill(logits < threshold, NEG_INF)


def apply_typical_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al., 2022, "Locally Typical Sampling"): keep the
    tokens whose surprisal -log p is closest to the row's entropy, closest first, until their
    probability reaches p (the crossing token, and any tied with it, included); p (B,),
    1 = off. Works on dense logits and on sorted candidates alike: it orders by its own key."""
    logp = torch.log_softmax(logits.double(), dim=-1)  # (B, N)
    probs = logp.exp()
    entropy = -(probs * logp).nan_to_num(0.0).sum(dim=-1, keepdim=True)  # (B, 1); removed tokens add 0
    score = (-logp - entropy).abs()  # (B, N), inf for removed tokens
    s_sorted, order = score.sort(dim=-1)
    p_sorted = probs.gather(1, order)
    before = p_sorted.cumsum(dim=-1) - p_sorted  # mass of the more typical tokens
    keep = before < (p.double()[:, None] - TOP_P_EPS)
    keep[:, 0] = True  # the most typical token always survives
    cut = s_sorted.masked_fill(~keep, float("-inf")).amax(dim=-1, keepdim=True)  # (B, 1) the crossing score
    return logits.masked_fill((score > cut) & (p < 1.0)[:, None], NEG_INF)


# -- 10 -----------------------------------------------------------------------------------------
def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: one index per row from probs (B, N) (need not sum to 1) given one
    uniform number u (B,) in [0, 1) per row. An entry with probability 0 is never drawn."""
    cdf = probs.cumsum(dim=-1)  # (B, N)
    total = cdf[:, -1:]  # (B, 1)
    x = torch.minimum(u.to(cdf.dtype)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
