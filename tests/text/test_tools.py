"""pellucid.text.tools without a model: tool lists and choices, the grammar, the parser
(streamed piece by piece equals whole), and templates with and without their own tools."""

from __future__ import annotations

import llguidance as llg
import pytest
from tiny import byte_tokenizer

from pellucid.errors import PellucidError
from pellucid.sampling.constraints import make_constraint
from pellucid.text import tools as T
from pellucid.text.chat_template import ChatTemplate

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
OA = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}},
      {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]  # fmt: skip
AN = [{"name": "get_weather", "description": "weather", "input_schema": WEATHER}]


def test_both_shapes_give_the_same_tools():
    assert T.parse_tools(OA)[0] == T.parse_tools(AN)[0] == T.Tool("get_weather", "weather", WEATHER)


@pytest.mark.parametrize(
    ("tools", "param", "match"),
    [
        ("x", "tools", "list"),
        ([{"type": "function", "function": {"name": "a b"}}], "tools[0].function.name", "1-64"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], "tools[0].function.parameters", "'object'"),
        ([{"name": "f"}, {"name": "f"}], "tools[1].name", "unique"),
        ([{"type": "web_search"}], "tools[0].type", "not supported"),
    ],
)  # fmt: skip
def test_bad_tools_name_the_field(tools, param, match):
    with pytest.raises(PellucidError, match=match) as e:
        T.parse_tools(tools)
    assert e.value.param == param


def test_tool_choice_both_apis():
    tools = T.parse_tools(OA)
    assert T.parse_tool_choice(None, tools) == T.ToolChoice("auto", None, True)
    assert T.parse_tool_choice("required", tools, parallel=False) == T.ToolChoice("required", None, False)
    assert T.parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools).name == "get_time"
    assert T.parse_tool_choice({"type": "any", "disable_parallel_tool_use": True}, tools) == T.ToolChoice("required", None, False)
    assert T.parse_tool_choice({"type": "tool", "name": "get_weather"}, tools).mode == "named"
    for bad, match in (("sometimes", "not one of"), ({"type": "tool", "name": "nope"}, "not among")):
        with pytest.raises(PellucidError, match=match):
            T.parse_tool_choice(bad, tools)
    with pytest.raises(PellucidError, match="needs tools"):
        T.parse_tool_choice("required", [])


@pytest.mark.parametrize("mode", ["auto", "required", "named"])
@pytest.mark.parametrize("parallel", [True, False])
def test_grammar_accepts_calls_and_only_calls(mode, parallel):
    tools = T.parse_tools(OA)
    choice = T.ToolChoice(mode, "get_weather" if mode == "named" else None, parallel)
    g = llg.grammar_from("lark", T.grammar(tools, choice))
    assert make_constraint(None, grammar=T.grammar(tools, choice)) is None  # compiles
    call = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    time = '<tool_call>{"name":"get_time","arguments":{}}</tool_call>'

    def accepts(text: str) -> bool:
        m = llg.LLMatcher(byte_tokenizer(), g, log_level=0)
        return all(m.consume_token(b) for b in text.encode()) and m.is_accepting()

    assert accepts(call)
    assert accepts(time) == (mode != "named")
    assert accepts(call + "\n" + call) == (parallel and mode != "named")  # a named tool: exactly one call
    assert accepts("It is sunny.") == (mode == "auto")
    if mode == "auto":  # the fenced form small models fall back to is a call too; a fence naming no tool is text
        assert accepts('```json\n{"name":"get_weather","arguments":{"city":"Paris"}}\n```')
        assert accepts('```json\n{"name": "translate"}\n```') and accepts("```python\nprint(1)\n```")
    assert not accepts('<tool_call>{"name":"get_weather","arguments":{"town":"Paris"}}</tool_call>')
    assert not accepts('<tool_call>{"name":"get_weather","arguments":{}}</tool_call>')  # city is required


def test_a_repeated_call_is_dropped_whole_or_streamed():
    """A small model under "required" writes the same call twice: the answer has it once,
    and a stream never shows the second (its events are held until it differs)."""
    tools = T.parse_tools(OA)
    one = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    other = '<tool_call>{"name":"get_weather","arguments":{"city":"Pau"}}</tool_call>'
    text = "\n".join([one, one, other])
    _, calls, complete = T.parse_answer(text, tools)
    assert complete and [c.args["city"] for c in calls] == ["Paris", "Pau"]
    p = T.ToolCallParser(tools)
    events = [e for ch in text for e in p.feed(ch)]
    assert [e[1] for e in events if e[0] == "call"] == [0, 1]
    assert "".join(e[2] for e in events if e[0] == "args") == '{"city":"Paris"}{"city":"Pau"}'


def test_parser_streamed_equals_whole():
    tools = T.parse_tools(OA)
    text = ('<tool_call>{"name":"get_weather","arguments":{"city":"Pa}\\"ris","n":[1,{"x":"]"}]}}</tool_call>\n'
            '<tool_call>{"name":"get_time","arguments":{}}</tool_call>')  # fmt: skip
    whole_text, whole, complete = T.parse_answer(text, tools)
    assert whole_text == "" and complete
    assert [(c.name, c.args) for c in whole] == [("get_weather", {"city": 'Pa}"ris', "n": [1, {"x": "]"}]}), ("get_time", {})]
    assert whole[0].error is None  # checked against the tool's own schema, which leaves the object open
    for size in (1, 3, 7):
        p = T.ToolCallParser(tools)
        events = []
        for i in range(0, len(text), size):
            events += p.feed(text[i : i + size])
        events += p.finish()
        args = "".join(e[2] for e in events if e[0] == "args" and e[1] == 0)
        assert args == whole[0].arguments and [e[0] for e in events if e[0] != "args"] == ["call", "end", "call", "end"]
        assert p.complete


def test_parser_text_and_cut_calls():
    tools = T.parse_tools(OA)
    assert T.parse_answer("<tool is not a call", tools) == ("<tool is not a call", [], True)
    text, calls, complete = T.parse_answer('<tool_call>{"name":"get_weather","arguments":{"ci', tools)
    assert text == "" and len(calls) == 1 and not complete
    assert T.parse_answer('<tool_call>{"name":"get_time","arguments":{"x":1}}</tool_call>', tools)[1][0].error is None


def test_template_without_tools_gets_the_default_section():
    t = ChatTemplate(None)  # ChatML, no tools variable
    assert not t.supports_tools
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]  # fmt: skip
    out = t.render(msgs, tools=T.parse_tools(OA))
    assert out.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in out
    assert '<|im_start|>assistant\n<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call><|im_end|>' in out
    assert "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>" in out


def test_template_with_tools_renders_them_itself():
    src = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}|{% endif %}"
           "{% for m in messages %}{{ m.role }}:{{ m.content }}{% if m.tool_calls %}"
           "{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}{% endif %}|"
           "{% endfor %}")  # fmt: skip
    t = ChatTemplate(src)
    assert t.supports_tools
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "noon"}]  # fmt: skip
    out = t.render(msgs, tools=T.parse_tools(OA), add_generation_prompt=False)
    assert out == "TOOLS:get_weather;get_time;|user:hi|assistant:CALL get_time {}|tool:noon|"  # arguments as objects
