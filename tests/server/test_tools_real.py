"""Tool calling on the real default model, through the real openai and anthropic clients.

One live server (as in test_server.py) serves the module. Every call's arguments must
parse and validate against the tool's schema: a weather tool round trip (call, result,
final answer) on both APIs, streaming and not, with required and named choices, and 16
function-calling schemas from JSONSchemaBench's Glaiveai2K that the other tests do not use.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import pytest
import test_server as live
from paths import SHARED

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.real

MODEL = "smollm2-135m-instruct"
KEY = "test-key"  # test_server's
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "description": "the city's name"},
           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}  # fmt: skip
OA_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                              "parameters": WEATHER}}]  # fmt: skip
AN_TOOLS = [{"name": "get_weather", "description": "The current weather in a city", "input_schema": WEATHER}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
RESULT = {"city": "Paris", "temperature": 18, "unit": "celsius", "sky": "sunny"}
GREEDY = {"temperature": 0}
srv, oa, an = live.srv, live.oa, live.an  # the live server's fixtures (a server of this module's own)
BENCH_DIR = Path(os.environ.get("PELLUCID_JSONSCHEMABENCH", SHARED / "data" / "jsonschemabench"))


def weather_args(arguments: str | dict) -> dict:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, WEATHER)
    return args


# -- OpenAI ---------------------------------------------------------------------------------------
def test_openai_weather_round_trip(oa, real_llm):
    r = oa.chat.completions.create(model=MODEL, messages=ASK, tools=OA_TOOLS, tool_choice="required",
                                   parallel_tool_calls=False, max_tokens=80, **GREEDY)  # fmt: skip
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert len(c.message.tool_calls) == 1  # parallel_tool_calls=False: one call
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = weather_args(call.function.arguments)
    ref = real_llm.chat(ASK, tools=OA_TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=80, **GREEDY)
    assert [(t.name, t.args) for t in ref.tool_calls] == [("get_weather", args)]  # the Python API gives the same call
    # the result goes back; the answer is text that uses it
    history = [*ASK, c.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps(RESULT)}]  # fmt: skip
    final = oa.chat.completions.create(model=MODEL, messages=history, tools=OA_TOOLS, tool_choice="none", max_tokens=40, **GREEDY)
    f = final.choices[0]
    print("\nOpenAI round trip:", args, "->", repr(f.message.content))
    assert f.finish_reason in ("stop", "length") and not f.message.tool_calls
    assert f.message.content and not f.message.content.startswith("<")
    assert "18" in f.message.content  # the model read the tool's result
    # the history's call is in the prompt: a longer prompt than the question alone
    assert final.usage.prompt_tokens > r.usage.prompt_tokens - 300


def test_openai_stream_named_choice_equals_whole(oa):
    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model=MODEL, messages=ASK, tools=OA_TOOLS, tool_choice=named, parallel_tool_calls=False, max_tokens=120, **GREEDY)
    whole = oa.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = []
    for ch in oa.chat.completions.create(stream=True, **kw):
        if not ch.choices:
            continue
        d = ch.choices[0]
        for t in d.delta.tool_calls or []:
            entry = calls.setdefault(t.index, {"id": None, "name": None, "arguments": ""})
            if t.id:
                assert entry["id"] is None, "the id comes once, first"
                entry["id"], entry["name"] = t.id, t.function.name
            entry["arguments"] += t.function.arguments or ""
        if d.finish_reason:
            finish.append(d.finish_reason)
    assert finish == ["tool_calls"] == [whole.finish_reason]
    assert [(c["name"], weather_args(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(t.function.name, weather_args(t.function.arguments)) for t in whole.message.tool_calls]  # fmt: skip


def test_openai_auto_is_text_or_valid_calls(oa):
    for q in ("What is the weather in Paris?", "Say hello."):
        c = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], tools=OA_TOOLS,
                                       max_tokens=60, **GREEDY).choices[0]  # fmt: skip
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls"
            for t in c.message.tool_calls:
                weather_args(t.function.arguments)
        else:
            assert c.message.content and c.finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("body", "param", "match"),
    [
        ({"tools": OA_TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among the tools"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": OA_TOOLS, "tool_choice": "always"}, "tool_choice", "'auto', 'none', 'required'"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "1-64"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "function"),
        ({"tools": OA_TOOLS, "response_format": {"type": "json_object"}}, "response_format", "not both"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strnig"}}}}}]},
         "tools", "grammar"),
    ],
)  # fmt: skip
def test_openai_bad_tools_are_400_naming_the_field(srv, body, param, match):
    r = httpx.post(f"{srv.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, "messages": ASK, "max_tokens": 4, **body})  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"], err


# -- Anthropic --------------------------------------------------------------------------------------
def test_anthropic_weather_round_trip(an):
    m = an.messages.create(model=MODEL, max_tokens=80, messages=ASK, tools=AN_TOOLS,
                           tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body=GREEDY)  # fmt: skip
    assert m.stop_reason == "tool_use"
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    args = weather_args(uses[0].input)
    history = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": json.dumps(RESULT)}]}]  # fmt: skip
    final = an.messages.create(model=MODEL, max_tokens=40, messages=history, tools=AN_TOOLS, tool_choice={"type": "none"},
                               extra_body=GREEDY)  # fmt: skip
    text = "".join(b.text for b in final.content if b.type == "text")
    print("\nAnthropic round trip:", args, "->", repr(text))
    assert final.stop_reason in ("end_turn", "max_tokens") and all(b.type == "text" for b in final.content)
    assert "18" in text
    n = an.messages.count_tokens(model=MODEL, messages=history, tools=AN_TOOLS)
    assert n.input_tokens > an.messages.count_tokens(model=MODEL, messages=history).input_tokens  # the tools are in the prompt


def test_anthropic_stream_named_choice_equals_whole(an):
    kw = dict(model=MODEL, max_tokens=120, messages=ASK, tools=AN_TOOLS, extra_body=GREEDY,
              tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})  # fmt: skip
    whole = an.messages.create(**kw)
    partial: dict[int, str] = {}
    with an.messages.stream(**kw) as stream:
        for ev in stream:
            if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                partial[ev.index] = partial.get(ev.index, "") + ev.delta.partial_json
        final = stream.get_final_message()
    assert final.stop_reason == whole.stop_reason == "tool_use"
    streamed = [(b.name, b.input) for b in final.content if b.type == "tool_use"]
    assert streamed == [(b.name, b.input) for b in whole.content if b.type == "tool_use"]
    assert [weather_args(p) for _, p in sorted(partial.items())] == [i for _, i in streamed]  # deltas join to the input


def test_anthropic_bad_blocks_are_400(srv):
    h = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    bad = [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "get_weather", "input": {}}]}]
    r = httpx.post(f"{srv.url}/v1/messages", headers=h, json={"model": MODEL, "max_tokens": 4, "messages": bad, "tools": AN_TOOLS})
    assert r.status_code == 400 and "messages[0].content[0]" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{srv.url}/v1/messages", headers=h,
                   json={"model": MODEL, "max_tokens": 4, "messages": ASK, "tools": AN_TOOLS, "tool_choice": {"type": "tool", "name": "x"}})  # fmt: skip
    assert r.status_code == 400 and "not among the tools" in r.json()["error"]["message"], r.text


# -- real function-calling schemas ----------------------------------------------------------------
def glaive_tools(count: int = 16) -> list[tuple[str, dict]]:
    """`count` Glaiveai2K schemas spread over the set, none of those test_structured_real uses."""
    if not BENCH_DIR.is_dir():
        pytest.skip(f"JSONSchemaBench not found at {BENCH_DIR} (set PELLUCID_JSONSCHEMABENCH)")
    from test_structured_real import BENCH

    files = sorted(p for p in (BENCH_DIR / "Glaiveai2K").glob("*.json") if f"Glaiveai2K/{p.name}" not in BENCH)
    step = len(files) // count
    return [(p.stem.rsplit("_", 1)[0], json.loads(p.read_text())) for p in files[::step][:count]]


def test_glaive_tool_calls_parse_and_validate(oa):
    tools = glaive_tools()
    assert len(tools) >= 15

    def call(item):
        name, schema = item
        tool = {"type": "function", "function": {"name": name, "description": name.replace("_", " "), "parameters": schema}}
        ask = [{"role": "user", "content": f"Please {name.replace('_', ' ')} for me."}]
        return oa.chat.completions.create(model=MODEL, messages=ask, tools=[tool], tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=384, **GREEDY).choices[0]  # fmt: skip

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, tools))
    bad = []
    for (name, schema), c in zip(tools, results, strict=True):
        if c.finish_reason != "tool_calls":
            bad.append((name, c.finish_reason))
            continue
        (t,) = c.message.tool_calls
        assert t.function.name == name
        jsonschema.validate(json.loads(t.function.arguments), schema)  # parses and validates, or the test fails here
    print(f"\n{len(tools) - len(bad)} of {len(tools)} Glaive tool calls parse and validate; not finished: {bad}")
    assert not bad
