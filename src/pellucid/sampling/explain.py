"""See the sampler work: the next-token distribution after each step of the chain.

`explain_next_token(llm, "The capital of France is", SamplingParams(top_k=3))` runs the
model once and the real sampler once (the same `sample` the engine calls, through its
trace hook), and returns one StageView per step: raw, after bias and penalties, after each
later stage of the chain (temperature, top-k, top-p, ...: sampler.STAGES), and the draw.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pellucid.sampling.params import KNOBS, SamplingParams
from pellucid.sampling.sampler import STAGES, SequenceSampler, sample


@dataclass
class Candidate:
    id: int
    text: str
    logit: float | None  # None: removed at this stage (logit -inf)
    prob: float  # probability at this stage (0 when removed)
    kept: bool


@dataclass
class StageView:
    name: str  # raw | bias_penalties | temperature | top_k | top_p | min_p | greedy | draw
    title: str  # e.g. "after top-k (k=50)"
    setting: str  # the step's parameters, or "off"
    kept: int  # tokens with probability > 0 after this stage
    candidates: list[Candidate] = field(default_factory=list)  # the same tokens in every stage

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def explain_next_token(llm, prompt: str | list[int], params: SamplingParams | None = None, *,
                       top: int = 10, chat: bool = False) -> list[StageView]:  # fmt: skip
    """The next-token distribution of `prompt` after each step of the sampler chain.

    The candidates are the `top` most likely tokens of the raw distribution and of the
    distribution after bias and penalties (a biased token shows up even when it was rare).
    With temperature 0 the chain ends in a greedy step instead of temperature..draw.
    """
    params = params or SamplingParams()
    if chat:
        prompt = llm.render_chat([{"role": "user", "content": prompt}])
    ids = llm.encode_prompt(prompt)
    tok = llm.tokenizer
    with torch.inference_mode():
        logits = llm.model(torch.tensor([ids], device=_device(llm)), last_only=True).float()  # (1, V)
    V = logits.shape[-1]
    seq = SequenceSampler(params, vocab_size=V, prompt_ids=ids, eog_ids=tok.eog_ids)
    traced: dict[str, torch.Tensor] = {}
    out = sample(logits, [seq], trace=lambda stage, x: traced.__setitem__(stage, x[0].detach().cpu()))
    chosen = int(out.tokens[0])

    raw, biased = traced["raw"], traced["mask"]  # "mask" = after bias, penalties and bans
    pick = list(dict.fromkeys(biased.topk(min(top, V)).indices.tolist() + raw.topk(min(top, V)).indices.tolist()))
    pick.sort(key=lambda i: -float(biased[i]))

    def view(name: str, title: str, setting: str, x: torch.Tensor) -> StageView:
        probs = torch.softmax(x, dim=-1)
        cands = [Candidate(i, tok.piece(i), _finite(float(x[i])), float(probs[i]), bool(x[i] > -math.inf)) for i in pick]
        return StageView(name, title, setting, int((x > -math.inf).sum()), cands)

    p = params
    bias_set = ", ".join(
        s for s in (
            f"logit_bias {len(p.logit_bias)} token(s)" if p.logit_bias else "",
            f"repetition {p.repetition_penalty:g}" if p.repetition_penalty != 1 else "",
            f"frequency {p.frequency_penalty:g}" if p.frequency_penalty else "",
            f"presence {p.presence_penalty:g}" if p.presence_penalty else "",
            f"min_tokens {p.min_tokens}" if p.min_tokens else "",
        ) if s
    ) or "off"  # fmt: skip
    stages = [
        view("raw", "raw (model)", "-", raw),
        view("bias_penalties", "after bias and penalties", bias_set, biased),
    ]
    if seq.greedy:
        point = torch.full_like(biased, -math.inf)
        point[chosen] = 0.0
        stages.append(view("greedy", "greedy (temperature 0): the argmax", "temperature 0", point))
        return stages
    # every stage of the sampler's chain after the bias, penalties and masks, each a knob of its own
    stages += [view(name, f"after {name.replace('_', '-')}", KNOBS[name].setting(getattr(p, name)), traced[name])
               for name in STAGES[STAGES.index("mask") + 1 :]]  # fmt: skip
    point = torch.full_like(biased, -math.inf)
    point[chosen] = 0.0
    if chosen not in pick:
        pick.append(chosen)
    stages.append(view("draw", "draw with the request's seeded generator", f"seed={seq.seed}", point))
    # the drawn token may be new to the candidate list: give the earlier stages its row too
    for s in stages[:-1]:
        if len(s.candidates) < len(pick):
            x = raw if s.name == "raw" else biased if s.name == "bias_penalties" else traced[s.name]
            probs = torch.softmax(x, dim=-1)
            s.candidates.append(Candidate(chosen, tok.piece(chosen), _finite(float(x[chosen])), float(probs[chosen]), bool(x[chosen] > -math.inf)))
    return stages


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _device(llm) -> torch.device:
    return next(llm.model.parameters()).device
