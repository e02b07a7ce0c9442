"""The web inspector on a tiny random model (the fast lane): the page and its files are
served without a key, the endpoints want the server's key, and inspection hooks go on a
shadow that shares the served model's tensors but not its hook points."""

from __future__ import annotations

import httpx
import pytest
import torch
from tiny import tiny_hf_llama, write_llama_gguf

KEY = "sekrit"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from pellucid.api import LLM
    from pellucid.loading import load_model
    from pellucid.server.app import ServerThread, create_app
    from pellucid.server.state import ServerConfig

    lm = load_model(write_llama_gguf(tiny_hf_llama(), tmp_path_factory.mktemp("insp") / "tiny.gguf"), dtype="float32")
    cfg = ServerConfig(model="tiny", api_key=KEY, max_batch=2, max_len=128)
    s = ServerThread(create_app(cfg, loader=lambda c: LLM(loaded=lm, max_batch=c.max_batch, max_len=c.max_len))).start()
    assert s.wait_ready(60), s.state.error
    yield s
    s.stop()


def test_page_and_files_need_no_key(srv):
    page = httpx.get(srv.url + "/")
    assert page.status_code == 200 and "pellucid inspector" in page.text
    for name in ("inspector.js", "inspector.css"):
        r = httpx.get(f"{srv.url}/static/{name}")
        assert r.status_code == 200 and len(r.text) > 1000
        assert f"/static/{name}" in page.text
    assert httpx.get(srv.url + "/static/nothing.js").status_code == 404


def test_endpoints_want_the_key(srv):
    body = {"prompt": "hello world", "layer": 1, "head": 0}
    r = httpx.post(srv.url + "/v1/inspect/attention", json=body)
    assert r.status_code == 401
    r = httpx.post(srv.url + "/v1/inspect/attention", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert (d["n_layers"], d["n_heads"]) == (2, 4) and d["layer"] == 1
    T = len(d["tokens"])
    assert len(d["pattern"]) == T and all(abs(sum(row) - 1) < 1e-3 for row in d["pattern"])


def test_shadow_shares_tensors_not_hooks(srv):
    from pellucid.server.inspector import shadow_model, shadow_tensors

    model = srv.state.llm.model
    shadow = shadow_model(model)
    ptrs = {t.data_ptr() for t in shadow_tensors(model).values()}
    assert {t.data_ptr() for t in shadow_tensors(shadow).values()} == ptrs  # no weight was copied
    seen = []
    with shadow.hooks([("blocks.0.hook_resid_pre", lambda x, hook: seen.append(x.shape))]):
        assert not any(h.fns for h in model.hook_points.values())
        with torch.no_grad():
            a = shadow(torch.tensor([[1, 2, 3]]))
    assert seen == [(1, 3, 64)]
    with torch.no_grad():
        b = model(torch.tensor([[1, 2, 3]]))
    assert torch.equal(a, b)


def test_a_queue_of_inspections_is_bounded(srv):
    """Inspections run on the engine's thread: while it is busy, one inspection waits to run and
    MAX_QUEUED more behind it; the next is refused with a 429. Released, all are answered."""
    import threading
    import time

    from pellucid.server.inspector import MAX_QUEUED

    insp = srv.app.state.inspector
    auth = {"Authorization": f"Bearer {KEY}"}
    codes: list[int] = []

    def ask() -> None:
        codes.append(httpx.post(srv.url + "/v1/inspect/budget", json={"current": "hi", "reserve": 8}, headers=auth, timeout=60).status_code)

    gate = threading.Event()
    held = srv.app.state.server.engine.call(lambda: gate.wait(60))  # the engine thread is busy
    try:
        waiting = [threading.Thread(target=ask) for _ in range(MAX_QUEUED + 1)]
        for t in waiting:
            t.start()
        t0 = time.monotonic()
        while insp.pending < MAX_QUEUED + 1 and time.monotonic() - t0 < 30:
            time.sleep(0.02)
        r = httpx.post(srv.url + "/v1/inspect/budget", json={"current": "hi"}, headers=auth)
        assert r.status_code == 429 and r.json()["error"]["code"] == "inspector_busy"
    finally:
        gate.set()
    assert held.result(10) is True
    for t in waiting:
        t.join(60)
    assert codes == [200] * (MAX_QUEUED + 1)


def test_inspections_run_on_the_engine_thread(srv, monkeypatch):
    """No other thread runs torch for the inspector (a second OpenMP team slows the engine)."""
    import threading

    insp = srv.app.state.inspector
    seen: list[str] = []
    subject = insp.subject

    def watched():
        seen.append(threading.current_thread().name)
        return subject()

    monkeypatch.setattr(insp, "subject", watched)
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(srv.url + "/v1/inspect/attention", json={"prompt": "hello there"}, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    assert seen == ["pellucid-engine"]
