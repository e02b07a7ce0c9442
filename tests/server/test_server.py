"""The HTTP server on the real default model, driven by the real openai and anthropic clients.

One live server (uvicorn on 127.0.0.1, a free port, a thread of this process) serves the
whole module from the session's float32 weights; its engine is its own (max_batch 16).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.real

MODEL = "smollm2-135m-instruct"
KEY = "test-key"
CHAT = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Name three fruits."}]


@pytest.fixture(scope="module")
def srv(real_lm):
    from pellucid.api import LLM
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    cfg = ServerConfig(model=MODEL, api_key=KEY, dtype="float32", max_batch=16, max_len=2048)
    app = create_app(cfg, loader=lambda c: LLM(loaded=real_lm, max_batch=c.max_batch, max_len=c.max_len))
    s = ServerThread(app).start()
    assert s.wait_ready(120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oa(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def an(srv):
    return anthropic.Anthropic(base_url=srv.url, api_key=KEY, max_retries=0, timeout=120)


def metrics(srv) -> dict[str, float]:
    from pellucid.server.metrics import parse_metrics

    return parse_metrics(httpx.get(f"{srv.url}/metrics").text)


def wait_idle(srv, timeout: float = 30) -> dict[str, float]:
    t = time.monotonic()
    while True:
        m = metrics(srv)
        if m["pellucid_requests_running"] == 0 and m["pellucid_requests_waiting"] == 0:
            return m
        assert time.monotonic() - t < timeout, m
        time.sleep(0.05)


# -- OpenAI chat ----------------------------------------------------------------------------
def test_chat_same_as_python_api(oa, real_llm):
    """Same seed and parameters: the same text and token counts as LLM.chat."""
    kw = dict(temperature=0.8, top_p=0.9, seed=1234, max_tokens=12)
    r = oa.chat.completions.create(model=MODEL, messages=CHAT, **kw)
    ref = real_llm.chat(CHAT, **kw)
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert c.message.content == ref.text
    assert c.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens == len(real_llm.encode_prompt(real_llm.render_chat(CHAT)))
    assert r.usage.completion_tokens == ref.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL and r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_stream_with_usage(oa, real_llm):
    kw = dict(temperature=0.7, seed=7, max_tokens=10)
    chunks = list(oa.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                             stream_options={"include_usage": True}, **kw))  # fmt: skip
    ref = real_llm.chat(CHAT, **kw)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref.text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == ref.completion_tokens
    assert chunks[-1].usage.prompt_tokens == ref.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_stream_without_usage(oa):
    chunks = list(oa.chat.completions.create(model=MODEL, messages=CHAT, stream=True, max_tokens=4, temperature=0))
    assert all(ch.usage is None for ch in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_chat_penalties_and_extras(oa, real_llm):
    """frequency/presence penalties and the extras (top_k, min_p, repetition_penalty) reach the sampler."""
    kw = dict(temperature=0.9, seed=5, max_tokens=12, frequency_penalty=1.5, presence_penalty=0.5)
    extras = dict(top_k=20, min_p=0.05, repetition_penalty=1.3)
    r = oa.chat.completions.create(model=MODEL, messages=CHAT, extra_body=extras, **kw)
    ref = real_llm.chat(CHAT, **kw, **extras)
    assert r.choices[0].message.content == ref.text
    # top_k=1 is greedy whatever the temperature
    g = oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.5, extra_body={"top_k": 1})
    assert g.choices[0].message.content == real_llm.chat(CHAT, max_tokens=8, temperature=0).text


def test_typical_p_reaches_the_sampler_through_every_api(oa, an, real_llm):
    """typical_p, an extra (extra_body): the same text as the Python API with the same seed,
    through chat, completions, responses and messages; and a different one than without it."""
    kw = dict(temperature=1.0, max_tokens=16, seed=11)
    ref = real_llm.chat(CHAT, typical_p=0.2, **kw).text
    assert ref != real_llm.chat(CHAT, **kw).text  # it changes what this seed draws
    r = oa.chat.completions.create(model=MODEL, messages=CHAT, extra_body={"typical_p": 0.2}, **kw)
    assert r.choices[0].message.content == ref
    resp = oa.responses.create(model=MODEL, input=CHAT, temperature=1.0, max_output_tokens=16,
                               extra_body={"typical_p": 0.2, "seed": 11})  # fmt: skip
    assert resp.output_text == ref
    m = an.messages.create(model=MODEL, messages=CHAT[1:], system=CHAT[0]["content"], max_tokens=16,
                           extra_body={"typical_p": 0.2, "temperature": 1.0, "seed": 11})  # fmt: skip
    assert m.content[0].text == ref
    text = real_llm.generate("The capital of France is", typical_p=0.2, **kw).text
    c = oa.completions.create(model=MODEL, prompt="The capital of France is", extra_body={"typical_p": 0.2}, **kw)
    assert c.choices[0].text == text
    with pytest.raises(openai.BadRequestError, match="typical_p"):
        oa.chat.completions.create(model=MODEL, messages=CHAT, extra_body={"typical_p": 0})


def test_chat_logit_bias(oa, real_llm):
    greedy = real_llm.chat(CHAT, max_tokens=3, temperature=0)
    first = greedy.token_ids[0]
    r = oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logit_bias={str(first): -100})
    assert r.choices[0].message.content != greedy.text
    assert r.choices[0].message.content == real_llm.chat(CHAT, max_tokens=3, temperature=0, logit_bias={first: -100}).text
    forced = real_llm.tokenizer.single_token_id(" banana")
    f = oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=0, logit_bias={str(forced): 100})
    assert f.choices[0].message.content == " banana banana"


def test_chat_stop_and_max_completion_tokens(oa, real_llm):
    full = real_llm.chat(CHAT, max_tokens=24, temperature=0).text
    word = full.split()[3]
    for stop in (word, [word, "zzzz"]):
        r = oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stop=stop)
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == full[: full.index(word)]
    s = oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stop=word, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in s) == full[: full.index(word)]
    m = oa.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=5, temperature=0)
    assert m.choices[0].finish_reason == "length" and m.usage.completion_tokens == 5


def test_chat_n_choices_use_consecutive_seeds(oa, real_llm):
    kw = dict(temperature=1.0, max_tokens=8)
    r = oa.chat.completions.create(model=MODEL, messages=CHAT, n=3, seed=40, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    refs = [real_llm.chat(CHAT, seed=40 + i, **kw) for i in range(3)]
    assert [c.message.content for c in r.choices] == [x.text for x in refs]
    assert r.usage.completion_tokens == sum(x.completion_tokens for x in refs)
    assert r.usage.prompt_tokens == refs[0].prompt_tokens
    s = oa.chat.completions.create(model=MODEL, messages=CHAT, n=3, seed=40, stream=True, **kw)
    texts = ["", "", ""]
    for ch in s:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [x.text for x in refs]


def test_chat_logprobs(oa, real_llm):
    r = oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    ref = real_llm.chat(CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(ref.logprobs) == 6
    tok = real_llm.tokenizer
    for e, t in zip(content, ref.logprobs, strict=True):
        assert bytes(e.bytes) == tok.token_bytes(t.token)
        assert e.logprob == pytest.approx(t.logprob, abs=1e-4) and e.logprob <= 0
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the most likely one
    assert "".join(bytes(e.bytes).decode() for e in content) == r.choices[0].message.content
    s = oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for ch in s if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_chat_response_format(oa):
    r = oa.chat.completions.create(
        model=MODEL, max_tokens=40, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Return a JSON object with the keys name and color of a cat."}],
    )  # fmt: skip
    assert isinstance(json.loads(r.choices[0].message.content), dict) and r.choices[0].finish_reason == "stop"
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
              "required": ["name", "age"]}  # fmt: skip
    r = oa.chat.completions.create(
        model=MODEL, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}},
        messages=[{"role": "user", "content": "A cat, as JSON."}],
    )  # fmt: skip
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)
    assert r.choices[0].finish_reason == "stop"


def test_schema_check_said_streamed_as_whole(oa):
    """A oneOf whose branches overlap is generated as anyOf; an answer matching both is
    flagged with schema_error, in the whole answer and in a stream's last chunk alike."""
    schema = {"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "string", "minLength": 2}]}},
              "required": ["a"]}  # fmt: skip
    kw = dict(model=MODEL, max_tokens=40, temperature=0, messages=[{"role": "user", "content": "Give me a word in JSON."}],
              response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}})  # fmt: skip
    whole = oa.chat.completions.create(**kw).choices[0]
    chunks = list(oa.chat.completions.create(**kw, stream=True))
    last = chunks[-1].choices[0]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.message.content
    assert whole.finish_reason == last.finish_reason == "stop"
    said = getattr(whole.message, "schema_error", None)
    assert said == getattr(last, "schema_error", None)
    assert (said is not None) == (len(json.loads(whole.message.content)["a"]) >= 2), (whole.message.content, said)


# -- OpenAI completions -----------------------------------------------------------------------
def test_completions(oa, real_llm):
    kw = dict(temperature=0.6, seed=11, max_tokens=8)
    r = oa.completions.create(model=MODEL, prompt="The capital of France is", **kw)
    ref = real_llm.generate("The capital of France is", **kw)
    assert r.choices[0].text == ref.text and r.object == "text_completion"
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == ref.completion_tokens
    # token ids, and several prompts at once
    ids = real_llm.encode_prompt("The capital of France is")
    assert oa.completions.create(model=MODEL, prompt=ids, **kw).choices[0].text == ref.text
    multi = oa.completions.create(model=MODEL, prompt=["The capital of France is", "One, two,"], temperature=0, max_tokens=4)
    assert [c.index for c in multi.choices] == [0, 1]
    assert multi.choices[1].text == real_llm.generate("One, two,", temperature=0, max_tokens=4).text
    # the legacy default is 16 tokens
    d = oa.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True})
    assert d.usage.completion_tokens == 16


def test_completions_stream_and_logprobs(oa, real_llm):
    r = oa.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) == 2 and max(t.values()) == pytest.approx(v, abs=1e-5) for t, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    chunks = list(oa.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=5, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-2].choices[0].finish_reason == "length"


def test_models(oa):
    models = oa.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert oa.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-4o")


# -- Anthropic ----------------------------------------------------------------------------------
def test_messages_same_as_python_api(an, real_llm):
    msgs = [{"role": "user", "content": "Name three fruits."}]
    kw = dict(temperature=0.8, top_p=0.95, top_k=40)
    # anthropic>=2 has no typed temperature/top_p/top_k: they go as body fields
    m = an.messages.create(model=MODEL, max_tokens=12, system="You are a helpful assistant.", messages=msgs,
                           extra_body={"seed": 99, **kw})  # fmt: skip
    ref = real_llm.chat(CHAT, max_tokens=12, seed=99, **kw)
    assert m.content[0].type == "text" and m.content[0].text == ref.text
    assert m.role == "assistant" and m.type == "message" and m.id.startswith("msg_")
    # Anthropic counts prompt tokens read from the (prefix) cache apart from those computed
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == ref.prompt_tokens
    assert m.usage.output_tokens == ref.completion_tokens
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None


def test_messages_stop_reasons(an, real_llm):
    msgs = [{"role": "user", "content": "Say hello."}]
    full = real_llm.chat(msgs, max_tokens=200, temperature=0)
    assert full.finish_reason == "stop"
    m = an.messages.create(model=MODEL, max_tokens=200, messages=msgs, extra_body={"temperature": 0})
    assert m.stop_reason == "end_turn" and m.content[0].text == full.text
    word = full.text.split()[1]
    s = an.messages.create(model=MODEL, max_tokens=200, messages=msgs, stop_sequences=[word], extra_body={"temperature": 0})
    assert s.stop_reason == "stop_sequence" and s.stop_sequence == word
    assert s.content[0].text == full.text[: full.text.index(word)]
    # content as a list of text blocks, and a prefill the answer continues
    head = full.text.split(" ")[0]
    b = an.messages.create(model=MODEL, max_tokens=5, extra_body={"temperature": 0},
                           messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]},
                                     {"role": "assistant", "content": head}])  # fmt: skip
    assert b.content[0].text and full.text[len(head) :].startswith(b.content[0].text)


def test_messages_stream_events(srv, an, real_llm):
    msgs = [{"role": "user", "content": "Name three fruits."}]
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0, "messages": msgs, "stream": True}
    names, deltas, data = [], [], []
    with httpx.stream("POST", f"{srv.url}/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                names.append(line[7:])
            elif line.startswith("data: "):
                data.append(json.loads(line[6:]))
                if data[-1]["type"] == "content_block_delta":
                    deltas.append(data[-1]["delta"]["text"])
    k = names.index("content_block_stop")
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:k]) == {"content_block_delta"} and names[k:] == ["content_block_stop", "message_delta", "message_stop"]
    assert [d["type"] for d in data] == names
    ref = real_llm.chat(msgs, max_tokens=8, temperature=0)
    assert "".join(deltas) == ref.text
    assert data[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    usage = data[0]["message"]["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == ref.prompt_tokens
    assert data[-2]["usage"]["output_tokens"] == 8 and data[-2]["usage"]["input_tokens"] == usage["input_tokens"]
    with an.messages.stream(model=MODEL, max_tokens=8, messages=msgs, extra_body={"temperature": 0}) as st:
        text = "".join(st.text_stream)
        final = st.get_final_message()
    assert text == ref.text == final.content[0].text and final.stop_reason == "max_tokens"


def test_count_tokens(an, real_llm):
    msgs = [{"role": "user", "content": "Name three fruits."}]
    n = an.messages.count_tokens(model=MODEL, system="You are a helpful assistant.", messages=msgs)
    assert n.input_tokens == len(real_llm.encode_prompt(real_llm.render_chat(CHAT)))


# -- tokens, health, metrics ------------------------------------------------------------------------
def test_tokenize_detokenize(srv, real_llm):
    h = {"authorization": f"Bearer {KEY}"}
    t = httpx.post(f"{srv.url}/tokenize", json={"prompt": "Hello world"}, headers=h).json()
    ids = real_llm.tokenizer.encode("Hello world")
    assert t["tokens"] == ids and t["count"] == len(ids) and t["max_model_len"] == 2048
    assert t["pieces"] == ["Hello", " world"]
    c = httpx.post(f"{srv.url}/tokenize", json={"messages": CHAT}, headers=h).json()
    assert c["count"] == len(real_llm.encode_prompt(real_llm.render_chat(CHAT)))
    d = httpx.post(f"{srv.url}/detokenize", json={"tokens": ids}, headers=h).json()
    assert d["text"] == d["prompt"] == "Hello world" and d["count"] == 2 and d["pieces"] == ["Hello", " world"]
    info = httpx.get(f"{srv.url}/tokenizer_info", headers=h).json()  # vLLM's shape, for lm-eval's remote tokenizer
    tok = real_llm.tokenizer
    assert info["eos_token"] == tok.piece(tok.eos_id) and info["vocab_size"] == tok.vocab_size
    assert info["chat_template"] == real_llm.chat_template.source and info["model_max_length"] == 2048
    assert httpx.get(f"{srv.url}/tokenizer_info").status_code == 401  # behind the key like the rest
    bad = httpx.post(f"{srv.url}/detokenize", json={"tokens": [10**9]}, headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_health_and_metrics(srv, oa):
    h = httpx.get(f"{srv.url}/health")
    assert h.status_code == 200 and h.json()["status"] == "ready"
    before = metrics(srv)
    oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0)
    m = metrics(srv)
    assert m["pellucid_generation_tokens_total"] - before["pellucid_generation_tokens_total"] == 3
    assert m["pellucid_prompt_tokens_total"] > before["pellucid_prompt_tokens_total"]
    assert m["pellucid_time_to_first_token_seconds_count"] == before["pellucid_time_to_first_token_seconds_count"] + 1
    assert m["pellucid_time_per_output_token_seconds_count"] >= before["pellucid_time_per_output_token_seconds_count"] + 2
    for name in ("pellucid_requests_running", "pellucid_requests_waiting", "pellucid_kv_cache_usage_ratio",
                 "pellucid_requests_aborted_total", 'pellucid_http_requests_total{path="/v1/chat/completions",status="200"}'):  # fmt: skip
        assert name in m
    text = httpx.get(f"{srv.url}/metrics").text
    assert "# TYPE pellucid_time_to_first_token_seconds histogram" in text


# -- continuous batching ------------------------------------------------------------------------------
def test_sixteen_concurrent_streams_match_solo_greedy(srv, real_llm):
    """16 streaming clients at once: each gets complete output, token for token its solo greedy output."""
    prompts = [f"Write the number {i} in words, then count from {i} to {i + 5}." for i in range(16)]
    solo = [real_llm.chat([{"role": "user", "content": p}], max_tokens=12, temperature=0) for p in prompts]
    client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=300)
    peak = []

    async def one(p):
        s = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 logprobs=True)  # fmt: skip
        text, ids, usage, finish = "", [], None, None
        async for ch in s:
            if ch.usage:
                usage = ch.usage
            for c in ch.choices:
                text += c.delta.content or ""
                finish = c.finish_reason or finish
                if c.logprobs:
                    ids += [e.bytes for e in c.logprobs.content]
        return text, ids, usage, finish

    async def watch():
        while True:
            peak.append((await asyncio.to_thread(metrics, srv))["pellucid_requests_running"])
            await asyncio.sleep(0.05)

    async def run_all():
        w = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            w.cancel()

    results = asyncio.run(run_all())
    tok = real_llm.tokenizer
    for (text, ids, usage, finish), ref in zip(results, solo, strict=True):
        assert text == ref.text
        assert finish == ref.finish_reason
        assert usage.completion_tokens == ref.completion_tokens
        want = [list(tok.token_bytes(t)) for t in ref.token_ids if t not in tok.eog_ids]
        assert ids == want
    assert max(peak) > 1  # they did share the batch


def test_client_disconnect_stops_generation(srv, oa):
    """A streaming client that goes away mid-stream: its request is aborted and its slot freed."""
    before = wait_idle(srv)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 1500, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
            if got == 3:
                assert metrics(srv)["pellucid_requests_running"] == 1
            if got >= 4:
                break  # dropping the line iterator closes the connection: the client is gone
    m = wait_idle(srv)
    assert m["pellucid_requests_aborted_total"] == before["pellucid_requests_aborted_total"] + 1
    t = time.monotonic()  # aborted while a forward wrote its positions, the slot goes back when that forward ends
    while m["pellucid_kv_cache_slots_used"] != 0:
        assert time.monotonic() - t < 10, m
        time.sleep(0.05)
        m = metrics(srv)
    generated = m["pellucid_generation_tokens_total"] - before["pellucid_generation_tokens_total"]
    assert generated < 1000  # stopped long before max_tokens
    time.sleep(0.3)
    assert metrics(srv)["pellucid_generation_tokens_total"] == m["pellucid_generation_tokens_total"]
    # the server keeps serving
    r = oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_non_streaming_disconnect_stops_generation(srv):
    before = wait_idle(srv)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=1.0)
    m = wait_idle(srv)
    assert m["pellucid_requests_aborted_total"] == before["pellucid_requests_aborted_total"] + 1
    assert m["pellucid_generation_tokens_total"] - before["pellucid_generation_tokens_total"] < 1000


# -- errors ---------------------------------------------------------------------------------------------
def test_auth(srv):
    bad_oa = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    bad_an = anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad_an.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body == {"type": "error", "error": {"type": "authentication_error", "message": "Incorrect API key provided"}}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(f"{srv.url}/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(f"{srv.url}/health").status_code == 200  # open


def test_unknown_model_404(oa, an):
    with pytest.raises(openai.NotFoundError) as e:
        oa.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert "gpt-4o" in e.value.body["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        an.messages.create(model="claude-unknown-1", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"temperature": 500}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 300}}, "logit_bias"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"extra_body": {"top_k": -3}}, "top_k"),
        ({"extra_body": {"min_p": 2}}, "min_p"),
        ({"extra_body": {"tools_typo": 1}}, "tools_typo"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"temperature": "hot"}, "temperature"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ],
)  # fmt: skip
def test_invalid_parameter_400(oa, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=MODEL, messages=CHAT, **{"max_tokens": 2, **kw})
    body = e.value.body
    assert e.value.status_code == 400 and body["type"] == "invalid_request_error" and body["param"] == param
    assert param.split(".")[0] in body["message"]


def test_invalid_parameter_400_anthropic(an):
    msgs = [{"role": "user", "content": "hi"}]
    for kw, word in (({"temperature": 1.5}, "temperature"), ({"top_k": -1}, "top_k"), ({"stop_sequences": [""]}, "stop")):
        with pytest.raises(anthropic.BadRequestError) as e:
            an.messages.create(model=MODEL, max_tokens=2, messages=msgs, extra_body=kw)
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
        assert word in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        an.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}])
    assert "image" in e.value.body["error"]["message"]


def test_context_length_exceeded(oa, an):
    long = "word " * 2100
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded" and "2048" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5000)
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "max_tokens"
    assert "5000" in body["message"] and "2048" in body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=MODEL, prompt=long, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    with pytest.raises(anthropic.BadRequestError) as e:
        an.messages.create(model=MODEL, max_tokens=4000, messages=[{"role": "user", "content": "hi"}])
    assert "2048" in e.value.body["error"]["message"]


def test_malformed_bodies(srv):
    h = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    r = httpx.post(f"{srv.url}/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": [5, 10**7]}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "10000000" in r.json()["error"]["message"]
    r = httpx.post(f"{srv.url}/v1/nothing", json={}, headers=h)
    assert r.status_code == 404 and "error" in r.json()
