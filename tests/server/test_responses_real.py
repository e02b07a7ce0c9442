"""OpenAI's Responses API on the real default model in its default format, through the real
openai client (`responses.create`, `responses.stream`, `responses.retrieve`) against a live
server: text, the stream's typed events in order, a function tool round trip, text.format
with a JSON schema, previous_response_id from the in-memory store, and bad input.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.real

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The current weather in a city", "parameters": WEATHER}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def srv(default_server):
    return default_server


@pytest.fixture(scope="module")
def oa(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=120)


def test_text_answer_is_the_chat_answer(oa):
    r = oa.responses.create(model=MODEL, input="What is the capital of France?", max_output_tokens=40, **GREEDY)
    chat = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                      max_tokens=40, **GREEDY)  # fmt: skip
    assert r.status == "completed" and r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == chat.choices[0].message.content and "Paris" in r.output_text
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_instructions_are_the_system_message(oa):
    ask = [{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}]
    r = oa.responses.create(model=MODEL, instructions="Answer in French.", input=ask, max_output_tokens=30, **GREEDY)
    chat = oa.chat.completions.create(model=MODEL, max_tokens=30, **GREEDY, messages=[
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say hello."}])  # fmt: skip
    assert r.output_text == chat.choices[0].message.content
    assert r.instructions == "Answer in French."


def test_stream_events_in_order_and_same_text(oa):
    kw = dict(model=MODEL, input="Name three fruits.", max_output_tokens=60, **GREEDY)
    whole = oa.responses.create(**kw)
    with oa.responses.stream(**kw) as s:
        events = list(s)
        final = s.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == final.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_function_tool_round_trip(oa):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = oa.responses.create(model=MODEL, input=ask, tools=TOOLS, tool_choice="required", max_output_tokens=80, **GREEDY)
    [call] = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    # streamed: the same call, its arguments in deltas
    with oa.responses.stream(model=MODEL, input=ask, tools=TOOLS, tool_choice="required", max_output_tokens=80, **GREEDY) as s:
        events = list(s)
        final = s.get_final_response()
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == call.arguments
    assert [o.arguments for o in final.output if o.type == "function_call"] == [call.arguments]
    # the tool's result goes back as function_call_output; the model answers in text
    back = [*ask, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny", "temperature": 21}'}]  # fmt: skip
    r2 = oa.responses.create(model=MODEL, input=back, tools=TOOLS, tool_choice="none", max_output_tokens=40, **GREEDY)
    assert r2.output_text and not [o for o in r2.output if o.type == "function_call"]
    # a named function: exactly one call of it
    named = oa.responses.create(model=MODEL, input=ask, tools=TOOLS, tool_choice={"type": "function", "name": "get_weather"},
                                max_output_tokens=80, **GREEDY)  # fmt: skip
    assert [o.name for o in named.output if o.type == "function_call"] == ["get_weather"]


def test_text_format_json_schema(oa):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}}
    r = oa.responses.create(model=MODEL, input="Describe a person as JSON.", text=fmt, max_output_tokens=60, **GREEDY)
    jsonschema.validate(json.loads(r.output_text), schema)
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model=MODEL, input="x", text={"format": {"type": "json_schema", "name": "p",
                            "schema": {"type": "object", "properties": {"a": {"type": "strng"}}}}})  # fmt: skip
    assert e.value.body["param"].startswith("text.format"), e.value.body


def test_previous_response_id_continues_and_store_false_keeps_nothing(oa, srv):
    first = oa.responses.create(model=MODEL, input="My name is Ada. Remember it.", max_output_tokens=20, **GREEDY)
    second = oa.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=20,
                                 **GREEDY)  # fmt: skip
    history = [{"role": "user", "content": "My name is Ada. Remember it."}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "What is my name?"}]  # fmt: skip
    whole = oa.responses.create(model=MODEL, input=history, max_output_tokens=20, **GREEDY)
    assert second.output_text == whole.output_text and second.usage.input_tokens == whole.usage.input_tokens
    assert oa.responses.retrieve(first.id).output_text == first.output_text
    off = oa.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=5)
    with pytest.raises(openai.NotFoundError):
        oa.responses.retrieve(off.id)
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model=MODEL, input="Hi", previous_response_id=off.id)
    assert e.value.body["param"] == "previous_response_id" and "not kept" in e.value.body["message"]


def test_max_output_tokens_makes_it_incomplete(oa):
    r = oa.responses.create(model=MODEL, input="Count from one to fifty in words.", max_output_tokens=5,
                            extra_body={"ignore_eos": True})  # fmt: skip
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5


@pytest.mark.parametrize(("body", "param"), [
    ({"input": []}, "input"),
    ({"input": [{"type": "web_search_call"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
    ({"input": "hi", "text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "hi", "frobnicate": 1}, "frobnicate"),
])  # fmt: skip
def test_bad_input_is_a_400_naming_the_field(srv, body, param):
    r = httpx.post(f"{srv.url}/v1/responses", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert httpx.get(f"{srv.url}/health").status_code == 200
