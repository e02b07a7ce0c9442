"""Make tests/data/greedy_<model>.json: transformers' float32 greedy tokens on a GGUF file, and llama.cpp's.

The reference for "pellucid's default format gives the model's own greedy text":
transformers loads the same GGUF (`from_pretrained(..., gguf_file=...)`, dequantized to
float32) and decodes greedily; llama.cpp's tokens are recorded beside them (its 8-bit
activations can tip a near tie) so the test can report how often it agrees. Prompt ids
come from pellucid's tokenizer, which equals llama.cpp's on this file (tests/data/
tokenizer_cases_*.json), so all three engines see the same ids.

    .venv/bin/python benchmarks/make_greedy_cases.py --model qwen2.5-coder-1.5b-instruct \\
        --peer-python ~/.cache/peers/llama/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):\n",
    "Write a haiku about the sea.\n",
    '{"name": "Ada", "languages": [',
    "Q: What is 17 times 23?\nA:",
]

PEER = """
import json, sys
import llama_cpp, numpy as np
path, n = sys.argv[1], int(sys.argv[2])
prompts = json.loads(sys.stdin.read())
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
out = []
for ids in prompts:
    llm.reset(); llm.eval(ids); toks = []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        t = int(np.argmax(logits)); toks.append(t); llm.eval([t])
    out.append(toks)
print(json.dumps({"tokens": out, "version": llama_cpp.__version__}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--peer-python", default=os.environ.get("PELLUCID_PEER_PYTHON"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "tests" / "data")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from pellucid import registry
    from pellucid.text.gguf import gguf_text
    from pellucid.weights.gguf import GGUFFile

    torch.set_num_threads(2)
    path = registry.resolve(args.model)
    tok, _ = gguf_text(GGUFFile(path).metadata)
    prompts = [tok.encode(p) for p in PROMPTS]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    cases = []
    with torch.inference_mode():
        for text, ids in zip(PROMPTS, prompts, strict=True):
            out = model(torch.tensor([ids]), use_cache=True)
            toks = []
            for _ in range(args.tokens):  # plain argmax, no end-of-generation stop
                toks.append(int(out.logits[0, -1].argmax()))
                out = model(torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            cases.append({"prompt": text, "prompt_ids": ids, "transformers": toks})
    doc = {"made_by": "benchmarks/make_greedy_cases.py", "model": args.model, "file": path.name,
           "transformers_version": transformers.__version__, "torch_version": torch.__version__,
           "settings": f"greedy, {args.tokens} new tokens, float32 (transformers), no EOS stop", "cases": cases}  # fmt: skip
    if args.peer_python:
        r = subprocess.run([args.peer_python, "-c", PEER, str(path), str(args.tokens)], input=json.dumps(prompts),
                           capture_output=True, text=True, check=True)  # fmt: skip
        peer = json.loads(r.stdout.strip().splitlines()[-1])
        doc["llama_cpp_python_version"] = peer["version"]
        for c, t in zip(cases, peer["tokens"], strict=True):
            c["llama.cpp"] = t
    dest = args.out / f"greedy_{args.model}.json"
    dest.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for c in cases:
        same = c.get("llama.cpp") == c["transformers"]
        print(f"{c['prompt']!r}: llama.cpp {'equal' if same else 'differs'}", file=sys.stderr)
    print(dest, file=sys.stderr)


if __name__ == "__main__":
    main()
