"""The engine replica: one process with its own model, threads, KV cache and prefix cache,
running the FastAPI app of `pellucid serve` (server/app.py); the relay calls `forward` for
each HTTP request and gets the app's ASGI messages back, a stream's close chunks joined."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pellucid.server.ray_serve.config import STREAM_INTERVAL_MS
from pellucid.server.state import ServerConfig

REPLICA_HEADER = b"x-pellucid-replica"  # which replica answered (its Ray replica id)
PID_HEADER = b"x-pellucid-replica-pid"


@dataclass
class ServeLoader:
    """A replica's model loader, picklable (Ray ships it to the replicas): `factory(config)`
    makes the loader, e.g. the CLI's, so replicas load and log as `pellucid serve` does."""

    factory: Callable[[Any], Callable[[ServerConfig], Any]]  # a module-level function: pickled by name
    config: Any = None  # pellucid.config.Config or None

    def __call__(self, sc: ServerConfig):
        return self.factory(self.config)(sc)


class EngineReplica:
    """One engine process: the FastAPI app of `pellucid serve`, called through `forward`."""

    async def __init__(self, config: ServerConfig, loader: Callable[[ServerConfig], Any] | None = None,
                       stream_interval_ms: int = STREAM_INTERVAL_MS):  # fmt: skip
        from ray import serve  # (a Ray replica: Ray is imported already)

        from pellucid.server.app import create_app
        from pellucid.server.state import ServerState

        self.state = ServerState(config, loader)
        self.app = create_app(state=self.state)
        self.state.start_loading()
        await asyncio.to_thread(self.state.wait_ready)
        if self.state.status != "ready":
            raise RuntimeError(f"the model did not load: {self.state.error}")
        self.name = serve.get_replica_context().replica_id.unique_id
        self.headers = [(REPLICA_HEADER, self.name.encode()), (PID_HEADER, str(os.getpid()).encode())]
        self.interval = stream_interval_ms / 1000

    async def forward(self, scope: dict[str, Any], body: bytes, key: str | None = None,
                      replica_index: int | None = None) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """The app's ASGI messages for one HTTP request (key and replica_index are for the router)."""
        out = Outbox()
        gone = asyncio.Event()
        first = True

        async def receive() -> dict[str, Any]:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # the app watches for a disconnect: the ingress let go of this request
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            out.put(message)

        task = asyncio.ensure_future(self.app(scope, receive, send))
        task.add_done_callback(lambda _: out.put(None))
        loop = asyncio.get_running_loop()
        sent = -1e9
        try:
            while (message := await out.get()) is not None:
                if self.interval and _is_chunk(message) and (wait := sent + self.interval - loop.time()) > 0:
                    await asyncio.sleep(wait)  # chunks close behind the last one sent go together
                    message = out.joined(message)
                yield message
                if message["type"] == "http.response.body":
                    sent = loop.time()
            task.result()
        finally:
            gone.set()
            if not task.done():
                asyncio.get_running_loop().call_later(5.0, task.cancel)

    def check_health(self) -> None:
        """Ray restarts a replica whose engine thread has died."""
        if self.state.engine is None or not self.state.engine.alive:
            raise RuntimeError("the engine has stopped")

    def __del__(self) -> None:
        state = getattr(self, "state", None)
        if state is not None:
            state.shutdown()


def _is_chunk(message: dict[str, Any]) -> bool:
    return message["type"] == "http.response.body" and bool(message.get("more_body"))


class Outbox:
    """The app's ASGI messages for one request, in order; None ends them."""

    def __init__(self) -> None:
        self.items: deque[dict[str, Any] | None] = deque()
        self.ready = asyncio.Event()

    def put(self, message: dict[str, Any] | None) -> None:
        self.items.append(message)
        self.ready.set()

    async def get(self) -> dict[str, Any] | None:
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        return self.items.popleft()

    def joined(self, message: dict[str, Any]) -> dict[str, Any]:
        """`message` with the body chunks waiting behind it (the last may end the response);
        anything else stays queued, in order."""
        parts = [message.get("body", b"")]
        while self.items and message.get("more_body") and (nxt := self.items[0]) is not None and nxt["type"] == "http.response.body":
            message = self.items.popleft()
            parts.append(message.get("body", b""))
        return {**message, "body": b"".join(parts)}

