"""503 while the model loads, 429 when the waiting queue is full (a small live server).

The server's loader waits for the test to let it finish, so the loading phase is
observed for certain; the weights are the session's real float32 model.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.real
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def gated(real_lm):
    """A server with one batch slot and room for one waiting request, whose loading the test releases."""
    from pellucid.api import LLM
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    release = threading.Event()

    def loader(c):
        assert release.wait(60)
        return LLM(loaded=real_lm, max_batch=c.max_batch, max_len=c.max_len)

    cfg = ServerConfig(model=MODEL, max_batch=1, max_waiting=1, max_len=1024)
    s = ServerThread(create_app(cfg, loader=loader)).start()
    yield s, release
    release.set()
    s.stop()


def test_503_while_loading_then_ready(gated):
    s, release = gated
    oa = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
    an = anthropic.Anthropic(base_url=s.url, api_key="x", max_retries=0)
    h = httpx.get(f"{s.url}/health")
    assert h.status_code == 503 and h.json()["status"] == "loading"
    with pytest.raises(openai.InternalServerError) as e:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 503 and e.value.body["code"] == "model_loading"
    assert e.value.response.headers["retry-after"] == "1"
    with pytest.raises(anthropic.APIStatusError) as e:
        an.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503 and e.value.body["error"]["type"] == "overloaded_error"
    assert httpx.get(f"{s.url}/metrics").text.count("pellucid_model_loaded 0") == 1
    assert [m.id for m in oa.models.list().data] == [MODEL]  # known before loading ends
    release.set()
    assert s.wait_ready(120)
    assert httpx.get(f"{s.url}/health").json()["status"] == "ready"
    r = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_429_when_waiting_queue_is_full(gated):
    s, release = gated
    release.set()
    assert s.wait_ready(120)
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(base_url=s.url, timeout=60) as c1, httpx.Client(base_url=s.url, timeout=60) as c2:
        with c1.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # keep the iterator: dropping it closes the connection
            next(lines)  # it holds the one batch slot
            with c2.stream("POST", "/v1/completions", json=body) as waiting:
                assert waiting.status_code == 200  # queued behind it
                t = time.monotonic()
                while httpx.get(f"{s.url}/metrics").text.find("pellucid_requests_waiting 1") < 0:
                    assert time.monotonic() - t < 10
                    time.sleep(0.02)
                oa = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.RateLimitError) as e:
                    oa.completions.create(model=MODEL, prompt="hi", max_tokens=2)
                assert e.value.status_code == 429 and e.value.body["code"] == "rate_limit_exceeded"
                assert "waiting" in e.value.body["message"]
                an = anthropic.Anthropic(base_url=s.url, api_key="x", max_retries=0)
                with pytest.raises(anthropic.RateLimitError) as e:
                    an.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
                assert e.value.body["error"]["type"] == "rate_limit_error"
    # both clients left: their requests are gone and new ones are served again
    t = time.monotonic()
    while "pellucid_requests_running 0" not in httpx.get(f"{s.url}/metrics").text:
        assert time.monotonic() - t < 10
        time.sleep(0.05)
    oa = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
    assert oa.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).usage.completion_tokens == 2
