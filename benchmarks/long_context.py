"""One request that fills the model's context window while other clients stream, against
`pellucid serve` with its default settings (and llama.cpp's `llama-server` with a unified
KV cache of the same size, when given), on the same GGUF file, one after the other.

    .venv/bin/python benchmarks/long_context.py                       # the 1.5B, 30,000 tokens, 16 clients
    .venv/bin/python benchmarks/long_context.py --llama-server ~/.cache/peers/.../llama-server
    .venv/bin/python benchmarks/long_context.py --model smollm2-135m-instruct --long-tokens 7000

Two phases per server:

- short: `--clients` streaming clients, each `--requests` chats of `--max-tokens` tokens
  (end of generation banned), nothing else: their tokens/s.
- long: the same clients stream chats without pause while one request with a
  `--long-tokens`-token prompt (WikiText-2 test text, then a question) runs to its
  answer; the clients stop when it is done. Reported: the long request's time to first
  token, total time and answer, the clients' tokens/s and inter-token gaps meanwhile, the
  server's peak resident memory (VmHWM) and, for pellucid, the KV pool's figures from
  /metrics (budget, preemptions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from server import (  # noqa: E402
    Result,
    Server,
    cpu_seconds,
    eog_ban,
    llama_server,
    one_request,
    pellucid_server,
    summarize,
)

WIKITEXT = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
TOPICS = ["a lighthouse keeper", "a lost robot", "the first snow", "a market in Marrakesh", "a chess prodigy",
          "an old violin", "a night train", "a garden on Mars"]  # fmt: skip
QUESTION = "\n\nIn one sentence: what is the text above about?"


def long_prompt(model_file: Path, tokens: int) -> str:
    """WikiText-2's test text cut to `tokens` tokens in this model's tokenizer, then the question."""
    from pellucid.text.tokenizer import Tokenizer
    from pellucid.weights.gguf import GGUFFile

    tok = Tokenizer.from_gguf(GGUFFile(model_file).metadata)
    text = WIKITEXT.read_text()
    ids = tok.encode(text)
    if len(ids) < tokens:
        raise SystemExit(f"{WIKITEXT} has {len(ids):,} tokens, fewer than --long-tokens {tokens:,}")
    return tok.decode(ids[: tokens - len(tok.encode(QUESTION)) - 16]) + QUESTION


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def metrics(url: str) -> dict[str, float]:
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    return {k: float(v) for k, v in re.findall(r"^pellucid_(\w+) ([0-9.e+-]+)$", text, re.M)}


def chat(k: int, j: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long story about {TOPICS[(k + j) % len(TOPICS)]}."}]


async def short_phase(url: str, args, ban) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:

        async def one_client(k: int) -> list[Result]:
            return [await one_request(client, url, chat(k, j), args.max_tokens, ban) for j in range(args.requests)]

        t = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(one_client(k) for k in range(args.clients))) for r in rs]
        return summarize(results, time.perf_counter() - t, args.clients)


async def long_phase(url: str, prompt: str, args, ban) -> tuple[dict, dict]:
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:

        async def one_client(k: int) -> list[Result]:
            out, j = [], 0
            while not done.is_set():
                out.append(await one_request(client, url, chat(k, j), args.max_tokens, ban))
                j += 1
            return out

        async def the_long_one() -> Result:
            await asyncio.sleep(1.0)  # the clients are streaming when it comes
            try:
                return await one_request(client, url, [{"role": "user", "content": prompt}], args.long_max_tokens, {})
            finally:
                done.set()

        t = time.perf_counter()
        long_result, *per_client = await asyncio.gather(the_long_one(), *(one_client(k) for k in range(args.clients)))
        wall = time.perf_counter() - t
    results = [r for rs in per_client for r in rs]
    long = {"ttft_s": long_result.ttft, "latency_s": long_result.latency, "tokens": long_result.tokens,
            "text": long_result.text, "error": long_result.error}  # fmt: skip
    return long, summarize(results, wall, args.clients)


def run_server(server: Server, prompt: str, args, ban) -> dict:
    with server:
        pid = server.proc.pid
        out: dict = {"name": server.name}
        cpu0 = cpu_seconds(pid)
        out["short"] = asyncio.run(short_phase(server.url, args, ban))
        print(f"{server.name} short: {out['short']['tok_s']:.1f} tok/s, {out['short']['errors']} errors", flush=True)
        out["long"], out["beside"] = asyncio.run(long_phase(server.url, prompt, args, ban))
        out["cpu_s"] = cpu_seconds(pid) - cpu0
        out["peak_rss_mib"] = peak_rss_mib(pid)
        out["metrics"] = {k: v for k, v in metrics(server.url).items() if k.startswith(("kv_cache", "requests_preempted", "prefix_cache"))}
        lg = out["long"]
        print(f"{server.name} long: first token {lg['ttft_s']:.1f} s, done {lg['latency_s']:.1f} s, error {lg['error']}; "
              f"beside it {out['beside']['tok_s']:.1f} tok/s over {out['beside']['requests']} requests "
              f"({out['beside']['errors']} errors); peak RSS {out['peak_rss_mib']:,.0f} MiB", flush=True)  # fmt: skip
        print(f"  answer: {lg['text'][:200]!r}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--long-tokens", type=int, default=30_000)
    ap.add_argument("--long-max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2, help="requests per client in the short phase")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary: run it too (unified KV cache)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pellucid-args", default="", help="extra serve flags (default: none, the defaults are measured)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "long_context.json")
    args = ap.parse_args()

    from pellucid import registry

    model_file = registry.resolve(args.model)
    prompt = long_prompt(model_file, args.long_tokens)
    ban = eog_ban(model_file)
    logs = args.out.parent
    logs.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    print(f"{args.model}: a {args.long_tokens:,}-token request beside {args.clients} streaming clients; "
          f"{platform.processor() or platform.machine()}, commit {commit}", flush=True)
    runs = [run_server(pellucid_server(model_file, args.clients, args.pellucid_args.split(), logs / "long_pellucid.log"),
                       prompt, args, ban)]  # fmt: skip
    if args.llama_server:
        ctx = args.long_tokens + args.clients * 1024  # the long one plus room for every short one, one pool
        peer = llama_server(args.llama_server, model_file, args.clients, ctx // args.clients, args.threads,
                            logs / "long_llama.log", extra=("--kv-unified",))  # fmt: skip
        runs.append(run_server(peer, prompt, args, ban))
    args.out.write_text(json.dumps({"model": args.model, "commit": commit, "args": vars(args) | {"out": str(args.out)},
                                    "runs": runs}, indent=2))  # fmt: skip
    if len(runs) == 2:
        p, q = runs
        print(f"ratios pellucid / llama-server: short {p['short']['tok_s'] / q['short']['tok_s']:.2f}x, "
              f"beside the long one {p['beside']['tok_s'] / q['beside']['tok_s']:.2f}x, long request time "
              f"{q['long']['latency_s'] / p['long']['latency_s']:.2f}x faster, peak RSS "
              f"{p['peak_rss_mib'] / q['peak_rss_mib']:.2f}x")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
