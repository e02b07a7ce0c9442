"""Structured output: the cost of the grammar mask per token, and decode speed with and
without a JSON schema, side by side in one run.

    .venv/bin/python benchmarks/structured.py                 # the default format, batch 1 and 4
    .venv/bin/python benchmarks/structured.py --quant none --dtype bfloat16 --rounds 5

1. Mask cost on the real vocabulary (49,152 tokens): the constrained outputs of part 2 are
   replayed token by token through a fresh constraint, timing llguidance's bitmask fill,
   `allowed_mask()` (fill + unpack to a bool (V,) tensor, what the sampler asks for), the
   mask applied to the logits, and `accept()`. Also the grammar's compile time, cold and
   cached (a new request copies a compiled matcher).
2. End-to-end decode: the same prompts decoded by the engine with a JSON schema (a list of
   records long enough to fill max_tokens) and without one (ignore_eos, same max_tokens).
   Runs alternate (plain, constrained, plain, ...) so that load on the machine hits both
   alike; tok/s is generated tokens over the decode steps' time (engine.stats, prefill
   excluded); the median over rounds is reported. Goal: constrained >= 90% of plain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 12,
            "maxItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "name": {"type": "string", "maxLength": 24},
                    "email": {"type": "string", "format": "email"},
                    "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
                    "score": {"type": "number", "minimum": 0, "maximum": 100},
                },
                "required": ["id", "name", "email", "role", "score"],
            },
        }
    },
    "required": ["records"],
}
PROMPTS = [
    "Make a JSON list of the users of a small blog, with id, name, email, role and score.",
    "Return the staff of a library as JSON records: id, name, email, role, score.",
    "Give JSON records for the members of a chess club (id, name, email, role, score).",
    "List the accounts of a shop's admin panel as JSON with id, name, email, role and score.",
]


def decode_run(llm, prompts: list[str], max_tokens: int, constrained: bool) -> tuple[float, int, list]:
    """(decode seconds, generated tokens, requests) for one batch of prompts."""
    from pellucid.sampling.constraints import make_constraint
    from pellucid.sampling.params import SamplingParams

    eng = llm.engine
    reqs = []
    for p in prompts:
        text = llm.render_chat([{"role": "user", "content": p}])
        c = make_constraint(llm.tokenizer, json_schema=SCHEMA) if constrained else None
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=not constrained)
        reqs.append(llm.request(text, params, constraint=c))
    for r in reqs:
        eng.add_request(r)
    while any(not r.prefill_done for r in reqs):  # prefill first, untimed
        eng.step()
    eng.stats.token_latency.clear()
    before = sum(len(r.output_ids) for r in reqs)
    while eng.has_unfinished():
        eng.step()
    secs = sum(eng.stats.token_latency)
    return secs, sum(len(r.output_ids) for r in reqs) - before, reqs


def mask_costs(tok, outputs: list[list[int]]) -> dict[str, list[float]]:
    from pellucid.sampling.constraints import make_constraint, mask_words

    base = make_constraint(tok, json_schema=SCHEMA)
    V = tok.vocab_size
    logits = torch.randn(1, V)
    t: dict[str, list[float]] = {"llguidance bitmask fill": [], "allowed_mask() (fill + unpack)": [],
                                 "mask applied to logits (masked_fill)": [], "accept(token)": []}  # fmt: skip
    for ids in outputs:
        c = base.copy()
        bits = torch.empty((1, mask_words(V)), dtype=torch.int32)
        for tid in ids:
            if c.is_finished():
                break
            t0 = time.perf_counter()
            c.fill_bitmask(bits, 0)
            t1 = time.perf_counter()
            m = c.allowed_mask()
            t2 = time.perf_counter()
            logits.masked_fill(~m, float("-inf"))
            t3 = time.perf_counter()
            c.accept(tid)
            t4 = time.perf_counter()
            t["llguidance bitmask fill"].append(t1 - t0)
            t["allowed_mask() (fill + unpack)"].append(t2 - t1)
            t["mask applied to logits (masked_fill)"].append(t3 - t2)
            t["accept(token)"].append(t4 - t3)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto", help="activations (default: the CLI default)")
    ap.add_argument("--quant", default=None, help="weights (default: the CLI default format)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", default="1,4")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from pellucid import registry, runtime
    from pellucid.api import LLM
    from pellucid.sampling.constraints import ll_tokenizer, make_constraint

    llm = LLM(args.model or registry.DEFAULT_MODEL, dtype=args.dtype, quant=args.quant or runtime.DEFAULT_QUANT,
              max_batch=4, max_len=2048)  # fmt: skip
    tok = llm.tokenizer
    print(f"model {llm.model_name} ({llm.loaded.quant or 'float'} weights, {args.dtype} activations), vocab {tok.vocab_size}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    t0 = time.perf_counter()
    ll_tokenizer(tok)
    print(f"llguidance vocabulary from pellucid's tokenizer: {1e3 * (time.perf_counter() - t0):.0f} ms (once per tokenizer)")
    schema = dict(SCHEMA, title="cold")  # a grammar not seen yet
    t0 = time.perf_counter()
    make_constraint(tok, json_schema=schema)
    t1 = time.perf_counter()
    make_constraint(tok, json_schema=schema)
    t2 = time.perf_counter()
    print(f"grammar compile: cold {1e3 * (t1 - t0):.1f} ms, cached {1e3 * (t2 - t1):.2f} ms")

    print(f"\n## decode tok/s, greedy, max_tokens {args.max_tokens}, median of {args.rounds} alternating rounds")
    print(f"{'batch':>5} {'plain tok/s':>12} {'JSON schema tok/s':>18} {'ratio':>7}  finished(constrained)")
    outputs: list[list[int]] = []
    decode_run(llm, PROMPTS[:1], 8, False)  # warm-up
    for B in [int(b) for b in args.batch.split(",")]:
        plain, cons, fin = [], [], []
        for _ in range(args.rounds):
            s, n, _ = decode_run(llm, PROMPTS[:B], args.max_tokens, False)
            plain.append(n / s)
            s, n, reqs = decode_run(llm, PROMPTS[:B], args.max_tokens, True)
            cons.append(n / s)
            fin = [r.finish_reason for r in reqs]
            outputs = [r.output_ids for r in reqs]
            for r in reqs:
                if r.finish_reason == "stop":
                    json.loads(r.text)
        p, c = statistics.median(plain), statistics.median(cons)
        print(f"{B:>5} {p:>12.1f} {c:>18.1f} {c / p:>7.1%}  {fin}")
    print("sample constrained output:", outputs[0] and tok.decode(outputs[0])[:160] + "...")

    print("\n## mask cost per token (replaying the constrained outputs), microseconds")
    costs = mask_costs(tok, outputs)
    print(f"{'step':40s} {'median':>8} {'mean':>8} {'p99':>8} {'max':>8}  tokens")
    for name, ts in costs.items():
        ts = sorted(ts)
        print(f"{name:40s} {1e6 * ts[len(ts) // 2]:8.1f} {1e6 * statistics.mean(ts):8.1f} "
              f"{1e6 * ts[int(0.99 * (len(ts) - 1))]:8.1f} {1e6 * ts[-1]:8.1f}  {len(ts)}")  # fmt: skip
    total = statistics.mean(costs["allowed_mask() (fill + unpack)"]) + statistics.mean(costs["mask applied to logits (masked_fill)"]) + statistics.mean(costs["accept(token)"])
    print(f"mask + apply + accept, mean: {1e3 * total:.3f} ms per token per constrained request")


if __name__ == "__main__":
    main()
