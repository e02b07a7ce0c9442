"""Process start to first token: `pellucid generate` against llama-cpp-python, fresh processes.

What a one-shot command pays before its first token: the interpreter, imports, the load,
one prompt's prefill and one token. Each round runs pellucid's CLI
(`pellucid generate PROMPT --max-tokens 1 -m MODEL`) and then a llama-cpp-python script
(import, `Llama(...)`, one token) in fresh processes, one after the other; wall time and
peak RSS (the child's ru_maxrss) of each, then medians and ratios. llama-cpp-python is
never a dependency of pellucid: give an interpreter that has it (`--peer-python`, default
$PELLUCID_PEER_PYTHON).

    .venv/bin/python benchmarks/startup.py --model qwen2.5-coder-1.5b-instruct --rounds 5 \\
        --peer-python ~/.cache/peers/llama/bin/python
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

PEER = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[3]), verbose=False)
print(llm(sys.argv[2], max_tokens=1, temperature=0)["choices"][0]["text"])
"""


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Run cmd; (wall seconds, peak RSS MiB, stdout). Its output goes to files, not pipes, so
    a chatty child cannot block on a full pipe while we wait for it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0), err.seek(0)
        text, errors = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{errors[-2000:]}")
    return wall, usage.ru_maxrss / 1024, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name (pulled already)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-python", default=os.environ.get("PELLUCID_PEER_PYTHON"))
    args = ap.parse_args()

    from pellucid.registry import resolve

    gguf = str(resolve(args.model, pull_missing=False))
    ours = [sys.executable, "-m", "pellucid", "generate", args.prompt, "--max-tokens", "1", "-m", args.model,
            "--threads", str(args.threads)]  # fmt: skip
    theirs = [args.peer_python, "-c", PEER, gguf, args.prompt, str(args.threads)] if args.peer_python else None
    timed(ours)  # the first run builds nothing twice (kernels, caches) and warms the page cache
    if theirs:
        timed(theirs)
    rows: dict[str, list[tuple[float, float]]] = {"pellucid": [], "llama-cpp-python": []}
    for r in range(args.rounds):
        w, m, out = timed(ours)
        rows["pellucid"].append((w, m))
        line = f"round {r + 1}: pellucid {w:.2f} s {m:.0f} MiB ({out.strip()[:20]!r})"
        if theirs:
            w, m, out = timed(theirs)
            rows["llama-cpp-python"].append((w, m))
            line += f"; llama-cpp-python {w:.2f} s {m:.0f} MiB ({out.strip()[:20]!r})"
        print(line, flush=True)
    print(f"\n{args.model}, {args.rounds} rounds, {os.cpu_count()} cores, {args.threads} threads\n")
    print("| engine | wall s (median, min-max) | peak RSS MiB (median) |")
    print("|---|---|---|")
    med = {}
    for name, xs in rows.items():
        if xs:
            walls = [w for w, _ in xs]
            med[name] = (statistics.median(walls), statistics.median(m for _, m in xs))
            print(f"| {name} | {med[name][0]:.2f} ({min(walls):.2f}-{max(walls):.2f}) | {med[name][1]:.0f} |")
    if len(med) == 2:
        a, b = med["pellucid"], med["llama-cpp-python"]
        print(f"\npellucid / llama-cpp-python: wall {a[0] / b[0]:.2f}x, peak RSS {a[1] / b[1]:.2f}x")


if __name__ == "__main__":
    main()
