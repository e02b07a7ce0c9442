"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

`input` is a string or a list of items (messages, `function_call`, `function_call_output`);
`instructions` is the system message; function tools in the API's flat shape; `text.format`
asks for JSON (json_schema, json_object). The request takes the chat path (the same
builder, template, grammar and tool-call parsing as /v1/chat/completions); only the wire
format is this API's: output items (a message with output_text, function_call items) and,
streamed, its typed events in order: response.created, response.in_progress, for each item
output_item.added ... its deltas ... output_item.done, then response.completed (or
response.incomplete when max_output_tokens cut it).

`store` (OpenAI's default: true) keeps the answer in memory, the last RESPONSES_KEPT of
them, so `previous_response_id` can continue a conversation; an id not kept is a 400 that
says so.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse

from pellucid.errors import PellucidError
from pellucid.sampling.constraints import check_output
from pellucid.server.build import Plan, Received, receive, with_activations
from pellucid.server.errors import ApiError
from pellucid.server.openai import MAX_STOP, SSE_HEADERS, _chat_logprobs, chat_plan
from pellucid.server.protocol import ResponsesRequest, extras
from pellucid.server.state import (
    RESPONSES_KEPT,
    Choice,
    ServerState,
    collect,
    joined_text,
    new_id,
    trim_stop_token,
)
from pellucid.text.tools import ToolCallParser, parse_answer

router = APIRouter()
LOGPROBS = "message.output_text.logprobs"  # the `include` entry that asks for the tokens' log-probabilities
TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}


# -- the request -------------------------------------------------------------------------------
def _content(content: Any, where: str) -> str:
    """A message's content: a string or a list of text parts (input_text, output_text)."""
    return joined_text(content, where, TEXT_PARTS, "part")


def messages_of(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items -> chat messages: function_call items join the assistant turn before them
    as its tool_calls, function_call_output items become `tool` messages; reasoning items
    (from a reasoning model's earlier answer) carry nothing a prompt needs."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise ApiError(400, "input is empty: give a string or at least one item", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ApiError(400, f"{where}.role is {role!r}; allowed: user, assistant, system, developer", param=f"{where}.role")
            if "content" not in item:
                raise ApiError(400, f"{where}.content is required", param=f"{where}.content")
            out.append({"role": role, "content": _content(item["content"], f"{where}.content")})
        elif kind == "function_call":
            name, args, call_id = item.get("name"), item.get("arguments", "{}"), item.get("call_id")
            if not isinstance(name, str) or not isinstance(args, str) or not isinstance(call_id, str):
                raise ApiError(400, f"{where} must have 'call_id', 'name' and 'arguments' (a JSON string)", param=where)
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or "output" not in item:
                raise ApiError(400, f"{where} must have 'call_id' and 'output'", param=where)
            output = item["output"] if isinstance(item["output"], str) else _content(item["output"], f"{where}.output")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":
            continue
        else:
            raise ApiError(400, f"{where}.type {kind!r} is not supported; allowed: message, function_call, "
                                "function_call_output (and reasoning, which is skipped)", param=f"{where}.type")  # fmt: skip
    return out


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """text.format in chat's response_format shape."""
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise ApiError(400, "text.format.schema is required for type json_schema (a JSON schema object)", param="text.format.schema")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    if fmt.get("type") == "json_object":
        return {k: v for k, v in fmt.items() if k in ("type", "schema")}
    raise ApiError(400, f"text.format.type {fmt.get('type')!r} is not supported; allowed: text, json_schema, json_object",
                   param="text.format.type")  # fmt: skip


def _prepare(state: ServerState, body: ResponsesRequest) -> Plan:
    state.check_model(body.model)
    if body.background:
        raise ApiError(400, "background responses are not supported; send the request without background", param="background")
    for name in ("conversation", "prompt"):
        if getattr(body, name) is not None:
            raise ApiError(400, f"{name} is not supported: this server keeps no {name}s; send the input itself"
                           + (" (or previous_response_id)" if name == "conversation" else ""), param=name)  # fmt: skip
    if body.temperature is not None and not 0.0 <= body.temperature <= 2.0:
        raise ApiError(400, f"temperature = {body.temperature} is out of range; allowed: [0.0, 2.0]", param="temperature")
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        kept = state.responses.get(body.previous_response_id)
        if kept is None:
            raise ApiError(400, f"previous_response_id {body.previous_response_id!r} is not kept here: this server keeps the "
                                f"last {RESPONSES_KEPT} responses made with store on, in memory, until it restarts; send the "
                                "whole conversation as input instead", param="previous_response_id")  # fmt: skip
        history = kept["messages"]
    messages = history + messages_of(body.input)
    if body.instructions:  # the system message, not carried to the next response (as OpenAI's API does)
        messages = [{"role": "system", "content": body.instructions}, *messages]
    if isinstance(body.stop, list) and len(body.stop) > MAX_STOP:
        raise ApiError(400, f"stop has {len(body.stop)} strings; allowed: at most {MAX_STOP}", param="stop")
    values = extras(body) | {
        "temperature": body.temperature, "top_p": body.top_p, "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty, "logit_bias": body.logit_bias, "stop": body.stop,
        "max_tokens": body.max_output_tokens, "seed": body.seed, "top_logprobs": body.top_logprobs,
        "logprobs": LOGPROBS in (body.include or []) or None,
    }  # fmt: skip
    rename = {"max_tokens": "max_output_tokens"}
    params = state.params(values, rename=rename)
    try:
        plan = chat_plan(state, messages, params, rename, tools=body.tools, tool_choice=body.tool_choice,
                         parallel_tool_calls=body.parallel_tool_calls, response_format=_response_format(body.text),
                         names={"response_format": "text.format"})  # fmt: skip
    except PellucidError as e:  # errors of the schema name text.format, where the client wrote it
        if e.param and e.param.startswith("response_format"):
            e.param = "text.format" + e.param.removeprefix("response_format").removeprefix(".json_schema")
        raise
    plan.extra["history"] = messages[1:] if body.instructions else messages
    return plan


# -- the answer ----------------------------------------------------------------------------------
def _response(r: Received, status: str, output: list[dict[str, Any]], usage: dict | None, created: int) -> dict[str, Any]:
    body = r.body
    return {
        "id": r.id, "object": "response", "created_at": created, "status": status, "model": r.state.config.model_name,
        "output": output, "usage": usage, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "previous_response_id": body.previous_response_id, "temperature": body.temperature, "top_p": body.top_p,
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto", "tools": body.tools or [],
        "text": body.text or {"format": {"type": "text"}}, "truncation": body.truncation or "disabled",
        "store": body.store is not False, "metadata": body.metadata or {}, "reasoning": body.reasoning,
        "top_logprobs": body.top_logprobs, "user": body.user,
    }  # fmt: skip


def _usage(plan: Plan, c: Choice) -> dict[str, Any]:
    return {"input_tokens": plan.prompt_tokens, "input_tokens_details": {"cached_tokens": c.cached_tokens},
            "output_tokens": c.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": plan.prompt_tokens + c.completion_tokens}  # fmt: skip


def _message_item(item_id: str, text: str, status: str, logprobs: list | None = None, schema_error: str | None = None) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}
    item = {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}
    if schema_error is not None:
        item["schema_error"] = schema_error  # the finished output does not match the real schema (oneOf as anyOf)
    return item


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def _keep(r: Received, response: dict[str, Any], c: Choice, calls: list) -> None:
    """Stored for previous_response_id (and GET): the conversation so far with this answer."""
    if r.body.store is False:
        return
    answer = {"role": "assistant", "content": c.text if not calls else ""}
    if calls:
        answer["tool_calls"] = [t.openai() for t in calls]
    r.state.responses.put(r.id, {"messages": [*r.plan.extra["history"], answer], "response": response})


@router.post("/v1/responses")
async def create(http: HttpRequest):
    t0 = time.perf_counter()
    r = await receive(http, ResponsesRequest, _prepare, prefix="resp_")
    created = int(time.time())
    if r.body.stream:
        return StreamingResponse(_stream(r, created, t0), media_type="text/event-stream", headers=SSE_HEADERS)
    choices = await collect(r.group, http)
    if choices is None:
        return JSONResponse({}, status_code=499)
    r.state.metrics.observe_latency(time.perf_counter() - t0)
    c, plan, tok = choices[0], r.plan, r.state.llm.tokenizer
    lps = _chat_logprobs(tok, trim_stop_token(c.logprobs, c.stop_reason))["content"] if plan.params.logprobs else None
    status = "incomplete" if c.finish_reason == "length" else "completed"
    item_status = "incomplete" if status == "incomplete" else "completed"
    calls: list = []
    text = c.text
    if plan.tools is not None:
        text, found, complete = parse_answer(c.text, plan.tools)
        calls = found if found and complete else []
        text = text if calls else c.text
    output = []
    if text or not calls:
        err = check_output(plan.constraint, c.text) if plan.tools is None and c.finish_reason == "stop" else None
        output.append(_message_item(new_id("msg_"), text, item_status, lps, err))
    output += [_call_item(new_id("fc_"), t.id, t.name, t.arguments, "completed") for t in calls]
    response = _response(r, status, output, _usage(plan, c), created)
    _keep(r, response, c, calls)
    return with_activations(r, response)


async def _stream(r: Received, created: int, t0: float) -> AsyncIterator[str]:
    state, group, plan = r.state, r.group, r.plan
    tok = state.llm.tokenizer
    parser = ToolCallParser(plan.tools) if plan.tools is not None else None
    seq = 0
    output: list[dict[str, Any]] = []  # the items so far, as they will be in the response
    open_text: dict[str, Any] | None = None  # the message item being written
    open_call: dict[str, Any] | None = None  # the function_call item being written

    def event(kind: str, **data: Any) -> str:
        nonlocal seq
        seq += 1
        payload = {"type": kind, "sequence_number": seq - 1, **data}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def close(status: str = "completed") -> list[str]:
        nonlocal open_text, open_call
        out = []
        if open_text is not None:
            i, item = len(output) - 1, open_text
            part = item["content"][0]
            at = {"item_id": item["id"], "output_index": i, "content_index": 0}
            out += [event("response.output_text.done", **at, text=part["text"], logprobs=part["logprobs"]),
                    event("response.content_part.done", **at, part=part)]  # fmt: skip
            item["status"] = status
            out.append(event("response.output_item.done", output_index=i, item=item))
            open_text = None
        if open_call is not None:
            i, item = len(output) - 1, open_call
            item["status"] = "completed"
            out += [event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                          arguments=item["arguments"], name=item["name"]),
                    event("response.output_item.done", output_index=i, item=item)]  # fmt: skip
            open_call = None
        return out

    def text_delta(piece: str, lps: list) -> list[str]:
        nonlocal open_text
        out = []
        if open_text is None:
            out += close()
            open_text = _message_item(new_id("msg_"), "", "in_progress")
            output.append(open_text)
            i = len(output) - 1
            out += [event("response.output_item.added", output_index=i, item={**open_text, "content": []}),
                    event("response.content_part.added", item_id=open_text["id"], output_index=i, content_index=0,
                          part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]  # fmt: skip
        open_text["content"][0]["text"] += piece
        open_text["content"][0]["logprobs"] += lps
        delta_lps = [{k: v for k, v in e.items() if k != "bytes"} | {"top_logprobs": [{"token": t["token"], "logprob": t["logprob"]}
                     for t in e["top_logprobs"]]} for e in lps]  # fmt: skip
        out.append(event("response.output_text.delta", item_id=open_text["id"], output_index=len(output) - 1, content_index=0,
                         delta=piece, logprobs=delta_lps))  # fmt: skip
        return out

    c = Choice()
    try:
        shell = _response(r, "in_progress", [], None, created)
        yield event("response.created", response=shell)
        yield event("response.in_progress", response=shell)
        while not group.done:
            outs = [await group.get()]
            while not group.done and (o := group.get_nowait()) is not None:
                outs.append(o)
            for o in outs:
                c.add(o)
            last = outs[-1]
            piece = "".join(o.new_text for o in outs)
            lps = [lp for o in outs for lp in o.logprobs]
            if last.finished:
                lps = trim_stop_token(lps, last.stop_reason)
            lps = _chat_logprobs(tok, lps)["content"] if plan.params.logprobs else []
            if parser is None:
                for e in text_delta(piece, lps) if piece or lps else []:
                    yield e
                continue
            for ev in parser.feed(piece) + (parser.finish() if last.finished else []):
                if ev[0] == "text":
                    for e in text_delta(ev[1], lps):
                        yield e
                    lps = []
                elif ev[0] == "call":
                    for e in close():
                        yield e
                    call = ev[2]
                    open_call = _call_item(new_id("fc_"), call.id, call.name, "", "in_progress")
                    output.append(open_call)
                    yield event("response.output_item.added", output_index=len(output) - 1, item=dict(open_call))
                elif ev[0] == "args":
                    open_call["arguments"] += ev[2]
                    yield event("response.function_call_arguments.delta", item_id=open_call["id"],
                                output_index=len(output) - 1, delta=ev[2])  # fmt: skip
        status = "incomplete" if c.finish_reason == "length" else "completed"
        if not output:  # nothing came: an empty message, as for any answer
            for e in text_delta("", []):
                yield e
        if open_text is not None and plan.tools is None and c.finish_reason == "stop":
            if (err := check_output(plan.constraint, c.text)) is not None:
                open_text["schema_error"] = err
        for e in close("incomplete" if status == "incomplete" else "completed"):
            yield e
        state.metrics.observe_latency(time.perf_counter() - t0)
        response = _response(r, status, output, _usage(plan, c), created)
        _keep(r, response, c, parser.calls if parser is not None and any(i["type"] == "function_call" for i in output) else [])
        yield event(f"response.{status}", response=with_activations(r, response))
    except PellucidError as e:
        err = ApiError.from_pellucid(e)
        yield event("error", code=err.code, message=err.message, param=err.param)
        yield event("response.failed", response={**_response(r, "failed", output, None, created),
                                                 "error": {"code": err.code or "server_error", "message": err.message}})  # fmt: skip
    finally:
        for rid in group.abort():
            state.metrics.forget(rid)


@router.get("/v1/responses/{response_id}")
async def retrieve(response_id: str, http: HttpRequest):
    kept = http.app.state.server.responses.get(response_id)
    if kept is None:
        raise ApiError(404, f"No response with id {response_id[:100]!r} is kept here (the last {RESPONSES_KEPT} made with "
                            "store on, in memory)", param="response_id")  # fmt: skip
    return kept["response"]


@router.delete("/v1/responses/{response_id}")
async def delete(response_id: str, http: HttpRequest):
    if http.app.state.server.responses.pop(response_id) is None:
        raise ApiError(404, f"No response with id {response_id[:100]!r} is kept here", param="response_id")
    return {"id": response_id, "object": "response.deleted", "deleted": True}
