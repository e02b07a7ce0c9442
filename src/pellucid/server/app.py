"""The HTTP server: OpenAI- and Anthropic-compatible, one engine, continuous batching.

The server listens at once and loads the model on a background thread; until it is
ready, model endpoints answer 503 and /health says "loading". Endpoints:

  POST /v1/chat/completions, /v1/completions; GET /v1/models    (OpenAI)
  POST /v1/messages, /v1/messages/count_tokens                   (Anthropic)
  POST /tokenize, /detokenize                                    (token ids, pieces, counts)
  GET  /health, /metrics                                         (no key needed)

With an API key set, every other endpoint wants `Authorization: Bearer KEY` (OpenAI's
clients) or `x-api-key: KEY` (Anthropic's).
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse

from pellucid import runtime
from pellucid.errors import PellucidError
from pellucid.server import anthropic, inspector, openai, residual, responses
from pellucid.server.errors import ApiError, error_response
from pellucid.server.protocol import DetokenizeRequest, TokenizeRequest
from pellucid.server.state import ServerConfig, ServerState, off_loop, parse_body

METRIC_PATHS = {
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages", "/v1/messages/count_tokens",
    "/v1/responses",
    "/tokenize", "/detokenize", "/tokenizer_info", "/infill", "/health", "/metrics",
}  # fmt: skip


async def require_key(http: HttpRequest) -> None:
    key = http.app.state.server.config.api_key
    if not key:
        return
    given = http.headers.get("x-api-key")
    auth = http.headers.get("authorization")
    if auth and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if given is None:
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'", code="invalid_api_key")
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")


class _CountRequests:
    """ASGI middleware: HTTP requests by path and status, for /metrics (streams pass untouched)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        path = path if path in METRIC_PATHS else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        status = {}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.count_http(path, status.get("code", 499))


def create_app(config: ServerConfig | None = None, *, loader: Callable[[ServerConfig], Any] | None = None,
               state: ServerState | None = None) -> FastAPI:  # fmt: skip
    """The FastAPI app; loading starts when the app starts (uvicorn's lifespan)."""
    state = state or ServerState(config or ServerConfig(), loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.status == "loading" and not state.loading_started:
            state.start_loading()
        yield
        state.shutdown()

    app = FastAPI(title="pellucid", summary="OpenAI- and Anthropic-compatible server for a local model",
                  lifespan=lifespan, docs_url="/docs", redoc_url=None)  # fmt: skip
    app.state.server = state
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    auth = [Depends(require_key)]
    app.include_router(service)  # /health and /metrics: no key
    app.include_router(openai.router, dependencies=auth)
    app.include_router(responses.router, dependencies=auth)
    app.include_router(anthropic.router, dependencies=auth)
    app.include_router(residual.router, dependencies=auth)
    app.include_router(tokens, dependencies=auth)
    inspector.install(app, auth)  # the web inspector at / and /v1/inspect/...
    app.add_middleware(_CountRequests, metrics=state.metrics)
    return app


# -- errors: every one in the API's own format (error_response) --------------------------------
async def _api_error(http: HttpRequest, e: ApiError):
    return error_response(e, http.url.path)


async def _pellucid_error(http: HttpRequest, e: PellucidError):
    return error_response(ApiError.from_pellucid(e), http.url.path)


async def _http_error(http: HttpRequest, e: StarletteHTTPException):
    msg = f"no route {http.method} {http.url.path}" if e.status_code in (404, 405) else str(e.detail)
    return error_response(ApiError(e.status_code, msg), http.url.path)


async def _crash(http: HttpRequest, e: Exception):
    return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"), http.url.path)


ERROR_HANDLERS = {ApiError: _api_error, PellucidError: _pellucid_error, StarletteHTTPException: _http_error, Exception: _crash}


# -- /health and /metrics ----------------------------------------------------------------------
service = APIRouter()


@service.get("/health")
async def health(http: HttpRequest):
    state: ServerState = http.app.state.server
    body = {"status": state.status, "model": state.config.model_name}
    if state.status == "failed":
        body["error"] = state.error
    if state.status == "ready" and state.engine is not None and not state.engine.alive:
        body = {"status": "failed", "model": state.config.model_name, "error": "the engine has stopped"}
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


@service.get("/metrics")
async def metrics(http: HttpRequest):
    state: ServerState = http.app.state.server
    engine = state.llm.engine if state.status == "ready" else None
    return PlainTextResponse(state.metrics.render(engine, loading=state.status != "ready", async_engine=state.engine),
                             media_type="text/plain; version=0.0.4; charset=utf-8")  # fmt: skip


# -- /tokenize and /detokenize -----------------------------------------------------------------
tokens = APIRouter()


@tokens.post("/tokenize")
async def tokenize(http: HttpRequest):
    state, body = await _token_request(http, TokenizeRequest)
    llm = state.llm
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of prompt (raw text) and messages (chat)", param="prompt")

    def encode() -> list[int]:
        if body.messages is not None:  # the prompt a chat request with these messages feeds (the server's system prompt too)
            return llm.tokenizer.encode(llm.render_chat(state.with_system(body.messages), add_generation_prompt=body.add_generation_prompt))
        return llm.tokenizer.encode(body.prompt, add_bos=None if body.add_special_tokens else False)

    try:
        ids = await off_loop(encode)
    except PellucidError as e:
        raise ApiError.from_pellucid(e) from None
    return _token_answer(llm, ids, state.max_len)


@tokens.post("/detokenize")
async def detokenize(http: HttpRequest):
    state, body = await _token_request(http, DetokenizeRequest)
    llm = state.llm
    try:
        llm.tokenizer.check_ids(body.tokens, "tokens")
    except PellucidError as e:
        raise ApiError(400, e.message, param="tokens") from None
    text = await off_loop(llm.tokenizer.decode, body.tokens)
    return {"text": text, "prompt": text, **_token_answer(llm, body.tokens, state.max_len)}  # "prompt": vLLM's name


@tokens.get("/tokenizer_info")
async def tokenizer_info(http: HttpRequest):
    """The tokenizer's special tokens and chat template in vLLM's shape (what lm-evaluation-harness's
    `tokenizer_backend=remote` reads, with /tokenize and /detokenize, instead of a tokenizer file)."""
    state: ServerState = http.app.state.server
    state.require_ready()
    llm = state.llm
    return {**llm.tokenizer.hf_config(state.max_len), "vocab_size": llm.tokenizer.vocab_size,
            "chat_template": llm.chat_template.source}


async def _token_request(http: HttpRequest, model: type) -> tuple[ServerState, Any]:
    state: ServerState = http.app.state.server
    state.require_ready()
    body = await parse_body(http, model)
    state.check_model(body.model, optional=True)
    return state, body


def _token_answer(llm, ids: list[int], max_len: int) -> dict[str, Any]:
    tok = llm.tokenizer
    return {"tokens": list(ids), "pieces": [tok.piece(i) for i in ids], "count": len(ids), "max_model_len": max_len}


class ServerThread:
    """A live server on a background thread of this process (tests, notebooks).

    `port=0` takes a free port; `.url` is the address once started. The model loads in
    the background as with `pellucid serve`; `wait_ready()` waits for it.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):


        self.app = app
        self.state: ServerState = app.state.server
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, loop=runtime.EVENT_LOOP,
                                                    timeout_graceful_shutdown=2))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, name="pellucid-http", daemon=True)
        self.host = host

    def start(self, timeout: float = 60.0) -> ServerThread:

        self.thread.start()
        t = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t > timeout:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self.state.wait_ready(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
