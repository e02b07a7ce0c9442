"""Soak: many concurrent clients against one `pellucid serve` for a fixed time, nothing lost.

    .venv/bin/python benchmarks/soak.py                            # 64 clients, 10 minutes
    .venv/bin/python benchmarks/soak.py --clients 16 --duration 30 --json soak.json

A pool of greedy requests (chat, raw completions, JSON-object structured output, n = 2
choices, stop strings) is first sent one at a time: each answer alone is its reference.
Then every client loops for --duration seconds: it picks a request from the pool, sends it
streaming, and compares the text it gets with the reference (a difference is a lost or
mixed-up output); one request in ten is abandoned after its first chunks (a disconnect).
Meanwhile /health is polled every 0.2 s, and every 30 s a 5 MB body (far past the context
window) is sent and must be refused. Reported: requests, errors, mismatches, disconnects,
tokens/s, TTFT, /health latency p50/p99/max, 5 MB refusals and their time, and the server's
resident memory after the warm-up and at the end (growth must stay small: no leak per
request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import pct, pellucid_server  # noqa: E402

TOPICS = ["rivers", "owls", "bridges", "tea", "volcanoes", "chess", "bees", "trains", "glaciers", "violins", "deserts",
          "lighthouses"]  # fmt: skip


def request_pool() -> list[tuple[str, dict]]:
    """(path, body) pairs, all greedy, so each has one right answer."""
    pool = []
    for i, t in enumerate(TOPICS):
        chat = {"messages": [{"role": "user", "content": f"Tell me one fact about {t}."}], "max_tokens": 24 + i % 3 * 8}
        pool.append(("/v1/chat/completions", chat))
        pool.append(("/v1/completions", {"prompt": f"A short note about {t}:", "max_tokens": 20}))
    pool.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": "Give a JSON object with a colour."}],
                                          "response_format": {"type": "json_object"}, "max_tokens": 32}))  # fmt: skip
    pool.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count from one to ten in words."}],
                                          "stop": [" five", "5"], "max_tokens": 40}))  # fmt: skip
    pool.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a fruit."}], "n": 2, "max_tokens": 12}))
    for _, body in pool:
        body |= {"model": "bench", "temperature": 0, "stream": True}
    return pool


async def stream(client: httpx.AsyncClient, url: str, path: str, body: dict, *, abandon: bool = False) -> dict:
    """One streaming request: its texts by choice, tokens, TTFT; stops reading early when `abandon`."""
    t0 = time.perf_counter()
    texts: dict[int, str] = {}
    first, chunks = None, 0
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return {"error": str(obj["error"])[:200]}
            for c in obj.get("choices") or []:
                piece = (c.get("delta") or {}).get("content") if "delta" in c else c.get("text")
                if piece:
                    texts[c["index"]] = texts.get(c["index"], "") + piece
                    first = first or time.perf_counter()
                    chunks += 1
            if abandon and chunks >= 2:
                return {"abandoned": True}
    return {"texts": texts, "chunks": chunks, "ttft": (first or time.perf_counter()) - t0}


async def soak(url: str, clients: int, duration: float, seed: int) -> dict:
    pool = request_pool()
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        refs = []
        for path, body in pool:  # each alone: the reference
            out = await stream(client, url, path, body)
            if "error" in out:
                raise SystemExit(f"reference request failed: {out['error']}")
            refs.append(out["texts"])
        stats = {"requests": 0, "errors": [], "mismatches": [], "abandoned": 0, "chunks": 0, "ttft": []}
        health: list[float] = []
        big: list[tuple[int, float]] = []
        stop_at = time.monotonic() + duration

        async def one_client(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            while time.monotonic() < stop_at:
                i = rng.randrange(len(pool))
                path, body = pool[i]
                abandon = rng.random() < 0.1
                try:
                    out = await stream(client, url, path, body, abandon=abandon)
                except httpx.HTTPError as e:
                    out = {"error": f"{type(e).__name__}: {e}"}
                stats["requests"] += 1
                if "error" in out:
                    stats["errors"].append(out["error"])
                elif out.get("abandoned"):
                    stats["abandoned"] += 1
                else:
                    stats["chunks"] += out["chunks"]
                    stats["ttft"].append(out["ttft"])
                    if out["texts"] != refs[i]:
                        stats["mismatches"].append({"request": i, "got": out["texts"], "want": refs[i]})

        async def watch_health() -> None:
            async with httpx.AsyncClient(timeout=30) as c:
                while time.monotonic() < stop_at:
                    t = time.perf_counter()
                    r = await c.get(url + "/health")
                    health.append(time.perf_counter() - t)
                    if r.status_code != 200:
                        stats["errors"].append(f"/health {r.status_code}")
                    await asyncio.sleep(0.2)

        async def send_big() -> None:
            body = json.dumps({"model": "bench", "prompt": "word " * 1_000_000, "max_tokens": 1})
            async with httpx.AsyncClient(timeout=120) as c:
                while time.monotonic() < stop_at:
                    t = time.perf_counter()
                    r = await c.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
                    big.append((r.status_code, time.perf_counter() - t))
                    await asyncio.sleep(30)

        t = time.perf_counter()
        await asyncio.gather(watch_health(), send_big(), *(one_client(k) for k in range(clients)))
        wall = time.perf_counter() - t
    return stats | {"wall_s": wall, "health": health, "big": big, "pool": len(pool)}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-file", default=None, help="GGUF file or registry name (default: the default model)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=600, help="seconds of load after the references")
    ap.add_argument("--slots", type=int, default=16, help="pellucid serve --max-batch")
    ap.add_argument("--warmup", type=float, default=15, help="seconds of load before the first memory reading")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.model_file is None:
        from pellucid import registry

        args.model_file = registry.resolve(registry.DEFAULT_MODEL)
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "soak-pellucid.log"
    with pellucid_server(Path(args.model_file), args.slots, [], log) as s:
        # warm-up at full concurrency, so every KV slot and buffer has its working size before the first reading
        asyncio.run(soak(s.url, min(args.clients, 2 * args.slots), args.warmup, args.seed + 1))
        rss0 = rss_mib(s.proc.pid)
        res = asyncio.run(soak(s.url, args.clients, args.duration, args.seed))
        rss1 = rss_mib(s.proc.pid)
        alive = s.proc.poll() is None
    h = res["health"]
    out = {
        "clients": args.clients, "duration_s": args.duration, "wall_s": res["wall_s"], "requests": res["requests"],
        "errors": len(res["errors"]), "first_errors": res["errors"][:5], "mismatches": len(res["mismatches"]),
        "first_mismatches": res["mismatches"][:3], "abandoned": res["abandoned"], "chunks_per_s": res["chunks"] / res["wall_s"],
        "ttft_p50_s": statistics.median(res["ttft"]) if res["ttft"] else float("nan"),
        "health_p50_ms": 1000 * statistics.median(h), "health_p99_ms": 1000 * pct(h, 99), "health_max_ms": 1000 * max(h),
        "big_refusals": [st for st, _ in res["big"]], "big_s": [round(t, 2) for _, t in res["big"]],
        "rss_start_mib": rss0, "rss_end_mib": rss1, "rss_growth_pct": 100 * (rss1 - rss0) / rss0, "server_alive": alive,
    }  # fmt: skip
    for k, v in out.items():
        print(f"{k:>18}: {v:.2f}" if isinstance(v, float) else f"{k:>18}: {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
