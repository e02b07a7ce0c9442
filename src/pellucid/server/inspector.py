"""The web inspector: the page at `/` and the read-only JSON endpoints it calls.

    GET  /                          the page (static files in server/static, no build step)
    GET  /v1/inspect/model          architecture, weights table, parameter counts, memory by format
    POST /v1/inspect/next-token     the next-token candidates after each sampler stage
    POST /v1/inspect/attention      layer x head thumbnails and one pattern (a head, or an average)
    POST /v1/inspect/lens           the logit lens, P(target) by layer, residual-stream norms
    POST /v1/inspect/budget         the context window split: system, history, current, reserve
    POST /v1/inspect/token-ids      token bytes (as in OpenAI logprobs) -> token ids
    GET  /v1/inspect/styles         the output styles' presets (length, formality, ...)
    POST /v1/inspect/system         a system prompt with a style -> the system message

Every inspection runs on the model the API serves, on the engine's own thread between two
of its steps (never on the event loop, never on a thread of its own), one at a time, on at
most MAX_TOKENS tokens; hooks go on a shadow of the model
(its own modules and hook points, the same weight tensors), so the engine's own forwards
never see them and keep their fused path.

The inspector's endpoints import pellucid.inspect and the sampler's explain step inside
the handlers: a server that nobody inspects never loads them (matplotlib, ~1 s).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, Response
from starlette.staticfiles import StaticFiles

from pellucid.errors import PellucidError
from pellucid.sampling.params import BIAS_BAN, KNOBS, SamplingParams
from pellucid.sampling.params import FIELDS as SAMPLING_FIELDS
from pellucid.server.errors import ApiError
from pellucid.server.state import ServerState, new_id, off_loop, parse_body

STATIC = Path(__file__).parent / "static"
MAX_TOKENS = 256  # the longest context an inspection looks at
THUMB = 32  # attention thumbnails are at most THUMB x THUMB cells
WAIT_S = 60.0  # an inspection not answered by then is a 503
MAX_QUEUED = 4  # inspections waiting while one is at work; more get a 429

router = APIRouter()


def install(app: FastAPI, dependencies: list) -> None:
    """Serve the page at `/`, its files under /static, and the /v1/inspect endpoints."""
    app.state.inspector = Inspector(app.state.server)
    app.include_router(router, dependencies=dependencies)
    app.mount("/static", StaticFiles(directory=STATIC), name="inspector-static")

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(page_html(), headers={"Cache-Control": "no-cache"})


@functools.cache
def page_html() -> str:
    """The page, with one slider per numeric sampling control (sampling.params.KNOBS)."""
    rows = []
    for name, k in KNOBS.items():
        lo, hi, step, start = k.slider
        words = name.split("_")
        label = "-".join(words) if len(words[-1]) == 1 else " ".join(words)  # top-k, min-p; frequency penalty
        rows.append(f'    <label>{label} <output data-for="{name}"></output><input id="{name}" type="range" min="{lo:g}" '
                    f'max="{hi:g}" step="{step:g}" value="{start:g}" data-knob data-off="{k.off:g}"></label>\n')
    html = (STATIC / "index.html").read_text()
    marker = html.index("    <!-- knobs:")
    return html[:marker] + "".join(rows) + html[html.index("\n", marker) + 1 :]


# -- request bodies -------------------------------------------------------------------------------
class _Context(BaseModel):
    """What to look at: exactly one of prompt (raw text), messages (chat) or tokens (ids)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tokens: list[int] | None = None


class _NextTokenFields(_Context):
    generated: list[int] = Field(default_factory=list)  # already generated, after the context
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    seed: int | None = None
    top: int = Field(10, ge=1, le=50)


# and every numeric control of the sampler (sampling.params.KNOBS), None = the default
NextTokenBody = create_model("NextTokenBody", __base__=_NextTokenFields,
                             **{name: (k.kind | None, None) for name, k in KNOBS.items()})  # fmt: skip


class AttentionBody(_Context):
    layer: int | None = None  # None: the average over layers
    head: int | None = None  # None: the average over heads


class LensBody(_Context):
    target: str | int | None = None  # one token (" Paris") or its id; default the model's top-1
    last: int = Field(24, ge=1, le=64)  # positions whose top tokens are read
    k: int = Field(3, ge=1, le=10)


class BudgetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    system: str | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    current: str = ""
    reserve: int = Field(256, ge=0)
    window: int | None = Field(None, ge=1)


class SystemBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    system: str | None = None  # plain text (never a prompt file: the client names no server path)
    style: dict[str, Any] = Field(default_factory=dict)  # Style's fields: length, formality, ..., max_words, skeleton


class TokenIdsBody(BaseModel):
    """Chat logprobs carry each token's `bytes`; legacy completions logprobs its piece text."""

    model_config = ConfigDict(extra="forbid")
    bytes: list[list[int]] | None = None
    pieces: list[str] | None = None


# -- the worker -----------------------------------------------------------------------------------
class Inspector:
    """One inspection at a time on a shadow of the served model; the last results kept for reuse."""

    def __init__(self, state: ServerState):
        self.state = state
        self.pending = 0  # inspections asked for and not answered (one at work, the rest waiting)
        self._shadow: tuple[Any, Any] | None = None  # (llm, Subject)
        self._last: dict[str, tuple[Any, Any]] = {}  # kind -> (key, result)
        self._by: dict[str, dict] = {}  # "bytes" | "pieces" -> {token's bytes or piece: id}
        self._model_info: dict[str, Any] | None = None

    async def run(self, fn) -> Any:
        """fn() on the engine thread, between two steps (pellucid.engine.async_engine says why not
        on a thread of its own); 429 when MAX_QUEUED wait already, 503 after waiting too long."""
        if self.pending > MAX_QUEUED:
            raise ApiError(429, f"{self.pending - 1} inspections are waiting already; retry later", code="inspector_busy")

        def guarded() -> Any:
            with torch.no_grad():
                return fn()

        self.pending += 1  # (on the event loop: no lock)
        try:
            fut = self.state.engine.call(guarded)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(fut), WAIT_S)
            except TimeoutError:
                raise ApiError(503, "the inspector is busy with other requests; retry", code="inspector_busy") from None
        except PellucidError as e:
            raise ApiError.from_pellucid(e) from None
        finally:
            self.pending -= 1

    def subject(self):
        """The served model's shadow: hooks attached to it are invisible to the engine."""
        from pellucid.inspect.subject import Subject

        llm = self.state.llm
        if self._shadow is None or self._shadow[0] is not llm:
            model = shadow_model(llm.model)
            self._shadow = (llm, Subject(model, llm.tokenizer, llm.chat_template, self.state.config.model_name))
        return self._shadow[1]

    def on_shadow(self, kind: str, key: Any, compute):
        """compute(the shadow's Subject), or the last result of this kind if its key is the same."""
        last = self._last.get(kind)
        if last is not None and last[0] == key:
            return last[1]
        result = compute(self.subject())
        self._last[kind] = (key, result)
        return result

    def token_ids(self, field: str, given: list) -> list[int]:
        tok = self.state.llm.tokenizer
        key = tok.token_bytes if field == "bytes" else tok.piece
        if field not in self._by:
            by: dict = {}
            for i in range(tok.vocab_size):
                by.setdefault(key(i), i)
            self._by[field] = by
        out = []
        for n, g in enumerate(given):
            if field == "bytes":
                if any(not 0 <= x < 256 for x in g):
                    raise ApiError(400, f"bytes[{n}] has a value outside 0..255", param=f"bytes[{n}]")
                g = bytes(g)
            i = self._by[field].get(g)
            if i is None:
                raise ApiError(400, f"{field}[{n}] = {g!r} is not one token of this model", param=f"{field}[{n}]")
            out.append(i)
        return out


def shadow_tensors(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Every tensor of the module tree and of modules kept outside it (pack_for_cpu_ops' fused projections), by id."""
    found: dict[int, torch.Tensor] = {}
    todo, seen = [model], set()
    while todo:
        mod = todo.pop()
        if id(mod) in seen:
            continue
        seen.add(id(mod))
        todo += mod.children()
        for v in (*mod._parameters.values(), *mod._buffers.values(), *vars(mod).values()):
            if isinstance(v, torch.Tensor):
                found[id(v)] = v
            elif isinstance(v, torch.nn.Module):
                todo.append(v)
    return found


def shadow_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model`'s modules (own hook points) that shares every tensor with it."""
    memo: dict[int, Any] = dict(shadow_tensors(model))
    stack = model.__dict__.get("_stack")  # pellucid.Stack (C++): shared, as the tensors it holds are
    if stack is not None:
        memo[id(stack)] = stack
    shadow = copy.deepcopy(model, memo)
    if hasattr(shadow, "reset_hooks"):
        shadow._hook_points = {}
        shadow.reset_hooks()  # hooks someone attached to the served model stay there
    return shadow


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct storage the model's modules hold (weights, quantized blocks, tables)."""
    storages: dict[int, int] = {}
    for t in shadow_tensors(model).values():
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _inspector(http: HttpRequest) -> tuple[ServerState, Inspector]:
    state: ServerState = http.app.state.server
    state.require_ready()
    return state, http.app.state.inspector


async def _begin(http: HttpRequest, body_cls):
    """(state, inspector, the checked body) for a POST endpoint."""
    state, insp = _inspector(http)
    body = await parse_body(http, body_cls)
    state.check_model(body.model, optional=True)
    return state, insp, body


def context_ids(state: ServerState, body: _Context, extra: list[int] = ()) -> list[int]:
    """The token ids a context body names (+ `extra`), within MAX_TOKENS."""
    given = [f for f in ("prompt", "messages", "tokens") if getattr(body, f) is not None]
    if len(given) != 1:
        raise ApiError(400, f"give exactly one of prompt (raw text), messages (chat) or tokens (ids); got {given or 'none'}",
                       param="prompt")  # fmt: skip
    llm = state.llm
    try:
        if body.tokens is not None:
            llm.tokenizer.check_ids(body.tokens, "tokens")
            ids = list(body.tokens)
        elif body.messages is not None:
            ids = llm.tokenizer.encode(llm.render_chat(state.with_system(body.messages)))
        else:
            ids = llm.tokenizer.encode(body.prompt)
        llm.tokenizer.check_ids(list(extra), "generated")
    except PellucidError as e:
        raise ApiError.from_pellucid(e) from None
    ids += extra
    if not ids:
        raise ApiError(400, "the context is empty: give at least one token", param=given[0])
    if len(ids) > MAX_TOKENS:
        raise ApiError(400, f"the context is {len(ids)} tokens; the inspector looks at most {MAX_TOKENS} "
                            "(shorten the prompt or the generated text)", param=given[0], code="too_long_to_inspect")  # fmt: skip
    return ids


def labels(tok, ids: list[int]) -> list[str]:
    from pellucid.inspect.subject import label_tokens

    return label_tokens([tok.piece(i) for i in ids])


# -- endpoints ------------------------------------------------------------------------------------
@router.get("/v1/inspect/model")
async def model_info(http: HttpRequest):
    state, insp = _inspector(http)

    def build() -> dict[str, Any]:
        if insp._model_info is None:
            from pellucid.inspect.param_count import BYTES_PER_PARAM, memory_bytes
            from pellucid.inspect.weights_table import weights_report

            # the file's tensor directory: the loaded model keeps quantized weights as buffers
            path = Path(state.llm.loaded.path)
            report = weights_report(str(path)) if path.is_file() else weights_report(state.llm)
            info = report.to_dict()
            info["memory_by_format"] = {p: memory_bytes(report.total_params, p) for p in BYTES_PER_PARAM}
            info["served_bytes"] = tensor_bytes(state.llm.model)
            info["max_model_len"] = state.max_len
            info["served_as"] = state.config.model_name
            insp._model_info = info
        return insp._model_info

    return await insp.run(build)


@router.post("/v1/inspect/next-token")
async def next_token(http: HttpRequest):
    state, insp, body = await _begin(http, NextTokenBody)
    values = {f: getattr(body, f) for f in SAMPLING_FIELDS if f in NextTokenBody.model_fields}
    params = state.params(values)

    def explain() -> dict[str, Any]:
        from pellucid.sampling.explain import explain_next_token

        ids = context_ids(state, body, body.generated)
        folded, note = fold_penalties(params, body.generated)
        stages = explain_next_token(state.llm, ids, folded, top=body.top)
        return {"tokens": ids, "position": len(ids), "generated": len(body.generated), "note": note,
                "stages": [s.to_dict() for s in stages]}  # fmt: skip

    return await insp.run(explain)


def fold_penalties(params: SamplingParams, generated: list[int]) -> tuple[SamplingParams, str | None]:
    """Params for the token after `generated`, as a fresh sampler sees them.

    explain_next_token starts a sampler with nothing generated: the frequency and presence
    penalties of the tokens generated so far become logit biases (they are additive, as a
    bias is), and min_tokens counts down.
    """
    f, p = params.frequency_penalty, params.presence_penalty
    min_tokens = max(0, params.min_tokens - len(generated))
    if not generated or (f == 0 and p == 0):
        return replace(params, min_tokens=min_tokens), None
    counts: dict[int, int] = {}
    for t in generated:
        counts[t] = counts.get(t, 0) + 1
    bias = dict(params.logit_bias)
    for t, n in counts.items():
        b = bias.get(t, 0.0)
        if b > BIAS_BAN:  # a banned token stays banned
            bias[t] = min(100.0, max(BIAS_BAN + 1e-3, b - (n * f + p)))
    note = None
    if params.repetition_penalty != 1:
        note = "frequency/presence penalties applied with the logit bias, before the repetition penalty (the sampler applies them after it)"
    return replace(params, logit_bias=bias, frequency_penalty=0.0, presence_penalty=0.0, min_tokens=min_tokens), note


@router.post("/v1/inspect/attention")
async def attention(http: HttpRequest):
    state, insp, body = await _begin(http, AttentionBody)

    def look() -> dict[str, Any]:
        from pellucid.inspect.attention import attention_patterns

        ids = context_ids(state, body)
        pats = insp.on_shadow("attention", tuple(ids), lambda subject: attention_patterns(subject, ids))
        L, H, T, _ = pats.patterns.shape
        size = min(T, THUMB)
        thumbs = torch.nn.functional.adaptive_avg_pool2d(pats.patterns.reshape(L * H, 1, T, T), size)  # (L*H, 1, S, S)
        # thumbnails show sqrt(weight): most heads rest on the first token, the rest would vanish
        grid = (thumbs.clamp(0, 1).sqrt() * 255).round().to(torch.uint8)
        pattern = pats.select(body.layer, body.head)  # (T, T)
        first = pats.patterns[:, :, 1:, 0].mean().item() if T > 1 else 1.0
        return {
            "tokens": ids, "str_tokens": labels(state.llm.tokenizer, ids), "n_layers": L, "n_heads": H,
            "layer": body.layer, "head": body.head, "first_token_share": first,
            "grid": {"size": size, "encoding": "uint8 sqrt(weight)*255, layer-major, row-major cells",
                     "data": base64.b64encode(grid.numpy().tobytes()).decode()},
            "pattern": [[round(v, 5) for v in row] for row in pattern.tolist()],
        }  # fmt: skip

    return await insp.run(look)


@router.post("/v1/inspect/lens")
async def lens(http: HttpRequest):
    state, insp, body = await _begin(http, LensBody)

    def look() -> dict[str, Any]:
        from pellucid.inspect.logit_lens import lens_report

        ids = context_ids(state, body)
        key = (tuple(ids), body.target, body.last, body.k)
        out = insp.on_shadow("lens", key, lambda subject: lens_report(subject, ids, target=body.target, k=body.k,
                                                                      last=body.last)).to_dict()  # fmt: skip
        out["labels_tokens"] = labels(state.llm.tokenizer, ids)
        out["max_model_len"] = state.max_len
        for stage in out["top"]:
            for pos in stage:
                for c in pos:
                    c["prob"] = round(c["prob"], 5)
        out["target"]["prob"] = [_round(v) for v in out["target"]["prob"]]
        for key_ in ("resid_norm", "attn_norm", "mlp_norm"):
            out[key_] = [[round(v, 3) for v in row] for row in out[key_]]
        return out

    return await insp.run(look)


@router.post("/v1/inspect/budget")
async def budget(http: HttpRequest):
    state, insp, body = await _begin(http, BudgetBody)

    def fit() -> dict[str, Any]:
        from pellucid.prompts.counting import TokenCounter

        counter = TokenCounter.from_llm(state.llm)
        window = body.window or state.max_len
        alloc = counter.budget(window, body.reserve).fit(body.current, system=body.system or None, history=body.history)
        return {"window": alloc.window, "reserve": alloc.reserve, "prompt_tokens": alloc.prompt_tokens,
                "total": alloc.total, "free": alloc.free, "max_new_tokens": alloc.max_new_tokens,
                "history_dropped": alloc.history_dropped, "sections": [vars(s) for s in alloc.sections]}  # fmt: skip

    return await insp.run(fit)


@router.post("/v1/inspect/token-ids")
async def token_ids(http: HttpRequest):
    state, insp = _inspector(http)
    body: TokenIdsBody = await parse_body(http, TokenIdsBody)
    if (body.bytes is None) == (body.pieces is None):
        raise ApiError(400, "give exactly one of bytes (lists of byte values) and pieces (token texts)", param="bytes")
    field = "bytes" if body.bytes is not None else "pieces"
    return {"tokens": await off_loop(insp.token_ids, field, getattr(body, field))}


def _round(v: float) -> float:
    return v if v == 0 or not math.isfinite(v) else float(f"{v:.4g}")


@router.get("/v1/inspect/styles")
async def styles(http: HttpRequest):
    from pellucid.prompts.styles import DIMENSIONS, SKELETONS

    _inspector(http)
    return {"dimensions": {d: list(presets) for d, presets in DIMENSIONS.items()}, "skeletons": list(SKELETONS)}


@router.post("/v1/inspect/system")
async def system(http: HttpRequest):
    """The system message a chat with this system text and style sends (as `pellucid chat --style`)."""
    from pellucid.prompts.styles import Style

    _inspector(http)
    body: SystemBody = await parse_body(http, SystemBody)
    try:
        style = Style(**body.style)
    except TypeError as e:
        raise ApiError(400, f"style: {e}; valid fields: length, formality, structure, persona, depth, max_words, skeleton",
                       param="style") from None  # fmt: skip
    except PellucidError as e:
        raise ApiError.from_pellucid(e) from None
    text = (body.system or "").strip()
    extra = style.render()
    text = f"{text}\n\n{extra}" if text and extra else text or extra
    return {"messages": [{"role": "system", "content": text}] if text else []}


# -- steering ---------------------------------------------------------------------------------------
class SteerBody(_Context):
    steer: Any  # as a generation request's `steer` (pellucid.steering.resolve)
    max_tokens: int = Field(24, ge=1, le=256)
    top: int = Field(8, ge=1, le=20)


class MakeVectorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    positive: list[str] = Field(min_length=1, max_length=256)
    negative: list[str] = Field(min_length=1, max_length=256)
    layers: str | list[int] | None = None
    position: str = "mean"
    overwrite: bool = False


@router.post("/v1/inspect/steer")
async def steer_compare(http: HttpRequest):
    """The context continued greedily without and with `steer`, side by side: the first
    token's most likely candidates and the continuation. Both run in the serving engine."""
    from pellucid import steering
    from pellucid.server.build import run_engine

    state, _, body = await _begin(http, SteerBody)
    llm = state.llm

    def make() -> list:
        ids = context_ids(state, body)
        s = steering.resolve(body.steer, llm.config, llm.steering, dtype=llm.engine_dtype, device=llm.engine.device)
        params = SamplingParams(max_tokens=body.max_tokens, temperature=0.0, logprobs=True, top_logprobs=body.top)
        rid = new_id("steer-")
        return [llm.engine.make_request(ids, params, f"{rid}-{i}", steer=x) for i, x in enumerate((None, s))]

    done = await run_engine(http, state, make)
    if done is None:
        return Response(status_code=499)
    tok = llm.tokenizer

    def side(c) -> dict[str, Any]:
        first = c.logprobs[0].top if c.logprobs else []
        return {"text": c.text, "tokens": len(c.token_ids),
                "top": [{"id": i, "piece": tok.piece(i), "p": _round(math.exp(lp))} for i, lp in first]}  # fmt: skip

    plain, steered = done[1]
    return {"plain": side(plain), "steered": side(steered), "same": plain.token_ids == steered.token_ids}


@router.post("/v1/inspect/steer/make")
async def steer_make(http: HttpRequest):
    """A steering vector from the examples (difference of means, pellucid.steering), saved in the
    server's steering folder under `name`; its layers, norms and separation."""
    from pellucid import steering
    from pellucid.server.build import run_engine

    state, _, body = await _begin(http, MakeVectorBody)
    llm = state.llm
    path = llm.steering.folder / f"{body.name}.gguf"
    if path.exists() and not body.overwrite:
        raise ApiError(400, f"a steering vector named {body.name!r} exists already; choose another name or send overwrite: true", param="name")
    layers = steering.parse_layers(body.layers) if isinstance(body.layers, str) else body.layers

    def make() -> list:
        cap = steering.make_capture(llm.config, body.positive, body.negative, layers, body.position)
        params = SamplingParams(max_tokens=1, temperature=0.0)
        rid = new_id("make-")
        return [llm.engine.make_request(llm.encode_prompt(t, limit=state.max_len), params, f"{rid}-{i}", capture=cap)
                for i, t in enumerate(body.positive + body.negative)]  # fmt: skip

    done = await run_engine(http, state, make)
    if done is None:
        return Response(status_code=499)
    acts = [q.activations() for q in done[0]]
    n = len(body.positive)
    vec = steering.from_activations(llm, acts[:n], acts[n:], body.position, body.name)
    await off_loop(vec.save, path)
    sep = dict(zip(vec.meta["separation_layers"], vec.meta["separation"], strict=True))
    return {"name": body.name, "layers": vec.layers, "norms": {str(i): _round(v) for i, v in vec.norms().items()},
            "separation": {str(i): _round(v) for i, v in sep.items()}, "best_layer": max(sep, key=sep.get)}  # fmt: skip
