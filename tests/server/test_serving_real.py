"""Serving under load on the real default model in its default format (int4 blocks, fused CPU
path): one forward per step over many requests, the prefix cache, and 64 concurrent streams
through the real openai client, each equal to its solo greedy run."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from pellucid.sampling.params import SamplingParams

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.real

SYSTEM = ("You are the support assistant of a small bookshop. Answer briefly and politely, and never invent "
          "opening hours, prices or titles that the customer did not mention.")  # fmt: skip
QUESTIONS = ["Do you sell maps?", "Can I order a book by phone?", "Are you open on Sundays?", "Do you buy used books?",
             "Can you gift-wrap a novel?", "Do you have a children's corner?", "Is there parking nearby?",
             "Do you ship abroad?"]  # fmt: skip
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def default_llm(real_path):
    """The real default model as users get it: default format and dtype."""
    from pellucid.api import LLM

    return LLM(str(real_path), max_batch=16, max_len=1024)


def chat_ids(llm, question: str, system: str = SYSTEM, history: list[dict] | None = None) -> list[int]:
    msgs = [{"role": "system", "content": system}, *(history or []), {"role": "user", "content": question}]
    return llm.encode_prompt(llm.render_chat(msgs))


def run_all(engine, prompts: list[list[int]], params: SamplingParams = GREEDY):
    reqs = [engine.add_request(engine.make_request(ids, params)) for ids in prompts]
    while engine.has_unfinished():
        engine.step()
    return reqs


def test_default_format_is_batch_invariant_and_caches_prefixes(default_llm):
    assert default_llm.model.batch_invariant() and default_llm.engine.prefix_cache


def test_prefix_cache_leaves_outputs_unchanged(default_llm):
    """Shared system prompts (running at once), a chat re-sent whole with its reply, n copies of one
    prompt: the same tokens and text with the prefix cache as without, and the cache was used."""
    from pellucid.engine.engine import Engine

    llm = default_llm
    plain = Engine(llm.loaded, max_batch=16, max_len=1024, prefix_cache=False)
    cached = Engine(llm.loaded, max_batch=16, max_len=1024)
    assert cached.prefix_cache and not plain.prefix_cache

    first = [chat_ids(llm, q) for q in QUESTIONS]
    a, b = run_all(plain, first), run_all(cached, first)
    assert [r.output_ids for r in a] == [r.output_ids for r in b]
    assert [r.text for r in a] == [r.text for r in b] and all(r.text for r in b)
    # the first request computes the system prompt; the others copy it from it while it runs
    assert b[0].cached_tokens == 0 and all(r.cached_tokens >= 30 for r in b[1:])

    # the second turn of each chat: the whole conversation again, now with the model's answer
    second = [chat_ids(llm, "Thank you. And on Saturdays?", history=[{"role": "user", "content": q},
                                                                    {"role": "assistant", "content": r.text}])
              for q, r in zip(QUESTIONS, a, strict=True)]  # fmt: skip
    a2, b2 = run_all(plain, second), run_all(cached, second)
    assert [r.output_ids for r in a2] == [r.output_ids for r in b2]
    assert all(r.cached_tokens >= len(p) // 2 for r, p in zip(b2, second, strict=True))

    # n choices of one prompt, sampled: the copies share the prompt, the seeds differ
    ids = chat_ids(llm, "Tell me a joke about books.")
    params = [SamplingParams(max_tokens=10, temperature=0.9, seed=s) for s in (1, 2, 3)]
    outs = []
    for eng in (plain, cached):
        reqs = [eng.add_request(eng.make_request(ids, p)) for p in params]
        while eng.has_unfinished():
            eng.step()
        outs.append(reqs)
    assert [r.output_ids for r in outs[0]] == [r.output_ids for r in outs[1]]
    assert all(r.cached_tokens > 0 for r in outs[1])
    assert cached.stats.prefix_hit_tokens > 0 and plain.stats.prefix_hit_tokens == 0


def test_prefix_cache_evicts_least_recently_used(default_llm):
    """Room kept for two finished conversations: a third evicts the oldest one's prefix, not the newest."""
    from pellucid.engine.engine import Engine

    llm = default_llm
    systems = [f"You are assistant number {i}. You answer in one sentence, in English, about cooking only." for i in range(3)]
    prompts = [chat_ids(llm, "Hello!", system=s) for s in systems]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    kept = [len(p) + params.max_tokens - 1 for p in prompts]  # a finished request keeps all but its last token
    bpt = llm.engine.cache.bytes_per_token
    mib = -(-(kept[1] + kept[2]) * bpt // 2**20)
    eng = Engine(llm.loaded, max_batch=1, max_len=256, prefix_cache=True, prefix_cache_mib=mib)
    assert kept[1] + kept[2] <= eng.cache.held_limit < sum(kept)
    for p in prompts:  # three conversations, one after another: the room holds the last two
        run_all(eng, [p], params)
    assert eng.cache.held_tokens == kept[1] + kept[2]
    again = run_all(eng, [chat_ids(llm, "How do I boil an egg?", system=systems[2])])[0]
    assert again.cached_tokens >= 20  # the newest is still there
    gone = run_all(eng, [chat_ids(llm, "How do I boil an egg?", system=systems[0])])[0]
    assert gone.cached_tokens < 16  # the oldest was evicted (only the template's first tokens may match)


@pytest.fixture(scope="module")
def srv(default_llm):
    from pellucid.api import LLM
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    cfg = ServerConfig(model="smollm2-135m-instruct", max_batch=16, max_len=1024)
    app = create_app(cfg, loader=lambda c: LLM(loaded=default_llm.loaded, max_batch=c.max_batch, max_len=c.max_len))
    s = ServerThread(app).start()
    assert s.wait_ready(120)
    yield s
    s.stop()


def test_64_concurrent_streams_each_equal_their_solo_run(srv, default_llm):
    """64 streaming chats at once (16 run, 48 queue): each stream's text is its solo greedy text, none
    is refused, and usage reports the prompt tokens the prefix cache supplied."""
    from pellucid.engine.engine import Engine

    solo_engine = Engine(default_llm.loaded, max_batch=1, max_len=1024, prefix_cache=False)
    prompts = [(q, s) for s in (SYSTEM, "You are a pirate. Answer like one.") for q in QUESTIONS]  # 16 prompts
    solo = {}
    for q, s in prompts:
        req = run_all(solo_engine, [chat_ids(default_llm, q, system=s)])[0]
        solo[q, s] = req.text
    jobs = [prompts[i % len(prompts)] for i in range(64)]

    async def one(client, q, s):
        stream = await client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "system", "content": s}, {"role": "user", "content": q}],
            max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})  # fmt: skip
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(client, q, s) for q, s in jobs))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert [t for t, _ in results] == [solo[j] for j in jobs]
    cached = [u.prompt_tokens_details.cached_tokens for _, u in results]
    assert all(0 <= c < u.prompt_tokens for c, (_, u) in zip(cached, results, strict=True))
    assert sum(c > 0 for c in cached) >= 32  # repeats and shared system prompts came from the cache
    from pellucid.server.metrics import parse_metrics

    m = parse_metrics(httpx.get(f"{srv.url}/metrics").text)
    assert m["pellucid_prefix_cache_enabled"] == 1 and 0 < m["pellucid_prefix_cache_hit_ratio"] < 1
    assert m["pellucid_prefix_cache_hits_tokens_total"] >= sum(cached)


def test_a_huge_body_does_not_hold_up_other_requests(srv):
    """Counting the tokens of a 4 MB text takes the tokenizer seconds, off the event loop: a health
    check sent after it returns first. Generating from it is refused before any tokenizing."""
    text = "word " * 800_000
    done: dict[str, float] = {}

    def send_big():
        r = httpx.post(f"{srv.url}/tokenize", json={"prompt": text}, timeout=300)
        done["big"] = time.monotonic()
        done["count"] = r.json()["count"]

    t = threading.Thread(target=send_big)
    t.start()
    time.sleep(0.3)  # the big body is uploaded and being tokenized
    r = httpx.get(f"{srv.url}/health", timeout=60)
    done["health"] = time.monotonic()
    t.join()
    assert r.status_code == 200 and done["count"] > 800_000
    assert done["health"] < done["big"]
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": text, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "at least" in r.json()["error"]["message"]  # refused from its length alone, not tokenized
