"""The HTTP front: reads a request's body, routes it by key to an engine replica, relays the
replica's answer. Served by `pellucid serve` itself, or (--ingress ray-proxy) as an ingress
deployment behind Ray Serve's own HTTP proxy.

A replica that dies before a request has sent any output (still queued or prefilling)
costs nothing: the Relay sends the request again to another replica. A stream that had
started ends with an error event in its API's format (OpenAI: a `data:` line with an
`error` object; Anthropic: `event: error`), which both clients raise. Ray starts a new
replica in place of the dead one.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pellucid.server.errors import ApiError, error_body, error_response, is_anthropic
from pellucid.server.ray_serve.metrics import merge_metrics
from pellucid.server.ray_serve.replica import REPLICA_HEADER
from pellucid.server.ray_serve.routing import SESSION_HEADER, routing_key

RETRY_HEADER = b"x-pellucid-retries"  # times the request was sent again after a replica died
RETRIES = 4  # attempts per request when replicas die before it sent any output
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path",
              "query_string", "headers", "client", "server")  # fmt: skip


class Relay:
    """The HTTP front's ASGI app (in `pellucid serve`, or in the ingress deployment): reads the
    body, routes by key, relays the replica's answer."""

    def __init__(self, engine):
        self.handle = engine
        self._engine = None

    @property
    def engine(self):
        """The streaming handle, made on first use: inside the event loop that will use it."""
        if self._engine is None:
            self._engine = self.handle.options(stream=True)
        return self._engine

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        clean = {k: scope[k] for k in SCOPE_KEYS if k in scope}
        path = scope.get("path", "")
        if path == "/metrics" and scope.get("method") == "GET":
            return await self._metrics(clean, send)
        session = dict(scope.get("headers", [])).get(SESSION_HEADER)
        key = routing_key(path, body, session.decode("latin-1") if session else None)
        await self._relay(clean, body, key, receive, send)

    async def _relay(self, scope: dict[str, Any], body: bytes, key: str | None, receive, send) -> None:
        from ray.exceptions import RayActorError  # (the relay runs where Ray is imported already)

        path = scope.get("path", "")
        last: Exception | None = None
        for attempt in range(RETRIES):
            held: list[dict[str, Any]] = []  # messages kept back until one carries output
            started = False
            try:
                async for message in self.engine.forward.remote(scope, body, key=key):
                    if started:
                        await send(message)
                        continue
                    if message["type"] == "http.response.start" and attempt:
                        message = {**message, "headers": [*message.get("headers", []), (RETRY_HEADER, str(attempt).encode())]}
                    held.append(message)
                    if message["type"] == "http.response.body" and (not message.get("more_body")
                                                                    or carries_output(message.get("body", b""))):  # fmt: skip
                        for m in held:
                            await send(m)
                        started = True
                return
            except RayActorError as e:
                if started:  # the client has part of the answer: end it with an error it can see
                    await send({"type": "http.response.body", "body": stream_error(path, e), "more_body": False})
                    return
                last = e
                await asyncio.sleep(0.25 * (attempt + 1))  # the router learns of the death meanwhile
        msg = f"the engine replicas died {RETRIES} times while this request waited; last: {_died(last)}"
        await error_response(ApiError(503, msg, code="replica_died"), path)(scope, receive, send)

    async def _metrics(self, scope: dict[str, Any], send) -> None:
        """Every replica's /metrics in one page, each sample labelled with its replica."""
        from ray.exceptions import RayActorError

        pages: dict[str, str] = {}
        for i in range(64):
            try:
                messages = [m async for m in self.engine.forward.remote(scope, b"", replica_index=i)]
            except RayActorError:
                continue
            headers = dict(messages[0].get("headers", []))
            name = headers.get(REPLICA_HEADER, b"?").decode()
            if name in pages:
                break
            pages[name] = b"".join(m.get("body", b"") for m in messages[1:]).decode()
        text = merge_metrics(pages).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]})  # fmt: skip
        await send({"type": "http.response.body", "body": text, "more_body": False})


def carries_output(chunk: bytes) -> bool:
    """Whether an SSE chunk holds generated text, a finish, an error or the end (not just a
    stream's opening events, which every replica would send the same)."""
    for line in chunk.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        try:
            obj = json.loads(data)
        except ValueError:
            return True
        if not isinstance(obj, dict) or obj.get("error") or obj.get("type") in ("content_block_delta", "message_delta", "error"):
            return True
        for c in obj.get("choices") or []:
            if isinstance(c, dict) and (c.get("text") or (c.get("delta") or {}).get("content") or c.get("finish_reason")):
                return True
    return False


def stream_error(path: str, e: Exception) -> bytes:
    """The event that ends a stream whose replica died, in the path's API format."""
    err = ApiError(503, f"the engine replica serving this request died mid-stream ({_died(e)}); "
                        "send the request again", code="replica_died")  # fmt: skip
    body = json.dumps(error_body(err, is_anthropic(path)))
    return (f"event: error\ndata: {body}\n\n" if is_anthropic(path) else f"data: {body}\n\n").encode()


def _died(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class Ingress:
    """The ingress deployment of --ingress ray-proxy, wrapped by `serve.ingress()` in
    lifecycle.build_app: Ray's proxy hands it each HTTP request, its Relay answers."""

    def __init__(self, engine):
        self.relay = Relay(engine)

    def __serve_build_asgi_app__(self):
        return self.relay
