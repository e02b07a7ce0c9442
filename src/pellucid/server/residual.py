"""The residual stream over HTTP: the named steering vectors (GET /v1/steering) and the
activations of a batch of texts (POST /v1/activations, for training probes).

Steering and capture of a single answer ride on the generation APIs themselves (`steer`,
`capture` in the body: server/build.py)."""

from __future__ import annotations

import json
from typing import Any

import torch
from fastapi import APIRouter
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from pellucid import steering
from pellucid.sampling.params import SamplingParams
from pellucid.server.build import run_engine
from pellucid.server.errors import ApiError
from pellucid.server.protocol import ActivationsRequest
from pellucid.server.state import ServerState, new_id, off_loop, parse_body

router = APIRouter()

MAX_TEXTS = 256  # texts in one /v1/activations body
FORMATS = ("safetensors", "json")


@router.get("/v1/steering")
async def list_vectors(http: HttpRequest) -> dict[str, Any]:
    """The named steering vectors the server can apply, and whether each fits the served model."""
    state: ServerState = http.app.state.server
    state.require_ready()
    lib = state.llm.steering
    data = await off_loop(lib.describe, state.llm.config)
    return {"object": "list", "folder": str(lib.folder), "data": data}


@router.post("/v1/activations")
async def activations(http: HttpRequest):
    """The residual stream after `layers` at `positions` of each input (optionally steered):
    one safetensors body, tensor `activations.I` (layers, positions, d_model) float16 per
    input, the layers and positions in its metadata; or JSON with `format: "json"`."""
    state: ServerState = http.app.state.server
    state.require_ready()
    body = await parse_body(http, ActivationsRequest)
    state.check_model(body.model, optional=True)
    if body.format not in FORMATS:
        raise ApiError(400, f"format {body.format!r} is not one of {', '.join(FORMATS)}", param="format")
    llm = state.llm
    inputs = [body.input] if isinstance(body.input, str) or (body.input and isinstance(body.input[0], int)) else list(body.input)
    if not inputs or len(inputs) > MAX_TEXTS:
        raise ApiError(400, f"input holds {len(inputs)} texts; give 1 to {MAX_TEXTS}", param="input")

    def build() -> list:
        cap = steering.parse_capture({"layers": body.layers, "positions": body.positions}, llm.config)
        steer = steering.resolve(body.steer, llm.config, llm.steering, dtype=llm.engine_dtype, device=llm.engine.device)
        params = SamplingParams(max_tokens=1, temperature=0.0)
        rid = new_id("act-")
        return [llm.engine.make_request(llm.encode_prompt(t, limit=state.max_len), params, f"{rid}-{i}", steer=steer, capture=cap)
                for i, t in enumerate(inputs)]  # fmt: skip

    done = await run_engine(http, state, build)
    if done is None:
        return Response(status_code=499)
    reqs = done[0]
    if body.format == "json":
        return {"object": "list", "model": state.config.model_name,
                "data": [steering.encode(q.activations(), q.capture_positions) for q in reqs]}  # fmt: skip

    def pack() -> bytes:
        from safetensors.torch import save

        tensors, meta = {}, {"model": state.config.model_name, "what": "resid_post"}
        for i, q in enumerate(reqs):
            acts = q.activations()
            tensors[f"activations.{i}"] = torch.stack([acts[k] for k in sorted(acts)]).to(torch.float16).contiguous()
            meta[f"positions.{i}"] = json.dumps(q.capture_positions)
        meta["layers"] = json.dumps(sorted(reqs[0].capture.layers))
        return save(tensors, metadata=meta)

    return Response(await off_loop(pack), media_type="application/octet-stream")
