"""Schemas as written in the wild, and tool calls: JSONSchemaBench coverage on the real model.

    .venv/bin/python benchmarks/schemas.py                       # 12 schemas a subset, 34 tool calls
    .venv/bin/python benchmarks/schemas.py --per-subset 24 --tools 0

1. Compile: every schema of each subset in ../shared/data/jsonschemabench, compiled with
   pellucid's default (oneOf as anyOf, checked afterwards), with strict=True (refuse what
   cannot be enforced exactly) and with strict=False (ignore it).
2. Generate: `--per-subset` schemas spread over each subset, greedy, `--max-tokens`, one
   continuous batch, two ways: "raw" as before issue 15 (a raw prompt naming the schema, no
   default bounds on strings, arrays and numbers) and "chat" as now (a chat prompt that
   states the schema, the default bounds). Each output is valid (finished, validates
   against the real schema), cut short (finish_reason length: marked incomplete, never
   passed as valid), or invalid (finished but does not validate: reported as schema_error).
3. Tool calls: `--tools` Glaiveai2K schemas as tools, tool_choice "required", one call each:
   how many arguments parse and validate against the tool's schema.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from pellucid.errors import PellucidError
from pellucid.sampling import constraints as C
from pellucid.sampling import json_schema as S
from pellucid.sampling.params import SamplingParams

DATA = Path(os.environ.get("PELLUCID_JSONSCHEMABENCH", Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschemabench"))
SUBSETS = ("Github_trivial", "Glaiveai2K")


def compiles(tok, schema: dict, strict: bool | None) -> bool:
    try:
        C.make_constraint(tok, json_schema=schema, strict=strict)
        return True
    except PellucidError:
        return False


def spread(items: list, count: int) -> list:
    step = max(1, len(items) // count)
    return items[::step][:count]


def generate(llm, items: list[tuple[str, dict]], max_tokens: int, way: str) -> dict[str, int]:
    """Counts of valid / cut / invalid outputs for (name, schema) items, generated `way`."""
    saved = S.DEFAULT_MAX_STRING, S.DEFAULT_MAX_ITEMS, S.NUMBER_STEP
    if way == "raw":  # as before issue 15: no default bounds
        S.DEFAULT_MAX_STRING = S.DEFAULT_MAX_ITEMS = S.NUMBER_STEP = None
    try:
        reqs = []
        for name, schema in items:
            c = C.make_constraint(llm.tokenizer, json_schema=schema)
            text = json.dumps(schema, separators=(",", ":"))
            if way == "raw":
                prompt = f"JSON that follows the schema {text}:\n"
            else:
                prompt = llm.render_chat([{"role": "user", "content": "Fill in realistic example values."}], constraint=c)
            params = SamplingParams(temperature=0, max_tokens=max_tokens)
            try:
                reqs.append(llm.request(prompt, params, request_id=f"{way}-{name}", constraint=c))
            except PellucidError:  # the schema does not fit the context window with max_tokens
                reqs.append(None)
    finally:
        S.DEFAULT_MAX_STRING, S.DEFAULT_MAX_ITEMS, S.NUMBER_STEP = saved
    run(llm, [r for r in reqs if r is not None])
    counts = {"valid": 0, "cut": 0, "invalid": 0, "too long": 0}
    for (name, schema), r in zip(items, reqs, strict=True):
        if r is None:
            counts["too long"] += 1
        elif C.is_incomplete(r.constraint, r.finish_reason, r.stop_reason):
            counts["cut"] += 1
            print(f"  {way} cut short: {name}: {r.text[:80]!r}...")
        elif (err := S.schema_error(schema, r.text)) is None:
            counts["valid"] += 1
        else:
            counts["invalid"] += 1
            print(f"  {way} invalid: {name}: {err[:160]}")
    return counts


def tool_calls(llm, count: int, max_tokens: int) -> tuple[int, int, int, list[str]]:
    """(requests, parsed, validated, names not finished) for `count` Glaive schemas as tools,
    run as one batch (what LLM.chat(tools=...) does for one request)."""
    from pellucid.text.tools import parse_answer

    files = spread(sorted((DATA / "Glaiveai2K").glob("*.json")), count)
    reqs, tools = [], []
    for f in files:
        name, schema = f.stem.rsplit("_", 1)[0], json.loads(f.read_text())
        tool = {"type": "function", "function": {"name": name, "description": name.replace("_", " "), "parameters": schema}}
        all_tools, shown, c = llm.tool_constraint([tool], "required", False)
        prompt = llm.render_chat([{"role": "user", "content": f"Please {name.replace('_', ' ')} for me."}], tools=shown)
        reqs.append(llm.request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens), f"tool-{f.stem}", c))
        tools.append((name, schema, all_tools))
    run(llm, reqs)
    parsed = valid = 0
    cut = []
    for (name, schema, all_tools), r in zip(tools, reqs, strict=True):
        _, calls, complete = parse_answer(r.text, all_tools)
        if r.finish_reason != "stop" or not calls or not complete:
            cut.append(name)
            continue
        parsed += 1
        err = S.schema_error(schema, calls[0].arguments)
        valid += err is None
        if err is not None:
            print(f"  {name}: {calls[0].arguments} {err}")
    return len(files), parsed, valid, cut


def run(llm, reqs: list) -> None:
    for r in reqs:
        llm.engine.add_request(r)
    while not all(r.finished for r in reqs):
        llm.engine.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-subset", type=int, default=12, help="schemas generated per subset")
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--tools", type=int, default=34, help="Glaive tool-call requests (0: none)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    from pellucid.api import LLM

    llm = LLM(dtype=args.dtype, max_batch=16, max_len=4096)
    tok = llm.tokenizer
    print(f"JSONSchemaBench at {DATA}; greedy, max_tokens {args.max_tokens}\n")
    print("| subset | schemas | compile (default) | compile strict=True | compile strict=False |")
    print("|---|---|---|---|---|")
    usable = {}
    for sub in SUBSETS:
        items = [(f.stem, json.loads(f.read_text())) for f in sorted((DATA / sub).glob("*.json"))]
        t = time.perf_counter()
        ok = [(n, s) for n, s in items if compiles(tok, s, None)]
        strict = sum(compiles(tok, s, True) for _, s in items)
        loose = sum(compiles(tok, s, False) for _, s in items)
        usable[sub] = ok
        n = len(items)
        print(f"| {sub} | {n} | {len(ok)} ({len(ok) / n:.1%}) | {strict} ({strict / n:.1%}) | {loose} ({loose / n:.1%}) |"
              f"  <!-- {time.perf_counter() - t:.1f} s -->")  # fmt: skip
    print("\n| subset | way | schemas | valid | cut short | invalid | prompt too long |")
    print("|---|---|---|---|---|---|---|")
    for sub in SUBSETS:
        items = spread(usable[sub], args.per_subset)
        for way in ("raw", "chat"):
            t = time.perf_counter()
            c = generate(llm, items, args.max_tokens, way)
            print(f"| {sub} | {way} | {len(items)} | {c['valid']} | {c['cut']} | {c['invalid']} | {c['too long']} |"
                  f"  <!-- {time.perf_counter() - t:.0f} s -->")  # fmt: skip
    if args.tools:
        t = time.perf_counter()
        n, parsed, valid, cut = tool_calls(llm, args.tools, args.max_tokens)
        print(f"\nGlaive tool calls: {n} requests, {parsed} parsed, {valid} validate, not finished: {cut} "
              f"({time.perf_counter() - t:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
