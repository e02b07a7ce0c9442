"""The logit lens and the residual stream.

Each layer's residual stream is read as if it were the last: through the model's own
final norm and unembedding, into a distribution over the vocabulary. The stream's norm,
and the norms of what attention and the MLP add to it at each layer, draw the concept
note's "Residual Stream" diagram with numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pellucid.errors import PellucidError
from pellucid.inspect.subject import encode, load_subject, str_tokens

RESID_NAMES = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


@dataclass
class LensResult:
    tokens: list[int]
    str_tokens: list[str]
    labels: list[
        str
    ]  # "embed", "0", ..., "N-1": the stream entering layer 0, then leaving each layer
    top_ids: torch.Tensor  # (n, T, k) most likely next tokens read at each stage and position
    top_probs: torch.Tensor  # (n, T, k)
    top_tokens: list[list[list[str]]]  # (n, T, k)
    target_id: int
    target_token: str
    target_from: str  # "model" (its own top-1 at the last position) or "given"
    target_prob: torch.Tensor  # (n,) P(target) at the last position
    target_rank: torch.Tensor  # (n,) 0 = the most likely token
    resid_norm: torch.Tensor  # (n, T) L2 norm of the stream
    attn_norm: torch.Tensor  # (N, T) L2 norm of each layer's attention output
    mlp_norm: torch.Tensor  # (N, T) L2 norm of each layer's MLP output
    start: int = 0  # the top_* fields cover positions start..T-1 (`last` in lens_report)

    @property
    def n_layers(self) -> int:
        return self.attn_norm.shape[0]

    def first_layer_top1(self) -> str | None:
        """The first stage from which the target stays the top-1 prediction at the last position."""
        ok = (self.target_rank == 0).tolist()
        for i in range(len(ok)):
            if all(ok[i:]):
                return self.labels[i]
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "str_tokens": self.str_tokens,
            "labels": self.labels,
            "start": self.start,
            "target": {
                "id": self.target_id,
                "token": self.target_token,
                "from": self.target_from,
                "prob": self.target_prob.tolist(),
                "rank": self.target_rank.tolist(),
                "top1_from": self.first_layer_top1(),
            },  # fmt: skip
            "top": [
                [
                    [
                        {"id": int(i), "token": t, "prob": float(p)}
                        for i, t, p in zip(ids, toks, ps, strict=True)
                    ]
                    for ids, toks, ps in zip(
                        self.top_ids[s], self.top_tokens[s], self.top_probs[s], strict=True
                    )
                ]
                for s in range(len(self.labels))
            ],  # fmt: skip
            "resid_norm": self.resid_norm.tolist(),
            "attn_norm": self.attn_norm.tolist(),
            "mlp_norm": self.mlp_norm.tolist(),
        }


def target_id(subject: Any, target: str | int) -> int:
    if isinstance(target, int):
        subject.tokenizer.check_ids([target], "target")
        return target
    ids = subject.tokenizer.encode(target)
    if len(ids) != 1:
        pieces = [subject.tokenizer.piece(i) for i in ids]
        raise PellucidError(f"target {target!r} is {len(ids)} tokens {pieces}; give a single token "
                            "(mind the leading space: ' Paris')", param="target")  # fmt: skip
    return ids[0]


@torch.no_grad()
def lens_report(source: Any, prompt: str | list[int], *, target: str | int | None = None, k: int = 5,
               chat: bool = False, last: int | None = None) -> LensResult:  # fmt: skip
    """Logit lens at every stage and position, P(target) by layer, and residual norms.

    `target` defaults to the model's own top-1 prediction at the last position. `last`
    reads the top tokens at the last `last` positions only (the unembedding of every
    stage at every position is most of the cost on a long prompt).
    """
    if k < 1:
        raise PellucidError(f"k must be >= 1, got {k}", param="k")
    if last is not None and last < 1:
        raise PellucidError(f"last must be >= 1, got {last}", param="last")
    subject = load_subject(source)
    ids = encode(subject, prompt, chat=chat)
    cache = subject.model.run_with_cache(ids, lambda n: n.endswith(RESID_NAMES))
    resid, labels = cache.accumulated_resid()  # (n, 1, T, E)
    start = 0 if last is None else max(0, len(ids) - last)
    tops, top_p, tgt_p, tgt_rank = [], [], [], []
    tid = int(cache.logits[0, -1].argmax()) if target is None else target_id(subject, target)
    for r in resid:  # one stage at a time: n x T x V floats at once would be large
        probs = torch.softmax(cache.unembed_resid(r[:, start:])[0], dim=-1)  # (T - start, V)
        p, i = probs.topk(k, dim=-1)
        tops.append(i)
        top_p.append(p)
        tgt_p.append(probs[-1, tid])
        tgt_rank.append((probs[-1] > probs[-1, tid]).sum())
    top_ids = torch.stack(tops)  # (n, T, k)
    n = cache.n_layers
    return LensResult(
        tokens=ids,
        str_tokens=str_tokens(subject, ids),
        labels=labels,
        top_ids=top_ids,
        top_probs=torch.stack(top_p),
        top_tokens=[
            [[subject.tokenizer.piece(int(j)) for j in pos] for pos in stage] for stage in top_ids
        ],
        target_id=tid,
        target_token=subject.tokenizer.piece(tid),
        target_from="model" if target is None else "given",
        target_prob=torch.stack(tgt_p),
        target_rank=torch.stack(tgt_rank),
        resid_norm=resid[:, 0].float().norm(dim=-1),
        attn_norm=torch.stack([cache["attn_out", i][0].float().norm(dim=-1) for i in range(n)]),
        mlp_norm=torch.stack([cache["mlp_out", i][0].float().norm(dim=-1) for i in range(n)]),
        start=start,
    )
