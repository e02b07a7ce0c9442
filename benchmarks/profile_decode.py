"""Where a decode step's time goes: operator calls per token, time in pellucid's kernels vs the rest.

One model in the default format (or --quant/--dtype), a 128-token prompt, then N greedy
tokens under torch.profiler; the prompt's prefill is run before profiling starts.

    .venv/bin/python benchmarks/profile_decode.py --model smollm2-135m-instruct --tokens 32
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quant", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from pellucid import runtime
    from pellucid.api import LLM
    from pellucid.cli.bench import prompt_ids
    from pellucid.sampling.params import SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype=args.dtype, quant=args.quant or runtime.DEFAULT_QUANT, max_batch=1, max_len=512)
    ids = prompt_ids(llm.tokenizer, 128)
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    llm.generate(ids, params)  # warm-up
    eng = llm.engine

    def decode(prof=None) -> tuple[int, float]:
        req = eng.make_request(ids, params)
        eng.add_request(req)
        eng.step()  # the prefill, outside the measurement
        steps, t0 = 0, time.perf_counter()
        while not req.finished:
            eng.step()
            steps += 1
        return steps, time.perf_counter() - t0

    steps, wall = decode()  # timed without the profiler
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        psteps, pwall = decode()
    ev = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    calls = sum(e.count for e in ev)
    ours = sum(e.self_cpu_time_total for e in ev if e.key.startswith("pellucid::")) / 1e3 / psteps
    other = sum(e.self_cpu_time_total for e in ev if not e.key.startswith("pellucid::")) / 1e3 / psteps
    ms = wall / steps * 1e3
    print(f"{args.model}, {llm.loaded.quant or 'no quantization'}, kernels: {runtime.kernels()}")
    print(f"decode: {ms:.2f} ms/token ({steps / wall:.1f} tok/s) without the profiler")
    print(f"operator calls per token (nested ones included): {calls / psteps:.0f}")
    pms = pwall / psteps * 1e3
    print(f"profiled step {pms:.2f} ms: pellucid's ops {ours:.2f} ms ({100 * ours / pms:.0f}%), other aten ops "
          f"{other:.2f} ms ({100 * other / pms:.0f}%), Python, the engine and the sampler {max(0.0, pms - ours - other):.2f} ms")  # fmt: skip
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
