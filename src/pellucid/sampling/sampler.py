"""The sampler: logits (B, V) -> one token per row, each row with its own parameters.

Order of the chain (DESIGN.md): logit_bias -> penalties -> constraint mask ->
(temperature == 0: greedy) -> temperature -> top_k -> top_p -> min_p -> draw with the
request's own seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pellucid.sampling.params import SamplingParams


class SequenceSampler:
    """Per-request sampling state; advances with `accept(token)`."""

    def __init__(self, params: SamplingParams, *, vocab_size: int, prompt_ids: list[int], eog_ids: frozenset[int] = frozenset()):
        self.params = params
        self.vocab_size = vocab_size
        self.eog_ids = eog_ids
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        self.output_ids: list[int] = []

    def accept(self, token: int) -> None:
        self.output_ids.append(token)


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None = None  # (B,) log-probability of the chosen token
    top_ids: torch.Tensor | None = None  # (B, k)
    top_logprobs: torch.Tensor | None = None  # (B, k)


def sample(logits: torch.Tensor, seqs: list[SequenceSampler]) -> SampleOutput:
    """Greedy or temperature sampling (the full chain is built in processors.py)."""
    out = []
    for row, s in zip(logits.float(), seqs, strict=True):
        t = s.params.temperature
        if t == 0:
            out.append(row.argmax())
        else:
            probs = torch.softmax(row / t, dim=-1)
            out.append(torch.multinomial(probs, 1, generator=s.generator)[0])
    return SampleOutput(torch.stack(out))
