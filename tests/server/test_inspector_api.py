"""The web inspector's JSON endpoints (/v1/inspect/...) on a live server with the real
default model in its served format: the numbers agree with the served model, the sampler
and pellucid.inspect, and bad input gets a 400 naming the field."""

from __future__ import annotations

import base64
import math
import threading
from pathlib import Path

import httpx
import pytest
import torch
from inspector_server import served

pytestmark = pytest.mark.real

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def srv():
    with served() as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c


def post(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def error(client, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    return r.json()["error"]


def prompt_ids(client) -> list[int]:
    return post(client, "/tokenize", {"messages": QUESTION})["tokens"]


def test_greedy_stage_is_what_the_server_generated(client):
    """Temperature 0: at every generated position, the inspector's one greedy candidate is the
    token the API streamed there (ids recovered from the logprobs' bytes)."""
    r = post(client, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 6, "logprobs": True})
    content = r["choices"][0]["logprobs"]["content"]
    ids = post(client, "/v1/inspect/token-ids", {"bytes": [t["bytes"] for t in content]})["tokens"]
    assert post(client, "/detokenize", {"tokens": ids})["text"] == r["choices"][0]["message"]["content"]
    ctx = prompt_ids(client)
    for i, want in enumerate(ids):
        out = post(client, "/v1/inspect/next-token", {"tokens": ctx, "generated": ids[:i], "temperature": 0})
        assert [s["name"] for s in out["stages"]] == ["raw", "bias_penalties", "greedy"]
        kept = [c for c in out["stages"][-1]["candidates"] if c["kept"]]
        assert [(c["id"], c["prob"]) for c in kept] == [(want, 1.0)]
        assert out["position"] == len(ctx) + i


def test_stages_follow_the_sampler_arithmetic(client):
    out = post(client, "/v1/inspect/next-token", {"messages": QUESTION, "temperature": 0.5, "top_k": 3, "seed": 7, "top": 12})
    st = {s["name"]: s for s in out["stages"]}
    assert list(st) == ["raw", "bias_penalties", "temperature", "top_k", "top_p", "min_p", "typical_p", "draw"]
    raw = {c["id"]: c["logit"] for c in st["raw"]["candidates"]}
    for c in st["temperature"]["candidates"]:
        assert c["logit"] == pytest.approx(raw[c["id"]] / 0.5, rel=1e-5)
    kept = [c for c in st["top_k"]["candidates"] if c["kept"]]
    assert len(kept) == 3 == st["top_k"]["kept"]
    z = sum(math.exp(c["logit"]) for c in kept)
    for c in kept:  # renormalised over the three kept tokens
        assert c["prob"] == pytest.approx(math.exp(c["logit"]) / z, rel=1e-4)
    drawn = [c for c in st["draw"]["candidates"] if c["kept"]]
    assert len(drawn) == 1 and drawn[0]["id"] in {c["id"] for c in kept}


def test_a_banned_token_is_removed_from_every_later_stage(client):
    first = post(client, "/v1/inspect/next-token", {"messages": QUESTION, "temperature": 0.8, "seed": 1})
    top = max(first["stages"][0]["candidates"], key=lambda c: c["prob"])["id"]
    out = post(client, "/v1/inspect/next-token", {"messages": QUESTION, "temperature": 0.8, "seed": 1, "logit_bias": {str(top): -100}})
    for s in out["stages"][1:]:
        c = next(c for c in s["candidates"] if c["id"] == top)
        assert not c["kept"] and c["prob"] == 0.0, s["name"]
    assert next(c for c in out["stages"][0]["candidates"] if c["id"] == top)["kept"]  # raw: still there


def test_penalties_on_generated_tokens_equal_the_samplers_own(client, srv):
    """frequency/presence count the generated tokens: the inspector's bias stage equals the
    sampler's stateful path (a SequenceSampler that accepted those tokens)."""
    from pellucid.sampling.params import SamplingParams
    from pellucid.sampling.sampler import SequenceSampler, sample

    ctx = prompt_ids(client)
    generated = post(client, "/tokenize", {"prompt": " The capital of France is Paris. The capital", "add_special_tokens": False})["tokens"]
    body = {"tokens": ctx, "generated": generated, "frequency_penalty": 1.5, "presence_penalty": 0.7, "temperature": 1.0, "top": 30}
    out = post(client, "/v1/inspect/next-token", body)
    llm = srv.state.llm
    ids = ctx + generated
    with torch.inference_mode():
        logits = llm.model(torch.tensor([ids]), last_only=True).float()  # (1, V)
    seq = SequenceSampler(SamplingParams(frequency_penalty=1.5, presence_penalty=0.7), vocab_size=logits.shape[-1], prompt_ids=ids)
    for t in generated:
        seq.accept(t)
    traced = {}
    sample(logits, [seq], trace=lambda stage, x: traced.__setitem__(stage, x[0]))
    after = traced["penalties"]
    stage = out["stages"][1]
    assert any(c["id"] in generated for c in stage["candidates"])  # some penalised token is shown
    for c in stage["candidates"]:
        assert c["logit"] == pytest.approx(float(after[c["id"]]), abs=1e-3)


def test_attention_equals_pellucid_inspect_on_the_served_model(client, srv):
    from pellucid.inspect import attention_patterns

    ids = prompt_ids(client)
    out = post(client, "/v1/inspect/attention", {"tokens": ids, "layer": 16, "head": 0})
    L, H, T = out["n_layers"], out["n_heads"], len(ids)
    assert (L, H) == (30, 9)
    grid = base64.b64decode(out["grid"]["data"])
    assert len(grid) == L * H * out["grid"]["size"] ** 2
    pattern = torch.tensor(out["pattern"])
    assert pattern.shape == (T, T)
    assert torch.allclose(pattern.sum(-1), torch.ones(T), atol=1e-3)
    assert pattern.triu(1).abs().max() == 0  # causal
    model = srv.state.llm.model
    assert model.runs_fused() and not any(h.fns for h in model.hook_points.values())  # hooks went on the shadow
    want = attention_patterns(srv.state.llm, ids).select(16, 0)
    assert torch.allclose(pattern, want, atol=1e-4)
    avg = torch.tensor(post(client, "/v1/inspect/attention", {"tokens": ids})["pattern"])
    assert not torch.allclose(avg, pattern, atol=1e-2)  # the average over layers and heads is another picture


def test_lens_ends_at_the_models_prediction(client):
    ids = prompt_ids(client)
    lens = post(client, "/v1/inspect/lens", {"tokens": ids, "last": 5, "k": 2})
    assert len(lens["labels"]) == 31 and lens["labels"][0] == "embed"
    assert lens["start"] == len(ids) - 5 and len(lens["top"][0]) == 5 and len(lens["top"][0][0]) == 2
    nxt = post(client, "/v1/inspect/next-token", {"tokens": ids, "temperature": 0})
    greedy = next(c for c in nxt["stages"][-1]["candidates"] if c["kept"])["id"]
    assert lens["top"][-1][-1][0]["id"] == greedy == lens["target"]["id"]
    assert lens["target"]["from"] == "model" and lens["target"]["rank"][-1] == 0
    assert len(lens["resid_norm"]) == 31 and len(lens["resid_norm"][0]) == len(ids)
    paris = post(client, "/v1/inspect/lens", {"prompt": "The capital of France is", "target": " Paris"})
    assert paris["target"]["token"] == " Paris" and paris["target"]["from"] == "given"
    assert paris["target"]["prob"][-1] > paris["target"]["prob"][5]


def test_budget_splits_the_window(client, srv):
    history = [{"role": "user", "content": "Tell me about Paris. " * 20}, {"role": "assistant", "content": "Paris is big. " * 20}]
    b = post(client, "/v1/inspect/budget", {"system": "Be brief.", "history": history, "current": "And Rome?", "reserve": 100})
    sec = {s["name"]: s["tokens"] for s in b["sections"]}
    assert b["window"] == srv.state.max_len and sec["reserved for response"] == 100
    assert sum(sec.values()) == b["total"] == b["prompt_tokens"] + 100
    assert sec["conversation history"] > 0 and b["history_dropped"] == 0
    small = post(client, "/v1/inspect/budget", {"system": "Be brief.", "history": history, "current": "And Rome?", "reserve": 100, "window": 160})
    assert small["history_dropped"] == 2 and small["total"] <= 160
    e = error(client, "/v1/inspect/budget", {"current": "And Rome?", "reserve": 2000, "window": 1000})
    assert "1000" in e["message"] or "1,000" in e["message"]


def test_model_table_and_counts(client):
    r = client.get("/v1/inspect/model")
    assert r.status_code == 200
    m = r.json()
    assert m["total"]["params"] == 134_515_008
    assert m["memory_by_format"]["fp32"] == 4 * 134_515_008 and m["memory_by_format"]["int4"] == 134_515_008 // 2
    assert m["architecture"]["n_layers"] == 30 and m["max_model_len"] == 1024
    # the served format keeps the file's quantized blocks: far less than float32
    assert m["total"]["stored_bytes"] < m["served_bytes"] < m["memory_by_format"]["fp32"]


def test_system_prompt_with_a_style(client):
    styles = client.get("/v1/inspect/styles").json()
    assert "concise" in styles["dimensions"]["length"] and styles["skeletons"]
    r = post(client, "/v1/inspect/system", {"system": "You are Ada.", "style": {"length": "concise", "max_words": 40}})
    text = r["messages"][0]["content"]
    assert text.startswith("You are Ada.\n\n") and "under 40 words" in text
    assert post(client, "/v1/inspect/system", {"style": {}})["messages"] == []
    assert error(client, "/v1/inspect/system", {"style": {"length": "tiny"}})["param"] == "style.length"
    assert error(client, "/v1/inspect/system", {"style": {"colour": "red"}})["param"] == "style"


def test_bad_input_is_a_400_naming_the_field(client):
    assert error(client, "/v1/inspect/next-token", {"prompt": "word " * 300})["code"] == "too_long_to_inspect"
    assert error(client, "/v1/inspect/attention", {"prompt": "hi", "tokens": [1]})["param"] == "prompt"
    assert error(client, "/v1/inspect/attention", {"prompt": "hi", "layer": 30})["param"] == "layer"
    assert error(client, "/v1/inspect/next-token", {"prompt": "hi", "top_p": 0})["param"] == "top_p"
    assert error(client, "/v1/inspect/next-token", {"prompt": "hi", "logit_bias": {"999999": 5}})["param"] == "logit_bias"
    assert error(client, "/v1/inspect/next-token", {"prompt": "hi", "generated": [-1]})["param"] == "generated"
    assert error(client, "/v1/inspect/next-token", {"prompt": "hi", "top": 0})["param"] == "top"
    assert error(client, "/v1/inspect/lens", {"prompt": "hi", "target": " Paris is"})["param"] == "target"
    assert error(client, "/v1/inspect/lens", {"prompt": "hi", "colour": 1})["param"] == "colour"
    assert error(client, "/v1/inspect/token-ids", {"pieces": ["no such token at all"]})["param"] == "pieces[0]"


def test_streams_are_unchanged_while_inspecting(client, srv):
    """Inspections during a stream: the stream's tokens equal a solo run, and the engine kept its fused path."""
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 24}
    solo = post(client, "/v1/chat/completions", body)["choices"][0]["message"]["content"]
    done = threading.Event()
    results = []

    def inspect() -> None:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            while not done.is_set():
                results.append(c.post("/v1/inspect/lens", json={"messages": QUESTION, "last": 4}).status_code)

    t = threading.Thread(target=inspect)
    t.start()
    try:
        text = ""
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    import json

                    for ch in json.loads(line[6:])["choices"]:
                        text += ch["delta"].get("content") or ""
    finally:
        done.set()
        t.join(120)
    assert text == solo
    assert results and set(results) == {200}
    assert srv.state.llm.engine.fused()


def test_steering_compare_and_make(client, srv):
    """steer/make saves a vector in the server's folder; steer continues the context without
    and with it through the engine: the plain side is the server's own greedy answer, scale 0
    makes both sides equal, and bad input is a 400 naming the field."""
    made = post(client, "/v1/inspect/steer/make", {
        "name": "joy", "layers": "4-12",
        "positive": ["I love this, it is wonderful!", "What a joyful, fantastic day.", "This is the best thing ever."],
        "negative": ["I hate this, it is awful.", "What a miserable, terrible day.", "This is the worst thing ever."]})  # fmt: skip
    assert made["layers"] == list(range(4, 13)) and str(made["best_layer"]) in made["separation"]
    assert Path(srv.steer_dir, "joy.gguf").is_file()
    assert error(client, "/v1/inspect/steer/make", {"name": "joy", "positive": ["a"], "negative": ["b"]})["param"] == "name"
    listed = client.get("/v1/steering").json()["data"]
    assert [v["name"] for v in listed] == ["joy"]
    body = {"messages": QUESTION, "max_tokens": 12}
    r = post(client, "/v1/inspect/steer", {**body, "steer": [{"vector": "joy", "layers": [6, 7, 8, 9, 10], "scale": 0.5}]})
    served = post(client, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0})
    assert r["plain"]["text"] == served["choices"][0]["message"]["content"]
    assert not r["same"] and r["steered"]["text"] != r["plain"]["text"]
    assert len(r["plain"]["top"]) == 8 and abs(sum(c["p"] for c in r["plain"]["top"])) <= 1.0001
    zero = post(client, "/v1/inspect/steer", {**body, "steer": "joy:0"})
    assert zero["same"] and zero["steered"]["text"] == r["plain"]["text"]
    assert "no direction for layer 2" in error(client, "/v1/inspect/steer", {**body, "steer": "joy@2"})["message"]
