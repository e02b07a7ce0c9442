"""OpenAI's API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

Each choice is one engine request (n choices = n requests, seeds seed, seed+1, ...);
all of them join the running batch of the one engine. Streams are server-sent events
ending in `data: [DONE]`; with stream_options.include_usage a last chunk carries usage.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse

from pellucid.engine.async_engine import RequestGroup
from pellucid.engine.request import RequestOutput, TokenLogprob
from pellucid.errors import PellucidError
from pellucid.sampling.constraints import check_output, from_response_format
from pellucid.server.build import Plan, Received, receive, with_activations
from pellucid.server.errors import ApiError, error_body
from pellucid.server.protocol import ChatCompletionRequest, CompletionRequest, InfillRequest, extras
from pellucid.server.state import Choice, ServerState, cached_tokens, collect, trim_stop_token
from pellucid.text.tools import ToolCallParser, parse_answer

router = APIRouter()
FINGERPRINT = "pellucid"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


# -- models ---------------------------------------------------------------------------------
def _model_card(state: ServerState) -> dict[str, Any]:
    card = {"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": "pellucid"}
    if state.status == "ready":
        card["max_model_len"] = state.max_len
    return card


@router.get("/v1/models")
async def list_models(http: HttpRequest):
    state: ServerState = http.app.state.server
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, http: HttpRequest):
    state: ServerState = http.app.state.server
    state.check_model(model)
    return _model_card(state)


# -- shared -----------------------------------------------------------------------------------
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; pellucid more, documented in docs/server.md)


def _sampling_values(body, max_tokens: int | None) -> dict[str, Any]:
    """The sampling fields, with OpenAI's own limits where pellucid's engine would allow more."""
    t = body.temperature
    if t is not None and not 0.0 <= t <= 2.0:
        raise ApiError(400, f"temperature = {t} is out of range; allowed on OpenAI's API: [0.0, 2.0]", param="temperature")
    if isinstance(body.stop, list) and len(body.stop) > MAX_STOP:
        raise ApiError(400, f"stop has {len(body.stop)} strings; allowed: at most {MAX_STOP}", param="stop")
    return extras(body) | {
        "temperature": body.temperature, "top_p": body.top_p, "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty, "logit_bias": body.logit_bias, "stop": body.stop,
        "max_tokens": max_tokens, "seed": body.seed, "n": body.n,
    }  # fmt: skip


def _response_constraint(state: ServerState, response_format: dict | None):
    """The constraint a response_format asks for, compiled once (None: unconstrained)."""
    if response_format is None or response_format.get("type") == "text":
        return None
    return from_response_format(state.llm.tokenizer, response_format)


def _finish_reason(reason: str | None, calls: bool = False) -> str | None:
    """stop | length | tool_calls (the answer is complete calls)."""
    if calls and reason == "stop":
        return "tool_calls"
    return reason if reason in ("stop", "length") else ("stop" if reason else None)


def _prepare_chat(state: ServerState, body: ChatCompletionRequest) -> Plan:
    state.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    values = _sampling_values(body, max_tokens) | {"logprobs": body.logprobs, "top_logprobs": body.top_logprobs}
    rename = {"max_tokens": "max_completion_tokens"} if body.max_completion_tokens is not None else None
    params = state.params(values, rename=rename)
    return chat_plan(state, body.messages, params, rename, tools=body.tools, tool_choice=body.tool_choice,
                     parallel_tool_calls=body.parallel_tool_calls, response_format=body.response_format)  # fmt: skip


def chat_plan(state: ServerState, messages: list[dict[str, Any]], params, rename: dict[str, str] | None = None, *,
              tools=None, tool_choice=None, parallel_tool_calls=None, response_format=None,
              names: dict[str, str] | None = None) -> Plan:  # fmt: skip
    """Messages in OpenAI's chat shape -> the Plan: the tools or the response_format decide the
    grammar, and the prompt says so (tools section, "answer in JSON"). `names` are the
    fields as the client's API calls them (the Responses API: text.format), for errors."""
    names = names or {}
    messages = [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in messages]
    llm = state.llm
    shown = None
    rf = response_format
    if tools:
        if rf is not None and rf.get("type") != "text":
            raise ApiError(400, f"give tools or {names.get('response_format', 'response_format')}, not both",
                           param=names.get("response_format", "response_format"))  # fmt: skip
        tools, shown, c = llm.tool_constraint(tools, tool_choice, parallel_tool_calls)
    else:
        if tool_choice not in (None, "none"):
            raise ApiError(400, f"tool_choice {tool_choice!r} needs tools; none were given", param="tool_choice")
        tools, c = None, _response_constraint(state, rf)
    text = llm.render_chat(state.with_system(messages), tools=shown, constraint=c)
    return Plan([llm.encode_prompt(text, limit=state.max_len)], params, c, tools, rename)


def _message(c: Choice, tools, constraint) -> tuple[dict[str, Any], bool]:
    """A choice's assistant message (content and tool_calls), and whether it is complete calls."""
    if tools is None:
        msg = {"role": "assistant", "content": c.text, "refusal": None}
        if c.finish_reason == "stop" and (err := check_output(constraint, c.text)) is not None:
            msg["schema_error"] = err  # the finished output does not match the real schema (oneOf as anyOf)
        return msg, False
    text, calls, complete = parse_answer(c.text, tools)
    msg = {"role": "assistant", "content": text or (None if calls else ""), "refusal": None}
    if calls:
        msg["tool_calls"] = [t.openai() for t in calls]
    return msg, bool(calls) and complete


def _usage(prompt_tokens: int, choices: list[Choice], n: int) -> dict[str, Any]:
    completion_tokens = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens(choices, n)}}  # fmt: skip


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


_HOLE = "\x01pellucid-text\x01"  # a placeholder, found once in a template's own encoding


def _template(obj: dict) -> Callable[[str], str]:
    """The event `_sse(obj)` as a template with one string hole (the value _HOLE in obj): the
    same bytes as encoding obj with the text in place, at the cost of encoding the text."""
    pre, post = _sse(obj).split(json.dumps(_HOLE, ensure_ascii=False))
    return lambda text: pre + json.dumps(text, ensure_ascii=False) + post


def _chat_logprobs(tok, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        return {"token": tok.piece(tid), "logprob": lp, "bytes": list(tok.token_bytes(tid))}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]} for t in lps],
            "refusal": None}  # fmt: skip


def _legacy_logprobs(tok, lps: list[TokenLogprob], offset: int) -> tuple[dict[str, Any], int]:
    """The completions API's shape: parallel lists, top alternatives as {token: logprob}."""
    tokens, values, tops, offsets = [], [], [], []
    for t in lps:
        piece = tok.piece(t.token)
        tokens.append(piece)
        values.append(t.logprob)
        tops.append({tok.piece(i): v for i, v in t.top})
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def _merge_backlog(group: RequestGroup, first: RequestOutput) -> dict[int, list[RequestOutput]]:
    """The output just awaited plus any already queued, by choice index (one message each)."""
    per: dict[int, list[RequestOutput]] = {group.index[first.request_id]: [first]}
    while not group.done:
        o = group.get_nowait()
        if o is None:
            break
        per.setdefault(group.index[o.request_id], []).append(o)
    return per


def _stream_error(e: Exception) -> str:
    err = ApiError.from_pellucid(e) if isinstance(e, PellucidError) else ApiError(500, f"{type(e).__name__}: {e}")
    return _sse(error_body(err, anthropic=False))


# -- chat -------------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(http: HttpRequest):
    t0 = time.perf_counter()
    r = await receive(http, ChatCompletionRequest, _prepare_chat, prefix="chatcmpl-")
    state, body, plan = r.state, r.body, r.plan
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chat_stream(r, created, include_usage, t0), media_type="text/event-stream", headers=SSE_HEADERS)
    choices = await collect(r.group, http)
    if choices is None:
        return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
    state.metrics.observe_latency(time.perf_counter() - t0)
    tok = state.llm.tokenizer
    out = []
    for i, c in enumerate(choices):
        lps = _chat_logprobs(tok, trim_stop_token(c.logprobs, c.stop_reason)) if plan.params.logprobs else None
        msg, calls = _message(c, plan.tools, plan.constraint)
        out.append({"index": i, "message": msg, "logprobs": lps, "finish_reason": _finish_reason(c.finish_reason, calls),
                    "stop_reason": c.stop_reason})  # fmt: skip
    return with_activations(r, {
        "id": r.id, "object": "chat.completion", "created": created, "model": state.config.model_name,
        "system_fingerprint": FINGERPRINT, "choices": out, "usage": _usage(plan.prompt_tokens, choices, plan.n),
    })  # fmt: skip


async def _chat_stream(r: Received, created: int, include_usage: bool, t0: float) -> AsyncIterator[str]:
    state, group, plan = r.state, r.group, r.plan
    n, tools, tok, want_lp = plan.n, plan.tools, state.llm.tokenizer, plan.params.logprobs
    head = {"id": r.id, "object": "chat.completion.chunk", "created": created, "model": state.config.model_name,
            "system_fingerprint": FINGERPRINT}  # fmt: skip
    if include_usage:
        head["usage"] = None

    def chunk(i: int, delta: dict, logprobs=None, finish=None, stop_reason=None, schema_error=None) -> str:
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
            choice = with_activations(r, choice, i)
        if schema_error is not None:
            choice["schema_error"] = schema_error
        return _sse({**head, "choices": [choice]})

    # the most frequent event, a content delta of choice i, templated once
    content = [_template({**head, "choices": [{"index": i, "delta": {"content": _HOLE}, "logprobs": None,
                                                "finish_reason": None}]}) for i in range(n)]  # fmt: skip
    choices = [Choice() for _ in range(n)]
    parsers = [ToolCallParser(tools) if tools is not None else None for _ in range(n)]
    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        while not group.done:
            first = await group.get()
            for i, outs in _merge_backlog(group, first).items():
                c = choices[i]
                for o in outs:
                    c.add(o)
                text = "".join(o.new_text for o in outs)
                lps = [lp for o in outs for lp in o.logprobs]
                last = outs[-1]
                if last.finished:
                    lps = trim_stop_token(lps, last.stop_reason)
                p = parsers[i]
                if p is not None:  # text and calls, as their deltas
                    events = p.feed(text) + (p.finish() if last.finished else [])
                    deltas = [d for e in events if (d := _tool_delta(e)) is not None]
                    if want_lp and lps and not deltas:
                        deltas = [{"content": ""}]
                    for k, d in enumerate(deltas):
                        yield chunk(i, d, _chat_logprobs(tok, lps) if want_lp and k == 0 else None)
                elif want_lp and (text or lps):
                    yield chunk(i, {"content": text}, _chat_logprobs(tok, lps))
                elif text:
                    yield content[i](text)
                if last.finished:
                    calls = p is not None and p.complete
                    # the same check as a whole answer's: does the finished output match the real schema?
                    err = check_output(plan.constraint, c.text) if p is None and last.finish_reason == "stop" else None
                    yield chunk(i, {}, None, _finish_reason(last.finish_reason, calls), last.stop_reason, err)
        state.metrics.observe_latency(time.perf_counter() - t0)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(plan.prompt_tokens, choices, n)})
        yield "data: [DONE]\n\n"
    except PellucidError as e:
        yield _stream_error(e)
    finally:
        for rid in group.abort():
            state.metrics.forget(rid)


def _tool_delta(event: tuple) -> dict[str, Any] | None:
    """A ToolCallParser event as an OpenAI chunk's delta."""
    kind, *rest = event
    if kind == "text":
        return {"content": rest[0]}
    if kind == "call":
        i, call = rest
        return {"tool_calls": [{"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}]}
    if kind == "args":
        i, frag = rest
        return {"tool_calls": [{"index": i, "function": {"arguments": frag}}]}
    return None


# -- completions --------------------------------------------------------------------------------
def _prompts(llm, prompt, limit: int) -> list[list[int]]:
    if isinstance(prompt, str):
        return [llm.encode_prompt(prompt, limit=limit)]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    if all(isinstance(x, str) for x in prompt):
        return [llm.encode_prompt(x, limit=limit) for x in prompt]
    return [list(x) for x in prompt]


def _prepare_completion(state: ServerState, body: CompletionRequest) -> Plan:
    state.check_model(body.model)
    llm = state.llm
    if body.echo and body.stream:
        raise ApiError(400, "echo with stream is not supported; send the request without stream", param="echo")
    if body.suffix is not None and llm.tokenizer.fim_ids is None:
        raise ApiError(400, "suffix is not supported: this model has no fill-in-the-middle tokens", param="suffix")
    if body.suffix is not None and not (isinstance(body.prompt, str) or all(isinstance(x, str) for x in body.prompt)):
        raise ApiError(400, "suffix needs the prompt as text (the part before the gap)", param="prompt")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise ApiError(400, f"best_of = {body.best_of} is not supported; only best_of = n", param="best_of")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens = 0 generates nothing; it needs echo: true (the prompt's log-probabilities)",
                       param="max_tokens")  # fmt: skip
    values = _sampling_values(body, None if body.max_tokens == 0 else body.max_tokens)
    if body.logprobs is not None:
        values |= {"logprobs": True, "top_logprobs": body.logprobs}
    rename = {"top_logprobs": "logprobs", "messages": "prompt", "prompt token": "prompt"}
    params = state.params(values, api_defaults={"max_tokens": 16}, rename=rename)  # 16: the legacy API's default
    if body.suffix is not None:  # fill in the middle: prefix, suffix, then the model writes what goes between
        texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        prompts = [llm.tokenizer.fim_prompt(t, body.suffix) for t in texts]
    else:
        prompts = _prompts(llm, body.prompt, state.max_len)
    c = None if body.echo else _response_constraint(state, body.response_format)
    return Plan(prompts, params, c, rename=rename, queue=body.max_tokens != 0)


@router.post("/v1/completions")
async def completions(http: HttpRequest):
    t0 = time.perf_counter()
    r = await receive(http, CompletionRequest, _prepare_completion, prefix="cmpl-")
    state, body, plan = r.state, r.body, r.plan
    if body.echo:
        return await _echo(http, r, t0)
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _completion_stream(r, created, include_usage, body.logprobs is not None, t0)
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)
    choices = await collect(r.group, http)
    if choices is None:
        return JSONResponse({}, status_code=499)
    state.metrics.observe_latency(time.perf_counter() - t0)
    tok = state.llm.tokenizer
    out = []
    for i, c in enumerate(choices):
        lps = _legacy_logprobs(tok, trim_stop_token(c.logprobs, c.stop_reason), 0)[0] if body.logprobs is not None else None
        choice = {"index": i, "text": c.text, "logprobs": lps, "finish_reason": _finish_reason(c.finish_reason),
                  "stop_reason": c.stop_reason}  # fmt: skip
        if c.finish_reason == "stop" and (err := check_output(plan.constraint, c.text)) is not None:
            choice["schema_error"] = err
        out.append(choice)
    return with_activations(r, {
        "id": r.id, "object": "text_completion", "created": created, "model": state.config.model_name,
        "system_fingerprint": FINGERPRINT, "choices": out, "usage": _usage(plan.prompt_tokens, choices, plan.n),
    })  # fmt: skip


async def _echo(http: HttpRequest, r: Received, t0: float) -> dict[str, Any] | JSONResponse:
    """Completions with echo: each choice's text is its prompt and then its completion (none
    with max_tokens 0); with logprobs, the prompt's tokens' log-probabilities come first, the
    first one null (OpenAI's legacy shape, what lm-evaluation-harness scores with). The prompt
    is scored on the engine thread, between steps."""
    state, body, prompts, n = r.state, r.body, r.plan.prompts, r.plan.n
    llm, tok = state.llm, state.llm.tokenizer
    top = body.logprobs
    scored = []
    for ids in prompts:
        lps = await asyncio.wrap_future(state.engine.call(lambda ids=ids: llm.prompt_logprobs(ids, top or 0))) if top is not None else None
        scored.append(lps)
    generated: list[Choice | None] = [None] * (len(prompts) * n)
    if r.group is not None:
        got = await collect(r.group, http)
        if got is None:
            return JSONResponse({}, status_code=499)
        generated = list(got)
    state.metrics.observe_latency(time.perf_counter() - t0)
    out = []
    for i, c in enumerate(generated):
        ids = prompts[i // n]
        text = tok.decode(ids)
        lp_obj = None
        if top is not None:
            lp_obj, offset = _legacy_logprobs(tok, [x for x in scored[i // n] if x is not None], len(tok.piece(ids[0])))
            first = tok.piece(ids[0])
            lp_obj = {"tokens": [first, *lp_obj["tokens"]], "token_logprobs": [None, *lp_obj["token_logprobs"]],
                      "top_logprobs": [None, *lp_obj["top_logprobs"]], "text_offset": [0, *lp_obj["text_offset"]]}  # fmt: skip
            if c is not None:  # every generated token, an end-of-generation one too (harnesses drop the last entry)
                more, _ = _legacy_logprobs(tok, c.logprobs, offset)
                for k in lp_obj:
                    lp_obj[k] += more[k]
        finish = _finish_reason(c.finish_reason) if c is not None else "length"
        out.append({"index": i, "text": text + (c.text if c is not None else ""), "logprobs": lp_obj, "finish_reason": finish,
                    "stop_reason": c.stop_reason if c is not None else None})  # fmt: skip
    completion = sum(len(c.token_ids) for c in generated if c is not None)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "id": r.id, "object": "text_completion", "created": int(time.time()), "model": state.config.model_name,
        "system_fingerprint": FINGERPRINT, "choices": out,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion},
    }  # fmt: skip


async def _completion_stream(r: Received, created: int, include_usage: bool, want_lp: bool, t0: float) -> AsyncIterator[str]:
    state, group, plan = r.state, r.group, r.plan
    tok = state.llm.tokenizer
    head = {"id": r.id, "object": "text_completion", "created": created, "model": state.config.model_name,
            "system_fingerprint": FINGERPRINT}  # fmt: skip
    if include_usage:
        head["usage"] = None
    text_only = [_template({**head, "choices": [{"index": i, "text": _HOLE, "logprobs": None, "finish_reason": None}]})
                 for i in range(len(group.requests))]  # the most frequent event, templated once
    choices = [Choice() for _ in group.requests]
    offsets = [0] * len(group.requests)
    try:
        while not group.done:
            first = await group.get()
            for i, outs in _merge_backlog(group, first).items():
                c = choices[i]
                for o in outs:
                    c.add(o)
                text = "".join(o.new_text for o in outs)
                lps = [lp for o in outs for lp in o.logprobs]
                last = outs[-1]
                if last.finished:
                    lps = trim_stop_token(lps, last.stop_reason)
                finish = _finish_reason(last.finish_reason) if last.finished else None
                if text and not finish and not want_lp:
                    yield text_only[i](text)
                elif text or finish or (want_lp and lps):
                    lp_obj = None
                    if want_lp:
                        lp_obj, offsets[i] = _legacy_logprobs(tok, lps, offsets[i])
                    choice = {"index": i, "text": text, "logprobs": lp_obj, "finish_reason": finish}
                    if finish is not None:
                        choice["stop_reason"] = last.stop_reason
                        choice = with_activations(r, choice, i)
                    yield _sse({**head, "choices": [choice]})
        state.metrics.observe_latency(time.perf_counter() - t0)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(plan.prompt_tokens, choices, plan.n)})
        yield "data: [DONE]\n\n"
    except PellucidError as e:
        yield _stream_error(e)
    finally:
        for rid in group.abort():
            state.metrics.forget(rid)


# -- /infill: llama-server's fill-in-the-middle endpoint, as editor plugins call it ----------------
def _prepare_infill(state: ServerState, body: InfillRequest) -> Plan:
    tok = state.llm.tokenizer
    if tok.fim_ids is None:
        raise ApiError(400, "this model has no fill-in-the-middle tokens; /infill needs a model trained for it "
                       "(Qwen2.5-Coder, StarCoder, ...)", param="model")  # fmt: skip
    values = {"max_tokens": None if body.n_predict in (None, -1) else body.n_predict, "temperature": body.temperature,
              "top_k": body.top_k, "top_p": body.top_p, "stop": body.stop, "seed": body.seed}  # fmt: skip
    rename = {"max_tokens": "n_predict"}
    params = state.params(values, api_defaults={"max_tokens": 128}, rename=rename)
    extra = [(x.filename, x.text) for x in body.input_extra or []]
    return Plan([tok.fim_prompt(body.input_prefix + (body.prompt or ""), body.input_suffix, extra)], params, rename=rename)


def _stop_type(finish_reason: str | None, stop_reason) -> str:
    """llama-server's names: limit (n_predict reached), word (a stop string), eos."""
    return "limit" if finish_reason == "length" else "word" if isinstance(stop_reason, str) else "eos"


@router.post("/infill")
async def infill(http: HttpRequest):
    """{"input_prefix", "input_suffix", "input_extra": [{"filename", "text"}], "prompt"} -> {"content", ...}:
    the code between the prefix (and `prompt`, the text right before the cursor) and the suffix."""
    t0 = time.perf_counter()
    r = await receive(http, InfillRequest, _prepare_infill, prefix="infill-")
    if r.body.stream:
        return StreamingResponse(_infill_stream(r, t0), media_type="text/event-stream", headers=SSE_HEADERS)
    choices = await collect(r.group, http)
    if choices is None:
        return JSONResponse({}, status_code=499)
    r.state.metrics.observe_latency(time.perf_counter() - t0)
    c = choices[0]
    return {"content": c.text, "stop": True, "model": r.state.config.model_name, "tokens_predicted": len(c.token_ids),
            "tokens_evaluated": r.plan.prompt_tokens, "stop_type": _stop_type(c.finish_reason, c.stop_reason),
            "stopping_word": c.stop_reason if isinstance(c.stop_reason, str) else ""}  # fmt: skip


async def _infill_stream(r: Received, t0: float) -> AsyncIterator[str]:
    """llama-server's stream: {"content": piece, "stop": false} events, then one with "stop": true."""
    group, n = r.group, 0
    try:
        while not group.done:
            first = await group.get()
            for outs in _merge_backlog(group, first).values():
                text = "".join(o.new_text for o in outs)
                n += sum(len(o.new_token_ids) for o in outs)
                last = outs[-1]
                if text:
                    yield _sse({"content": text, "stop": False})
                if last.finished:
                    yield _sse({"content": "", "stop": True, "tokens_predicted": n, "tokens_evaluated": r.plan.prompt_tokens,
                                "stop_type": _stop_type(last.finish_reason, last.stop_reason)})  # fmt: skip
        r.state.metrics.observe_latency(time.perf_counter() - t0)
    except PellucidError as e:
        yield _stream_error(e)
    finally:
        for rid in group.abort():
            r.state.metrics.forget(rid)
