"""Layer functions on evidence: knock out one layer's attention or MLP, measure the loss.

Each layer's attention output (`blocks.{L}.hook_attn_out`) or MLP output
(`blocks.{L}.hook_mlp_out`) is replaced, one at a time, by zeros or by its mean over the
text's positions, and the change in next-token loss (mean cross-entropy, nats) on the
text says how much the model relies on that component there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pellucid.errors import PellucidError
from pellucid.inspect.subject import load_subject, next_token_loss
from pellucid.models.hooks import as_batch

COMPONENTS = {"attn": "hook_attn_out", "mlp": "hook_mlp_out"}
MODES = ("zero", "mean")

DEFAULT_TEXT = (
    "The lighthouse at the end of the harbour was built in 1872, after two ships ran aground on "
    "the rocks in a single winter. Its tower is made of granite blocks cut from a quarry a few miles "
    "inland, and the stones were brought down to the coast on carts pulled by horses. For almost a "
    "century a keeper and his family lived in the small house at its base. Every evening the keeper "
    "climbed the spiral staircase, trimmed the wick, cleaned the glass and wound the clockwork that "
    "turned the lens, so that the beam swept across the water once every ten seconds. In bad weather "
    "he stayed awake through the night, listening for the bell of the fog signal and writing the "
    "state of the sea in a logbook. The light was converted to electricity in 1954 and made fully "
    "automatic in 1981, when the last keeper left. Today the tower is a small museum. Visitors can "
    "climb the one hundred and twelve steps to the lantern room, where the old lens still stands, "
    "and look out over the bay towards the islands. On a clear day the mountains on the far side of "
    "the water are visible, and in spring the cliffs below are covered in nesting sea birds. The "
    "logbooks, the keeper's uniform and a model of the first lamp are on display in the house, "
    "along with photographs of the storms that gave the lighthouse its reputation."
)


@dataclass
class AblationResult:
    mode: str  # zero | mean
    n_tokens: int
    base_loss: float
    loss: dict[str, list[float]]  # component ("attn", "mlp") -> loss with layer L knocked out
    truncated_from: int = 0  # token count of the text before the budget cut it (0: not cut)
    components: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(next(iter(self.loss.values())))

    def delta(self, component: str) -> list[float]:
        return [x - self.base_loss for x in self.loss[component]]

    def ranking(self, top: int = 5) -> list[tuple[str, int, float]]:
        """The (component, layer, delta loss) that hurt most when removed, largest first."""
        rows = [(c, i, d) for c in self.loss for i, d in enumerate(self.delta(c))]
        return sorted(rows, key=lambda r: -r[2])[:top]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "n_tokens": self.n_tokens,
            "truncated_from": self.truncated_from,
            "base_loss": self.base_loss,
            "loss": self.loss,
            "delta": {c: self.delta(c) for c in self.loss},
        }


def _replace_row(row: int, value: torch.Tensor | None):
    """A hook that knocks out batch row `row` only: zeros, or `value` (E,) at every position."""

    def hook(x: torch.Tensor, _hook) -> torch.Tensor:
        x = x.clone()
        x[row] = 0.0 if value is None else value.to(x.dtype)
        return x

    return hook


# Logit floats one batched forward may hold: rows x T x V <= this (512 MiB in float32).
LOGIT_BUDGET = 1 << 27


@torch.no_grad()
def ablate_layers(source: Any, text: str | list[int] = DEFAULT_TEXT, *, mode: str = "zero",
                  components: tuple[str, ...] = ("attn", "mlp"), max_tokens: int = 512,
                  progress: Callable[[int, str], None] | None = None) -> AblationResult:  # fmt: skip
    """Knock out each layer's attention / MLP output in turn; loss on `text` for each.

    `mode` "zero" replaces the output with zeros, "mean" with its mean over the text's
    positions (from an unablated run). The text is cut to its first `max_tokens` tokens.
    The knock-outs run as batch rows (row b knocks out one component), as many per
    forward as LOGIT_BUDGET allows. `progress(done, label)` is called after each forward
    with the number of knock-outs it completed.
    """
    if mode not in MODES:
        raise PellucidError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", param="mode")
    bad = [c for c in components if c not in COMPONENTS]
    if bad or not components:
        raise PellucidError(
            f"components must be among {', '.join(COMPONENTS)}, got {list(components)}",
            param="components",
        )
    if max_tokens < 2:
        raise PellucidError(f"max_tokens must be >= 2, got {max_tokens}", param="max_tokens")
    subject = load_subject(source)
    model = subject.model
    ids = list(text) if isinstance(text, list) else subject.tokenizer.encode(text)
    full = len(ids)
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise PellucidError(
            f"the text is {len(ids)} token(s); the loss needs at least 2", param="text"
        )
    tokens = as_batch(ids, next(model.parameters()).device)
    n = len(model.blocks)
    names = [f"blocks.{i}.{COMPONENTS[c]}" for c in components for i in range(n)]
    means: dict[str, torch.Tensor] = {}
    if mode == "mean":
        cache = model.run_with_cache(tokens, names)
        means = {k: cache[k].mean(dim=(0, 1)) for k in names}  # (E,) each
        logits = cache.logits
        base = float(torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]))
    else:
        base = next_token_loss(model, tokens)
    if progress:
        progress(0, "baseline")
    jobs = [(c, i) for c in components for i in range(n)]
    rows = max(1, min(len(jobs), LOGIT_BUDGET // (len(ids) * model.cfg.vocab_size)))
    loss: dict[str, list[float]] = {c: [0.0] * n for c in components}
    for start in range(0, len(jobs), rows):
        chunk = jobs[start : start + rows]
        hooks = []
        for b, (c, i) in enumerate(chunk):
            name = f"blocks.{i}.{COMPONENTS[c]}"
            hooks.append((name, _replace_row(b, means.get(name))))
        x = tokens.expand(len(chunk), -1)  # (R, T): the same text, one knock-out per row
        with model.hooks(hooks):
            logits = model(x)  # (R, T, V)
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none"
        ).mean(dim=1)  # (R,)
        for (c, i), v in zip(chunk, ce.tolist(), strict=True):
            loss[c][i] = v
        if progress:
            c, i = chunk[-1]
            progress(len(chunk), f"{c} {i}")
    return AblationResult(
        mode, len(ids), base, loss, full if full > len(ids) else 0, list(components)
    )
