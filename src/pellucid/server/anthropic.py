"""Anthropic's API: POST /v1/messages and POST /v1/messages/count_tokens.

The system prompt is top level; content is a string or a list of text blocks; a last
assistant message is a prefill the answer continues. Streams send Anthropic's events in
its order: message_start, content_block_start, ping, content_block_delta...,
content_block_stop, message_delta (stop_reason, stop_sequence, usage), message_stop.
stop_reason: end_turn (the model ended), stop_sequence, max_tokens. output_config.format
(structured outputs, the SDK's messages.parse) is a JSON schema the text answer follows.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse

from pellucid.errors import PellucidError
from pellucid.sampling.constraints import from_response_format
from pellucid.server.build import Plan, Received, receive, with_activations
from pellucid.server.errors import ApiError, error_body
from pellucid.server.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest, extras
from pellucid.server.state import ServerState, collect, joined_text
from pellucid.text.tools import ToolCallParser, parse_answer

router = APIRouter()
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _text(content: Any, where: str) -> str:
    """A content string or a list of text blocks -> one string."""
    return joined_text(content, where, {"text": "text"}, "block")


def _blocks(m: dict[str, Any], i: int) -> list[dict[str, Any]]:
    """One Anthropic message -> chat messages: tool_use blocks become the assistant's
    tool_calls, tool_result blocks `tool` messages (before the user's text, as they answer
    the calls of the turn before)."""
    role, content = m["role"], m["content"]
    where = f"messages[{i}].content"
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of content blocks", param=where)
    allowed = {"text", "tool_use"} if role == "assistant" else {"text", "tool_result"}
    text, calls, results = [], [], []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else type(b).__name__
        if kind not in allowed:
            raise ApiError(400, f"{where}[{j}] is a {kind!r} block; allowed in a {role} message: {', '.join(sorted(allowed))}",
                           param=f"{where}[{j}]")  # fmt: skip
        if kind == "text":
            text.append(_text([b], f"{where}[{j}]"))
        elif kind == "tool_use":
            if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                raise ApiError(400, f"{where}[{j}] must have a 'name' and an 'input' object", param=f"{where}[{j}]")
            calls.append({"id": b.get("id"), "type": "function", "function": {"name": b["name"], "arguments": b.get("input", {})}})
        else:
            r = _text(b.get("content", ""), f"{where}[{j}].content")
            results.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": f"error: {r}" if b.get("is_error") else r})
    out = results
    if calls:
        out.append({"role": role, "content": "".join(text), "tool_calls": calls})
    elif text or not results:
        out.append({"role": role, "content": "".join(text)})
    return out


def render_prompt(state: ServerState, body, tools=None, constraint=None) -> tuple[list[int], str]:
    """Prompt token ids from system + messages; a last assistant turn is a prefill. -> (ids, prefill)."""
    messages = []
    system = _text(body.system, "system") if body.system is not None else state.config.system_prompt
    if system:
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(body.messages):
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise ApiError(400, f"messages[{i}].role is {role!r}; allowed: user, assistant", param=f"messages[{i}].role")
        if "content" not in m:
            raise ApiError(400, f"messages[{i}].content is required", param=f"messages[{i}].content")
        messages += _blocks(m, i)
    prefill = ""
    if messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls"):
        if constraint is not None:
            raise ApiError(400, "a last assistant message (a prefill) cannot be continued under tools or output_config.format; "
                           "end with a user message",
                           param=f"messages[{len(body.messages) - 1}]")  # fmt: skip
        prefill = messages.pop()["content"]
        if not any(m["role"] == "user" for m in messages):
            raise ApiError(400, "messages must hold at least one user message", param="messages")
    llm = state.llm
    try:
        text = llm.render_chat(messages, tools=tools, constraint=constraint) + prefill
        return llm.encode_prompt(text, limit=state.max_len), prefill
    except PellucidError as e:
        raise ApiError.from_pellucid(e) from None


def _output_format(state: ServerState, config) -> Any:
    """output_config.format {"type": "json_schema", "schema": {...}} -> its grammar (None: none asked)."""
    fmt = config.format if config is not None else None
    if fmt is None:
        return None
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise ApiError(400, 'output_config.format must be {"type": "json_schema", "schema": {...}} (a JSON schema object)',
                       param="output_config.format")  # fmt: skip
    try:
        return from_response_format(state.llm.tokenizer, {"type": "json_schema", "json_schema": {"schema": fmt["schema"]}})
    except PellucidError as e:  # Anthropic's API has no strict switch: a keyword the grammar cannot enforce is refused
        msg = re.sub(r",? or set json_schema\.strict to false to (treat it as anyOf|ignore it)", "", e.message)
        raise ApiError(400, "output_config.format.schema: " + msg.removeprefix("json_schema: "), param="output_config.format.schema") from None


def _prepare(state: ServerState, body) -> Plan:
    """The prompt, and the grammar of the tools or of output_config.format (count_tokens: nothing to generate)."""
    state.check_model(body.model)
    fmt = _output_format(state, body.output_config)
    if not body.tools:
        if body.tool_choice is not None and body.tool_choice.get("type") != "none":
            raise ApiError(400, f"tool_choice {body.tool_choice!r} needs tools; none were given", param="tool_choice")
        return Plan([render_prompt(state, body, constraint=fmt)[0]], constraint=fmt)
    if fmt is not None:
        raise ApiError(400, "give tools or output_config.format, not both", param="output_config.format")
    tools, shown, c = state.llm.tool_constraint(body.tools, body.tool_choice or {"type": "auto"})
    return Plan([render_prompt(state, body, shown, c)[0]], constraint=c, tools=tools)


def _prepare_messages(state: ServerState, body: AnthropicMessagesRequest) -> Plan:
    if body.temperature is not None and not (isinstance(body.temperature, int | float) and 0.0 <= body.temperature <= 1.0):
        raise ApiError(400, f"temperature = {body.temperature} is out of range; allowed: [0.0, 1.0]", param="temperature")
    values = extras(body) | {
        "temperature": body.temperature, "top_p": body.top_p, "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty, "stop": body.stop_sequences, "max_tokens": body.max_tokens,
        "seed": body.seed,
    }  # fmt: skip
    rename = {"stop": "stop_sequences"}
    params = state.params(values, rename=rename)
    plan = _prepare(state, body)
    plan.params, plan.rename = params, rename
    return plan


def _stop(finish_reason: str | None, stop_reason, calls: bool = False) -> tuple[str, str | None]:
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return ("tool_use" if calls else "end_turn"), None


def _tool_use(call) -> dict[str, Any]:
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": call.args}


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


@router.post("/v1/messages/count_tokens")
async def count_tokens(http: HttpRequest):
    r = await receive(http, AnthropicCountTokensRequest, _prepare, prefix="count-")
    return {"input_tokens": r.plan.prompt_tokens}


@router.post("/v1/messages")
async def messages(http: HttpRequest):
    t0 = time.perf_counter()
    r = await receive(http, AnthropicMessagesRequest, _prepare_messages, prefix="msg_")
    state, plan = r.state, r.plan
    model = state.config.model_name
    if r.body.stream:
        return StreamingResponse(_stream(r, t0), media_type="text/event-stream", headers=SSE_HEADERS)
    choices = await collect(r.group, http)
    if choices is None:
        return JSONResponse({}, status_code=499)
    state.metrics.observe_latency(time.perf_counter() - t0)
    c = choices[0]
    content: list[dict[str, Any]] = [{"type": "text", "text": c.text}]
    calls = False
    if plan.tools is not None:
        text, tool_calls, complete = parse_answer(c.text, plan.tools, id_prefix="toolu_")
        calls = bool(tool_calls) and complete
        if calls:  # (a call cut by max_tokens stays the text it is: its input is not JSON yet)
            content = ([{"type": "text", "text": text}] if text else []) + [_tool_use(t) for t in tool_calls]
    stop_reason, stop_sequence = _stop(c.finish_reason, c.stop_reason, calls)
    return with_activations(r, {
        "id": r.id, "type": "message", "role": "assistant", "model": model,
        "content": content,
        "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": _usage(plan.prompt_tokens, c.cached_tokens, c.completion_tokens),
    })  # fmt: skip


def _usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict[str, int]:
    """Anthropic's split: input_tokens are the prompt tokens computed, cache reads counted apart."""
    return {"input_tokens": prompt_tokens - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": output_tokens}  # fmt: skip


async def _stream(r: Received, t0: float) -> AsyncIterator[str]:
    state, group, mid, model, input_tokens = r.state, r.group, r.id, r.state.config.model_name, r.plan.prompt_tokens
    parser = ToolCallParser(r.plan.tools, "toolu_") if r.plan.tools is not None else None
    block = -1  # index of the open content block (-1: none yet)

    def start(content_block: dict) -> str:
        nonlocal block
        block += 1
        return _event("content_block_start", {"type": "content_block_start", "index": block, "content_block": content_block})

    def delta(d: dict) -> str:
        return _event("content_block_delta", {"type": "content_block_delta", "index": block, "delta": d})

    def stop() -> str:
        return _event("content_block_stop", {"type": "content_block_stop", "index": block})

    try:
        first = await group.get()  # it tells how much of the prompt the prefix cache had
        cached = first.num_cached_tokens
        yield _event("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": _usage(input_tokens, cached, 0),
        }})  # fmt: skip
        if parser is None:
            yield start({"type": "text", "text": ""})
        yield _event("ping", {"type": "ping"})
        last = None
        kind = "text" if parser is None else None  # the open block's kind
        while first is not None or not group.done:
            outs = [first if first is not None else await group.get()]
            first = None
            while not group.done and (o := group.get_nowait()) is not None:
                outs.append(o)
            last = outs[-1]
            text = "".join(o.new_text for o in outs)
            if parser is None:
                if text:
                    yield delta({"type": "text_delta", "text": text})
                continue
            for event in parser.feed(text) + (parser.finish() if last.finished else []):
                if event[0] == "text":
                    if kind != "text":
                        yield start({"type": "text", "text": ""})
                        kind = "text"
                    yield delta({"type": "text_delta", "text": event[1]})
                elif event[0] == "call":
                    if kind is not None:
                        yield stop()
                    call = event[2]
                    yield start({"type": "tool_use", "id": call.id, "name": call.name, "input": {}})
                    kind = "tool_use"
                elif event[0] == "args":
                    yield delta({"type": "input_json_delta", "partial_json": event[2]})
        if kind is None:  # nothing came: an empty text block, as for any answer
            yield start({"type": "text", "text": ""})
        yield stop()
        stop_reason, stop_sequence = _stop(last.finish_reason, last.stop_reason, parser is not None and parser.complete)
        yield _event("message_delta", with_activations(r, {
            "type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": _usage(input_tokens, cached, last.num_output_tokens)}, 0))  # fmt: skip
        yield _event("message_stop", {"type": "message_stop"})
        state.metrics.observe_latency(time.perf_counter() - t0)
    except PellucidError as e:
        err = ApiError.from_pellucid(e)
        yield _event("error", error_body(err, anthropic=True))
    finally:
        for rid in group.abort():
            state.metrics.forget(rid)
