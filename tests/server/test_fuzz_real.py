"""Property-based fuzzing of the HTTP API from its request schemas (hypothesis), on a live server
with the real default model: whatever a client sends, the answer is never a 5xx, always JSON in
its API's error shape when refused, and the server keeps serving.

The bodies start from a valid request and replace, add or drop fields named by the endpoint's
own pydantic schema (plus unknown ones) with arbitrary JSON: nulls, booleans, huge and negative
numbers, strings with unpaired surrogates, nested lists and objects. (Schemathesis reads request
bodies from the OpenAPI document; pellucid's routes parse their bodies themselves, so the
schemas are taken from the same pydantic models directly.)
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pellucid.server.protocol import (
    AnthropicMessagesRequest,
    ChatCompletionRequest,
    CompletionRequest,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]
MODEL = "smollm2-135m-instruct"
ENDPOINTS = {
    "/v1/chat/completions": (ChatCompletionRequest, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    "/v1/completions": (CompletionRequest, {"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
    "/v1/messages": (AnthropicMessagesRequest, {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}),
}  # fmt: skip

text = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800", "a\udfffb", "<|im_start|>", "", " " * 50, "%s%n"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12)


def bodies(model_cls, base: dict):
    fields = sorted(model_cls.model_json_schema()["properties"])
    edit = st.tuples(st.sampled_from([*fields, "unknown_field"]), st.one_of(json_values, st.just(...)))
    return st.lists(edit, max_size=4).map(lambda edits: _apply(base, edits))


def _apply(base: dict, edits) -> dict:
    body = dict(base)
    for name, value in edits:
        if value is ...:
            body.pop(name, None)
        else:
            body[name] = value
    return body


@pytest.fixture(scope="module")
def srv(real_path):
    from pellucid.api import LLM
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    cfg = ServerConfig(model=MODEL, max_batch=4, max_len=512)
    s = ServerThread(create_app(cfg, loader=lambda c: LLM(str(real_path), max_batch=c.max_batch, max_len=c.max_len))).start()
    assert s.wait_ready(120)
    yield s
    s.stop()


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_fuzzed_bodies_never_get_a_5xx(srv, path):
    model_cls, base = ENDPOINTS[path]
    seen = {"ok": 0, "refused": 0}

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(bodies(model_cls, base))
    def check(body):
        r = httpx.post(f"{srv.url}{path}", content=json.dumps(body), headers={"content-type": "application/json"}, timeout=120)
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        if r.headers.get("content-type", "").startswith("text/event-stream"):  # a fuzzed "stream": true
            assert r.status_code == 200 and ("data: [DONE]" in r.text or "event: message_stop" in r.text), r.text[-300:]
            seen["ok"] += 1
            return
        data = r.json()
        if r.status_code >= 400:
            seen["refused"] += 1
            msg = data["error"]["message"] if "error" in data and isinstance(data["error"], dict) else None
            assert msg, (body, data)
        else:
            seen["ok"] += 1

    check()
    assert seen["refused"] > 0 and seen["ok"] > 0, seen  # the fuzzer reached both sides
    assert httpx.get(f"{srv.url}/health").status_code == 200
