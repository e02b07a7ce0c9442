"""Serving throughput: many concurrent streaming clients against `pellucid serve`, next to
llama-cpp-python's server on the same model file, in one run.

    .venv/bin/python benchmarks/server.py
    .venv/bin/python benchmarks/server.py --clients 1 4 16 --requests 8 --max-tokens 128
    .venv/bin/python benchmarks/server.py --no-peer                 # pellucid only
    .venv/bin/python benchmarks/server.py --pellucid-args "--dtype float32"

Each client sends its requests one after another (streaming chat completions, the end of
generation banned with logit_bias so every request makes exactly --max-tokens tokens);
all clients run at once. For each level: aggregate output tokens/s (all tokens / wall
time), time to first token (request sent -> first content), per-request latency, and the
gap between tokens as a client sees it. The peer is llama-cpp-python's OpenAI-compatible
server (`python -m llama_cpp.server` from --peer-python) on the same GGUF file, started
with --interrupt_requests False (its default hands concurrent clients empty streams).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
TOPICS = [
    "a lighthouse keeper", "a lost robot", "the first snow", "a market in Marrakesh", "a chess prodigy",
    "an old violin", "a night train", "a garden on Mars", "a baker at dawn", "a river delta",
    "a clockmaker", "a storm at sea", "a library cat", "a mountain rescue", "a street musician", "a comet",
]  # fmt: skip


@dataclass
class Result:
    ttft: float
    latency: float
    tokens: int
    gaps: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen, path: str, timeout: float = 600) -> float:
    t = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see its log")
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return time.monotonic() - t
        except httpx.HTTPError:
            pass
        if time.monotonic() - t > timeout:
            raise SystemExit(f"server at {url} not ready after {timeout} s")
        time.sleep(0.5)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      ban: dict[str, float], seed: int) -> Result:  # fmt: skip
    body = {
        "model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": seed,
        "logit_bias": ban, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": prompt}],
    }  # fmt: skip
    t0 = time.perf_counter()
    first = None
    last = t0
    gaps: list[float] = []
    chunks = 0
    usage = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for c in obj.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
                    chunks += 1
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    return Result((first or end) - t0, end - t0, tokens, gaps)


async def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int, ban: dict[str, float]) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:

        async def one_client(k: int) -> list[Result]:
            out = []
            for j in range(requests):
                topic = TOPICS[(k + j) % len(TOPICS)]
                out.append(await one_request(client, url, model, f"Write a long story about {topic}.", max_tokens, ban, 1000 * k + j))
            return out

        t = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(k) for k in range(clients)))
        wall = time.perf_counter() - t
    results = [r for rs in per_client for r in rs]
    tokens = sum(r.tokens for r in results)
    gaps = [g for r in results for g in r.gaps]
    ttft = [r.ttft for r in results]
    lat = [r.latency for r in results]
    return {
        "clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
        "tok_s": tokens / wall, "ttft_mean": statistics.mean(ttft), "ttft_p50": statistics.median(ttft),
        "ttft_p95": _pct(ttft, 95), "latency_mean": statistics.mean(lat), "latency_p95": _pct(lat, 95),
        "gap_p50_ms": 1000 * statistics.median(gaps) if gaps else float("nan"),
        "short": sum(1 for r in results if r.tokens < max_tokens),
    }  # fmt: skip


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def start_pellucid(model_file: Path, port: int, extra: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from pellucid.cli import main; main()", "serve", "--model", str(model_file),
           "--served-model-name", "bench", "--port", str(port), "--max-batch", "16", "--log-level", "warning", *extra]  # fmt: skip
    print("$", shlex.join(["pellucid", *cmd[4:]]), flush=True)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def start_peer(python: str, model_file: Path, port: int, n_ctx: int, threads: int, log: Path,
               pythonpath: str | None) -> subprocess.Popen:  # fmt: skip
    cmd = [python, "-m", "llama_cpp.server", "--model", str(model_file), "--model_alias", "bench", "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--interrupt_requests", "False", "--verbose", "False"]  # fmt: skip
    env = dict(os.environ)
    if pythonpath:  # e.g. the server extras (uvicorn, fastapi, sse-starlette, ...) installed with --target
        env["PYTHONPATH"] = pythonpath
    print("$", ("PYTHONPATH=" + pythonpath + " " if pythonpath else "") + shlex.join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def eog_ban(model_file: Path) -> dict[str, float]:
    """logit_bias banning every end-of-generation token, so each request runs to max_tokens."""
    from pellucid.text.tokenizer import Tokenizer
    from pellucid.weights.gguf import GGUFFile

    tok = Tokenizer.from_gguf(GGUFFile(model_file).metadata)
    return {str(i): -100 for i in sorted(tok.eog_ids)}


def cpu_split(url: str) -> dict[str, float]:
    from pellucid.server.metrics import parse_metrics

    return parse_metrics(httpx.get(f"{url}/metrics").text)


def bench(name: str, url: str, args, ban) -> list[dict]:
    # warm up: one request alone, then one per slot at once (a compiled engine compiles here)
    asyncio.run(run_level(url, "bench", 1, 1, 16, ban))
    asyncio.run(run_level(url, "bench", max(args.clients), 1, 16, ban))
    rows = []
    for c in args.clients:
        before = cpu_split(url) if name == "pellucid" else None
        row = asyncio.run(run_level(url, "bench", c, args.requests, args.max_tokens, ban))
        row["server"] = name
        if before is not None:
            after = cpu_split(url)
            proc, eng, http = (after[k] - before[k] for k in ("pellucid_process_cpu_seconds_total",
                               "pellucid_engine_cpu_seconds_total", "pellucid_http_thread_cpu_seconds_total"))  # fmt: skip
            busy = after["pellucid_engine_busy_seconds_total"] - before["pellucid_engine_busy_seconds_total"]
            row |= {"server_cpu_s": proc, "engine_cpu_s": eng, "http_cpu_s": http, "engine_busy_s": busy}
            print(f"  {'':<22} server CPU {proc:.1f} s = engine thread {eng:.1f} + HTTP thread {http:.1f} + "
                  f"other threads (OpenMP workers) {proc - eng - http:.1f}; engine busy {busy:.1f} s of "
                  f"{row['wall_s']:.1f} s wall", flush=True)  # fmt: skip
        rows.append(row)
        print(f"  {name:<22} {c:>3} clients: {row['tok_s']:7.1f} tok/s  TTFT {row['ttft_mean']:.3f} s "
              f"(p95 {row['ttft_p95']:.3f})  latency {row['latency_mean']:.2f} s  gap p50 {row['gap_p50_ms']:.1f} ms"
              + (f"  [{row['short']} short]" if row["short"] else ""), flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-file", type=Path, default=None, help="GGUF file (default: the default model's)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=8, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--pellucid-args", default="", help="extra flags for pellucid serve")
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python")
    ap.add_argument("--peer-pythonpath", default=None, help="PYTHONPATH for the peer (where its server extras are)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-pellucid", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads for llama.cpp")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()

    if args.model_file is None:
        from pellucid import registry

        args.model_file = registry.resolve(registry.DEFAULT_MODEL)
    ban = eog_ban(args.model_file)
    print(f"model file {args.model_file}; {args.requests} requests x {args.max_tokens} tokens per client; "
          f"clients {args.clients}; load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    rows: list[dict] = []
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    if not args.no_pellucid:
        port = free_port()
        p = start_pellucid(args.model_file, port, shlex.split(args.pellucid_args), logs / "bench-pellucid.log")
        try:
            print(f"pellucid ready in {wait_health(f'http://127.0.0.1:{port}', p, '/health'):.1f} s", flush=True)
            rows += bench("pellucid", f"http://127.0.0.1:{port}", args, ban)
        finally:
            stop(p)
    if not args.no_peer:
        if not Path(args.peer_python).exists():
            print(f"peer: {args.peer_python} not found; skipped")
        else:
            port = free_port()
            n_ctx = 2048
            p = start_peer(args.peer_python, args.model_file, port, n_ctx, args.threads, logs / "bench-llama-cpp.log",
                           args.peer_pythonpath)  # fmt: skip
            try:
                print(f"llama-cpp-python ready in {wait_health(f'http://127.0.0.1:{port}', p, '/v1/models'):.1f} s", flush=True)
                rows += bench("llama-cpp-python", f"http://127.0.0.1:{port}", args, ban)
            finally:
                stop(p)
    print()
    print(f"{'server':<18} {'clients':>7} {'tok/s':>8} {'x 1 client':>10} {'TTFT s':>7} {'TTFT p95':>8} "
          f"{'latency s':>9} {'gap ms':>7}")  # fmt: skip
    base = {}
    for r in rows:
        base.setdefault(r["server"], r["tok_s"])
        print(f"{r['server']:<18} {r['clients']:>7} {r['tok_s']:>8.1f} {r['tok_s'] / base[r['server']]:>9.2f}x "
              f"{r['ttft_mean']:>7.3f} {r['ttft_p95']:>8.3f} {r['latency_mean']:>9.2f} {r['gap_p50_ms']:>7.1f}")  # fmt: skip
    by = {(r["server"], r["clients"]): r["tok_s"] for r in rows}
    for c in args.clients:
        if ("pellucid", c) in by and ("llama-cpp-python", c) in by:
            print(f"pellucid / llama-cpp-python at {c} clients: {by[('pellucid', c)] / by[('llama-cpp-python', c)]:.2f}x")
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
