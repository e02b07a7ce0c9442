"""pellucid on Ray Serve: many engine replicas behind one OpenAI/Anthropic endpoint.

    HTTP -> `pellucid serve` itself (Relay, uvicorn) ------------------------> engine replicas
    HTTP -> Ray's proxy -> ingress deployment (Relay) ------------------------> engine replicas
            (--ingress ray-proxy)

Each engine replica is one process with its own model, threads, KV cache and prefix cache,
running the same FastAPI app as `pellucid serve` (server/app.py). The Relay reads the
request body, picks a routing key and hands the request to an engine replica through a
deployment handle; the replica runs it through its app and streams the ASGI messages back.
By default the Relay is an ASGI app that the `pellucid serve` process serves itself: one
Ray hop per streamed message. With `--ingress ray-proxy` it runs as an ingress deployment
behind Ray Serve's own HTTP proxy, as Serve applications usually do: a second hop and a
second process per message, about 3x the relay's CPU per token (BENCHMARKS.md), which on
a small machine the replicas pay for.

Routing (PrefixAffinityRouter): a chat's key is a hash of its messages up to the first
user message (with the system prompt), a completion's of its first characters, or the
`x-session-id` header when a client sends one. Requests with the same key go to the same
replica (rendezvous hashing over the live replicas), so a conversation's later turns find
their prefix in that replica's cache, unless that replica has `imbalance` more requests
than the lightest one; then the lightest takes it. Requests without a key (GET /health,
/tokenize, ...) get power-of-two-choices.

Failures: a replica that dies before a request has sent any output (still queued or
prefilling) costs nothing: the Relay sends the request again to another replica. A
stream that had started ends with an error event in its API's format (OpenAI: a `data:`
line with an `error` object; Anthropic: `event: error`), which both clients raise. Ray
starts a new replica in place of the dead one.

Only `pellucid serve --replicas` (or a `deploy:` section) imports this module.
"""

# ruff: noqa: E402  (Ray Serve settings go into the environment before `import ray`)
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

# Ray Serve settings for many small streamed messages: user code and the router on the
# caller's own event loop, request logs buffered. Ray Serve reads them when it is imported,
# here and in every Ray process the local cluster starts, so they are set before `import ray`.
RAY_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
           "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}  # fmt: skip
for _k, _v in RAY_ENV.items():
    os.environ.setdefault(_k, _v)

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from pellucid.config import DEPLOY_INGRESS
from pellucid.errors import PellucidError
from pellucid.server.errors import ApiError, error_body, error_response, is_anthropic
from pellucid.server.state import ServerConfig

APP_NAME = "pellucid"
REPLICA_HEADER = b"x-pellucid-replica"  # which replica answered (its Ray replica id)
PID_HEADER = b"x-pellucid-replica-pid"
RETRY_HEADER = b"x-pellucid-retries"  # times the request was sent again after a replica died
SESSION_HEADER = b"x-session-id"
KEY_BODY_LIMIT = 1 << 20  # bodies larger than this are not parsed for a routing key
KEY_PROMPT_CHARS = 512  # a completion's routing key: its prompt's first characters
RETRIES = 4  # attempts per request when replicas die before it sent any output
# Each streamed message costs CPU at every hop to the client (replica -> serve process; with
# --ingress ray-proxy replica -> ingress -> proxy, about 1.5-2 ms a message on this project's
# machines), in processes that may share the replicas' cores. A
# stream's chunks that come within this interval of the last one sent travel together; a
# chunk after a quiet spell (the first token) goes at once. (Ray Serve LLM batches its
# streams the same way, stream_batching_interval_ms; vLLM has stream_interval.)
STREAM_INTERVAL_MS = 100
LOGGING = {"enable_access_log": False, "log_level": "WARNING"}
SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path",
              "query_string", "headers", "client", "server")  # fmt: skip


@dataclass
class DeployConfig:
    """How many engine replicas, and how they scale; from --replicas / --threads and `deploy:`."""

    replicas: int = 1
    threads: int = 1  # torch threads (and Ray CPUs) per replica
    min_replicas: int | None = None  # autoscaling bounds; both None = a fixed number of replicas
    max_replicas: int | None = None
    max_ongoing_requests: int | None = None  # per replica (default: 2 x --max-batch)
    ray_address: str | None = None  # an existing cluster ("auto", "ray://host:10001"); None starts a local one
    imbalance: int = 2  # the prefix's replica keeps it while it has at most this many more requests than the lightest
    stream_interval_ms: int = STREAM_INTERVAL_MS  # a stream's chunks within this interval travel as one message
    ingress: str = "pellucid"  # who answers HTTP: see pellucid.config.DEPLOY_INGRESS


    def check(self) -> None:
        for name, value in (("replicas", self.replicas), ("threads", self.threads), ("min_replicas", self.min_replicas),
                            ("max_replicas", self.max_replicas), ("max_ongoing_requests", self.max_ongoing_requests)):  # fmt: skip
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise PellucidError(f"{name} = {value!r} is out of range; allowed: an integer, 1 or more", param=name)
        if self.ingress not in DEPLOY_INGRESS:
            raise PellucidError(f"ingress = {self.ingress!r} is not one of: {', '.join(DEPLOY_INGRESS)}", param="ingress")
        v = self.stream_interval_ms
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1000:
            raise PellucidError(f"stream_interval_ms = {v!r} is out of range; allowed: an integer 0..1000 (0 = every "
                                "chunk at once)", param="stream_interval_ms")  # fmt: skip
        if self.autoscaling:
            lo, hi = self.min_replicas or 1, self.max_replicas or max(self.replicas, self.min_replicas or 1)
            if not lo <= self.replicas <= hi:
                raise PellucidError(f"replicas = {self.replicas} must lie between min_replicas = {lo} and "
                                    f"max_replicas = {hi}", param="replicas")  # fmt: skip

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def deployment_options(self, max_batch: int) -> dict[str, Any]:
        ongoing = self.max_ongoing_requests or 2 * max_batch
        opts: dict[str, Any] = {"max_ongoing_requests": ongoing}
        if self.autoscaling:
            lo = self.min_replicas or 1
            opts["autoscaling_config"] = {"min_replicas": lo, "initial_replicas": self.replicas,
                                          "max_replicas": self.max_replicas or max(self.replicas, lo),
                                          "target_ongoing_requests": max(1, max_batch // 2)}  # fmt: skip
        else:
            opts["num_replicas"] = self.replicas
        return opts


# -- routing ------------------------------------------------------------------------------------
def routing_key(path: str, body: bytes, session: str | None = None) -> str | None:
    """The key that keeps a conversation on one replica, or None (no preference).

    Chat (OpenAI and Anthropic): the model, the system prompt and the messages up to the
    first user message, which stay the same as the conversation grows. Completions: the
    prompt's first KEY_PROMPT_CHARS characters (or 128 token ids). `session` (a client's
    x-session-id header) wins over both.
    """
    if session:
        return _digest(["session", session])
    if path not in ("/v1/chat/completions", "/v1/messages", "/v1/completions") or not body or len(body) > KEY_BODY_LIMIT:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # the app answers the error
    if not isinstance(data, dict):
        return None
    if path == "/v1/completions":
        prompt = data.get("prompt")
        head = prompt[:KEY_PROMPT_CHARS] if isinstance(prompt, str) else prompt[:128] if isinstance(prompt, list) else None
    else:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        head = [data.get("system")]
        for m in messages:
            head.append(m)
            if isinstance(m, dict) and m.get("role") == "user":
                break
    return None if head is None else _digest([path == "/v1/completions", data.get("model"), head])


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def rendezvous(key: str, names: list[str]) -> list[str]:
    """`names` ordered by preference for `key` (highest random weight first): when a replica
    goes or comes, only the keys it held (or takes) move."""
    return sorted(names, key=lambda n: hashlib.blake2b(f"{key}|{n}".encode(), digest_size=8).digest(), reverse=True)


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router: a request's key picks its replica (see the module docstring)."""

    def initialize_state(self, imbalance: int = 2, **kwargs: Any) -> None:
        self.imbalance = imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:  # fmt: skip
        if not candidate_replicas:
            return []
        kw = pending_request.kwargs if pending_request is not None else {}
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        index = kw.get("replica_index")
        if index is not None:  # one replica in turn (the ingress's /metrics)
            names = sorted(by_name)
            return [[by_name[names[index % len(names)]]]]
        key = kw.get("key")
        if key is None:  # power of two choices
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = [by_name[n] for n in rendezvous(key, list(by_name))]
        loads = [self.replica_queue_len_cache.get(r.replica_id) for r in ranked]
        known = [q for q in loads if q is not None]
        if loads[0] is not None and known and loads[0] > min(known) + getattr(self, "imbalance", 2):
            lightest = min((q, i) for i, q in enumerate(loads) if q is not None)[1]
            return [[ranked[lightest]], ranked]
        return [ranked[:1], ranked[1:]] if len(ranked) > 1 else [ranked]


# -- the engine replica ---------------------------------------------------------------------------
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


# -- the ingress ----------------------------------------------------------------------------------
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


def merge_metrics(pages: dict[str, str]) -> str:
    """Prometheus pages of several replicas as one: each family once, samples labelled replica="NAME"."""
    families: dict[str, list[str]] = {}  # family -> HELP/TYPE lines
    samples: dict[str, list[str]] = {}
    for name, page in pages.items():
        family = ""
        for line in page.splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                family = parts[2] if len(parts) > 2 else family
                if family not in samples:
                    families.setdefault(family, []).append(line)
                elif len(families[family]) < 2 and line not in families[family]:
                    families[family].append(line)
                continue
            if not line:
                continue
            metric, _, value = line.rpartition(" ")
            label = f'replica="{name}"'
            metric = metric.replace("{", "{" + label + ",", 1) if "{" in metric else f"{metric}{{{label}}}"
            samples.setdefault(family, []).append(f"{metric} {value}")
        for family in families:
            samples.setdefault(family, [])
    out = ["# HELP pellucid_replicas Engine replicas that answered this scrape.", "# TYPE pellucid_replicas gauge",
           f"pellucid_replicas {len(pages)}"]  # fmt: skip
    for family, head in families.items():
        out += head + samples[family]
    return "\n".join(out) + "\n"


@serve.ingress()
class Ingress:
    def __init__(self, engine):
        self.relay = Relay(engine)

    def __serve_build_asgi_app__(self):
        return self.relay


# -- starting it ----------------------------------------------------------------------------------
def build_app(config: ServerConfig, deploy: DeployConfig, loader: Callable[[ServerConfig], Any] | None = None):
    """The Ray Serve application: the ingress bound to `deploy.replicas` engine replicas."""
    deploy.check()
    config.num_threads = deploy.threads
    env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(deploy.threads)}  # before torch loads in the replica
    engine = serve.deployment(EngineReplica, name="engine", **deploy.deployment_options(config.max_batch),
                              ray_actor_options={"num_cpus": deploy.threads, "runtime_env": {"env_vars": env}},
                              request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                                                        request_router_kwargs={"imbalance": deploy.imbalance}),
                              health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
                              logging_config=LOGGING)  # fmt: skip
    app = engine.bind(config, loader, deploy.stream_interval_ms)
    if deploy.ingress == "pellucid":
        return app
    ingress = serve.deployment(Ingress, name="ingress", num_replicas=1, max_ongoing_requests=100_000,
                               ray_actor_options={"num_cpus": 0}, logging_config=LOGGING)  # fmt: skip
    return ingress.bind(app)


def start(config: ServerConfig, deploy: DeployConfig, loader=None, *, log=print):
    """Start (or join) a Ray cluster and deploy; returns (the engine deployment's handle, the
    function that takes it down again)."""
    deploy.check()
    local = deploy.ray_address is None
    try:
        ray.init(address=deploy.ray_address or "local", include_dashboard=False, logging_level="warning",
                 configure_logging=True, log_to_driver=True)  # fmt: skip
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise PellucidError(f"--ray-address {deploy.ray_address!r}: cannot join the Ray cluster: {e}", param="--ray-address") from None
    cpus = ray.cluster_resources().get("CPU", 0)
    first = deploy.min_replicas if deploy.autoscaling and deploy.min_replicas else deploy.replicas
    first = max(first, deploy.replicas)
    if first * deploy.threads > cpus:
        where = "this machine's local Ray cluster" if local else f"the Ray cluster at {deploy.ray_address}"
        ray.shutdown()
        raise PellucidError(f"--replicas {first} x --threads {deploy.threads} needs {first * deploy.threads} CPUs; "
                            f"{where} has {cpus:g}", param="--replicas")  # fmt: skip
    if deploy.ingress == "ray-proxy":
        serve.start(http_options={"host": config.host, "port": config.port})
    else:
        serve.start(proxy_location="Disabled")
    log(f"Ray cluster: {'local, started for this server' if local else deploy.ray_address} ({cpus:g} CPUs); "
        f"deploying {deploy.replicas} replica(s) x {deploy.threads} thread(s), each loading {config.model}")  # fmt: skip

    def stop() -> None:
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()

    try:
        handle = serve.run(build_app(config, deploy, loader), name=APP_NAME, blocking=False,
                           route_prefix="/" if deploy.ingress == "ray-proxy" else None)  # fmt: skip
    except Exception as e:
        stop()
        raise PellucidError(f"the deployment did not start: {type(e).__name__}: {e}") from None
    return handle, stop


def serve_forever(config: ServerConfig, deploy: DeployConfig, loader=None, *, log=print) -> None:
    """`pellucid serve --replicas N`: deploy, then serve HTTP here (or let Ray's proxy do it) until Ctrl-C or SIGTERM."""
    handle, stop = start(config, deploy, loader, log=log)
    where = "this process" if deploy.ingress == "pellucid" else "Ray Serve's proxy"
    log(f"pellucid: serving {config.model_name} on http://{config.host}:{config.port} ({where}) with "
        f"{deploy.replicas} replica(s) on Ray Serve (OpenAI: /v1/chat/completions, /v1/completions; "
        "Anthropic: /v1/messages; /health, /metrics)")  # fmt: skip
    try:
        if deploy.ingress == "pellucid":
            import uvicorn

            uvicorn.run(Relay(handle), host=config.host, port=config.port, log_level="warning", access_log=False,
                        timeout_graceful_shutdown=3, lifespan="off")  # fmt: skip
        else:
            signal.signal(signal.SIGTERM, _interrupt)  # `kill` takes Serve and the local cluster down as Ctrl-C does
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
