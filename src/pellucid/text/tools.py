"""Tool calling: tools in the prompt, a grammar for the call, the call parsed back out.

A call is written in the model's own format where its chat template states one, else in
pellucid's (`CallFormat`):

    <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>   (Qwen2.5, Hermes)
    <tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>            (pellucid's)

(several calls, when parallel calls are allowed, one per line). The call is generated
under an llguidance grammar built from the tools' schemas, so the name is one of the
tools and the arguments are JSON that follows that tool's parameters schema (prepared as
for response_format: see pellucid.sampling.constraints). tool_choice:

- "auto": the grammar allows plain text (not starting with "<" or whitespace), calls, or a
  call in the fenced form small models fall back to (```json\n{"name": ..., "arguments":
  ...}\n```), which is parsed as the call it is; once a call has begun its arguments
  follow the grammar;
- "required": one call or more; a named tool: exactly one call of that tool;
  parallel_tool_calls false: at most one call. A call that repeats one already made in the
  same answer (same tool, same arguments) is dropped, streaming or not;
- "none": the tools are not shown to the model, and the answer is plain text (not
  starting with "<" or whitespace, so a small model does not echo call or result markup).

A chat template that takes `tools` (it names the variable) renders them itself, with the
history's `tool_calls` and `tool` messages as it expects. Any other template gets
`DEFAULT_SECTION` appended to the system message, earlier calls as the text above and
tool results as user turns wrapped in <tool_response>.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pellucid.errors import PellucidError
from pellucid.sampling.constraints import make_constraint
from pellucid.sampling.json_schema import prepare_schema, schema_error, subschemas

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FENCE_OPEN, FENCE_CLOSE = "```json\n", "\n```"  # the fenced form small models fall back to
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
TEXT = r"TEXT: /[^<\s][\s\S]*/"  # a plain-text answer ("none"): it cannot open with markup or whitespace
MAX_PARALLEL = 4  # calls in one answer when parallel calls are allowed
CHOICES = ("auto", "none", "required")

DEFAULT_SECTION = """# Tools

You may call one or more of these tools. Their signatures, as JSON schemas:
{tools}

To call a tool, answer with nothing but
<tool_call>{{"name": <tool name>, "arguments": <arguments as a JSON object>}}</tool_call>
The result comes back in a <tool_response> message. Answer in plain text when no tool is needed."""


@dataclass(frozen=True)
class CallFormat:
    """How a model writes a call: the text around it and its JSON's separators."""

    name: str
    open: str
    close: str
    compact: bool  # JSON without spaces (else ", " and ": ", as Python's json.dumps and Jinja's tojson write it)

    def call(self, name: str, arguments: Any) -> str:
        seps = (",", ":") if self.compact else (", ", ": ")
        return self.open + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=seps) + self.close


PELLUCID_FORMAT = CallFormat("pellucid", OPEN, CLOSE, compact=True)
HERMES_FORMAT = CallFormat("hermes", OPEN + "\n", "\n" + CLOSE, compact=False)  # Qwen2.5's and Hermes' templates ask for this


def call_format(template_source: str | None, renders_tools: bool) -> CallFormat:
    """The format a model's template asks for its calls (pellucid's when it states none)."""
    if renders_tools and template_source and OPEN in template_source:
        return HERMES_FORMAT
    return PELLUCID_FORMAT


class ToolList(list):
    """The tools offered to one model, with the format its calls are written in."""

    def __init__(self, tools, fmt: CallFormat = PELLUCID_FORMAT):
        super().__init__(tools)
        self.call_format = fmt


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema for the arguments object

    def openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text the model wrote
    error: str | None = None  # set when the arguments do not validate against the tool's schema

    @property
    def args(self) -> Any:
        return json.loads(self.arguments)

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # auto | none | required | named
    name: str | None = None
    parallel: bool = True


# -- the request's side ---------------------------------------------------------------------------
def parse_tools(tools: Any, *, param: str = "tools") -> list[Tool]:
    """OpenAI's [{"type": "function", "function": {name, description, parameters}}], its
    Responses API's flat [{"type": "function", name, description, parameters}] or
    Anthropic's [{name, description, input_schema}] -> Tools; errors name the field."""
    if not isinstance(tools, list):
        raise PellucidError(f"{param} must be a list of tools, got {type(tools).__name__}", param=param)
    out: list[Tool] = []
    for i, t in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(t, dict):
            raise PellucidError(f"{where} must be an object", param=where)
        if t.get("type") == "function" and "function" not in t and "name" in t:  # the Responses API's shape
            fn, key = t, "parameters"
        elif "function" in t or t.get("type") == "function":
            if t.get("type") != "function" or not isinstance(t.get("function"), dict):
                raise PellucidError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}; type 'function' is the only one", param=f"{where}.type")
            fn, where, key = t["function"], f"{where}.function", "parameters"
        else:
            fn, key = t, "input_schema"
            if t.get("type") not in (None, "custom"):
                raise PellucidError(f"{where}.type {t.get('type')!r} is not supported; allowed: 'function' (OpenAI's shape) or "
                                   f"'custom' (Anthropic's: name, description, input_schema)", param=f"{where}.type")  # fmt: skip
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise PellucidError(f"{where}.name {name!r} must be 1-64 of a-z, A-Z, 0-9, _ and -", param=f"{where}.name")
        if any(x.name == name for x in out):
            raise PellucidError(f"{where}.name {name!r} is given twice; tool names must be unique", param=f"{where}.name")
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise PellucidError(f"{where}.description must be a string", param=f"{where}.description")
        schema = fn.get(key, {"type": "object", "properties": {}})
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise PellucidError(f"{where}.{key} must be a JSON schema of type 'object'", param=f"{where}.{key}")
        out.append(Tool(name, desc, schema))
    return out


def parse_tool_choice(choice: Any, tools: list[Tool], *, parallel: bool | None = True, param: str = "tool_choice") -> ToolChoice:
    """OpenAI's "auto" | "none" | "required" | {"type": "function", "function": {"name"}} (the
    Responses API's {"type": "function", "name"}) or Anthropic's {"type": "auto" | "any" |
    "none" | "tool", "name", "disable_parallel_tool_use"}."""
    parallel = True if parallel is None else bool(parallel)
    if choice is None:
        choice = "auto"
    mode, name = None, None
    if isinstance(choice, str):
        mode = choice if choice in CHOICES else None
    elif isinstance(choice, dict):
        t = choice.get("type")
        if t == "function" and isinstance(choice.get("function"), dict):
            mode, name = "named", choice["function"].get("name")
        elif t == "function" and isinstance(choice.get("name"), str):
            mode, name = "named", choice["name"]
        elif t == "tool":
            mode, name = "named", choice.get("name")
        elif t in ("auto", "none", "any"):
            mode = "required" if t == "any" else t
        if choice.get("disable_parallel_tool_use"):
            parallel = False
    if mode is None:
        raise PellucidError(f"{param} {choice!r} is not one of: 'auto', 'none', 'required', {{\"type\": \"function\", "
                            f"\"function\": {{\"name\": ...}}}} (OpenAI) or {{\"type\": \"auto\" | \"any\" | \"none\" | "
                            f"\"tool\"}} (Anthropic)", param=param)  # fmt: skip
    if mode != "none" and not tools:
        raise PellucidError(f"{param} {mode!r} needs tools; none were given", param=param)
    if mode == "named" and not any(t.name == name for t in tools):
        raise PellucidError(f"{param} names the tool {name!r}, which is not among the tools: {', '.join(t.name for t in tools)}", param=param)
    return ToolChoice(mode, name, parallel)


def system_section(tools: list[Tool]) -> str:
    """The default tools section, for templates that do not render tools themselves."""
    sigs = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters}, ensure_ascii=False)
                     for t in tools)  # fmt: skip
    return DEFAULT_SECTION.format(tools=sigs)


def call_text(name: str, arguments: Any) -> str:
    """A call as the model writes it (for earlier calls in the history)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise PellucidError(f"the arguments of the earlier call to {name!r} are not JSON: {arguments[:80]!r}", param="messages") from None
    return OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":")) + CLOSE


def history(messages: list[dict[str, Any]], tools: list[Tool] | None, *, native: bool) -> list[dict[str, Any]]:
    """Messages with assistant `tool_calls` and `tool` results, made renderable.

    native: the template renders tools itself; calls keep OpenAI's shape, with arguments as
    objects (what such templates iterate over). Otherwise calls become text in the assistant
    turn, consecutive tool results one user turn, and the tools section joins the system message.
    """
    out: list[dict[str, Any]] = []
    results: list[str] = []

    def flush() -> None:
        if results:
            out.append({"role": "user", "content": "\n".join(results)})
            results.clear()

    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)  # validate_messages names it
            continue
        role, calls = m.get("role"), m.get("tool_calls")
        if role == "tool":
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if not isinstance(content, str):
                raise PellucidError(f"messages[{i}].content must be the tool's result as a string", param=f"messages[{i}].content")
            if native:
                out.append({**m, "content": content})
            else:
                results.append(f"<tool_response>\n{content}\n</tool_response>")
            continue
        flush()
        if role == "assistant" and calls:
            parsed = _history_calls(calls, i)
            if native:
                out.append({**m, "content": m.get("content") or "",
                            "tool_calls": [{"id": c.get("id"), "type": "function",
                                            "function": {"name": n, "arguments": a}} for c, n, a in parsed]})  # fmt: skip
            else:
                text = "\n".join(call_text(n, a) for _, n, a in parsed)
                lead = m.get("content") or ""
                out.append({"role": "assistant", "content": f"{lead}\n{text}" if lead else text})
            continue
        out.append(m)
    flush()
    return add_to_system(out, system_section(tools)) if tools and not native else out


def add_to_system(messages: list[dict[str, Any]], text: str | None) -> list[dict[str, Any]]:
    """`text` appended to the system message (a new one first if there is none)."""
    if not text:
        return messages
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system" and isinstance(first.get("content"), str):
        return [{**first, "content": f"{first['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _history_calls(calls: Any, i: int) -> list[tuple[dict, str, Any]]:
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise PellucidError(f"{where} must be a list", param=where)
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise PellucidError(f"{where}[{j}] must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}", param=f"{where}[{j}]")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise PellucidError(f"{where}[{j}].function.arguments is not JSON: {args[:80]!r}", param=f"{where}[{j}].function.arguments") from None
        out.append((c, fn["name"], args))
    return out


# -- the grammar ---------------------------------------------------------------------------------
def grammar(tools: list[Tool], choice: ToolChoice, *, strict: bool | None = None, fmt: CallFormat = PELLUCID_FORMAT) -> str:
    """The Lark grammar of an answer under `choice` (not "none"), calls in `fmt`. strict as for
    response_format, except that by default a keyword the grammar cannot enforce is ignored
    (strict=False for that tool) rather than refused: each call is validated against the
    tool's schema after."""

    assert choice.mode != "none", choice
    names = [t for t in tools if choice.mode != "named" or t.name == choice.name]
    lines = []
    colon, comma = (":", ",") if fmt.compact else (": ", ", ")
    fenced = []
    for k, t in enumerate(names):
        head_text = f'{{"name"{colon}{json.dumps(t.name)}{comma}"arguments"{colon}'
        head = json.dumps(head_text)
        schema = t.parameters
        mode = strict
        if strict is None:  # a keyword the grammar cannot enforce: ignore it, close every object, check afterwards
            try:
                make_constraint(None, json_schema=schema)
            except PellucidError:
                schema, mode = _closed(schema), False
        schema = prepare_schema(schema, strict=mode, compact=fmt.compact)
        args = f"%json {json.dumps(schema, ensure_ascii=False)}"
        lines.append(f"tool_{k}: {head} {args} \"}}\"")
        # the fence and the head in one literal: plain text (which may open like a fence) ends where this
        # one names the tool, while the literal goes on, so the lexer never has to choose between them
        fenced.append(f"fenced_{k}: {json.dumps(FENCE_OPEN + head_text)} {args} {json.dumps('}' + FENCE_CLOSE)}")
    tool_alts = " | ".join(f"tool_{k}" for k in range(len(names)))
    # a named tool: exactly one call (OpenAI's meaning); otherwise more when parallel calls are allowed
    calls = "call" + (f' ("\\n" call){{0,{MAX_PARALLEL - 1}}}' if choice.parallel and choice.mode != "named" else "")
    top = "start: TEXT | calls | fenced" if choice.mode == "auto" else "start: calls"
    rules = [top, f"calls: {calls}", f"call: {json.dumps(fmt.open)} ({tool_alts}) {json.dumps(fmt.close)}"]
    if choice.mode == "auto":
        rules.append("fenced: " + " | ".join(f"fenced_{k}" for k in range(len(names))))
        # plain text may even open like a fenced call, up to the point where it names a tool
        heads = [FENCE_OPEN + f'{{"name"{colon}"{t.name}"' for t in names]
        rules.append(f"TEXT: /{not_starting_with(heads)}/")
    return "\n".join(rules + lines + (fenced if choice.mode == "auto" else [])) + "\n"


def not_starting_with(prefixes: list[str]) -> str:
    """A regex for plain text: at least one character, not opening with "<" or whitespace, and
    not opening with any of `prefixes` (text that stops inside one of them is allowed)."""
    trie: dict = {}
    for p in prefixes:
        node = trie
        for ch in p:
            node = node.setdefault(ch, {})
        node[None] = True  # a whole prefix ends here: nothing may follow it

    def esc(c: str) -> str:  # one character, as a regex inside Lark's /.../ writes it
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c) or ("\\" + c if c in "\\^-]/[.*+?(){}|$" else c)

    def alts(node: dict, top: bool) -> str:
        ban = ("<\\s" if top else "") + "".join(esc(c) for c in node if c is not None)
        out = ["[^" + ban + "][\\s\\S]*"]
        if not top:
            out.append("")  # the text ends inside a prefix
        for c, child in node.items():
            if c is not None and None not in child:
                out.append(esc(c) + "(" + alts(child, False) + ")")
        return "|".join(out)

    return "(" + alts(trie, True) + ")"


def constraint(tokenizer, tools: list[Tool], choice: ToolChoice, *, vocab_size: int | None = None):
    """The Constraint for an answer under `choice` ("none": text only), calls in the tools' format."""

    text = f"start: TEXT\n{TEXT}\n"  # "none": plain text that does not open with call (or result) markup
    fmt = getattr(tools, "call_format", PELLUCID_FORMAT)
    try:
        return make_constraint(tokenizer, grammar=text if choice.mode == "none" else grammar(tools, choice, fmt=fmt),
                               vocab_size=vocab_size)  # fmt: skip
    except PellucidError as e:
        raise PellucidError(f"the tools' parameters could not be made into a grammar: {e.message}", param="tools") from None


def _closed(schema: dict) -> dict:
    """A copy where every object that lists properties allows no others (outputs are checked
    against the real schema afterwards, so this may be narrower than exact)."""

    out = copy.deepcopy(schema)
    for _, s in subschemas(out):
        if isinstance(s.get("properties"), dict) and not any(k in s for k in ("additionalProperties", "patternProperties")):
            s["additionalProperties"] = False
    return out


# -- the answer's side -------------------------------------------------------------------------
_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


@dataclass
class ToolCallParser:
    """Splits an answer into text and calls as it streams: `feed(piece)` returns events
    ("text", s), ("call", index, ToolCall) when a call's name is known, ("args", index,
    fragment) as its arguments come, ("end", index) once the call is complete."""

    tools: list[Tool]
    id_prefix: str = "call_"
    calls: list[ToolCall] = field(default_factory=list)
    text: str = ""
    _buf: str = ""
    _mode: str = "start"  # start | text | head | args | tail
    _close: str = CLOSE  # what ends the call being read (its format's, or the fence's)
    _depth: int = 0
    _in_str: bool = False
    _esc: bool = False
    _complete: int = 0  # calls whose closing tag has come
    _held: list = field(default_factory=list)  # the current call's events, while it may still repeat an earlier call
    _dupes: list = field(default_factory=list)  # arguments of earlier complete calls of the current call's tool
    repeated: bool = False  # a complete call repeated an earlier one (and was dropped)

    def feed(self, piece: str) -> list[tuple]:
        self._buf += piece
        events: list[tuple] = []
        while self._buf:
            before = (len(self._buf), self._mode)
            events += self._step()
            if (len(self._buf), self._mode) == before:  # waiting for more text
                break
        return events

    def finish(self) -> list[tuple]:
        """Events for what is left at the end (held text that never became a call)."""
        if self._mode == "start" and self._buf:
            self._mode = "text"
            return self.feed("")
        return []

    @property
    def complete(self) -> bool:
        """Every call that was started is complete (and there is at least one)."""
        return bool(self.calls) and self._complete == len(self.calls)

    def _step(self) -> list[tuple]:
        buf = self._buf
        if self._mode == "start":
            stripped = buf.lstrip("\n")
            fmt = getattr(self.tools, "call_format", PELLUCID_FORMAT)
            for opening, closing in ((fmt.open, fmt.close), (OPEN, CLOSE), (FENCE_OPEN, FENCE_CLOSE)):
                if stripped.startswith(opening):
                    self._buf, self._mode, self._close = stripped[len(opening):], "head", closing
                    return []
            if not any(o.startswith(stripped) for o in (fmt.open, OPEN, FENCE_OPEN)):
                self._mode = "text"
            return []
        if self._mode == "text":
            self.text += buf
            self._buf = ""
            return [("text", buf)]
        if self._mode == "head":
            m = _HEAD.match(buf)
            if m is None or m.end() == len(buf):  # (more whitespace may still come before the arguments)
                return []
            name = json.loads(m.group(1))
            if self._close == FENCE_CLOSE and not any(t.name == name for t in self.tools):
                self._mode = "text"  # a fenced block that names no tool is what it looks like: text
                self._buf = FENCE_OPEN + buf
                return []
            call = ToolCall(f"{self.id_prefix}{secrets.token_hex(12)}", name, "")
            self._dupes = [c.arguments for c in self.calls if c.name == name]
            self.calls.append(call)
            self._buf, self._mode = buf[m.end():], "args"
            self._depth, self._in_str, self._esc = 0, False, False
            return self._hold([("call", len(self.calls) - 1, call)])
        if self._mode == "args":
            end = self._scan(buf)
            frag = buf if end is None else buf[:end]
            call = self.calls[-1]
            call.arguments += frag
            self._buf = "" if end is None else buf[end:]
            if end is not None:
                self._mode = "tail"
            return self._hold([("args", len(self.calls) - 1, frag)] if frag else [])
        # tail: the wrapper's "}" and the closing text, then a newline and the next call
        m = re.match(r"\s*\}" + re.escape(self._close), buf)
        if m is None:
            if re.fullmatch(r"\s*(\}.*)?", buf, re.S) and len(buf) < len(self._close) + 8:
                return []  # the end is still coming
            self._mode = "text"  # not a call's end after all: what follows is text
            return []
        self._buf, self._mode = buf[m.end():], "start"
        call = self.calls[-1]
        if call.arguments in self._dupes:  # the same call again (a small model repeats itself): dropped
            self.calls.pop()
            self._held, self._dupes, self.repeated = [], [], True
            return []
        self._complete += 1
        call.error = _check(self.tools, call)
        return self._hold([("end", len(self.calls) - 1)])

    def _hold(self, events: list[tuple]) -> list[tuple]:
        """Events of the current call, held back while its arguments so far are those of an earlier call."""
        if self._dupes and any(d.startswith(self.calls[-1].arguments) for d in self._dupes) and events[-1:] != [("end", len(self.calls) - 1)]:
            self._held += events
            return []
        out, self._held, self._dupes = self._held + events, [], []
        return out

    def _scan(self, s: str) -> int | None:
        """Index just past the end of the arguments object in `s`, or None if it goes on."""
        for i, ch in enumerate(s):
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


def _check(tools: list[Tool], call: ToolCall) -> str | None:

    tool = next((t for t in tools if t.name == call.name), None)
    if tool is None:
        return f"{call.name!r} is not one of the tools"
    return schema_error(tool.parameters, call.arguments)


def repeat_watch(tools: list[Tool]) -> Callable[[str], bool]:
    """A function fed the answer as it streams: True once the model repeats a complete call it
    already made in this answer (a small model looping on its call), where the answer should end."""
    p = ToolCallParser(tools)

    def repeated(piece: str) -> bool:
        p.feed(piece)
        return p.repeated

    return repeated


def parse_answer(text: str, tools: list[Tool], *, id_prefix: str = "call_") -> tuple[str, list[ToolCall], bool]:
    """A whole answer -> (text, calls, complete): complete is False when a call was cut short."""
    p = ToolCallParser(tools, id_prefix)
    p.feed(text)
    p.finish()
    return p.text, p.calls, p.complete or not p.calls
