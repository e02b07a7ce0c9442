"""Speculative decoding on an edit-this-text task: plain vs prompt lookup vs a draft model.

The task asks the model to fix two typos in a paragraph, so its answer copies most of its
prompt: the case prompt lookup is made for. Everything runs greedy in one process on the
same loaded target (same dtype for every method), and every method's tokens are checked
against plain decoding's. Decode tok/s excludes the prefill: plain = (n - 1) tokens over
first-to-last token; speculative = n tokens from the end of the prefill to the last token.

    .venv/bin/python benchmarks/speculative.py                      # bf16, 256 tokens, 3 repeats
    .venv/bin/python benchmarks/speculative.py --num-draft 4 8 12 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg comined "
    "movable metal type, oil-based ink and a wooden press adapted from the screw presses used for making "
    "wine. Before his invention, books were copied by hand, which made them rare and expensiv. Within fifty "
    "years, printing shops had spread to more than two hundred cities across Europe, and millions of books "
    "were in circulation. Cheaper books helped more people learn to read, allowed scientists to share their "
    "results quickly, and gave new ideas a way to travel far beyond the places where they began. Newspapers, "
    "pamphlets and maps soon followed, and by the end of the sixteenth century the printed page had become "
    "part of everyday life in most European towns."
)
TASK = f"Fix the typos in this paragraph. Reply with the corrected paragraph only.\n\n{PARAGRAPH}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default=None, help="target weights: int8 or int4 (default: --dtype)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--num-draft", type=int, nargs="+", default=[4, 8], help="k values for prompt lookup")
    ap.add_argument("--model-num-draft", type=int, default=4, help="k for the draft models")
    ap.add_argument("--draft-quant", default="int4", help="draft model: the target's file loaded with this quant ('' = skip)")
    ap.add_argument("--draft-layers", type=int, default=8, help="draft model: the target's first N blocks (0 = skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results to this file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pellucid.api import LLM
    from pellucid.engine.speculative import (
        SpeculativeConfig,
        SpeculativeDecoder,
        make_drafter,
        measure_plain,
    )
    from pellucid.sampling.params import SamplingParams

    load0 = os.getloadavg()
    llm = LLM(args.model, dtype=args.dtype, max_batch=1, max_len=2048, quant=args.quant)
    ids = llm.encode_prompt(llm.render_chat([{"role": "user", "content": TASK}]))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    print(f"model {args.model} ({args.quant or args.dtype}), prompt {len(ids)} tokens, up to {args.max_tokens} new, greedy, "
          f"{args.threads} threads, load average at start {load0[0]:.2f}")  # fmt: skip

    methods: list[tuple[str, object, int]] = [(f"prompt lookup k={k}", SpeculativeConfig("ngram", num_draft=k), k) for k in args.num_draft]
    if args.draft_quant:
        methods.append((f"draft model {args.draft_quant} k={args.model_num_draft}",
                        SpeculativeConfig("model", num_draft=args.model_num_draft, draft_quant=args.draft_quant), args.model_num_draft))  # fmt: skip
    if args.draft_layers:
        methods.append((f"draft model first {args.draft_layers} layers k={args.model_num_draft}",
                        SpeculativeConfig("model", num_draft=args.model_num_draft, draft_layers=args.draft_layers), args.model_num_draft))  # fmt: skip
    decoders = {}
    for name, cfg, k in methods:
        decoders[name] = SpeculativeDecoder(llm.loaded, make_drafter(cfg, llm.loaded, max_len=2048), num_draft=k, max_len=2048)

    # warm up every path once (allocations, first-call overheads)
    warm = SamplingParams(temperature=0, max_tokens=8)
    measure_plain(llm, ids, warm)
    for dec in decoders.values():
        list(dec.run(llm.engine.make_request(ids, warm)))

    plain_runs = []
    spec_runs: dict[str, list] = {name: [] for name in decoders}
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits every method alike
        plain_runs.append(measure_plain(llm, ids, params))
        for name, dec in decoders.items():
            req = llm.engine.make_request(ids, params)
            list(dec.run(req))
            spec_runs[name].append((list(req.output_ids), req.text, dec.stats))
    plain = plain_runs[0]
    plain_tok_s = statistics.median(r.decode_tok_s for r in plain_runs)
    results = [{"method": "plain", "tokens": len(plain.token_ids), "decode_tok_s": plain_tok_s, "speedup": 1.0,
                "identical": True, "acceptance_rate": None, "mean_accepted": None, "tokens_per_round": 1.0}]  # fmt: skip
    for name, runs in spec_runs.items():
        tok_s = statistics.median(s.decode_tok_s for _, _, s in runs)
        out_ids, _, s = runs[0]
        results.append({
            "method": name, "tokens": s.generated, "decode_tok_s": tok_s, "speedup": tok_s / plain_tok_s,
            "identical": all(r[0] == plain.token_ids for r in runs), "acceptance_rate": s.acceptance_rate,
            "mean_accepted": s.mean_accepted, "tokens_per_round": s.tokens_per_round, "rounds": s.rounds,
            "rounds_without_draft": s.rounds_without_draft,
            "draft_ms_per_round": 1000 * s.draft_seconds / s.rounds, "verify_ms_per_round": 1000 * s.verify_seconds / s.rounds,
        })  # fmt: skip

    # what a verification costs: one target forward over T = k + 1 positions vs T = 1
    fwd = forward_times(llm, ids, sorted({1, 2} | {k + 1 for k in args.num_draft} | {args.model_num_draft + 1}))
    load1 = os.getloadavg()
    print(f"\n{'method':<34} {'tokens':>6} {'accept':>7} {'acc/rnd':>7} {'tok/fwd':>7} {'decode tok/s':>12} {'speed-up':>8}  same")
    for r in results:
        acc = f"{r['acceptance_rate']:.1%}" if r["acceptance_rate"] is not None else "-"
        mean = f"{r['mean_accepted']:.2f}" if r["mean_accepted"] is not None else "-"
        print(f"{r['method']:<34} {r['tokens']:>6} {acc:>7} {mean:>7} {r['tokens_per_round']:>7.2f} "
              f"{r['decode_tok_s']:>12.1f} {r['speedup']:>7.2f}x  {'yes' if r['identical'] else 'NO'}")  # fmt: skip
    print(f"\ntarget forward with the cache at position ~{len(ids) + 100}: "
          + ", ".join(f"T={t}: {ms:.1f} ms ({ms / fwd[1]:.2f}x)" for t, ms in fwd.items()))
    print(f"\nplain output ({len(plain.token_ids)} tokens): {plain.text!r}")
    print(f"load average at end {load1[0]:.2f} (2 cores; above ~2 means other work shared them)")
    if args.json_out:
        meta = {"forward_ms": fwd, "model": args.model, "dtype": args.dtype, "quant": args.quant, "prompt_tokens": len(ids), "max_tokens": args.max_tokens,
                "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
                "machine": platform.machine(), "load_average": [load0[0], load1[0]],
                "time": time.strftime("%Y-%m-%d %H:%M:%S"), "plain_text": plain.text}  # fmt: skip
        with open(args.json_out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"wrote {args.json_out}")


@torch.inference_mode()
def forward_times(llm, ids: list[int], sizes: list[int], repeats: int = 7) -> dict[int, float]:
    """Best-of-N milliseconds of one cached target forward over T positions, for each T."""
    from pellucid.engine.kv_cache import KVCache
    from pellucid.models.layers import ForwardContext

    model = llm.model
    cache = KVCache(llm.config, 1, len(ids) + 256, llm.engine.cache.k.dtype)
    slots = torch.zeros(1, dtype=torch.long)
    start = len(ids) + 100
    model(torch.tensor([ids]), ForwardContext(torch.arange(len(ids))[None], cache, slots, len(ids)), last_only=True)
    best = {t: float("inf") for t in sizes}
    for _ in range(repeats):
        for t in sizes:
            x = torch.tensor([ids[:t]])
            t0 = time.perf_counter()
            model(x, ForwardContext(torch.arange(start, start + t)[None], cache, slots, start + t))
            best[t] = min(best[t], 1000 * (time.perf_counter() - t0))
    return best


if __name__ == "__main__":
    main()
