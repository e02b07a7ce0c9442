"""Anthropic's API: POST /v1/messages and POST /v1/messages/count_tokens.

The system prompt is top level; content is a string or a list of text blocks; a last
assistant message is a prefill the answer continues. Streams send Anthropic's events in
its order: message_start, content_block_start, ping, content_block_delta...,
content_block_stop, message_delta (stop_reason, stop_sequence, usage), message_stop.
stop_reason: end_turn (the model ended), stop_sequence, max_tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse

from pellucid.engine.async_engine import RequestGroup
from pellucid.errors import PellucidError
from pellucid.server.errors import ApiError, error_body
from pellucid.server.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from pellucid.server.state import ServerState, collect, new_id, off_loop, parse_body

router = APIRouter()
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def _state(http: HttpRequest) -> ServerState:
    state: ServerState = http.app.state.server
    state.require_ready()
    return state


def _text(content: Any, where: str) -> str:
    """A content string or a list of text blocks -> one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of content blocks", param=where)
    parts = []
    for j, block in enumerate(content):
        if not (isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ApiError(400, f"{where}[{j}] is a {kind!r} block; only text blocks are supported", param=f"{where}[{j}]")
        parts.append(block["text"])
    return "".join(parts)


def render_prompt(state: ServerState, body) -> tuple[list[int], str]:
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
        messages.append({"role": role, "content": _text(m["content"], f"messages[{i}].content")})
    prefill = ""
    if messages[-1]["role"] == "assistant":
        prefill = messages.pop()["content"]
        if not any(m["role"] == "user" for m in messages):
            raise ApiError(400, "messages must hold at least one user message", param="messages")
    llm = state.llm
    try:
        text = llm.render_chat(messages) + prefill
        return llm.encode_prompt(text), prefill
    except PellucidError as e:
        raise ApiError.from_pellucid(e) from None


def _stop(finish_reason: str | None, stop_reason) -> tuple[str, str | None]:
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


@router.post("/v1/messages/count_tokens")
async def count_tokens(http: HttpRequest):
    state = _state(http)
    body: AnthropicCountTokensRequest = await parse_body(http, AnthropicCountTokensRequest)
    state.check_model(body.model)
    ids, _ = await off_loop(render_prompt, state, body)
    return {"input_tokens": len(ids)}


@router.post("/v1/messages")
async def messages(http: HttpRequest):
    t0 = time.perf_counter()
    state = _state(http)
    body: AnthropicMessagesRequest = await parse_body(http, AnthropicMessagesRequest)
    state.check_model(body.model)
    if body.temperature is not None and not (isinstance(body.temperature, int | float) and 0.0 <= body.temperature <= 1.0):
        raise ApiError(400, f"temperature = {body.temperature} is out of range; allowed: [0.0, 1.0]", param="temperature")
    values = {
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty, "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty, "stop": body.stop_sequences, "stop_token_ids": body.stop_token_ids,
        "max_tokens": body.max_tokens, "min_tokens": body.min_tokens, "seed": body.seed, "ignore_eos": body.ignore_eos,
    }  # fmt: skip
    rename = {"stop": "stop_sequences"}
    params = state.params(values, rename=rename)
    ids, _ = await off_loop(render_prompt, state, body)
    mid = new_id("msg_")
    group = await state.submit([ids], params, n=1, prefix=mid, rename=rename)
    model = state.config.model_name
    if body.stream:
        return StreamingResponse(_stream(state, group, mid, model, len(ids), t0), media_type="text/event-stream",
                                 headers=SSE_HEADERS)  # fmt: skip
    choices = await collect(group, http)
    if choices is None:
        return JSONResponse({}, status_code=499)
    state.metrics.observe_latency(time.perf_counter() - t0)
    c = choices[0]
    stop_reason, stop_sequence = _stop(c.finish_reason, c.stop_reason)
    return {
        "id": mid, "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": c.text}],
        "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": _usage(len(ids), c.cached_tokens, c.completion_tokens),
    }  # fmt: skip


def _usage(prompt_tokens: int, cached: int, output_tokens: int) -> dict[str, int]:
    """Anthropic's split: input_tokens are the prompt tokens computed, cache reads counted apart."""
    return {"input_tokens": prompt_tokens - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": output_tokens}  # fmt: skip


async def _stream(state: ServerState, group: RequestGroup, mid: str, model: str, input_tokens: int,
                  t0: float) -> AsyncIterator[str]:  # fmt: skip
    try:
        first = await group.get()  # it tells how much of the prompt the prefix cache had
        cached = first.num_cached_tokens
        yield _event("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": _usage(input_tokens, cached, 0),
        }})  # fmt: skip
        yield _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        yield _event("ping", {"type": "ping"})
        last = None
        while first is not None or not group.done:
            outs = [first if first is not None else await group.get()]
            first = None
            while not group.done and (o := group.get_nowait()) is not None:
                outs.append(o)
            last = outs[-1]
            text = "".join(o.new_text for o in outs)
            if text:
                yield _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                     "delta": {"type": "text_delta", "text": text}})  # fmt: skip
        yield _event("content_block_stop", {"type": "content_block_stop", "index": 0})
        stop_reason, stop_sequence = _stop(last.finish_reason, last.stop_reason)
        yield _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                       "usage": _usage(input_tokens, cached, last.num_output_tokens)})  # fmt: skip
        yield _event("message_stop", {"type": "message_stop"})
        state.metrics.observe_latency(time.perf_counter() - t0)
    except PellucidError as e:
        err = ApiError.from_pellucid(e)
        yield _event("error", error_body(err, anthropic=True))
    finally:
        for rid in group.abort():
            state.metrics.forget(rid)
