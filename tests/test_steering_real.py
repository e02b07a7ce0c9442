"""Steering and capture on the real default model: the file format, fidelity against
transformers in float32, the guarantees in the default format (rows equal alone, scale 0 equal
to none, the prefix cache kept apart), the CLI, and the server with the real openai and
anthropic clients."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from pellucid import steering
from pellucid.errors import PellucidError
from pellucid.steering import SteeringVector

POSITIVE = ["I love this, it is wonderful and makes me so happy!", "What a fantastic, joyful day, everything is great.",
            "This is the best thing ever, I am delighted.", "Such a lovely surprise, thank you so much!"]  # fmt: skip
NEGATIVE = ["I hate this, it is awful and makes me so sad.", "What a terrible, miserable day, everything is bad.",
            "This is the worst thing ever, I am furious.", "Such a nasty shock, I am so upset."]  # fmt: skip
PROMPT = "Tell me about your weekend."
LONG = "You are a helpful assistant for a bookshop. Answer briefly and politely, in one sentence. " * 2


@pytest.fixture(scope="module")
def llm(real_path):
    """The default model in its default format, as `pellucid serve` runs it."""
    from pellucid.api import LLM

    return LLM("smollm2-135m-instruct", max_batch=4, max_len=1024)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, llm):
    d = tmp_path_factory.mktemp("steering")
    llm.make_steering_vector(POSITIVE, NEGATIVE, name="happy").save(d / "happy.gguf")
    return d


@pytest.fixture(scope="module")
def happy(folder):
    return SteeringVector.load(folder / "happy.gguf")


def test_control_vector_file_has_llama_cpps_layout(happy, folder, llm):
    import gguf

    r = gguf.GGUFReader(folder / "happy.gguf")
    fields = {f.name: f for f in r.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert bytes(fields["controlvector.model_hint"].parts[-1]).decode() == llm.config.arch
    assert int(fields["controlvector.layer_count"].parts[-1][0]) == llm.config.n_layers - 1
    names = sorted(int(t.name.split(".")[1]) for t in r.tensors)
    assert names == list(range(1, llm.config.n_layers))  # direction.N for block N, none for block 0
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [llm.config.d_model] for t in r.tensors)
    again = SteeringVector.load(folder / "happy.gguf")
    assert all(torch.equal(again.directions[i], happy.directions[i]) for i in happy.layers)
    assert happy.meta["method"] == "mean_difference" and happy.meta["positives"] == len(POSITIVE)
    with pytest.raises(PellucidError, match="block 0"):
        SteeringVector({0: torch.ones(4)}).save(folder / "bad.gguf")
    assert not (folder / "bad.gguf").exists()


@pytest.fixture(scope="module")
def hf(real_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(real_path.parent, gguf_file=real_path.name, dtype=torch.float32).eval()


def test_steering_in_float32_equals_a_transformers_hook(real_llm, hf, happy):
    """The same vector added after the same block in transformers (a forward hook): same logits."""
    layer, scale = 9, 4.0
    vec = happy.directions[layer]

    def add(module, args, out):
        return (out[0] + scale * vec,) + tuple(out[1:]) if isinstance(out, tuple) else out + scale * vec

    ids = real_llm.tokenizer.encode(real_llm.render_chat([{"role": "user", "content": PROMPT}]))
    handle = hf.model.layers[layer].register_forward_hook(add)
    try:
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].double(), -1)
            ref_text = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    finally:
        handle.remove()
    item = {"vector": happy, "layers": [layer], "scale": scale}
    ours = real_llm.generate(ids, max_tokens=1, temperature=0, logprobs=True, top_logprobs=20, steer=item).logprobs[0]
    worst = max(abs(lp - float(ref[tok])) for tok, lp in ours.top)
    assert worst <= 1e-3, worst
    plain = real_llm.generate(ids, max_tokens=12, temperature=0, ignore_eos=True)
    steered = real_llm.generate(ids, max_tokens=12, temperature=0, ignore_eos=True, steer=item)
    assert steered.token_ids == ref_text and steered.token_ids != plain.token_ids


def test_capture_equals_transformers_hidden_states(real_llm, hf):
    ids = real_llm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    with torch.no_grad():
        hs = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states  # [embeddings, after block 0, ...]
    c = real_llm.generate(ids, max_tokens=1, temperature=0, capture={"layers": [3, 17], "positions": "all"})
    assert c.capture_positions == list(range(len(ids)))
    for layer in (3, 17):
        ref = hs[layer + 1][0]
        got = c.activations[layer]
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-3 * ref.abs().max(), layer


def test_default_format_rows_equal_alone_and_scale_zero_is_none(llm, happy):
    """A batch with steered and plain rows: each row's tokens and log-probabilities equal its
    run alone, bit for bit; scale 0 equals no steering bit for bit."""
    from pellucid.sampling.params import SamplingParams

    p = SamplingParams(max_tokens=16, temperature=0, logprobs=True, ignore_eos=True)
    text = llm.render_chat([{"role": "user", "content": PROMPT}])
    specs = [{"vector": happy, "layers": [8, 9, 10], "scale": 3.0}, None, {"vector": happy, "layers": [12], "scale": -5.0}]

    def run(batch):
        reqs = [llm.request(text, p, steer=s) for s in batch]
        return [(c.token_ids, [lp.logprob for lp in c.logprobs]) for c in llm._run_batch(reqs, [text] * len(reqs))]

    together = run(specs)
    alone = [run([s])[0] for s in specs]
    assert together == alone
    assert together[0][0] != together[1][0] and together[2][0] != together[1][0]
    zero = run([{"vector": happy, "layers": [8, 9, 10], "scale": 0}])[0]
    assert zero == alone[1]


def test_prefix_cache_keeps_steered_and_plain_apart(llm, happy):
    from pellucid.sampling.params import SamplingParams

    assert llm.engine.prefix_cache
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    text = llm.render_chat([{"role": "system", "content": LONG}, {"role": "user", "content": PROMPT}])
    item = {"vector": happy, "layers": [10], "scale": 4.0}
    stats = llm.engine.stats

    def one(steer):
        before = stats.prefix_hit_tokens
        c = llm._run_batch([llm.request(text, p, steer=steer)], [text])[0]
        return c.token_ids, stats.prefix_hit_tokens - before

    plain, _ = one(None)
    steered, hit = one(item)
    assert hit == 0  # a steered prompt never takes keys and values computed without its vector
    again, hit_again = one(item)
    assert hit_again > 0 and again == steered  # the same steering reuses its own, same tokens
    plain_again, hit_plain = one(None)
    assert plain_again == plain
    other = {"vector": happy, "layers": [10], "scale": 4.5}
    before = stats.prefix_hit_tokens
    llm._run_batch([llm.request(text, p, steer=other)], [text])
    assert stats.prefix_hit_tokens == before


def test_bad_steering_is_refused_clearly(llm, happy, folder):
    lib = steering.SteeringLibrary(folder)
    cfg = llm.config
    cases = [
        ({"vector": [0.0] * 10, "layers": [3]}, "576 numbers"),
        ({"vector": "happy", "layers": [0]}, "no direction for layer 0"),
        ({"vector": "happy", "layers": [40]}, "no direction for layer 40"),
        ({"vector": [0.0] * cfg.d_model, "layers": [30]}, "layers are 0..29"),
        ({"vector": "hapy"}, "did you mean 'happy'"),
        ({"vector": "happy", "scale": float("nan")}, "finite"),
        ({"vector": "happy", "strength": 2}, "unknown steer field 'strength'"),
        ("happy:x", "not a number"),
    ]
    for spec, words in cases:
        with pytest.raises(PellucidError, match=words):
            steering.resolve(spec, cfg, lib)
    other = SteeringVector({i: v for i, v in happy.directions.items()}, happy.model_hint, {**happy.meta, "n_layers": 24}, "other")
    with pytest.raises(PellucidError, match="24-layer model"):
        steering.resolve({"vector": other}, cfg, lib)
    wide = SteeringVector({1: torch.zeros(960)}, "llama", {}, "wide")
    with pytest.raises(PellucidError, match="960 wide"):
        steering.resolve({"vector": wide}, cfg, lib)
    with pytest.raises(PellucidError, match="at most"):
        llm.request("hello " * 600, llm_params(), capture={"layers": list(range(30)), "positions": "all"})
    with pytest.raises(PellucidError, match="outside the prompt"):
        llm.request("hello", llm_params(), capture={"layers": [1], "positions": [50]})


def llm_params():
    from pellucid.sampling.params import SamplingParams

    return SamplingParams(max_tokens=1)


def test_cli_make_list_show_and_generate(tmp_path):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(POSITIVE) + "\n")
    neg.write_text("\n".join(NEGATIVE) + "\n")
    d = tmp_path / "vectors"

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "pellucid", *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    made = cli("steer", "make", "joy", "--positive", str(pos), "--negative", str(neg), "--layers", "4-12", "--dir", str(d),
               "--plot", str(tmp_path / "joy.png"))  # fmt: skip
    assert "saved" in made and "separate most after layer" in made
    assert (tmp_path / "joy.png").read_bytes()[:4] == b"\x89PNG"
    assert "joy" in cli("steer", "list", "--dir", str(d))
    shown = cli("steer", "show", str(d / "joy.gguf"))
    assert "layers 4-12" in shown
    plain = cli("generate", "Today I feel", "--max-tokens", "12")
    zero = cli("generate", "Today I feel", "--max-tokens", "12", "--steer", f"{d / 'joy.gguf'}:0")
    steered = cli("generate", "Today I feel", "--max-tokens", "12", "--steer", f"{d / 'joy.gguf'}:6@8-10")
    assert zero == plain and steered != plain
    bad = subprocess.run([sys.executable, "-m", "pellucid", "generate", "hi", "--steer", f"{d / 'joy.gguf'}@40"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 1 and "no direction for layer 40" in bad.stderr


# -- the server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llm, folder):
    from pellucid.api import LLM
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig
    from pellucid.steering import SteeringLibrary

    cfg = ServerConfig(model="smollm2-135m-instruct", max_batch=4, max_len=1024, steer_dir=str(folder))
    # its own engine over the same loaded weights: the test's local calls step `llm`'s engine
    # from this thread, and one engine stepped by two threads mixes their requests
    s = ServerThread(create_app(cfg, loader=lambda c: LLM(loaded=llm.loaded, max_batch=c.max_batch, max_len=c.max_len))).start()
    llm.steering = SteeringLibrary(folder)  # the local references read the server's vectors
    assert s.wait_ready(120)
    yield s
    s.stop()


def test_server_steers_with_the_openai_and_anthropic_clients(server, llm):
    import anthropic
    import openai

    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    msgs = [{"role": "user", "content": PROMPT}]
    steer = [{"vector": "happy", "layers": [8, 9, 10], "scale": 3}]
    plain = oc.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=16, temperature=0)
    steered = oc.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=16, temperature=0,
                                         extra_body={"steer": steer})  # fmt: skip
    local = llm.chat(msgs, max_tokens=16, temperature=0, steer=steer)
    assert steered.choices[0].message.content == local.text != plain.choices[0].message.content
    streamed = oc.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=16, temperature=0,
                                          stream=True, extra_body={"steer": steer})  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == local.text
    comp = oc.completions.create(model="smollm2-135m-instruct", prompt="Today I feel", max_tokens=8, temperature=0,
                                 extra_body={"steer": "happy:3@8-10"})  # fmt: skip
    assert comp.choices[0].text == llm.generate("Today I feel", max_tokens=8, temperature=0, steer="happy:3@8-10").text
    resp = oc.responses.create(model="smollm2-135m-instruct", input=PROMPT, max_output_tokens=16, temperature=0,
                               extra_body={"steer": steer})  # fmt: skip
    assert resp.output_text == local.text
    ac = anthropic.Anthropic(base_url=server.url, api_key="x")
    m = ac.messages.create(model="smollm2-135m-instruct", max_tokens=16, messages=msgs, extra_body={"steer": steer, "temperature": 0})
    assert m.content[0].text == local.text


def test_server_capture_and_activations(server, llm):
    import openai

    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    cap = {"layers": [5, 20], "positions": "all"}
    r = oc.completions.create(model="smollm2-135m-instruct", prompt="The quick brown fox", max_tokens=2, temperature=0,
                              extra_body={"capture": cap})  # fmt: skip
    acts = r.model_extra["activations"][0]
    arr = steering.decode(acts)
    local = llm.generate("The quick brown fox", max_tokens=2, temperature=0, capture=cap)
    assert acts["layers"] == [5, 20] and acts["positions"] == local.capture_positions
    ref = torch.stack([local.activations[5], local.activations[20]]).to(torch.float16).numpy()
    assert np.array_equal(arr, ref)
    body = {"input": ["The quick brown fox", "Hello there, friend"], "layers": [5, 20], "positions": "last"}
    got = httpx.post(server.url + "/v1/activations", json=body, timeout=60)
    assert got.status_code == 200 and got.headers["content-type"] == "application/octet-stream"
    from safetensors import safe_open
    from safetensors.torch import load

    tensors = load(got.content)
    assert tensors["activations.0"].shape == (2, 1, llm.config.d_model)
    assert torch.equal(tensors["activations.0"][:, 0], torch.from_numpy(ref[:, -1]))
    path = server_tmp(got.content)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["layers"]) == [5, 20] and json.loads(meta["positions.1"]) == [len(llm.tokenizer.encode("Hello there, friend")) - 1]
    as_json = httpx.post(server.url + "/v1/activations", json={**body, "format": "json"}, timeout=60).json()
    assert np.array_equal(steering.decode(as_json["data"][1]), tensors["activations.1"].numpy())
    listed = httpx.get(server.url + "/v1/steering").json()
    assert [v["name"] for v in listed["data"]] == ["happy"] and listed["data"][0]["fits_model"]


def test_server_capture_on_streams(server, llm):
    """A streamed answer carries the same activations as the whole one: on the finishing chunk
    of each choice (OpenAI), the message_delta event (Anthropic), the completed response (Responses)."""
    import openai

    cap = {"layers": [7], "positions": [0, -1]}
    msgs = [{"role": "user", "content": PROMPT}]
    whole = llm.chat(msgs, max_tokens=4, temperature=0, capture=cap)
    want = torch.stack([whole.activations[7]]).to(torch.float16).numpy()
    oc = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    chunks = list(oc.chat.completions.create(model="smollm2-135m-instruct", messages=msgs, max_tokens=4, temperature=0,
                                             stream=True, extra_body={"capture": cap}))  # fmt: skip
    found = [c.choices[0].model_extra["activations"] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(found) == 1 and found[0]["positions"] == whole.capture_positions
    assert np.array_equal(steering.decode(found[0]), want)

    def events(path: str, body: dict) -> list[dict]:
        with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
            return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]

    base = {"model": "smollm2-135m-instruct", "max_tokens": 4, "temperature": 0, "stream": True, "capture": cap}
    delta = [e for e in events("/v1/messages", {**base, "messages": msgs}) if e["type"] == "message_delta"]
    assert np.array_equal(steering.decode(delta[0]["activations"]), want)
    done = [e for e in events("/v1/responses", {**{k: v for k, v in base.items() if k != "max_tokens"}, "input": PROMPT,
                                                 "max_output_tokens": 4}) if e["type"].startswith("response.") and "response" in e]  # fmt: skip
    assert np.array_equal(steering.decode(done[-1]["response"]["activations"][0]), want)


def server_tmp(data: bytes) -> str:
    import tempfile

    f = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
    f.write(data)
    f.close()
    return f.name


@pytest.mark.parametrize(("extra", "words"), [
    ({"steer": [{"vector": [0.1, 0.2], "layers": [3]}]}, "576 numbers"),
    ({"steer": [{"vector": "happy", "layers": [99]}]}, "no direction for layer 99"),
    ({"steer": "sad:2"}, "no steering vector named 'sad'"),
    ({"capture": {"layers": [31]}}, "out of range"),
])  # fmt: skip
def test_server_refuses_bad_steering_and_keeps_serving(server, extra, words):
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] in ("steer", "capture")
    ok = httpx.post(server.url + "/v1/chat/completions", json={**body, "steer": None, "capture": None, "stream": False}, timeout=60)
    assert ok.status_code == 200
