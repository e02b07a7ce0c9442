"""JSON and tools in chat on the real default model: `pellucid chat --json / --json-schema /
--choice / --regex / --tools`, `LLM.chat(json_schema=...)` with oneOf accepted by default
and checked afterwards, and the constraint stated in the prompt."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pellucid.errors import PellucidError

pytestmark = pytest.mark.real

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city"]}  # fmt: skip
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
          "required": ["name", "age"]}  # fmt: skip


def test_chat_json_once(real_cli):
    """The issue's first try: `pellucid chat --json --once "List 3 colors as JSON"`."""
    r = real_cli("chat", "--json", "--once", "List 3 colors as JSON", "--max-tokens", "120")
    assert r.exit_code == 0, r.output
    value = json.loads(r.stdout.strip())
    print("\nchat --json ->", r.stdout.strip())
    assert isinstance(value, dict) and value


def test_chat_json_schema_and_choice_and_regex(real_cli, tmp_path):
    f = tmp_path / "person.json"
    f.write_text(json.dumps(PERSON))
    r = real_cli("chat", "--json-schema", str(f), "--once", "Describe a famous scientist.", "--max-tokens", "120")
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.stdout.strip()), PERSON)
    r = real_cli("chat", "--choice", "yes", "--choice", "no", "--once", "Is the sky blue?")
    assert r.exit_code == 0 and r.stdout.strip() in ("yes", "no"), r.output
    r = real_cli("chat", "--regex", "[0-9]{4}", "--once", "In which year did the Berlin wall fall?")
    assert r.exit_code == 0 and len(r.stdout.strip()) == 4 and r.stdout.strip().isdigit(), r.output


def test_chat_json_cut_short_is_reported(real_cli):
    r = real_cli("chat", "--json", "--once", "List 3 colors as JSON", "--max-tokens", "3")
    assert r.exit_code == 1 and "incomplete" in r.output


def test_chat_tools_once(real_cli, tmp_path):
    f = tmp_path / "tools.json"
    f.write_text(json.dumps([{"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER}]))
    r = real_cli("chat", "--tools", str(f), "--tool-choice", "get_weather", "--once", "Weather in Rome?", "--max-tokens", "80")
    assert r.exit_code == 0, r.output
    (line,) = r.stdout.strip().splitlines()  # one call per reply
    call = json.loads(line)
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(call["arguments"], WEATHER)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"type": "function", "function": {"name": "no spaces allowed"}}]))
    r = real_cli("chat", "--tools", str(bad), "--once", "hi")
    said = r.output + str(r.exception)  # in-process, a PellucidError reaches us as the exception main() prints
    assert r.exit_code != 0 and "--tools[0].function.name" in said and "1-64" in said, said


def test_the_prompt_states_the_constraint(real_llm):
    from pellucid.sampling.constraints import make_constraint

    msgs = [{"role": "user", "content": "Describe a person."}]
    c = make_constraint(real_llm.tokenizer, json_schema=PERSON)
    prompt = real_llm.render_chat(msgs, constraint=c)
    assert "Answer in JSON" in prompt and json.dumps(PERSON, separators=(",", ":")) in prompt
    assert "Answer in JSON" in real_llm.render_chat(msgs, constraint=make_constraint(real_llm.tokenizer, json=True))
    assert "Answer in JSON" not in real_llm.render_chat(msgs)


def test_one_of_accepted_by_default_checked_afterwards(real_llm):
    """A oneOf whose branches overlap: refused with strict=True, generated as anyOf by default,
    and an output that matches both branches is reported, not passed as valid."""
    schema = {"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "string", "minLength": 2}]}},
              "required": ["a"]}  # fmt: skip
    msgs = [{"role": "user", "content": "Give me a word in JSON."}]
    with pytest.raises(PellucidError, match="oneOf"):
        real_llm.chat(msgs, json_schema=schema, strict=True, max_tokens=40)
    out = real_llm.chat(msgs, json_schema=schema, max_tokens=80, temperature=0)
    assert out.finish_reason == "stop"
    value = json.loads(out.text)
    a = value["a"]
    assert isinstance(a, str)
    if len(a) >= 2:  # both branches match: oneOf fails, and it says so
        assert out.schema_error is not None and "valid under each of" in out.schema_error
    else:
        assert out.schema_error is None
    exact = {"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}, "required": ["a"]}
    out = real_llm.chat(msgs, json_schema=exact, max_tokens=80, temperature=0)
    assert out.finish_reason == "stop" and out.schema_error is None
    jsonschema.validate(json.loads(out.text), exact)


def test_llm_chat_tools(real_llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    msgs = [{"role": "user", "content": "What is the weather in Oslo?"}]
    out = real_llm.chat(msgs, tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=80, temperature=0)
    assert out.finish_reason == "tool_calls" and len(out.tool_calls) == 1 and out.text == ""
    jsonschema.validate(out.tool_calls[0].args, WEATHER)
    assert out.tool_calls[0].error is None
    with pytest.raises(PellucidError, match="not both"):
        real_llm.chat(msgs, tools=tools, json=True)
