"""The steps of the sampler chain: small pure functions over logits (B, V).

Every function takes per-row parameters as tensors of shape (B,), so rows with different
parameters share one call, and returns new logits (the input is never changed). A removed
token gets the logit -inf. The order in which the sampler applies them is in sampler.py.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
BIAS_BAN = -100.0  # a bias of -100 bans the token outright
TOP_P_EPS = 1e-6  # mass "reaches" top_p within float rounding
MIN_P_EPS = 1e-6  # p >= min_p * p_max, within float rounding (in log space)


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """logits[rows[n], ids[n]] += values[n]; a value of -100 sets the logit to -inf (a ban).

    rows, ids: (N,) int64; values: (N,) float. Each (row, id) pair appears at most once.
    """
    values = values.to(logits.dtype).masked_fill(values <= BIAS_BAN, NEG_INF)
    return logits.index_put((rows, ids), values, accumulate=True)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor | None, seen: torch.Tensor | None,
                    frequency: torch.Tensor, presence: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Repetition penalty, then OpenAI's frequency and presence penalties.

    counts (B, V): how often each token was generated (output only), or None when the
    frequency and presence penalties are 0 for the whole batch. seen (B, V) bool: tokens in
    the prompt or the output, or None when the repetition penalty is 1 for the whole batch.
    frequency, presence, repetition: (B,).

        logit[j] = logit[j] / r  if seen[j] and logit[j] > 0      (once per distinct token)
        logit[j] = logit[j] * r  if seen[j] and logit[j] <= 0
        logit[j] -= count[j] * frequency + (count[j] > 0) * presence
    """
    out = logits
    if seen is not None:
        r = repetition[:, None]  # (B, 1)
        out = torch.where(seen, torch.where(out > 0, out / r, out * r), out)
    if counts is not None:
        out = out - counts * frequency[:, None] - (counts > 0).to(out.dtype) * presence[:, None]
    return out


def apply_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Keep only allowed tokens: allowed (B, V) bool."""
    return logits.masked_fill(~allowed, NEG_INF)


def apply_bans(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Set logits[rows[n], ids[n]] to -inf (min_tokens: no end-of-generation or stop token yet)."""
    return logits.index_put((rows, ids), torch.tensor(NEG_INF, dtype=logits.dtype, device=logits.device))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: (B,) int64."""
    return logits.argmax(dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / temperature; temperature (B,) > 0 (greedy rows never get here)."""
    return logits / temperature[:, None]


def apply_top_k(logits: torch.Tensor, k: torch.Tensor, kmax: int | None = None) -> torch.Tensor:
    """Keep the k most likely tokens of each row; k (B,) int64, 0 = off.

    Exactly k tokens survive (ties at the k-th logit are broken by torch.topk's order).
    `kmax` = the largest k in the batch, when the caller knows it without a device sync.
    """
    B, V = logits.shape
    kmax = min(int(k.max()) if kmax is None else kmax, V)
    if kmax <= 0:
        return logits
    _, idx = logits.topk(kmax, dim=-1)  # (B, K), most likely first
    k_eff = torch.where((k > 0) & (k < V), k, V)  # (B,)
    keep_sorted = torch.arange(kmax, device=logits.device)[None, :] < k_eff[:, None]  # (B, K)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, keep_sorted)
    keep |= (k_eff >= V)[:, None]
    return logits.masked_fill(~keep, NEG_INF)


def apply_top_p(logits: torch.Tensor, p: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (the token
    that crosses p included); p (B,), 1 = off. Probabilities are softmax(logits) of the row.

    `width`: an upper bound on the number of finite logits in any row with p < 1 (after
    top_k it is the largest k); it replaces a full sort of V by a top-`width` selection.
    """
    B, V = logits.shape
    width = V if width is None else max(1, min(width, V))
    if width < V:
        vals, idx = logits.topk(width, dim=-1)  # (B, W)
    else:
        vals, idx = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = vals.softmax(dim=-1).double()  # (B, W)
    before = probs.cumsum(dim=-1) - probs  # mass strictly more likely than each token
    keep_sorted = before < (p.double()[:, None] - TOP_P_EPS)
    keep_sorted[:, 0] = True  # the most likely token always survives
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, keep_sorted)
    keep |= (p >= 1.0)[:, None]
    return logits.masked_fill(~keep, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens with p >= min_p * p_max; min_p (B,), 0 = off.

    In logits: logit >= max_logit + log(min_p), so no softmax is needed.
    """
    top = logits.amax(dim=-1, keepdim=True)  # (B, 1)
    threshold = top + torch.log(min_p.to(logits.dtype))[:, None] - MIN_P_EPS
    return logits.masked_fill(logits < threshold, NEG_INF)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: one token per row from probs (B, V) (need not sum to 1) given one
    uniform number u (B,) in [0, 1) per row. A token with probability 0 is never drawn."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    x = torch.minimum(u.to(cdf.dtype)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
