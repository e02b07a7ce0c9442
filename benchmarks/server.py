"""Serving under load: streaming clients against `pellucid serve` and llama.cpp's own
`llama-server`, on the same GGUF file, in one run.

    .venv/bin/python benchmarks/server.py --llama-server ~/.cache/peer/llama.cpp/build/bin/llama-server
    .venv/bin/python benchmarks/server.py --clients 1 4 16 64 --requests 4 --max-tokens 128
    .venv/bin/python benchmarks/server.py --workload shared          # the prefix-cache workload only
    .venv/bin/python benchmarks/server.py --no-peer --pellucid-args "--step-tokens 64"

Workloads (`--workload chat shared`, both by default):

- chat: every client sends `--requests` streaming chat requests one after another
  ("Write a long story about ..."), all clients at once; greedy, with every
  end-of-generation token banned by logit_bias so each request makes exactly --max-tokens.
- shared: the same ~1,000-token system prompt with a different question per request
  (16 clients, --shared-tokens tokens each), against pellucid with its prefix cache,
  pellucid with --no-prefix-cache, and llama-server (whose slots keep their prompts).
  pellucid's two runs must give the same texts.
- schema (`--workload schema`, pellucid alone): the chat clients asking for a list of
  records as a `json_schema` answer, against the same clients without one, in alternating
  rounds (`--schema-rounds`) on one server: what structured output costs under load.

Per level: aggregate output tokens/s (all tokens / wall time), time to first token
(request sent -> first content) p50/p95, inter-token gap as a client sees it p50/p99, a
stream's own rate after its first token (tokens after the first / time from the first
content to the last: the figure `pellucid bench` calls decode), failed requests, and the
server's CPU seconds (utime + stime from /proc). Both servers get the same number of
parallel slots (--slots: pellucid --max-batch, llama-server -np) and
all the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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
QUESTIONS = [
    "Can I return a jacket I bought five weeks ago?", "How long does shipping to Canada take?",
    "My order arrived damaged. What now?", "Do you price-match other stores?", "Can I change my delivery address?",
    "Is gift wrapping available?", "How do I reset my account password?", "Do you ship to post office boxes?",
    "Can I cancel an order after it has shipped?", "What does the warranty cover?", "Do you sell gift cards?",
    "How do I use a discount code?", "Why was my card declined?", "Can I order by phone?",
    "Do you have a loyalty programme?", "What sizes do the boots come in?",
]  # fmt: skip


@dataclass
class Result:
    ttft: float
    latency: float
    tokens: int
    text: str = ""
    gaps: list[float] = field(default_factory=list)
    cached: int = 0
    error: str | None = None


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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_request(client: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int,
                      ban: dict[str, float], temperature: float = 0, seed: int = 0, extra: dict | None = None) -> Result:  # fmt: skip
    body = {
        "model": "bench", "stream": True, "max_tokens": max_tokens, "temperature": temperature, "logit_bias": ban,
        "stream_options": {"include_usage": True}, "messages": messages, **(extra or {}),
    }  # fmt: skip
    if temperature:
        body["seed"] = seed
    for attempt in (0, 1):
        try:
            return await _stream_once(client, url, body)
        except httpx.RemoteProtocolError as e:  # a kept-alive connection the server had closed: no request was made
            if attempt:
                return Result(0, 0, 0, error=f"{type(e).__name__}: {e}")
        except httpx.HTTPError as e:
            return Result(0, 0, 0, error=f"{type(e).__name__}: {e}")
    raise AssertionError("unreachable")


async def _stream_once(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    """One streamed request; raises RemoteProtocolError only if the connection dropped before any answer."""
    t0 = time.perf_counter()
    first, last = None, t0
    gaps: list[float] = []
    parts: list[str] = []
    usage = None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Result(0, time.perf_counter() - t0, 0, error=f"{r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if obj.get("usage"):
                    usage = obj["usage"]
                for c in obj.get("choices") or []:
                    if content := (c.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
                        parts.append(content)
    except httpx.RemoteProtocolError as e:
        if first is None:
            raise
        return Result(0, time.perf_counter() - t0, 0, error=f"{type(e).__name__} mid-stream: {e}")
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else len(parts)
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Result((first or end) - t0, end - t0, tokens, "".join(parts), gaps, cached)


async def run_level(url: str, clients: int, make_messages, requests: int, max_tokens: int, ban: dict[str, float],
                    temperature: float = 0, extra: dict | None = None):  # fmt: skip
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:

        async def one_client(k: int) -> list[Result]:
            return [await one_request(client, url, make_messages(k, j), max_tokens, ban, temperature, seed=k * requests + j,
                                      extra=extra) for j in range(requests)]  # fmt: skip

        t = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(k) for k in range(clients)))
        wall = time.perf_counter() - t
    return [r for rs in per_client for r in rs], wall


def summarize(results: list[Result], wall: float, clients: int) -> dict:
    ok = [r for r in results if r.error is None]
    gaps = [g for r in ok for g in r.gaps]
    ttft = [r.ttft for r in ok] or [float("nan")]
    return {
        "clients": clients, "requests": len(results), "errors": len(results) - len(ok),
        "tokens": sum(r.tokens for r in ok), "wall_s": wall, "tok_s": sum(r.tokens for r in ok) / wall,
        "ttft_p50": statistics.median(ttft), "ttft_p95": pct(ttft, 95),
        "itl_p50_ms": 1000 * statistics.median(gaps) if gaps else float("nan"),
        "itl_p99_ms": 1000 * pct(gaps, 99) if gaps else float("nan"),
        # a stream's own rate after its first token (what `pellucid bench` calls decode): the
        # tokens after the first over the time from the first content to the last
        "stream_tok_s": sum(r.tokens - 1 for r in ok if r.gaps) / (sum(sum(r.gaps) for r in ok) or float("nan")),
        "cached_tokens": sum(r.cached for r in ok),
        "first_error": next((r.error for r in results if r.error), None),
    }  # fmt: skip


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


# -- servers ----------------------------------------------------------------------------------
class Server:
    def __init__(self, name: str, cmd: list[str], health: str, log: Path):
        self.name, self.health = name, health
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        print("$", shlex.join(cmd), flush=True)
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip

    def __enter__(self) -> Server:
        try:
            print(f"{self.name} ready in {wait_health(self.url, self.proc, self.health):.1f} s", flush=True)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def pellucid_server(model_file: Path, slots: int, extra: list[str], log: Path, name: str = "pellucid") -> Server:
    cmd = [sys.executable, "-m", "pellucid", "serve", "--model", str(model_file), "--served-model-name", "bench",
           "--port", "{port}", "--max-batch", str(slots), "--log-level", "warning", *extra]  # fmt: skip
    return Server(name, cmd, "/health", log)


def llama_server(binary: str, model_file: Path, slots: int, ctx_per_slot: int, threads: int, log: Path,
                 extra: tuple[str, ...] = ()) -> Server:  # fmt: skip
    cmd = [binary, "-m", str(model_file), "--alias", "bench", "--host", "127.0.0.1", "--port", "{port}",
           "-np", str(slots), "-c", str(slots * ctx_per_slot), "-t", str(threads), "-tb", str(threads),
           "--no-webui", *extra]  # fmt: skip
    return Server("llama-server", cmd, "/health", log)


def eog_ban(model_file: Path) -> dict[str, float]:
    """logit_bias banning every end-of-generation token, so each request runs to max_tokens."""
    from pellucid.text.tokenizer import Tokenizer
    from pellucid.weights.gguf import GGUFFile

    tok = Tokenizer.from_gguf(GGUFFile(model_file).metadata)
    return {str(i): -100 for i in sorted(tok.eog_ids)}


def shared_system_prompt(model_file: Path, tokens: int) -> str:
    """A support assistant's policy, about `tokens` tokens long in this model's tokenizer."""
    from pellucid.text.tokenizer import Tokenizer
    from pellucid.weights.gguf import GGUFFile

    tok = Tokenizer.from_gguf(GGUFFile(model_file).metadata)
    items = ["jackets", "boots", "gift cards", "lamps", "tents", "kettles", "bicycles", "watches", "rugs", "phones"]
    rules = ["You are the support assistant of Northwind Outfitters, an online shop. Answer in two sentences at most."]
    i = 0
    while len(tok.encode(" ".join(rules))) < tokens:
        item = items[i % len(items)]
        rules.append(f"Rule {i + 1}: {item.capitalize()} may be returned within {14 + i % 5 * 7} days if unused; "
                     f"refunds for {item} go to the original card within {3 + i % 4} business days, and shipping "
                     f"costs for {item} are refunded only when the item arrived damaged or was the wrong one.")  # fmt: skip
        i += 1
    return " ".join(rules)


def bench_chat(server: Server, args, ban) -> list[dict]:
    def messages(k: int, j: int) -> list[dict]:
        return [{"role": "user", "content": f"Write a long story about {TOPICS[(k + j) % len(TOPICS)]}."}]

    asyncio.run(run_level(server.url, min(args.slots, 4), messages, 1, 8, ban))  # warm up
    rows = []
    for c in args.clients:
        cpu0 = cpu_seconds(server.proc.pid)
        results, wall = asyncio.run(run_level(server.url, c, messages, args.requests, args.max_tokens, ban))
        row = summarize(results, wall, c) | {"server": server.name, "workload": "chat",
                                             "server_cpu_s": cpu_seconds(server.proc.pid) - cpu0}  # fmt: skip
        rows.append(row)
        print(line(row), flush=True)
    return rows


# A list of at least 60 records: far longer than --max-tokens, so no answer can end early
# (the grammar allows no end-of-generation token before it closes), as the plain rows,
# whose end tokens are banned, cannot either.
RECORDS = {"type": "object", "required": ["records"], "properties": {"records": {
    "type": "array", "minItems": 60, "items": {
        "type": "object", "required": ["id", "name", "email", "role"], "additionalProperties": False,
        "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "email": {"type": "string"},
                       "role": {"type": "string", "enum": ["admin", "user", "guest"]}}}}}}  # fmt: skip


def bench_schema(server: Server, args, ban) -> list[dict]:
    """The same clients with and without a json_schema answer, alternating rounds on one server."""

    def messages(k: int, j: int) -> list[dict]:
        return [{"role": "user", "content": f"List the staff of {TOPICS[(k + j) % len(TOPICS)]} as JSON records."}]

    schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "staff", "schema": RECORDS}}}
    asyncio.run(run_level(server.url, min(args.slots, 4), messages, 1, 8, {}, extra=schema))  # warm up (compiles it)
    rows = []
    for c in args.clients:
        for r in range(args.schema_rounds):
            for name, bias, extra in (("plain", ban, None), ("schema", {}, schema)):
                cpu0 = cpu_seconds(server.proc.pid)
                results, wall = asyncio.run(run_level(server.url, c, messages, args.requests, args.max_tokens, bias,
                                                      extra=extra))  # fmt: skip
                row = summarize(results, wall, c) | {"server": server.name, "workload": name, "round": r,
                                                     "server_cpu_s": cpu_seconds(server.proc.pid) - cpu0}  # fmt: skip
                if name == "schema":  # every answer a prefix of valid JSON for the schema: it starts as one
                    row["json_prefix"] = sum(x.text.lstrip().startswith('{"records"') for x in results)
                rows.append(row)
                print(line(row), flush=True)
        plain = statistics.median(x["tok_s"] for x in rows if x["workload"] == "plain" and x["clients"] == c)
        schem = statistics.median(x["tok_s"] for x in rows if x["workload"] == "schema" and x["clients"] == c)
        started = sum(x["json_prefix"] for x in rows if x["workload"] == "schema" and x["clients"] == c)
        answers = sum(x["requests"] for x in rows if x["workload"] == "schema" and x["clients"] == c)
        print(f"  {c} clients: json_schema {schem:.1f} vs plain {plain:.1f} tok/s (medians): {schem / plain:.3f}; "
              f"{started}/{answers} schema answers start as its JSON", flush=True)  # fmt: skip
    return rows


def bench_shared(server: Server, system: str, args, ban) -> tuple[dict, list[str]]:
    def messages(k: int, j: int) -> list[dict]:
        q = QUESTIONS[(k * args.shared_requests + j) % len(QUESTIONS)]
        return [{"role": "system", "content": system}, {"role": "user", "content": f"Customer {k}.{j}: {q}"}]

    def warm(k: int, j: int) -> list[dict]:  # the system prompt once, so every server starts with it seen
        return [{"role": "system", "content": system}, {"role": "user", "content": "Hello."}]

    asyncio.run(run_level(server.url, 1, warm, 1, 4, ban))
    cpu0 = cpu_seconds(server.proc.pid)
    results, wall = asyncio.run(run_level(server.url, args.shared_clients, messages, args.shared_requests,
                                          args.shared_tokens, ban))  # fmt: skip
    row = summarize(results, wall, args.shared_clients) | {"server": server.name, "workload": "shared",
                                                           "server_cpu_s": cpu_seconds(server.proc.pid) - cpu0}  # fmt: skip
    print(line(row), flush=True)
    return row, [r.text for r in results]


def line(r: dict) -> str:
    err = f"  [{r['errors']} errors: {r['first_error']}]" if r["errors"] else ""
    return (f"  {r['server']:<22} {r['workload']:<6} {r['clients']:>3} clients: {r['tok_s']:7.1f} tok/s  "
            f"TTFT p50 {r['ttft_p50']:.3f} s p95 {r['ttft_p95']:.3f}  ITL p50 {r['itl_p50_ms']:.1f} ms "
            f"p99 {r['itl_p99_ms']:.1f}  stream {r['stream_tok_s']:.1f} tok/s  CPU {r['server_cpu_s']:.0f} s  cached {r['cached_tokens']}{err}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-file", type=Path, default=None, help="GGUF file (default: the default model's)")
    ap.add_argument("--workload", nargs="+", choices=["chat", "shared", "schema"], default=["chat", "shared"],
                    help="schema: pellucid alone, the chat clients with and without a json_schema answer, alternating")
    ap.add_argument("--schema-rounds", type=int, default=2, help="alternating rounds of the schema workload")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--slots", type=int, default=16, help="parallel sequences: pellucid --max-batch, llama-server -np")
    ap.add_argument("--shared-clients", type=int, default=16)
    ap.add_argument("--shared-requests", type=int, default=2, help="requests per client in the shared workload")
    ap.add_argument("--shared-tokens", type=int, default=32, help="tokens generated per shared-workload request")
    ap.add_argument("--system-tokens", type=int, default=1000, help="length of the shared system prompt")
    ap.add_argument("--pellucid-args", default="", help="extra flags for pellucid serve")
    ap.add_argument("--llama-server", default=str(Path.home() / ".cache/peer/llama.cpp/build/bin/llama-server"),
                    help="llama.cpp's llama-server binary (built outside the repository; see BENCHMARKS.md)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads for llama-server")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()

    if args.model_file is None:
        from pellucid import registry

        args.model_file = registry.resolve(registry.DEFAULT_MODEL)
    ban = eog_ban(args.model_file)
    peer = not args.no_peer and Path(args.llama_server).exists()
    if not args.no_peer and not peer:
        print(f"llama-server: {args.llama_server} not found; peer skipped")
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; model file {args.model_file}; "
          f"{args.slots} slots; load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    extra = shlex.split(args.pellucid_args)
    ctx = 2048 if "shared" not in args.workload else max(2048, args.system_tokens + 256)
    rows: list[dict] = []
    if "chat" in args.workload:
        print(f"\nchat: {args.requests} requests x {args.max_tokens} tokens per client; clients {args.clients}")
        with pellucid_server(args.model_file, args.slots, extra, logs / "bench-pellucid.log") as s:
            rows += bench_chat(s, args, ban)
        if peer:
            with llama_server(args.llama_server, args.model_file, args.slots, ctx, args.threads, logs / "bench-llama-server.log") as s:
                rows += bench_chat(s, args, ban)
    if "schema" in args.workload:
        print(f"\nschema: {args.requests} requests x {args.max_tokens} tokens per client, with and without a json_schema; "
              f"clients {args.clients}")  # fmt: skip
        with pellucid_server(args.model_file, args.slots, extra, logs / "bench-pellucid.log") as s:
            rows += bench_schema(s, args, ban)
    if "shared" in args.workload:
        system = shared_system_prompt(args.model_file, args.system_tokens)
        print(f"\nshared: a {args.system_tokens}-token system prompt, {args.shared_clients} clients x "
              f"{args.shared_requests} questions, {args.shared_tokens} tokens each")  # fmt: skip
        with pellucid_server(args.model_file, args.slots, extra, logs / "bench-pellucid.log") as s:
            row, with_cache = bench_shared(s, system, args, ban)
            rows.append(row)
        off = [*extra, "--no-prefix-cache"]
        with pellucid_server(args.model_file, args.slots, off, logs / "bench-pellucid.log", "pellucid no prefix cache") as s:
            row, without = bench_shared(s, system, args, ban)
            rows.append(row)
        same = sum(a == b for a, b in zip(with_cache, without, strict=True))
        print(f"  pellucid with / without the prefix cache: {same}/{len(without)} texts identical")
        if peer:
            with llama_server(args.llama_server, args.model_file, args.slots, ctx, args.threads, logs / "bench-llama-server.log") as s:
                rows.append(bench_shared(s, system, args, ban)[0])

    print("\n| workload | server | clients | tok/s | TTFT p50 s | TTFT p95 s | ITL p50 ms | ITL p99 ms | stream tok/s | errors | server CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['server']} | {r['clients']} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} | "
              f"{r['ttft_p95']:.3f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | {r['stream_tok_s']:.1f} | {r['errors']} | "
              f"{r['server_cpu_s']:.0f} |")  # fmt: skip
    by = {(r["server"], r["workload"], r["clients"]): r for r in rows}
    for c in args.clients:
        a, b = by.get(("pellucid", "chat", c)), by.get(("llama-server", "chat", c))
        if a and b:
            print(f"chat, {c} clients: pellucid / llama-server {a['tok_s'] / b['tok_s']:.2f}x tok/s")
    one = by.get(("pellucid", "chat", 1))
    for c in args.clients:
        if one and c > 1 and (a := by.get(("pellucid", "chat", c))):
            print(f"chat, {c} clients: pellucid {a['tok_s'] / one['tok_s']:.2f}x its own 1-client tok/s")
    a, b = by.get(("pellucid", "shared", args.shared_clients)), by.get(("pellucid no prefix cache", "shared", args.shared_clients))
    if a and b:
        print(f"shared: TTFT p50 {b['ttft_p50'] / a['ttft_p50']:.2f}x lower with the prefix cache")
    print(f"load at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
