"""Attention patterns: for each token, which earlier tokens it reads from, and how much.

The concept note's "capital -> France (0.8)", measured: the probabilities every head of
every layer assigns, from the `blocks.{L}.attn.hook_pattern` hook points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pellucid.errors import PellucidError
from pellucid.inspect.subject import encode, load_subject, str_tokens


@dataclass
class Attended:
    pos: int
    token: str
    weight: float


@dataclass
class TokenAttention:
    """One query token and the key tokens it attends to most."""

    pos: int
    token: str
    top: list[Attended]


@dataclass
class AttentionPatterns:
    tokens: list[int]
    str_tokens: list[str]
    patterns: torch.Tensor  # (layers, H, T, T) float32, rows sum to 1, zero above the diagonal

    @property
    def n_layers(self) -> int:
        return self.patterns.shape[0]

    @property
    def n_heads(self) -> int:
        return self.patterns.shape[1]

    def select(self, layer: int | None = None, head: int | None = None) -> torch.Tensor:
        """(T, T) pattern of one head, or averaged over the heads / layers left as None."""
        p = self.patterns
        if layer is not None:
            _check("layer", layer, self.n_layers)
            p = p[layer : layer + 1]
        if head is not None:
            _check("head", head, self.n_heads)
            p = p[:, head : head + 1]
        return p.mean(dim=(0, 1))

    def top(self, layer: int | None = None, head: int | None = None, k: int = 3,
            skip_first: bool = False) -> list[TokenAttention]:  # fmt: skip
        """For every query token, its `k` most attended keys (from `select(layer, head)`).

        `skip_first` leaves out position 0, which most heads use as a resting place (the
        "attention sink"); the weights shown are still the true probabilities.
        """
        if k < 1:
            raise PellucidError(f"k must be >= 1, got {k}", param="k")
        p = self.select(layer, head)
        out = []
        for q in range(p.shape[0]):
            row = p[q, : q + 1].clone()
            if skip_first and q > 0:
                row[0] = -1.0
            order = torch.argsort(row, descending=True, stable=True)[
                : min(k, q + 1 - (skip_first and q > 0))
            ]
            out.append(TokenAttention(q, self.str_tokens[q],
                                      [Attended(int(j), self.str_tokens[j], float(p[q, j])) for j in order]))  # fmt: skip
        return out

    def to_dict(self, layer: int | None = None, head: int | None = None, k: int = 3,
                skip_first: bool = False) -> dict[str, Any]:  # fmt: skip
        return {
            "tokens": self.tokens,
            "str_tokens": self.str_tokens,
            "layer": layer,
            "head": head,
            "top": [
                {"pos": t.pos, "token": t.token, "top": [a.__dict__ for a in t.top]}
                for t in self.top(layer, head, k, skip_first)
            ],
            "pattern": self.select(layer, head).tolist(),
        }


def _check(what: str, value: int, n: int) -> None:
    if not 0 <= value < n:
        raise PellucidError(
            f"{what} {value} is out of range; this model has {n} ({what}s 0..{n - 1})", param=what
        )


def attention_patterns(
    source: Any, prompt: str | list[int], *, chat: bool = False
) -> AttentionPatterns:
    """Every layer's and head's attention probabilities on `prompt` (one forward)."""
    subject = load_subject(source)
    ids = encode(subject, prompt, chat=chat)
    cache = subject.model.run_with_cache(ids, lambda n: n.endswith("attn.hook_pattern"))
    n = len(subject.model.blocks)
    patterns = torch.stack([cache["pattern", i][0].float() for i in range(n)])  # (layers, H, T, T)
    return AttentionPatterns(ids, str_tokens(subject, ids), patterns)
