"""The shared workload and the peer workers for benchmarks/compare.py.

Workload: 128 prompt token ids (pellucid's tokenizer on a fixed text, a distinct variant per
run: a cold run, a warm-up, then 3 measured runs), then 128 greedy tokens with EOS ignored,
2 threads, batch 1. Every engine gets the token ids themselves, so all see the same input.

- prefill tok/s = 128 / time to the first token (prompt forward + first draw)
- decode tok/s = tokens after the first / time from the first to the last token
- load = constructing the model from the GGUF file (imports not included)
- peak RSS = ru_maxrss of the worker process, which does nothing else

Each worker is its own process (run with the engine's own interpreter):

    python benchmarks/core.py transformers --dtype bfloat16 --ids ids.json
    /work/peer-venv/bin/python benchmarks/core.py llama.cpp --ids ids.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def _summary(name: str, load_s: float, ttfts: list[float], decode_lats: list[list[float]], tokens: list[int],
             n_prompt: int, first_s: float, versions: dict) -> dict:  # fmt: skip
    lats = sorted(x for run in decode_lats for x in run)
    rates = [len(run) / sum(run) for run in decode_lats if run]
    ttft = statistics.median(ttfts)
    return {
        "engine": name, "load_seconds": load_s, "first_token_seconds": first_s, "ttft_seconds": ttft,
        "prefill_tok_s": n_prompt / ttft, "decode_tok_s": statistics.median(rates),
        "latency_p50_ms": lats[len(lats) // 2] * 1e3, "latency_p99_ms": lats[min(len(lats) - 1, round(0.99 * (len(lats) - 1)))] * 1e3,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tokens": tokens, "versions": versions,
    }  # fmt: skip


def run_transformers(gguf: str, prompts: list[list[int]], gen: int, dtype: str, threads: int, repeat: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=getattr(torch, dtype))  # fmt: skip
    model.eval()
    load_s = time.perf_counter() - t

    @torch.inference_mode()
    def once(n: int, ids: list[int]) -> tuple[float, list[float], list[int]]:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        out = model(x, use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        past, toks, lats = out.past_key_values, [tok], []
        for _ in range(n - 1):
            t1 = time.perf_counter()
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            past = out.past_key_values
            lats.append(time.perf_counter() - t1)
            toks.append(tok)
        return ttft, lats, toks

    first_s = once(1, prompts[0])[0]
    once(16, prompts[1 % len(prompts)])
    runs = [once(gen, prompts[(2 + k) % len(prompts)]) for k in range(repeat)]
    return _summary(f"transformers {dtype}", load_s, [r[0] for r in runs], [r[1] for r in runs], runs[-1][2], len(prompts[0]),
                    first_s, {"transformers": transformers.__version__, "torch": torch.__version__})  # fmt: skip


def run_llama_cpp(gguf: str, prompts: list[list[int]], gen: int, threads: int, repeat: int, n_ctx: int) -> dict:
    import llama_cpp
    import numpy as np

    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)  # fmt: skip
    load_s = time.perf_counter() - t

    n_vocab = llm.n_vocab()

    def argmax_last() -> int:  # llm.scores stays zero unless logits_all: read the context's last row
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))))

    def once(n: int, ids: list[int]) -> tuple[float, list[float], list[int]]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = argmax_last()
        ttft = time.perf_counter() - t0
        toks, lats = [tok], []
        for _ in range(n - 1):
            t1 = time.perf_counter()
            llm.eval([tok])
            tok = argmax_last()
            lats.append(time.perf_counter() - t1)
            toks.append(tok)
        return ttft, lats, toks

    first_s = once(1, prompts[0])[0]
    once(16, prompts[1 % len(prompts)])
    runs = [once(gen, prompts[(2 + k) % len(prompts)]) for k in range(repeat)]
    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return _summary("llama.cpp", load_s, [r[0] for r in runs], [r[1] for r in runs], runs[-1][2], len(prompts[0]), first_s,
                    {"llama_cpp_python": llama_cpp.__version__, "system_info": info.strip()})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", choices=["transformers", "llama.cpp"])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--ids", required=True, help="JSON file: the prompt token ids, or a list of prompts (one per run)")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=512)
    a = ap.parse_args()
    with open(a.ids) as f:
        ids = json.load(f)
    if ids and isinstance(ids[0], int):  # one prompt for every run
        ids = [ids]
    if a.engine == "transformers":
        res = run_transformers(a.gguf, ids, a.gen, a.dtype, a.threads, a.repeat)
    else:
        res = run_llama_cpp(a.gguf, ids, a.gen, a.threads, a.repeat, a.n_ctx)
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
