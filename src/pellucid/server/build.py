"""One request builder: an HTTP body becomes queued engine requests in one thread-pool hop.

Each API (OpenAI chat and completions, /infill, Anthropic messages, the Responses API)
gives a `prepare(state, body) -> Plan` that holds only its own wire format: which of its
fields mean which sampling values, how its messages become a prompt, what the grammar is.
Everything else is done here, once, on one worker thread: the body read as JSON and
checked against its pydantic model, the plan made (parameters built once, the constraint
compiled once), and the engine requests made from it (n per prompt, seeds seed, seed+1,
..., each with its own copy of the constraint). Only queueing them runs on the event loop.
The engine trusts what this made: prompt ids and parameters are checked here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest

from pellucid import runtime, steering
from pellucid.engine.async_engine import RequestGroup
from pellucid.errors import PellucidError
from pellucid.sampling.params import SamplingParams
from pellucid.server.errors import ApiError
from pellucid.server.state import (
    Choice,
    ServerState,
    check_media_type,
    collect,
    decode_body,
    new_id,
    off_loop,
    read_body,
)
from pellucid.text.tools import repeat_watch


@dataclass
class Plan:
    """What one API made of a request, in the engine's terms."""

    prompts: list[list[int]]
    params: SamplingParams | None = None  # None: nothing to generate (count_tokens)
    constraint: Any = None  # compiled once; each engine request gets a fresh copy
    tools: Any = None  # pellucid.text.tools.ToolList the answer is parsed against
    rename: dict[str, str] | None = None  # engine field names -> this API's, in errors
    queue: bool = True  # False: the handler answers without the engine (echo with max_tokens 0)
    extra: dict[str, Any] = field(default_factory=dict)  # what one API keeps for its answer
    steer: Any = None  # pellucid.steering.Steer, resolved from the body's `steer`
    capture: Any = None  # pellucid.steering.Capture, from the body's `capture`

    @property
    def n(self) -> int:
        return self.params.n if self.params is not None else 1

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


@dataclass
class Received:
    """A request as the handler gets it back: its body, its plan, its queued group."""

    id: str
    body: Any
    plan: Plan
    group: RequestGroup | None
    state: ServerState = field(repr=False)


async def receive(http: HttpRequest, model_cls, prepare: Callable[[ServerState, Any], Plan], *, prefix: str) -> Received:
    """Read, check, plan and queue one request: one thread-pool hop, then the queue."""
    state: ServerState = http.app.state.server
    state.require_ready()
    check_media_type(http)
    raw = await read_body(http)
    rid = new_id(prefix)

    def work():
        runtime.helper_thread()  # torch work here must not slow the engine thread
        body = decode_body(raw, model_cls)
        try:
            plan = prepare(state, body)
            stream_edits(state, body, plan)
        except PellucidError as e:
            raise ApiError.from_pellucid(e) from None
        try:
            reqs = make_requests(state, plan, rid) if plan.queue and plan.params is not None else []
        except PellucidError as e:
            raise ApiError.from_pellucid(e, rename=plan.rename) from None
        return body, plan, reqs

    body, plan, reqs = await run_in_threadpool(work)
    group = None
    if reqs:
        try:
            group = state.engine.add_many(reqs)
        except PellucidError as e:
            raise ApiError.from_pellucid(e, rename=plan.rename) from None
        state.metrics.requests_received += 1
    return Received(rid, body, plan, group, state)


def make_requests(state: ServerState, plan: Plan, rid: str) -> list:
    """n engine requests per prompt: choice i is seeded seed + i (when seeded)."""
    eng, params, n = state.llm.engine, plan.params, plan.n
    reqs = []
    for p, ids in enumerate(plan.prompts):
        for i in range(n):
            one = params if n == 1 else replace(params, seed=None if params.seed is None else params.seed + i, n=1)
            c = plan.constraint.copy() if plan.constraint is not None else None
            watch = repeat_watch(plan.tools) if plan.tools is not None else None  # a model repeating its call is done
            reqs.append(eng.make_request(ids, one, f"{rid}-{p * n + i}", c, watch, steer=plan.steer, capture=plan.capture))
    return reqs


async def run_engine(http: HttpRequest, state: ServerState, make: Callable[[], list]) -> tuple[list, list[Choice]] | None:
    """Engine requests made by make() on a worker thread, queued, and all their outputs
    (None: the client went away). For endpoints that answer with the engine's work whole."""
    try:
        reqs = await off_loop(make)
        group = state.engine.add_many(reqs)
    except PellucidError as e:
        raise ApiError.from_pellucid(e) from None
    choices = await collect(group, http)
    return None if choices is None else (reqs, choices)


def stream_edits(state: ServerState, body: Any, plan: Plan) -> None:
    """The body's `steer` and `capture` (every generation API takes them as extras), checked and resolved."""
    spec, cap = getattr(body, "steer", None), getattr(body, "capture", None)
    if spec is None and cap is None:
        return
    llm = state.llm
    plan.steer = steering.resolve(spec, llm.config, llm.steering, dtype=llm.engine_dtype, device=llm.engine.device)
    plan.capture = steering.parse_capture(cap, llm.config)


def with_activations(r: Received, answer: dict[str, Any], index: int | None = None) -> dict[str, Any]:
    """`answer` and the captured residual stream (pellucid.steering.encode), when the body asked:
    a list, one per engine request, or with `index` (a stream's finishing choice) that one's alone.
    A new dict: what else holds `answer` (the Responses API's store) keeps it without."""
    if r.plan.capture is None or r.group is None:
        return answer
    qs = r.group.requests if index is None else [r.group.requests[index]]
    acts = [steering.encode(q.activations(), q.capture_positions) for q in qs]
    return {**answer, "activations": acts if index is None else acts[0]}
