"""The server's state: config, the model (loaded in the background), the async engine.

Every API shares the helpers here: the body's limits and parsing, the model-name check,
parameters over the --config defaults, and collecting a group's outputs while watching
for the client to disconnect. pellucid.server.build turns a body into queued requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest

from pellucid import runtime
from pellucid.api import LLM
from pellucid.engine.async_engine import AsyncEngine, RequestGroup
from pellucid.engine.request import RequestOutput, TokenLogprob
from pellucid.errors import PellucidError
from pellucid.sampling.params import SamplingParams, build_params
from pellucid.server.errors import ApiError, from_validation
from pellucid.server.metrics import Metrics


@dataclass
class ServerConfig:
    model: str = "smollm2-135m-instruct"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    dtype: str = runtime.DEFAULT_DTYPE  # decided by pellucid.runtime for the format and device
    quant: str | None = runtime.DEFAULT_QUANT
    max_batch: int = runtime.ENGINE.serve_max_batch
    max_len: int | None = None  # context window served (default: the model's)
    max_waiting: int = runtime.ENGINE.max_waiting  # waiting requests beyond which new ones get 429
    prefill_chunk: int = runtime.ENGINE.prefill_chunk  # prompt tokens per step while nothing is generating
    step_tokens: int = runtime.ENGINE.step_tokens  # tokens per step (generated + prompt) while requests are generating
    prefix_cache: bool | None = None  # reuse earlier prompts' keys and values (default: where exact)
    prefix_cache_mib: int = runtime.ENGINE.prefix_cache_mib  # memory for finished requests' caches kept for reuse
    kv_cache_mib: int | None = None  # memory all requests' keys and values share (default: runtime.ENGINE.kv_cache_mib())
    num_threads: int | None = None  # torch threads of the engine (default: torch's)
    served_model_name: str | None = None  # the names clients use, comma-separated (default: --model as given)
    llm_options: dict[str, Any] = field(default_factory=dict)  # more keyword arguments for LLM
    defaults: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields for requests that omit them
    system_prompt: str | None = None  # added to chat requests that have no system message
    steer_dir: str | None = None  # the folder of named steering vectors (default: $PELLUCID_HOME/steering)

    @property
    def served_names(self) -> list[str]:
        """The names clients may send as `model`: the first is the one the server reports."""
        names = [n.strip() for n in (self.served_model_name or "").split(",") if n.strip()]
        if names:
            return names
        p = Path(self.model)  # a file given by path is named by its stem, not the whole local path
        return [p.stem if p.suffix == ".gguf" or os.sep in self.model else self.model]

    @property
    def model_name(self) -> str:
        return self.served_names[0]


class ServerState:
    """Everything a handler needs; `ready` once the model is loaded."""

    def __init__(self, config: ServerConfig, loader: Callable[[ServerConfig], Any] | None = None):
        self.config = config
        self.loader = loader or default_loader
        self.metrics = Metrics(config.model_name)
        self.llm = None
        self.engine: AsyncEngine | None = None
        self.status = "loading"  # loading | ready | failed
        self.error: str | None = None
        self.created = int(time.time())
        self.names = {*config.served_names, config.model}
        self._thread: threading.Thread | None = None
        self.responses = Recent(RESPONSES_KEPT)  # the Responses API's stored answers, for previous_response_id
        self.on_failure: Callable[[str], None] | None = None  # e.g. stop the CLI's server

    # -- loading ------------------------------------------------------------------------
    def start_loading(self) -> None:
        runtime.helper_thread()  # the event loop's thread: the model runs on the engine thread only
        self._thread = threading.Thread(target=self._load, name="pellucid-load", daemon=True)
        self._thread.start()

    @property
    def loading_started(self) -> bool:
        return self._thread is not None

    def _load(self) -> None:
        try:
            llm = self.loader(self.config)
            self.engine = AsyncEngine(llm.engine, max_waiting=self.config.max_waiting, num_threads=self.config.num_threads,
                                      on_step=self.metrics.observe_step).start()  # fmt: skip
            if self.config.steer_dir is not None:
                from pellucid.steering import SteeringLibrary

                llm.steering = SteeringLibrary(self.config.steer_dir)
            self.llm = llm
            path = getattr(llm.loaded, "path", None)
            if path is not None:
                self.names |= {str(path), Path(path).name, Path(path).stem}
            self.status = "ready"
        except Exception as e:  # shown by /health and the CLI
            self.error = e.message if isinstance(e, PellucidError) else f"{type(e).__name__}: {e}"
            self.status = "failed"
            if self.on_failure is not None:
                self.on_failure(self.error)

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status == "ready"

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    # -- checks -------------------------------------------------------------------------
    def require_ready(self) -> None:
        if self.status == "loading":
            raise ApiError(503, f"the model {self.config.model_name!r} is still loading; retry in a few seconds", code="model_loading")
        if self.status == "failed":
            raise ApiError(503, f"the model failed to load: {self.error}", code="model_load_failed")
        if self.engine is not None and not self.engine.alive:
            raise ApiError(503, "the engine has stopped", code="engine_stopped")

    def check_model(self, name: str | None, *, optional: bool = False) -> None:
        if name is None and optional:
            return
        if name not in self.names:
            shown = repr(name) if len(str(name)) <= 200 else f"{str(name)[:100]!r}... ({len(str(name)):,} characters)"
            raise ApiError(404, f"The model {shown} does not exist on this server; it serves "
                                f"{', '.join(repr(n) for n in self.config.served_names)}", param="model",
                           code="model_not_found")  # fmt: skip

    @property
    def max_len(self) -> int:
        return self.llm.engine.max_len

    # -- generation ---------------------------------------------------------------------
    def params(self, values: dict[str, Any], *, api_defaults: dict[str, Any] | None = None,
               rename: dict[str, str] | None = None) -> SamplingParams:  # fmt: skip
        """Request values (None: not given) > the --config file's defaults > the API's own
        defaults. max_tokens None means no limit but the context window, unless a default
        sets one. Token ids are checked against the vocabulary where the engine request is made."""
        defaults = {**(api_defaults or {}), **self.config.defaults}
        try:
            return build_params({"max_tokens": None}, _given(defaults), _given(values))
        except PellucidError as e:
            raise ApiError.from_pellucid(e, rename=rename) from None

    def with_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The --config system prompt first, when the request brings no system message."""
        sp = self.config.system_prompt
        if sp and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
            return [{"role": "system", "content": sp}, *messages]
        return messages


RESPONSES_KEPT = 256  # the Responses API's answers kept in memory (store: true), the oldest dropped first


class Recent:
    """At most `size` values by key, in memory, the least recently used dropped first."""

    def __init__(self, size: int):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def pop(self, key: str) -> Any:
        with self._lock:
            return self._items.pop(key, None)


def joined_text(content: Any, where: str, kinds: dict[str, str], noun: str) -> str:
    """A content string, or a list of parts whose type is among `kinds` (type -> the key
    holding its text), as one string; a 400 naming the first part of another kind."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of content {noun}s", param=where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if not (isinstance(kind, str) and kind in kinds and isinstance(part.get(kinds[kind]), str)):
            raise ApiError(400, f"{where}[{j}] is a {kind!r} {noun}; allowed: {', '.join(kinds)} {noun}s", param=f"{where}[{j}]")
        out.append(part[kinds[kind]])
    return "".join(out)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


@dataclass
class Choice:
    """One request's accumulated output."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs
        self.prompt_tokens = out.num_prompt_tokens
        self.completion_tokens = out.num_output_tokens
        self.cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


async def collect(group: RequestGroup, http: HttpRequest) -> list[Choice] | None:
    """All outputs of a group; None (and the group aborted) if the client disconnects first."""
    choices = [Choice() for _ in group.requests]

    async def gather() -> None:
        while not group.done:
            out = await group.get()
            choices[group.index[out.request_id]].add(out)

    task = asyncio.ensure_future(gather())
    watch = asyncio.ensure_future(_wait_disconnect(http))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises an engine failure
            return choices
        return None
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
        group.abort()


async def _wait_disconnect(http: HttpRequest) -> None:
    """Returns when the client goes away (the body was read already, so receive() waits for that)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def cached_tokens(choices: list[Choice], n: int) -> int:
    """Prompt tokens served from the prefix cache, counting each prompt once (its first choice)."""
    return sum(c.cached_tokens for c in choices[::n])


def trim_stop_token(choice_logprobs: list[TokenLogprob], stop_reason) -> list[TokenLogprob]:
    """A request that ended on a stop token (EOS, stop_token_ids) shows no entry for it."""
    if isinstance(stop_reason, int) and choice_logprobs and choice_logprobs[-1].token == stop_reason:
        return choice_logprobs[:-1]
    return choice_logprobs


def default_loader(config: ServerConfig):

    return LLM(config.model, dtype=config.dtype, quant=config.quant, max_batch=config.max_batch, max_len=config.max_len,
               prefix_cache=config.prefix_cache, prefix_cache_mib=config.prefix_cache_mib, kv_cache_mib=config.kv_cache_mib,
               prefill_chunk=config.prefill_chunk,
               step_tokens=config.step_tokens, **config.llm_options)  # fmt: skip


async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on a worker thread: tokenizing, rendering and grammar work must not hold up the event loop."""
    return await run_in_threadpool(_on_helper, fn, *args)


def _on_helper(fn, *args):
    runtime.helper_thread()  # torch work here must not slow the engine thread (runtime.helper_thread)
    return fn(*args)


MAX_BODY_BYTES = 16 << 20  # a request body larger than this is refused unread (413)
MAX_DEPTH = 64  # JSON nested deeper than this is refused (no real request comes close)
_JSON_TYPES = ("application/json", "text/json")


async def parse_body(http: HttpRequest, model_cls, *, rename: dict[str, str] | None = None):
    """The JSON body checked against a pydantic model (off the event loop); a 4xx naming the problem otherwise.

    One parser for both APIs, with limits a hostile client cannot get past: the body's size
    (refused before it is read when Content-Length says so), its media type, JSON nesting
    depth, and text that is not valid Unicode (unpaired UTF-16 surrogate escapes).
    """
    check_media_type(http)
    return await off_loop(decode_body, await read_body(http), model_cls, rename)


def check_media_type(http: HttpRequest) -> None:
    """A 415 for a body that says it is not JSON (no Content-Type is taken as JSON)."""
    kind = http.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind not in _JSON_TYPES and not kind.endswith("+json"):
        raise ApiError(415, f"Content-Type {kind[:80]!r} is not JSON: send the body as application/json "
                            "(curl: -H 'Content-Type: application/json')")  # fmt: skip


async def read_body(http: HttpRequest, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, at most `limit` bytes (413 past it, without reading the rest)."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit:,} bytes, the limit")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_body(raw: bytes, model_cls, rename: dict[str, str] | None = None):


    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"the request body nests JSON deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    check_json_values(data)
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise from_validation(e, rename=rename) from None


def check_json_values(data: Any) -> None:
    """Depth at most MAX_DEPTH and every string valid Unicode; a 400 naming the first field that is not."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(400, f"{path or 'the body'} nests JSON deeper than {MAX_DEPTH} levels", param=path or None)
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for k, v in value.items():
                sub = f"{path}.{k}" if path else str(k)
                _check_text(k, sub)
                stack.append((v, sub[:200], depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))


def _check_text(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = s[e.start]
        raise ApiError(400, f"{path or 'the body'} holds an unpaired UTF-16 surrogate ({ascii(bad)[1:-1]}) at "
                            f"character {e.start}: text must be valid Unicode", param=path or None) from None  # fmt: skip


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}
