"""pellucid vs llama.cpp vs transformers on one workload, in one run, with ratios.

Every configuration runs in its own fresh process, one after another (never two at
once): pellucid through `pellucid.cli.bench` (its worker), transformers (bf16 and fp32,
loading the same GGUF through `from_pretrained(gguf_file=...)`) and llama-cpp-python
through benchmarks/core.py. llama-cpp-python is never a dependency of pellucid: give
an interpreter that has it (`--peer-python`, default $PELLUCID_PEER_PYTHON).

    .venv/bin/python benchmarks/compare.py --peer-python /work/peer-venv/bin/python
    .venv/bin/python benchmarks/compare.py --pellucid int4,int8,bfloat16 --no-transformers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _peer(python: str, engine: str, gguf: str, ids_file: str, args, dtype: str = "bfloat16") -> dict:
    cmd = [python, str(HERE / "core.py"), engine, "--gguf", gguf, "--ids", ids_file, "--gen", str(args.gen),
           "--threads", str(args.threads), "--repeat", str(args.repeat), "--dtype", dtype]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _pellucid_configs(spec: str, base):
    from pellucid.cli.bench import BenchConfig

    out = []
    for item in spec.split(","):
        fmt, _, mode = item.strip().partition(":")
        q = fmt if fmt.startswith("int") or fmt == "auto" else None
        out.append(BenchConfig(**{**asdict(base), "dtype": "bfloat16" if q and "bf16" in mode else ("float32" if q else fmt),
                                  "quant": q}))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--pellucid", default="default,bfloat16,float32",
                    help="comma list of FORMAT[:bf16] (FORMAT: float32, bfloat16, int8, int4, default; :bf16 = bfloat16 activations)")
    ap.add_argument("--peer-python", default=os.environ.get("PELLUCID_PEER_PYTHON"))
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()

    from pellucid import registry, runtime
    from pellucid.cli.bench import BenchConfig, prompt_ids, run_isolated

    gguf = str(registry.resolve(args.model))
    load_before = os.getloadavg()
    from pellucid.text.tokenizer import Tokenizer
    from pellucid.weights.gguf import GGUFFile

    tok = Tokenizer.from_gguf(GGUFFile(gguf).metadata)
    # the prompts pellucid bench runs (one variant per run: a cold one, a warm-up, then `repeat`), so every
    # engine prefills the same distinct prompts and none is answered from a cache
    ids = [prompt_ids(tok, args.prompt, k) for k in range(args.repeat + 2)]
    ids_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(ids, ids_file)
    ids_file.close()

    base = BenchConfig(model=args.model, prompt_tokens=args.prompt, gen_tokens=args.gen, threads=args.threads,
                       repeat=args.repeat, max_len=512)  # fmt: skip
    spec = args.pellucid.replace("default", runtime.DEFAULT_QUANT or runtime.DEFAULT_DTYPE)
    rows: list[dict] = []
    if args.peer_python:
        print("llama.cpp ...", file=sys.stderr, flush=True)
        rows.append(_peer(args.peer_python, "llama.cpp", gguf, ids_file.name, args))
    for cfg in _pellucid_configs(spec, base):
        print(f"pellucid {cfg.label} ...", file=sys.stderr, flush=True)
        r = run_isolated(cfg)
        r["engine"] = f"pellucid {cfg.label}"
        rows.append(r)
    if not args.no_transformers:
        for dt in ("bfloat16", "float32"):
            print(f"transformers {dt} ...", file=sys.stderr, flush=True)
            rows.append(_peer(sys.executable, "transformers", gguf, ids_file.name, args, dt))
    load_after = os.getloadavg()

    ref = next((r for r in rows if r["engine"] == "llama.cpp"), None)
    head = f"{'engine':34s} {'load s':>7s} {'load+1st s':>10s} {'prefill tok/s':>13s} {'decode tok/s':>12s} {'p50 ms':>7s} {'p99 ms':>7s} {'RSS MiB':>8s}"
    if ref:
        head += f" {'prefill x':>9s} {'decode x':>8s} {'RSS x':>6s}"
    from pellucid.cli.bench import versions

    v = versions()
    print(f"host: {v['cpu']}, {v['logical_cpus']} logical CPUs; flags: {v['cpu_flags']}")
    print(f"pellucid kernels: {v['kernels']}; torch {v['torch']}")
    print(head)
    for r in rows:
        line = (f"{r['engine']:34s} {r['load_seconds']:7.2f} {r['load_seconds'] + r['first_token_seconds']:10.2f} "
                f"{r['prefill_tok_s']:13.0f} {r['decode_tok_s']:12.1f} {r['latency_p50_ms']:7.2f} {r['latency_p99_ms']:7.2f} "
                f"{r['peak_rss_mib']:8.0f}")  # fmt: skip
        if ref:
            line += (f" {r['prefill_tok_s'] / ref['prefill_tok_s']:9.2f} {r['decode_tok_s'] / ref['decode_tok_s']:8.2f} "
                     f"{r['peak_rss_mib'] / ref['peak_rss_mib']:6.2f}")  # fmt: skip
        print(line)
    by = {r["engine"]: r for r in rows}
    for dt in ("bfloat16", "float32"):
        t = by.get(f"transformers {dt}")
        for name, r in by.items():
            if t and name.startswith("pellucid") and name.split()[1] == dt:
                print(f"{name} decode vs transformers {dt}: x{r['decode_tok_s'] / t['decode_tok_s']:.2f}")
    if ref:
        for name, r in by.items():
            if name.startswith("pellucid"):
                same = sum(a == b for a, b in zip(r["tokens"], ref["tokens"], strict=False))
                print(f"{name}: greedy tokens equal to llama.cpp's for {same}/{len(ref['tokens'])} "
                      f"(first difference at {next((i for i, (a, b) in enumerate(zip(r['tokens'], ref['tokens'], strict=False)) if a != b), None)})")  # fmt: skip
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1-minute)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "loadavg": [load_before, load_after],
                                                   "time": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
