"""Tool calls in the model's own format, on the real-size model (Qwen2.5-Coder-1.5B-Instruct),
through the real openai client against a live server.

Qwen2.5's chat template renders the tools itself and asks for `<tool_call>\\n{...}\\n</tool_call>`;
the model, given a question a tool answers, mostly writes its call as fenced JSON instead.
Both are recognised as calls in the default tool_choice ("auto"), streaming and not, and
once a call has begun its arguments follow the tool's schema (a grammar). A question the
model answers itself (here: code) stays a plain answer.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.real

BIG = "qwen2.5-coder-1.5b-instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
           "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}  # fmt: skip
MONEY = {"type": "object", "properties": {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
         "required": ["amount", "from", "to"]}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "convert_currency", "description": "Convert an amount between currencies",
                                      "parameters": MONEY}},
]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "convert_currency": MONEY}


@pytest.fixture(scope="module")
def oa():
    from pellucid.api import LLM
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    cfg = ServerConfig(model=BIG, max_batch=2, max_len=2048)
    s = ServerThread(create_app(cfg, loader=lambda c: LLM(BIG, max_batch=c.max_batch, max_len=c.max_len))).start()
    assert s.wait_ready(300)
    yield openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=300)
    s.stop()


@pytest.mark.parametrize(("question", "tool"), [("What's the weather in Lisbon right now?", "get_weather"),
                                                ("How much is 120 US dollars in euros?", "convert_currency")])  # fmt: skip
def test_auto_turns_the_models_own_call_into_a_tool_call(oa, question, tool):
    msgs = [{"role": "user", "content": question}]
    r = oa.chat.completions.create(model=BIG, messages=msgs, tools=TOOLS, max_tokens=80, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c.message
    [call] = c.message.tool_calls
    assert call.function.name == tool
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[tool])
    # streaming: the same call, in pieces
    chunks = list(oa.chat.completions.create(model=BIG, messages=msgs, tools=TOOLS, max_tokens=80, temperature=0, stream=True))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == tool
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_question_the_model_answers_itself_stays_text(oa):
    msgs = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    r = oa.chat.completions.create(model=BIG, messages=msgs, tools=TOOLS, max_tokens=60, temperature=0)
    c = r.choices[0]
    assert not c.message.tool_calls and c.finish_reason in ("stop", "length")
    assert "def " in c.message.content


# -- fill in the middle: the coder model's own FIM tokens, through the legacy completions' suffix
# and llama-server's /infill (how editor plugins ask for the code at the cursor) --------------------
FIB_PREFIX = "def fibonacci(n):\n    if n < 2:\n        return n\n"
FIB_SUFFIX = "\n\nprint(fibonacci(10))\n"


def test_completions_suffix_fills_the_gap(oa):
    r = oa.completions.create(model=BIG, prompt=FIB_PREFIX, suffix=FIB_SUFFIX, max_tokens=24, temperature=0)
    text = r.choices[0].text
    assert "fibonacci(n - 1)" in text.replace("n-1", "n - 1"), text
    assert "print(fibonacci(10))" not in text  # the suffix is context, not repeated


def test_infill_endpoint_as_llama_server_answers(oa):
    import httpx

    url = str(oa.base_url).removesuffix("/v1/")
    body = {"input_prefix": FIB_PREFIX, "input_suffix": FIB_SUFFIX, "n_predict": 24, "temperature": 0,
            "input_extra": [{"filename": "util.py", "text": "# helpers\n"}]}  # fmt: skip
    r = httpx.post(f"{url}/infill", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    assert "fibonacci(n - 1)" in out["content"].replace("n-1", "n - 1"), out
    assert out["tokens_evaluated"] > 20 and out["tokens_predicted"] >= 1
    # streamed: the same text in pieces, a last event with stop true
    with httpx.stream("POST", f"{url}/infill", json={**body, "stream": True}, timeout=300) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == out["content"]
