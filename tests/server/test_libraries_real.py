"""Client libraries, unmodified, against a live server on the real default model: each
library's first, typical example, streamed and not where it has both. The openai SDK's
parse helpers (chat and Responses), the anthropic SDK's streamed tool use and
structured output (messages.parse), langchain-openai (invoke, stream, structured output
by json_schema / function_calling / json_mode, bind_tools, the Responses API),
pydantic-ai (tool output, NativeOutput, a function tool, run_stream) and the OpenAI
Agents SDK (a function tool with the chat and Responses models, run_streamed,
output_type).

The model is 135M parameters: its answers may be poor, but the structure must be right:
the object validates, the tool is called with arguments that fit its schema, a final
answer comes back. Where the model does not call a tool by itself, the test forces the
first turn to a tool call and the next to text (tool_choice "required", then "none"), as a
user of a small model would. Each library is skipped where it is not installed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import jsonschema
import pytest
from pydantic import BaseModel

pytestmark = pytest.mark.real

MODEL = "smollm2-135m-instruct"
EXTRACT = "Extract: John is 30 years old."
WEATHER_Q = "What is the weather in Paris?"
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


class User(BaseModel):
    name: str
    age: int


def _is_user(u) -> None:
    assert isinstance(u, User), u
    assert "John" in u.name and isinstance(u.age, int)


def _weather(calls: list[str], city: str) -> str:
    calls.append(city)
    return f"Sunny, 22 C in {city}"


def _called(calls: list) -> None:
    """The tool ran once, with arguments that fit its schema."""
    assert len(calls) == 1, calls
    jsonschema.validate({"city": calls[0]}, WEATHER)
    assert calls[0]


@pytest.fixture(scope="module")
def srv(default_server):
    return default_server


@pytest.fixture(scope="module")
def base(srv):
    return f"{srv.url}/v1"


# -- openai SDK -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oa(base):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)


def test_openai_chat_parse(oa):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": EXTRACT}], temperature=0, max_tokens=60)
    r = oa.chat.completions.parse(**ask, response_format=User)
    _is_user(r.choices[0].message.parsed)
    with oa.chat.completions.stream(**ask, response_format=User) as s:
        deltas = [e.delta for e in s if e.type == "content.delta"]
        final = s.get_final_completion()
    assert len(deltas) > 1 and "".join(deltas) == r.choices[0].message.content
    assert final.choices[0].message.parsed == r.choices[0].message.parsed
    # a pydantic model as a function tool: the call's arguments come back parsed
    import openai

    t = oa.chat.completions.parse(**ask, tools=[openai.pydantic_function_tool(User)], tool_choice="required",
                                  parallel_tool_calls=False)  # fmt: skip
    [call] = t.choices[0].message.tool_calls
    assert t.choices[0].finish_reason == "tool_calls" and call.function.name == "User"
    assert isinstance(call.function.parsed_arguments, User) and call.function.parsed_arguments.name


def test_openai_responses_parse(oa):
    ask = dict(model=MODEL, input=EXTRACT, temperature=0, max_output_tokens=60)
    r = oa.responses.parse(**ask, text_format=User)
    _is_user(r.output_parsed)
    with oa.responses.stream(**ask, text_format=User) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert "response.output_text.delta" in kinds and kinds[-1] == "response.completed"
    assert final.output_parsed == r.output_parsed


# -- anthropic SDK ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def an(srv):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=srv.url, api_key="none", max_retries=0, timeout=120)  # the root, not /v1


def test_anthropic_streamed_tool_use(an):
    tools = [{"name": "get_weather", "description": "The current weather in a city", "input_schema": WEATHER}]
    # anthropic>=2 has no typed temperature: it goes as a body field
    with an.messages.stream(model=MODEL, max_tokens=80, messages=[{"role": "user", "content": WEATHER_Q}], tools=tools,
                            tool_choice={"type": "any"}, extra_body={"temperature": 0}) as s:  # fmt: skip
        events = list(s)
        m = s.get_final_message()
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert "tool_use" in starts and m.stop_reason == "tool_use"
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER)
    assert json.loads(partial) == use.input


def test_anthropic_parse_output_format(an):
    ask = dict(model=MODEL, max_tokens=60, messages=[{"role": "user", "content": EXTRACT}], extra_body={"temperature": 0})
    m = an.messages.parse(**ask, output_format=User)  # sent as output_config.format (a JSON schema)
    _is_user(m.parsed_output)
    assert m.stop_reason == "end_turn"
    with an.messages.stream(**ask, output_format=User) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == m.content[0].text and final.parsed_output == m.parsed_output


# -- langchain-openai -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lc(base):
    lco = pytest.importorskip("langchain_openai")
    return lco.ChatOpenAI(base_url=base, api_key="none", model=MODEL, temperature=0, max_tokens=60, max_retries=0)


@pytest.fixture(scope="module")
def lc_tool():
    tool = pytest.importorskip("langchain_core.tools").tool

    calls: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return _weather(calls, city)

    return get_weather


def test_langchain_invoke_and_stream(lc):
    whole = lc.invoke("What is the capital of France?")
    assert isinstance(whole.content, str) and "Paris" in whole.content
    chunks = list(lc.stream("What is the capital of France?", stream_usage=True))  # off by default on a custom base_url
    assert len(chunks) > 2 and "".join(c.content for c in chunks) == whole.content
    assert sum(chunks[1:], chunks[0]).usage_metadata["output_tokens"] == whole.usage_metadata["output_tokens"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_structured_output(lc, method):
    ask = EXTRACT if method != "json_mode" else f'{EXTRACT} Answer in JSON with the keys "name" and "age".'
    out = lc.with_structured_output(User, method=method, include_raw=True).invoke(ask)
    assert out["parsing_error"] is None
    _is_user(out["parsed"])
    if method == "function_calling":
        assert out["raw"].tool_calls[0]["name"] == "User"


def test_langchain_bind_tools(lc, lc_tool):
    bound = lc.bind_tools([lc_tool], tool_choice="any")
    [call] = bound.invoke(WEATHER_Q).tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], WEATHER)
    chunks = list(bound.stream(WEATHER_Q))
    streamed = sum(chunks[1:], chunks[0])
    assert len(chunks) > 2 and [(c["name"], c["args"]) for c in streamed.tool_calls] == [(call["name"], call["args"])]
    assert lc_tool.invoke(call["args"]).startswith("Sunny")


def test_langchain_responses_api(base, lc_tool):
    lco = pytest.importorskip("langchain_openai")
    lr = lco.ChatOpenAI(base_url=base, api_key="none", model=MODEL, temperature=0, max_tokens=60, max_retries=0,
                        use_responses_api=True)  # fmt: skip
    assert "Paris" in lr.invoke("What is the capital of France?").text
    _is_user(lr.with_structured_output(User, method="json_schema").invoke(EXTRACT))
    [call] = lr.bind_tools([lc_tool], tool_choice="any").invoke(WEATHER_Q).tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER)


# -- pydantic-ai ------------------------------------------------------------------------------------
def _pai_model(base, kind):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    cls = OpenAIChatModel if kind == "chat" else OpenAIResponsesModel
    return cls(MODEL, provider=OpenAIProvider(base_url=base, api_key="none"))


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_pydantic_ai_outputs(base, kind):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.output import NativeOutput

    settings = {"temperature": 0, "max_tokens": 60}
    r = Agent(_pai_model(base, kind), output_type=User, model_settings=settings).run_sync(EXTRACT)  # ToolOutput: a final_result tool
    _is_user(r.output)
    assert [p.tool_name for m in r.all_messages() for p in m.parts if p.part_kind == "tool-call"] == ["final_result"]
    native = Agent(_pai_model(base, kind), output_type=NativeOutput(User), model_settings=settings).run_sync(EXTRACT)
    _is_user(native.output)  # response_format / text.format json_schema

    async def streamed():
        agent = Agent(_pai_model(base, kind), output_type=User, model_settings=settings)
        async with agent.run_stream(EXTRACT) as run:
            return [o async for o in run.stream_output(debounce_by=None)]

    partial = asyncio.run(streamed())
    assert len(partial) > 1 and partial[-1] == r.output


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_pydantic_ai_function_tool(base, kind):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent

    def settings(ctx):  # the first request must call a tool; the next answers in text
        return {"temperature": 0, "max_tokens": 60, "tool_choice": "required" if ctx.run_step <= 1 else "none"}

    calls: list[str] = []
    agent = Agent(_pai_model(base, kind), model_settings=settings)

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return _weather(calls, city)

    r = agent.run_sync(WEATHER_Q)
    _called(calls)
    kinds = [p.part_kind for m in r.all_messages() for p in m.parts]
    assert kinds == ["user-prompt", "tool-call", "tool-return", "text"], kinds
    assert isinstance(r.output, str) and r.output.strip()


# -- OpenAI Agents SDK ------------------------------------------------------------------------------
def _agent(base, kind, calls: list[str] | None, **kw):
    """An Agents SDK agent on a fresh client (a client belongs to the event loop that first used it)."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
    cls = agents.OpenAIChatCompletionsModel if kind == "chat" else agents.OpenAIResponsesModel
    model = cls(model=MODEL, openai_client=client)
    if calls is None:
        return agents.Agent(name="extract", model=model, model_settings=agents.ModelSettings(temperature=0, max_tokens=60), **kw)

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return _weather(calls, city)

    class AnswerAfterTool(agents.AgentHooks):  # the first turn must call the tool; the next answers in text
        async def on_tool_end(self, context, agent, tool, result):
            agent.model_settings = dataclasses.replace(agent.model_settings, tool_choice="none")

    return agents.Agent(name="weather", instructions="Answer weather questions.", model=model, tools=[get_weather],
                        model_settings=agents.ModelSettings(temperature=0, max_tokens=60, tool_choice="required"),
                        reset_tool_choice=False, hooks=AnswerAfterTool())  # fmt: skip


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_agents_function_tool(base, kind):
    agents = pytest.importorskip("agents")
    calls: list[str] = []
    r = agents.Runner.run_sync(_agent(base, kind, calls), WEATHER_Q, max_turns=4)
    _called(calls)
    assert [i.type for i in r.new_items] == ["tool_call_item", "tool_call_output_item", "message_output_item"]
    assert isinstance(r.final_output, str) and r.final_output.strip()


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_agents_run_streamed(base, kind):
    agents = pytest.importorskip("agents")
    calls: list[str] = []

    async def run():
        r = agents.Runner.run_streamed(_agent(base, kind, calls), WEATHER_Q, max_turns=4)
        names = [e.name async for e in r.stream_events() if e.type == "run_item_stream_event"]
        return r, names

    r, names = asyncio.run(run())
    _called(calls)
    assert names == ["tool_called", "tool_output", "message_output_created"], names
    assert isinstance(r.final_output, str) and r.final_output.strip()


@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_agents_output_type(base, kind):
    agents = pytest.importorskip("agents")
    r = agents.Runner.run_sync(_agent(base, kind, None, output_type=User), EXTRACT)
    _is_user(r.final_output)


@pytest.mark.parametrize(("output_config", "param"), [
    ({"format": {"type": "json_object"}}, "output_config.format"),
    ({"format": {"type": "json_schema"}}, "output_config.format"),
    ({"format": {"type": "json_schema", "schema": {"type": "object", "if": {}}}}, "output_config.format.schema"),
    ({"verbosity": "low"}, "output_config.verbosity"),
])  # fmt: skip
def test_anthropic_bad_output_config_is_a_400_naming_the_field(srv, output_config, param):
    import httpx

    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": EXTRACT}], "output_config": output_config}
    r = httpx.post(f"{srv.url}/v1/messages", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert r.json()["error"]["message"].startswith(param) and "strict" not in r.text, r.text  # Anthropic's body has no param
    both = {**body, "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
            "tools": [{"name": "get_weather", "input_schema": WEATHER}]}  # fmt: skip
    r = httpx.post(f"{srv.url}/v1/messages", json=both, timeout=60)
    assert r.status_code == 400 and "not both" in r.json()["error"]["message"]
    effort = httpx.post(f"{srv.url}/v1/messages", json={**body, "output_config": {"effort": "low"}}, timeout=60)
    assert effort.status_code == 200 and effort.json()["content"][0]["type"] == "text"
