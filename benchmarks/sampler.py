"""Cost of the sampler per token on the real vocabulary, next to a decode step of the model.

    .venv/bin/python benchmarks/sampler.py            # sampler + the default model's decode step
    .venv/bin/python benchmarks/sampler.py --no-model # sampler only

For each configuration and batch size it times `sample()` plus the step's one host sync
(`.tolist()`) plus `accept()` for every row: everything the engine spends on a token
besides the forward. The peer is a decode step of the default model (bfloat16, eager,
KV cache) at the same batch size, measured in the same run; the goal is a sampler under
10% of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from pellucid.sampling.params import SamplingParams
from pellucid.sampling.sampler import SequenceSampler, sample

V = 49_152
PROMPT_LEN, GENERATED = 256, 128


class FixedMask:
    """A stand-in constraint: the same allowed set every step (structured output's cost)."""

    def __init__(self, allowed: torch.Tensor):
        self.allowed = allowed

    def allowed_mask(self) -> torch.Tensor:
        return self.allowed

    def accept(self, token: int) -> None:
        pass


CONFIGS = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top_p only": dict(temperature=0.8, top_p=0.9),
    "all steps on": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, frequency_penalty=0.5,
                         presence_penalty=0.3, repetition_penalty=1.1, logprobs=True, top_logprobs=5,
                         min_tokens=GENERATED + 10),  # fmt: skip
    "all steps + constraint mask": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, frequency_penalty=0.5,
                                        presence_penalty=0.3, repetition_penalty=1.1, logprobs=True,
                                        top_logprobs=5, min_tokens=GENERATED + 10, _mask=True),  # fmt: skip
}


def make_seqs(cfg: dict, B: int, gen: torch.Generator) -> list[SequenceSampler]:
    cfg = dict(cfg)
    use_mask = cfg.pop("_mask", False)
    seqs = []
    for i in range(B):
        bias = {int(t): float(v) for t, v in zip(torch.randint(0, V, (8,), generator=gen).tolist(), [-100, 5, -5, 2, -2, 1, -1, 100], strict=True)} if cfg.get("top_k") else {}
        p = SamplingParams(**cfg, logit_bias=bias, seed=i, max_tokens=1024)
        prompt = torch.randint(0, V, (PROMPT_LEN,), generator=gen).tolist()
        constraint = FixedMask(torch.rand(V, generator=gen) < 0.5) if use_mask else None
        s = SequenceSampler(p, vocab_size=V, prompt_ids=prompt, eog_ids={0, 2}, constraint=constraint)
        for t in torch.randint(0, V, (GENERATED,), generator=gen).tolist():
            s.accept(t)
        seqs.append(s)
    return seqs


def synthetic_logits(B: int, gen: torch.Generator) -> torch.Tensor:
    """LM-like rows: a Zipf-shaped distribution (p ~ 1/rank^1.2) over a random order."""
    ranks = torch.arange(1, V + 1, dtype=torch.float32)
    row = -1.2 * torch.log(ranks)
    return torch.stack([row[torch.randperm(V, generator=gen)] for _ in range(B)])


def real_logits(B: int) -> torch.Tensor:
    """Next-token logits of the default model after B different prompts (bfloat16 model)."""
    llm = time_decode.llm
    rows = []
    with torch.inference_mode():
        for i in range(B):
            ids = llm.tokenizer.encode(PROMPTS[i % len(PROMPTS)])
            rows.append(llm.model(torch.tensor([ids]), last_only=True).float())
    return torch.cat(rows)


PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "My favourite colour is",
           "In 1492,", "The best way to learn", "Hello", "The weather today"]  # fmt: skip


def time_sampler(cfg: dict, B: int, iters: int, logits: torch.Tensor) -> float:
    """Median seconds per step (sample + host sync + accept for every row)."""
    gen = torch.Generator().manual_seed(0)
    seqs = make_seqs(cfg, B, gen)
    times = []
    for i in range(iters + 5):
        t = time.perf_counter()
        out = sample(logits, seqs)
        toks = out.tokens.tolist()
        if out.logprobs is not None:
            out.logprobs.tolist()
        for s, tok in zip(seqs, toks, strict=True):
            s.accept(tok)
        if i >= 5:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_decode(B: int, steps: int) -> float:
    """Median seconds of one decode step of the default model at batch B (greedy)."""
    from pellucid.api import LLM

    llm = time_decode.llm = getattr(time_decode, "llm", None) or LLM(dtype="bfloat16", max_batch=16, max_len=512)
    eng = llm.engine
    reqs = [llm.request(f"Story {i}: once upon a time", SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)) for i in range(B)]
    for r in reqs:
        eng.add_request(r)
    while any(not r.prefill_done or not r.output_ids for r in reqs):
        eng.step()
    eng.stats.token_latency.clear()
    for _ in range(steps):
        eng.step()
    lat = list(eng.stats.token_latency)
    for r in reqs:
        eng.abort(r.request_id)
    return statistics.median(lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-model", action="store_true", help="skip the decode-step peer")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, V={V:,}, prompt {PROMPT_LEN} + {GENERATED} generated tokens per row")
    decode: dict[int, float] = {}
    if not args.no_model:
        for B in (1, 16):
            decode[B] = time_decode(B, 20)
    gen = torch.Generator().manual_seed(1)
    logits = {B: real_logits(B) if decode else synthetic_logits(B, gen) for B in (1, 16)}
    print(f"logits: {'the real model' if decode else 'synthetic Zipf rows'}")
    rows = [(name, B, time_sampler(cfg, B, args.iters, logits[B])) for name, cfg in CONFIGS.items() for B in (1, 16)]
    if decode:  # measured again after the sampler, so that both see the same machine load
        for B in (1, 16):
            decode[B] = (decode[B] + time_decode(B, 20)) / 2
            print(f"decode step of the default model (bf16, eager, KV cache, greedy), B={B}: {decode[B] * 1e3:.2f} ms")
    print(f"\n{'configuration':32s} {'B':>3s} {'ms/step':>8s} {'us/token':>9s} {'% of decode step':>17s}")
    for name, B, t in rows:
        share = f"{100 * t / decode[B]:.1f}%" if B in decode else "-"
        print(f"{name:32s} {B:3d} {t * 1e3:8.3f} {t / B * 1e6:9.1f} {share:>17s}")


if __name__ == "__main__":
    main()
