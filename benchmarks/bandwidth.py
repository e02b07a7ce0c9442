"""Decode as a fraction of the machine's read bandwidth.

At batch 1 a decode step reads every weight byte once (the embedding excepted: it looks
up one row), so a step cannot be faster than (bytes read per token) / (read bandwidth).
This measures both in one process: the bandwidth with `pellucid::read_bytes` (every byte
of a 1 GiB buffer summed, two sequential streams per thread, best of 5) and the decode
rate of the model in its default format (128-token prompt, greedy, 3 runs of 128 tokens).

    .venv/bin/python benchmarks/bandwidth.py --model qwen2.5-coder-1.5b-instruct
"""

from __future__ import annotations

import argparse
import statistics
import time


def read_bandwidth(threads: int, gib: float = 1.0, repeat: int = 5) -> float:
    """Bytes per second that `threads` threads read from memory (best of `repeat`)."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.randint(0, 256, (int(gib * 2**30),), dtype=torch.uint8)
    torch.ops.pellucid.read_bytes(buf)  # pages touched once before timing
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        torch.ops.pellucid.read_bytes(buf)
        best = min(best, time.perf_counter() - t)
    return buf.numel() / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()

    import torch

    from pellucid import kernels
    from pellucid.api import LLM
    from pellucid.cli.bench import _run_once, prompt_ids, versions
    from pellucid.quantization.blocks import BlockEmbedding, BlockLinear

    assert kernels.available(), "needs pellucid's CPU kernels"
    one = read_bandwidth(1)
    bw = read_bandwidth(args.threads)
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, max_batch=1, max_len=512)
    per_token = sum(m.data.numel() for m in llm.model.modules() if isinstance(m, BlockLinear))
    embed = sum(m.data.numel() for m in llm.model.modules() if isinstance(m, BlockEmbedding))
    tied = any(isinstance(m, BlockEmbedding) and m.data is llm.model.lm_head.data for m in llm.model.modules())
    _run_once(llm, [prompt_ids(llm.tokenizer, 128, 1)], 16)  # warm-up
    rates = []
    for k in range(3):
        _, lat, _ = _run_once(llm, [prompt_ids(llm.tokenizer, 128, 2 + k)], args.tokens)
        rates.append(len(lat) / sum(lat))
    rate = statistics.median(rates)
    v = versions()
    print(f"host: {v['cpu']}, {v['logical_cpus']} logical CPUs; kernels: {v['kernels']}")
    print(f"read bandwidth: {one / 1e9:.1f} GB/s with 1 thread, {bw / 1e9:.1f} GB/s with {args.threads}")
    where = "the head is the embedding table" if tied else f"the {embed / 1e6:.0f} MB embedding table gives one row"
    print(f"{args.model}: {per_token / 1e6:.0f} MB of weights read per decode token (every linear layer and the head; {where})")
    print(f"decode {rate:.1f} tok/s (runs: {', '.join(f'{r:.1f}' for r in rates)}) = {rate * per_token / 1e9:.1f} GB/s "
          f"= {100 * rate * per_token / bw:.0f}% of the read bandwidth; the bound at 100%: {bw / per_token:.1f} tok/s")  # fmt: skip


if __name__ == "__main__":
    main()
