"""A request that fills most of the KV pool beside streaming clients, through the real openai
client against a live server of the default model in its default format, with a budget too
small for all of them at once: every answer is the one each request gets alone."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from paths import SHARED

from pellucid.sampling.params import SamplingParams

openai = pytest.importorskip("openai")

LONG_TOKENS = 5000
QUESTIONS = ["Do you sell maps?", "Can I order a book by phone?", "Are you open on Sundays?", "Do you buy used books?"]


@pytest.fixture(scope="module")
def llm(real_path):
    from pellucid.api import LLM

    return LLM(str(real_path), max_batch=4)


@pytest.fixture(scope="module")
def long_text(llm):
    ids = llm.tokenizer.encode((SHARED / "data" / "wikitext-2-raw-test.txt").read_text()[:60_000])
    return llm.tokenizer.decode(ids[:LONG_TOKENS]) + "\n\nIn one sentence: what is the text above about?"


def solo(llm, content: str, max_tokens: int) -> str:
    ids = llm.encode_prompt(llm.render_chat([{"role": "user", "content": content}]))
    req = llm.engine.add_request(llm.engine.make_request(ids, SamplingParams(max_tokens=max_tokens, temperature=0)))
    while not req.finished:
        llm.engine.step()
    return req.text


def test_a_long_request_beside_streaming_clients_in_a_tight_pool(llm, long_text):
    from pellucid.api import LLM
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    assert llm.engine.max_len == llm.config.context_length == 8192  # the model's whole window by default
    want_long = solo(llm, long_text, 16)
    want = {q: solo(llm, q, 24) for q in QUESTIONS}
    budget_tokens = LONG_TOKENS + 150  # the long one and little more: the clients must wait or be preempted
    mib = budget_tokens * llm.engine.cache.bytes_per_token // 2**20
    cfg = ServerConfig(model="smollm2-135m-instruct", max_batch=4, kv_cache_mib=mib)
    app = create_app(cfg, loader=lambda c: LLM(loaded=llm.loaded, max_batch=c.max_batch, kv_cache_mib=c.kv_cache_mib))
    srv = ServerThread(app).start()
    try:
        assert srv.wait_ready(120)

        async def ask(client, content: str, max_tokens: int) -> str:
            stream = await client.chat.completions.create(
                model="smollm2-135m-instruct", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
                temperature=0, stream=True)  # fmt: skip
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        async def main():
            client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=600)
            try:
                async def clients():
                    return [await ask(client, q, 24) for _ in range(3) for q in QUESTIONS]

                async def long_one():
                    await asyncio.sleep(0.2)
                    return await ask(client, long_text, 16)

                return await asyncio.gather(long_one(), *(clients() for _ in range(3)))
            finally:
                await client.close()

        long_answer, *streams = asyncio.run(main())
        assert long_answer == want_long and long_answer.strip()
        assert all(texts == [want[q] for _ in range(3) for q in QUESTIONS] for texts in streams)
        from pellucid.server.metrics import parse_metrics

        m = parse_metrics(httpx.get(f"{srv.url}/metrics").text)
        assert m["pellucid_kv_cache_capacity_tokens"] == mib * 2**20 // llm.engine.cache.bytes_per_token < budget_tokens + 30
        assert m["pellucid_kv_cache_used_tokens"] == 0  # every request done: only held prefixes remain
        assert m["pellucid_kv_cache_held_tokens"] <= m["pellucid_kv_cache_capacity_tokens"]
    finally:
        srv.stop()
