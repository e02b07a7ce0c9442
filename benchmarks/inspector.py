"""The web inspector beside the API: do API streams keep their speed while a person inspects?

    .venv/bin/python benchmarks/inspector.py                    # 4 clients, 192 tokens, 8 pairs of runs
    .venv/bin/python benchmarks/inspector.py --clients 4 --pairs 3 --max-tokens 96 --period 1.0

One `pellucid serve` (default model and format, --max-batch 8). Each pair is two runs of
the same load, one right after the other: `--clients` streaming chats (sampled at
temperature 0.8 with a seed, every end-of-generation token banned so each makes exactly
--max-tokens), first alone, then while an "inspector user" asks the page's questions every
--period seconds (next-token, attention, logit lens, in turn, on a chat that grows by
one word per question, so the inspector's cache of the last context does not answer it).
Pairs alternate which run goes first. The figure per pair is the streams' aggregate tok/s
with the inspector over without; the machine's own drift between runs shows as the spread
of that ratio. Also printed: the inspector's own answer times.

Issue 16's goal: the streams keep at least 80% of their tok/s.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import TOPICS, eog_ban, pellucid_server, run_level, summarize  # noqa: E402

INSPECTIONS = ("next-token", "attention", "lens")


async def inspector_user(url: str, period: float, stop: asyncio.Event) -> list[tuple[str, float, int]]:
    """Ask next-token, attention and lens in turn every `period` s until `stop`; (endpoint, seconds, status)."""
    words = "Tell me about the history of the lighthouse on the northern cape and its keepers".split()
    done: list[tuple[str, float, int]] = []
    async with httpx.AsyncClient(timeout=120) as client:
        k = 0
        while not stop.is_set():
            t = time.perf_counter()
            what = INSPECTIONS[k % len(INSPECTIONS)]
            content = " ".join(words[: 4 + k % (len(words) - 4)]) + f" (question {k})"
            body = {"messages": [{"role": "user", "content": content}]}
            if what == "next-token":
                body |= {"temperature": 0.8, "top_k": 40, "seed": k}
            r = await client.post(f"{url}/v1/inspect/{what}", json=body)
            done.append((what, time.perf_counter() - t, r.status_code))
            k += 1
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, period - (time.perf_counter() - t)))
            except TimeoutError:
                pass
    return done


async def streams(url: str, clients: int, max_tokens: int, ban: dict[str, float], *, inspect: float | None):
    def messages(k: int, j: int) -> list[dict]:
        return [{"role": "user", "content": f"Write a long story about {TOPICS[k % len(TOPICS)]}."}]

    stop = asyncio.Event()
    user = asyncio.create_task(inspector_user(url, inspect, stop)) if inspect else None
    results, wall = await run_level(url, clients, messages, 1, max_tokens, ban, temperature=0.8)
    stop.set()
    return summarize(results, wall, clients), (await user if user else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-file", type=Path, default=None, help="GGUF file (default: the default model's)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--period", type=float, default=1.0, help="seconds between the inspector user's questions")
    ap.add_argument("--logs", type=Path, default=Path("/tmp/pellucid-bench-inspector"))
    args = ap.parse_args()

    from pellucid import registry

    model_file = args.model_file or registry.resolve(registry.DEFAULT_MODEL)
    args.logs.mkdir(parents=True, exist_ok=True)
    ban = eog_ban(model_file)
    print(f"host: {platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores")
    ratios, answers = [], []
    with pellucid_server(model_file, 8, [], args.logs / "pellucid.log") as server:
        asyncio.run(streams(server.url, args.clients, 8, ban, inspect=None))  # warm up
        for p in range(args.pairs):
            order = (None, args.period) if p % 2 == 0 else (args.period, None)
            rows = {}
            for inspect in order:
                row, asked = asyncio.run(streams(server.url, args.clients, args.max_tokens, ban, inspect=inspect))
                rows[inspect is not None] = row
                answers += asked
                print(f"  pair {p + 1} {'with' if inspect else 'without':<7} the inspector: {row['tok_s']:6.1f} tok/s "
                      f"({row['errors']} errors){f', {len(asked)} inspections' if inspect else ''}", flush=True)  # fmt: skip
            ratios.append(rows[True]["tok_s"] / rows[False]["tok_s"])
            print(f"  pair {p + 1}: streams keep {100 * ratios[-1]:.0f}% of their tok/s", flush=True)
    print(f"\nstreams keep {100 * statistics.median(ratios):.0f}% (median of {len(ratios)} pairs; "
          f"{100 * min(ratios):.0f}-{100 * max(ratios):.0f}%); goal >= 80%")
    for what in INSPECTIONS:
        ts = [t for w, t, s in answers if w == what and s == 200]
        bad = sum(1 for w, _, s in answers if w == what and s != 200)
        if ts or bad:
            times = f", median {1000 * statistics.median(ts):.0f} ms, max {1000 * max(ts):.0f} ms" if ts else ""
            print(f"  {what:<10} answered {len(ts)} times{times}{f', {bad} refused' if bad else ''}")


if __name__ == "__main__":
    main()
