"""A catalogue of bad and hostile requests against a live server on the real default model.

Each case must get a 4xx (never a 5xx, never a hang), an error body in its API's own shape
whose message or param names the field at fault, and the server must still answer
/health and a real request afterwards.
"""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.real

MODEL = "smollm2-135m-instruct"
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
OK_COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
OK_MESSAGES = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def case(path: str, body, names: str | None, *, raw: bool = False, headers: dict | None = None, status: int | None = None):
    """One hostile request: body (a dict sent as JSON, or raw bytes/str), a text the error must name."""
    return pytest.param(path, body, names, raw, headers or {}, status, id=f"{path}:{str(body)[:60]}")


SAMPLING_FIELDS = {  # field -> (wrong type, out of range)
    "temperature": ({"hot": 1}, -1), "top_p": ([0.5], 1.5), "top_k": ("many", -2), "min_p": ({"x": 1}, 2.0), "typical_p": ("x", 1.5),
    "frequency_penalty": ("x", 3.5), "presence_penalty": ([1], -3.0), "repetition_penalty": ({"y": 2}, -1.0),
    "max_tokens": ({"n": 4}, -1), "min_tokens": ([3], -4), "seed": ({"s": 1}, "seedless"), "n": ({"n": 2}, 0),
    "logit_bias": ("all", {"99999999": 5}), "stop": (5, [None]), "stop_token_ids": ("eos", [-1]),
    "top_logprobs": ("x", 99), "logprobs": ({"a": 1}, "always"),
}  # fmt: skip

CASES = []
# -- malformed, truncated, not an object -----------------------------------------------------
for path in ("/v1/chat/completions", "/v1/completions", "/v1/messages"):
    for raw in ("", "{", '{"model": ', "[1, 2]", "null", "42", '"text"', "{'single': 'quotes'}", '{"model": "x",}',
                b"\xff\xfe\x00{", '{"a": NaN'):  # fmt: skip
        CASES.append(case(path, raw, None, raw=True))
# -- every sampling field: a wrong type and a value out of range -----------------------------------
for field, (wrong, out) in SAMPLING_FIELDS.items():
    CASES.append(case("/v1/chat/completions", {**OK_CHAT, field: wrong}, field))
    CASES.append(case("/v1/chat/completions", {**OK_CHAT, field: out}, field))
for field, value in (("temperature", 1.5), ("top_p", -0.1), ("top_k", -3), ("max_tokens", -2), ("stop_sequences", "halt"),
                     ("max_tokens", "lots"), ("temperature", "warm")):  # fmt: skip
    CASES.append(case("/v1/messages", {**OK_MESSAGES, field: value}, field))
# -- OpenAI's contract: its ranges and no silent coercion ----------------------------------------
for field, value in (("temperature", 3), ("temperature", 2.5), ("max_tokens", "4"), ("stream", "yes"), ("n", "2"),
                     ("stop", [f"s{i}" for i in range(100)]), ("seed", 1.5), ("logprobs", 1), ("top_p", "0.9")):  # fmt: skip
    CASES.append(case("/v1/chat/completions", {**OK_CHAT, field: value}, field))
CASES.append(case("/v1/completions", {**OK_COMPLETION, "temperature": 2.1}, "temperature"))
# -- messages -----------------------------------------------------------------------------------
for messages, names in (
    (None, "messages"), ("hello", "messages"), ([], "messages"), ([{"role": "wizard", "content": "hi"}], "role"),
    ([{"role": "user"}], "content"), ([{"role": "user", "content": 42}], "content"), (["just text"], "messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}], "content"),
    ([{"role": "user", "content": "\ud800 broken"}], "content"), ([{"role": "system", "content": "\udfff"}, {"role": "user", "content": "hi"}], "content"),
):  # fmt: skip
    CASES.append(case("/v1/chat/completions", {**OK_CHAT, "messages": messages}, names))
for messages, names in (([{"role": "system", "content": "hi"}], "role"), ([{"role": "user", "content": "\ud83d"}], "content"),
                        ([], "messages"), ([{"role": "user", "content": [{"type": "image", "source": {}}]}], "content")):  # fmt: skip
    CASES.append(case("/v1/messages", {**OK_MESSAGES, "messages": messages}, names))
CASES.append(case("/v1/messages", {**OK_MESSAGES, "system": "\ud800"}, "system"))
CASES.append(case("/v1/chat/completions", {**OK_CHAT, "metadata": {"\ud800key": 1}}, "surrogate"))  # echoed in the path
CASES.append(case("/v1/messages", {**OK_MESSAGES, "\udfffx": 1}, "surrogate"))
CASES.append(case("/v1/messages/count_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "\udc00"}]}, "content"))
CASES.append(case("/tokenize", {"prompt": "\ud800"}, "prompt"))
# -- prompts and token ids ------------------------------------------------------------------------
for prompt, names in (([], "prompt"), ([-1, 5], "prompt"), ([10**12], "prompt"), ([1.5, 2], "prompt"), ("\ud800", "prompt"),
                      ([[1, 2], "mixed"], "prompt"), ({"text": "hi"}, "prompt"), ("word " * 5000, "context")):  # fmt: skip
    CASES.append(case("/v1/completions", {**OK_COMPLETION, "prompt": prompt}, names))
CASES.append(case("/v1/chat/completions", {**OK_CHAT, "max_tokens": 10**9}, "context"))
CASES.append(case("/v1/completions", {**OK_COMPLETION, "echo": True, "stream": True}, "echo"))  # echo works, not streamed
CASES.append(case("/v1/completions", {**OK_COMPLETION, "max_tokens": 0}, "max_tokens"))  # 0 needs echo
CASES.append(case("/v1/completions", {**OK_COMPLETION, "echo": True, "logprobs": 21}, "logprobs"))
CASES.append(case("/v1/completions", {**OK_COMPLETION, "suffix": "end"}, "suffix"))  # SmolLM2 has no FIM tokens
CASES.append(case("/infill", {"input_prefix": "def f(", "input_suffix": "    return x"}, "fill-in-the-middle"))
CASES.append(case("/infill", {"input_prefix": 5}, "input_prefix"))
CASES.append(case("/v1/completions", {**OK_COMPLETION, "best_of": 3}, "best_of"))
CASES.append(case("/detokenize", {"tokens": [-5]}, "tokens"))
CASES.append(case("/detokenize", {"tokens": "abc"}, "tokens"))
# -- model names: unknown, path tricks, huge --------------------------------------------------------
for name in ("gpt-unknown", "../../etc/passwd", "/etc/passwd", "hf://org/repo/file.gguf", "", "x" * 100_000, "smollm2\x00"):
    CASES.append(case("/v1/chat/completions", {**OK_CHAT, "model": name}, "model"))
CASES.append(case("/v1/messages", {**OK_MESSAGES, "model": "claude-unknown"}, "model"))
# -- structured output: invalid and hostile schemas and regexes --------------------------------------
for fmt in (
    {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 123}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": "not a schema"}}, {"type": "xml"}, "json",
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}},
):  # fmt: skip
    CASES.append(case("/v1/chat/completions", {**OK_CHAT, "response_format": fmt}, "response_format"))
for schema in ({"$ref": "#"}, {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
               {"$defs": {"a": {"allOf": [{"$ref": "#/$defs/a"}]}}, "properties": {"x": {"$ref": "#/$defs/a"}}, "type": "object"}):  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "cyclic", "schema": schema}}
    CASES.append(case("/v1/chat/completions", {**OK_CHAT, "response_format": fmt}, "comes back to itself"))
# -- deep nesting, at the top and inside fields -------------------------------------------------------
for depth in (100, 1000, 100_000):
    CASES.append(case("/v1/chat/completions", '{"model": "m", "metadata": ' + nested(depth) + "}", "nest", raw=True))
    CASES.append(case("/v1/chat/completions", nested(depth), None, raw=True))
CASES.append(case("/v1/messages", '{"metadata": ' + nested(5000) + "}", "nest", raw=True))
# -- unknown fields, media types, sizes ---------------------------------------------------------------
CASES.append(case("/v1/chat/completions", {**OK_CHAT, "frobnicate": True}, "frobnicate"))
CASES.append(case("/v1/messages", {**OK_MESSAGES, "frobnicate": True}, "frobnicate"))
CASES.append(case("/v1/chat/completions", json.dumps(OK_CHAT), "content-type", raw=True, headers={"content-type": "text/plain"}))
CASES.append(case("/v1/messages", json.dumps(OK_MESSAGES), "content-type", raw=True, headers={"content-type": "application/xml"}))
CASES.append(case("/v1/chat/completions", b"x" * (17 << 20), "limit", raw=True, status=413))
CASES.append(case("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user", "content": "word " * 1_000_000}]}, "context"))
CASES.append(case("/v1/chat/completions", OK_CHAT, "api key", headers={"authorization": "Bearer " + "k" * 5000}, status=401))


@pytest.fixture(scope="module")
def srv(real_path):
    from pellucid.api import LLM
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    cfg = ServerConfig(model=MODEL, max_batch=4, max_len=1024, api_key="secret-key")
    s = ServerThread(create_app(cfg, loader=lambda c: LLM(str(real_path), max_batch=c.max_batch, max_len=c.max_len))).start()
    assert s.wait_ready(120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    with httpx.Client(base_url=srv.url, timeout=120, headers={"authorization": "Bearer secret-key"}) as c:
        yield c


def test_the_catalogue_holds_over_100_cases():
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize(("path", "body", "names", "raw", "headers", "status"), CASES)
def test_hostile_request_gets_a_clear_4xx_and_the_server_keeps_serving(client, path, body, names, raw, headers, status):
    if not raw:  # json.dumps escapes what httpx would refuse to send (unpaired surrogates)
        body = json.dumps(body)
    if "content-type" not in headers:
        headers = {**headers, "content-type": "application/json"}
    r = client.post(path, headers=headers, content=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if status is not None:
        assert r.status_code == status, r.text[:300]
    err = r.json()
    if path.startswith("/v1/messages"):
        assert err["type"] == "error" and err["error"]["message"]
        text = err["error"]["message"]
    else:
        text = err["error"]["message"] + " " + str(err["error"].get("param"))
    assert len(r.content) < 4096, "an error must not echo a huge input back"
    if names is not None:
        assert names.lower() in text.lower(), text
    assert client.get("/health").status_code == 200


def test_still_serves_real_requests_after_the_catalogue(client):
    r = client.post("/v1/chat/completions", json={**OK_CHAT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_model_aliases(real_path):
    """--served-model-name takes a comma-separated list: every alias is accepted, the first reported."""
    from pellucid.api import LLM
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    cfg = ServerConfig(model=MODEL, served_model_name="local, gpt-3.5-turbo-instruct ,gpt-4o", max_len=512)
    s = ServerThread(create_app(cfg, loader=lambda c: LLM(str(real_path), max_batch=1, max_len=c.max_len))).start()
    try:
        assert s.wait_ready(120)
        for name in ("local", "gpt-3.5-turbo-instruct", "gpt-4o", MODEL):
            r = httpx.post(f"{s.url}/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 1}, timeout=60)
            assert r.status_code == 200 and r.json()["model"] == "local", r.text
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "gpt-5", "prompt": "Hi"}, timeout=60)
        assert r.status_code == 404 and "'local', 'gpt-3.5-turbo-instruct', 'gpt-4o'" in r.json()["error"]["message"]
        assert [m["id"] for m in httpx.get(f"{s.url}/v1/models").json()["data"]] == ["local"]
    finally:
        s.stop()
