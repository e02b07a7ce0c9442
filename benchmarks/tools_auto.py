"""Tool calls in "auto" mode on a real model, through the real openai client against a live server.

Ten questions a tool obviously answers (weather, currency) and ten that need none (code,
facts, arithmetic, writing); greedy. Counts the calls made, how many have arguments that
validate against the tool's schema, and, without the grammar, what the model writes first
(its own choice between a call and an answer).

    .venv/bin/python benchmarks/tools_auto.py --model qwen2.5-coder-1.5b-instruct
"""

from __future__ import annotations

import argparse
import json

TOOL_QUESTIONS = [
    "What's the weather in Lisbon right now?", "How much is 120 US dollars in euros?", "Is it raining in Paris today?",
    "Convert 50 euros to Japanese yen.", "What's the temperature in Tokyo in Fahrenheit?", "How cold is it in Oslo?",
    "Change 1000 yen into US dollars.", "Weather forecast for Cairo, please.", "How many British pounds is 75 euros?",
    "Is it sunny in Sydney at the moment?",
]  # fmt: skip
PLAIN_QUESTIONS = [
    "Write a Python function that reverses a string.", "What is the capital of Japan?", "Who wrote Hamlet?",
    "Explain what a linked list is in one sentence.", "What is 17 times 23?", "Write a haiku about autumn.",
    "What does HTTP stand for?", "Sort the list [3, 1, 2] in Python.", "What is a prime number?",
    "Translate 'good morning' into Spanish.",
]  # fmt: skip
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
           "required": ["city"]}  # fmt: skip
MONEY = {"type": "object", "properties": {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
         "required": ["amount", "from", "to"]}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "convert_currency", "description": "Convert an amount between currencies",
                                      "parameters": MONEY}},
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    args = ap.parse_args()

    import jsonschema
    import openai

    from pellucid.api import LLM
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig
    from pellucid.text.tools import parse_tools

    llm = LLM(args.model, max_batch=1, max_len=2048)
    srv = ServerThread(create_app(ServerConfig(model=args.model, max_batch=1, max_len=2048), loader=lambda c: llm)).start()
    assert srv.wait_ready(300)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=300)
    schemas = {"get_weather": WEATHER, "convert_currency": MONEY}
    shown = parse_tools(TOOLS)
    rows = []
    for kind, questions in (("tool", TOOL_QUESTIONS), ("plain", PLAIN_QUESTIONS)):
        for q in questions:
            msgs = [{"role": "user", "content": q}]
            r = client.chat.completions.create(model=args.model, messages=msgs, tools=TOOLS, max_tokens=96, temperature=0)
            calls = r.choices[0].message.tool_calls or []
            valid = 0
            for c in calls:
                try:
                    jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
                    valid += 1
                except (ValueError, jsonschema.ValidationError, KeyError):
                    pass
            free = llm.generate(llm.render_chat(msgs, tools=shown), max_tokens=12, temperature=0).text
            rows.append((kind, q, [c.function.name for c in calls], valid, free))
            print(f"{kind:5s} {q[:50]:50s} calls {[c.function.name for c in calls]} valid {valid}; unconstrained: {free[:40]!r}")
    srv.stop()
    for kind in ("tool", "plain"):
        sel = [r for r in rows if r[0] == kind]
        with_calls = sum(1 for r in sel if r[2])
        valid = sum(r[3] for r in sel)
        print(f"{kind} questions: {len(sel)}; answered with a call: {with_calls}; calls with valid arguments: {valid}")


if __name__ == "__main__":
    main()
