"""pellucid serve --replicas: Ray Serve in front of several engine replicas.

Unit tests of the routing key, the rendezvous order, the stream-start rule, the merged
/metrics page and the deploy checks; one replica behind Ray Serve's own proxy
(`--ingress ray-proxy`); then one local Ray cluster for the module (`pellucid serve
--replicas 2 --threads 1` as a subprocess on 127.0.0.1, pellucid's own HTTP front) with the
real default model, the real openai and anthropic clients, and a replica killed mid-run.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from pellucid.config import parse_config
from pellucid.errors import PellucidError
from pellucid.server import ray_serve


def test_serve_without_replicas_imports_nothing_of_ray():
    code = ("import sys, pellucid.cli.serve, pellucid.server.app, pellucid.config; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_deploy_section_of_the_config():
    cfg = parse_config("deploy:\n  replicas: 3\n  threads: 2\n  min_replicas: 1\n  max_replicas: 4\n  max_ongoing_requests: 24\n")
    assert cfg.deploy == {"replicas": 3, "threads": 2, "min_replicas": 1, "max_replicas": 4, "max_ongoing_requests": 24}
    assert parse_config("model:\n  name: smollm2-135m-instruct\n").deploy == {}
    with pytest.raises(PellucidError, match=r"<config>:2: deploy.replicas: must be a whole number, 1 or more, got 0"):
        parse_config("deploy:\n  replicas: 0\n")
    with pytest.raises(PellucidError, match=r"unknown key 'deploy.replica'.*did you mean 'deploy.replicas'"):
        parse_config("deploy:\n  replica: 2\n")
    assert parse_config("deploy:\n  ingress: ray-proxy\n").deploy == {"ingress": "ray-proxy"}
    with pytest.raises(PellucidError, match=r"deploy.ingress: must be one of pellucid, ray-proxy, got 'nginx'"):
        parse_config("deploy:\n  ingress: nginx\n")


def test_the_ray_serve_modules_import_nothing_of_ray():
    """Ray is imported by lifecycle.start, after Ray Serve's settings are in the environment."""
    mods = ", ".join(f"pellucid.server.ray_serve.{m}" for m in ("config", "routing", "replica", "relay", "metrics", "lifecycle"))
    code = (f"import sys, os, pellucid.server.ray_serve, {mods}; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')), "
            "sorted(k for k in os.environ if k.startswith('RAY_SERVE_')))")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[] []"


# The unit tests below need no Ray; the ones marked needs_ray start it.
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray Serve is not installed: pip install 'pellucid[ray]' (make setup does)")  # fmt: skip


def test_deploy_config_checks_name_the_value():
    DC = ray_serve.DeployConfig
    with pytest.raises(PellucidError, match=r"replicas = 0 is out of range; allowed: an integer, 1 or more"):
        DC(replicas=0).check()
    with pytest.raises(PellucidError, match=r"threads = -1 is out of range"):
        DC(threads=-1).check()
    with pytest.raises(PellucidError, match=r"stream_interval_ms = -5 is out of range; allowed: an integer 0..1000"):
        DC(stream_interval_ms=-5).check()
    with pytest.raises(PellucidError, match=r"ingress = 'proxy' is not one of: pellucid, ray-proxy"):
        DC(ingress="proxy").check()
    with pytest.raises(PellucidError, match=r"replicas = 5 must lie between min_replicas = 1 and max_replicas = 4"):
        DC(replicas=5, min_replicas=1, max_replicas=4).check()
    assert DC(replicas=2).deployment_options(16) == {"max_ongoing_requests": 32, "num_replicas": 2}
    opts = DC(replicas=2, min_replicas=1, max_replicas=4, max_ongoing_requests=20).deployment_options(16)
    assert opts == {"max_ongoing_requests": 20, "autoscaling_config": {"min_replicas": 1, "initial_replicas": 2,
                                                                        "max_replicas": 4, "target_ongoing_requests": 8}}  # fmt: skip


@pytest.mark.parametrize("flag", [["--stream-interval-ms", "50"], ["--ingress", "ray-proxy"]])
def test_ray_flags_without_replicas_are_refused(flag):
    """--stream-interval-ms and --ingress only mean something for Ray replicas: alone each is an
    error naming the flag, before any model loads, not silently ignored."""
    r = subprocess.run([sys.executable, "-m", "pellucid", "serve", *flag], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"{flag[0]} {flag[1]}: it applies to Ray Serve replicas only" in r.stderr + r.stdout


@needs_ray
@pytest.mark.slow
def test_cli_refuses_a_bad_replica_count():
    r = subprocess.run([sys.executable, "-m", "pellucid", "serve", "--replicas", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "replicas = 0 is out of range; allowed: an integer, 1 or more" in r.stderr + r.stdout


def test_routing_key_follows_the_conversation_start():
    key = ray_serve.routing_key
    system = {"role": "system", "content": "You are terse."}
    turn1 = [system, {"role": "user", "content": "Name a fruit."}]
    turn2 = [*turn1, {"role": "assistant", "content": "Apple."}, {"role": "user", "content": "Another?"}]
    body = lambda msgs, **kw: json.dumps({"model": "m", "messages": msgs, **kw}).encode()  # noqa: E731
    assert key("/v1/chat/completions", body(turn1)) == key("/v1/chat/completions", body(turn2, stream=True))
    assert key("/v1/chat/completions", body(turn1)) != key("/v1/chat/completions", body([system, {"role": "user", "content": "Name a tree."}]))
    an = lambda msgs: json.dumps({"model": "m", "system": "S", "max_tokens": 5, "messages": msgs}).encode()  # noqa: E731
    assert key("/v1/messages", an(turn2[1:])) == key("/v1/messages", an(turn1[1:]))
    assert key("/v1/completions", b'{"prompt": "' + b"a" * 600 + b'"}') == key("/v1/completions", b'{"prompt": "' + b"a" * 700 + b'"}')
    assert key("/v1/chat/completions", body(turn1), session="s1") == key("/v1/completions", b"{}", session="s1")
    for path, raw in (("/health", b""), ("/v1/chat/completions", b"not json"), ("/v1/chat/completions", b"[1]"),
                      ("/v1/chat/completions", b'{"messages": []}'), ("/tokenize", body(turn1))):  # fmt: skip
        assert key(path, raw) is None


def test_rendezvous_moves_only_the_keys_of_a_replica_that_goes():
    keys = [f"k{i}" for i in range(400)]
    three = {k: ray_serve.rendezvous(k, ["a", "b", "c"])[0] for k in keys}
    two = {k: ray_serve.rendezvous(k, ["a", "c"])[0] for k in keys}
    assert all(two[k] == three[k] for k in keys if three[k] != "b")
    share = sum(v == "b" for v in three.values()) / len(keys)
    assert 0.25 < share < 0.42  # about a third each


def test_a_stream_starts_with_its_first_output():
    co = ray_serve.carries_output
    role = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}\n\n'
    text = b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]}\n\n'
    assert not co(role) and co(text) and co(role + text) and co(b"data: [DONE]\n\n")
    assert co(b'data: {"choices": [{"index": 0, "text": " the", "finish_reason": null}]}\n\n')
    assert not co(b'event: message_start\ndata: {"type": "message_start", "message": {}}\n\n')
    assert not co(b'event: ping\ndata: {"type": "ping"}\n\n')
    assert co(b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": {"text": "x"}}\n\n')
    assert co(b'data: {"error": {"message": "bad"}}\n\n')
    ended = ray_serve.stream_error("/v1/messages", RuntimeError("gone"))
    assert ended.startswith(b"event: error\ndata: ") and b"overloaded_error" in ended and b"replica" in ended
    assert json.loads(ray_serve.stream_error("/v1/chat/completions", RuntimeError("gone"))[6:])["error"]["code"] == "replica_died"


@pytest.mark.parametrize("interval_ms", [0, 40])
def test_a_streams_close_chunks_travel_together(interval_ms):
    """The replica's outbox: with an interval, the chunks that come close behind the last
    one sent go as one message (bytes and order unchanged; the first at once); with 0,
    every chunk is its own message."""
    import asyncio

    async def app(scope, receive, send):  # a streaming ASGI app: a start, 3 chunks at once, a pause, 3 more, the end
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(6):
            await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
            if i == 2:
                await asyncio.sleep(0.2)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    replica = object.__new__(ray_serve.EngineReplica)  # (no model: only the relay's side of it)
    replica.app, replica.headers, replica.interval = app, [], interval_ms / 1000

    async def collect():
        return [m async for m in replica.forward({"type": "http"}, b"")]

    messages = asyncio.run(collect())
    bodies = [m["body"] for m in messages[1:]]
    assert b"".join(bodies) == b"".join(f"data: {i}\n\n".encode() for i in range(6)) + b"data: [DONE]\n\n"
    assert messages[-1]["more_body"] is False and all(m["more_body"] for m in messages[1:-1])
    if interval_ms == 0:
        assert len(bodies) == 7
    else:  # chunk 0 at once; 1-2 together; after the pause 3 at once; 4, 5 and the end together
        assert bodies == [b"data: 0\n\n", b"data: 1\n\ndata: 2\n\n", b"data: 3\n\n", b"data: 4\n\ndata: 5\n\ndata: [DONE]\n\n"]


def test_merged_metrics_label_every_sample_with_its_replica():
    page = ("# HELP pellucid_x An x.\n# TYPE pellucid_x counter\npellucid_x 3\n"
            "# HELP pellucid_y A y.\n# TYPE pellucid_y gauge\npellucid_y{path=\"/a\",status=\"200\"} 1\n")  # fmt: skip
    merged = ray_serve.merge_metrics({"r1": page, "r2": page.replace(" 3\n", " 5\n")})
    from pellucid.server.metrics import parse_metrics

    m = parse_metrics(merged)
    assert m == {"pellucid_replicas": 2, 'pellucid_x{replica="r1"}': 3, 'pellucid_x{replica="r2"}': 5,
                 'pellucid_y{replica="r1",path="/a",status="200"}': 1, 'pellucid_y{replica="r2",path="/a",status="200"}': 1}  # fmt: skip
    assert merged.count("# TYPE pellucid_x counter") == 1
    lines = merged.splitlines()  # each family's samples follow its own HELP and TYPE
    assert lines.index('pellucid_x{replica="r2"} 5') < lines.index("# HELP pellucid_y A y.")


# -- a live local cluster -------------------------------------------------------------------------
MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replicas(url: str) -> dict[str, float]:
    """replica name -> its generated tokens, from the ingress's merged /metrics."""
    from pellucid.server.metrics import parse_metrics

    r = httpx.get(f"{url}/metrics", timeout=30)
    if r.status_code != 200:  # Ray's proxy answers 404 until the application's routes are up
        return {}
    m = parse_metrics(r.text)
    return {k.split('"')[1]: v for k, v in m.items() if k.startswith("pellucid_generation_tokens_total{")}


@contextlib.contextmanager
def _serve_replicas(log: Path, replicas: int, *extra: str):
    """`pellucid serve --replicas N --threads 1` with its own local Ray cluster; its URL once every replica serves."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pellucid", "serve", "--replicas", str(replicas), "--threads", "1",
                             "--port", str(port), "--max-batch", "8", *extra],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        t = time.monotonic()
        while True:
            assert proc.poll() is None, f"pellucid serve --replicas exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() - t < 150, f"not ready after 150 s:\n{log.read_text()[-3000:]}"
            try:
                if len(_replicas(url)) == replicas:
                    break
            except (httpx.HTTPError, IndexError):
                pass
            time.sleep(1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # the CLI takes Serve and its Ray cluster down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster(real_path, tmp_path_factory):
    """Two replicas behind pellucid's own HTTP front (the default --ingress)."""
    with _serve_replicas(tmp_path_factory.mktemp("ray") / "serve.log", 2) as url:
        yield url


def _openai(url: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def _stream(client, prompt: str, max_tokens: int, on_text=None) -> dict:
    """One streamed chat request; its replica, pid, text, finish reason, or the error that ended it."""
    out = {"text": "", "finish": None, "error": None, "chunks": 0}
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, stream=True, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": prompt}],
    ) as r:
        out["replica"], out["pid"] = r.headers["x-pellucid-replica"], int(r.headers["x-pellucid-replica-pid"])
        try:
            for ch in r.parse():
                for c in ch.choices:
                    if c.delta.content:
                        out["text"] += c.delta.content
                        out["chunks"] += 1
                        if on_text is not None:
                            on_text(out)
                    out["finish"] = c.finish_reason or out["finish"]
        except Exception as e:  # the client raises the server's error event
            out["error"] = f"{type(e).__name__}: {e}"
    return out


@needs_ray
@pytest.mark.real
@pytest.mark.slow
def test_behind_ray_serves_own_proxy(real_path, tmp_path):
    """--ingress ray-proxy: Ray Serve's HTTP proxy and an ingress deployment in front of the
    replica answer both APIs, streamed, with the same headers and /metrics."""
    import anthropic

    with _serve_replicas(tmp_path / "serve.log", 1, "--ingress", "ray-proxy") as url:
        out = _stream(_openai(url), "Write a story about a lighthouse.", 8)
        assert out["error"] is None and out["finish"] == "length" and out["text"], out
        an = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)
        with an.messages.stream(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Say hello."}]) as st:
            assert "".join(st.text_stream)
        assert out["replica"] in _replicas(url)
        assert "ray::ProxyActor" in _process_titles()  # the HTTP came through Ray's proxy


def _process_titles() -> str:
    titles = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                titles.append((d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return "\n".join(titles)


@needs_ray
@pytest.mark.real
@pytest.mark.slow
def test_concurrent_streams_spread_over_both_replicas(cluster):
    client = _openai(cluster)
    before = _replicas(cluster)
    with cf.ThreadPoolExecutor(12) as ex:
        results = list(ex.map(lambda k: _stream(client, f"Write a story about island number {k}.", 12), range(12)))
    assert all(r["error"] is None and r["finish"] == "length" and r["text"] for r in results), results
    served = {r["replica"] for r in results}
    assert served == set(before), f"streams went to {served}; replicas are {set(before)}"
    after = _replicas(cluster)
    assert all(after[name] > before[name] for name in before), (before, after)


@needs_ray
@pytest.mark.real
@pytest.mark.slow
def test_both_apis_and_a_conversation_stays_on_its_replica(cluster):
    import anthropic

    client = _openai(cluster)
    turn1 = [{"role": "system", "content": "You are a helpful assistant who answers in one short sentence."},
             {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip
    r1 = client.chat.completions.with_raw_response.create(model=MODEL, messages=turn1, max_tokens=16, temperature=0)
    answer = r1.parse().choices[0].message.content
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
    r2 = client.chat.completions.with_raw_response.create(model=MODEL, messages=turn2, max_tokens=16, temperature=0)
    assert r2.headers["x-pellucid-replica"] == r1.headers["x-pellucid-replica"]
    assert r2.parse().usage.prompt_tokens_details.cached_tokens > 0  # the first turn's prefix was cached there

    an = anthropic.Anthropic(base_url=cluster, api_key="none", max_retries=0)
    with an.messages.stream(model=MODEL, max_tokens=12, messages=[{"role": "user", "content": "Say hello."}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text and final.stop_reason in ("end_turn", "max_tokens")
    page = httpx.get(f"{cluster}/metrics").text
    assert "pellucid_replicas 2" in page and 'pellucid_http_requests_total{replica="' in page


@needs_ray
@pytest.mark.real
@pytest.mark.slow
def test_a_killed_replica(cluster):
    """In-flight streams on a killed replica end with a clear error; requests that had not
    sent output yet are sent again to the survivor; new requests go to the survivor; Ray
    starts a new replica."""
    from pellucid.server.metrics import parse_metrics

    client = _openai(cluster)
    names = set(_replicas(cluster))
    prompts = [f"Write a long story about planet number {k}." for k in range(6)]
    going = threading.Barrier(len(prompts) + 1, timeout=120)
    live: list[dict] = []  # the streams, as they go

    def started(out):
        if out["chunks"] == 3:
            live.append(out)
            going.wait()

    def unstreamed(prompt: str):
        return client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=300, temperature=0, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": prompt}])  # fmt: skip

    with cf.ThreadPoolExecutor(16) as ex:
        streams = [ex.submit(_stream, client, p, 400, started) for p in prompts]
        going.wait()  # every stream has output
        waiting = [ex.submit(unstreamed, p) for p in prompts[:4]]  # non-streaming: no output until they finish
        time.sleep(1.5)
        m = parse_metrics(httpx.get(f"{cluster}/metrics", timeout=30).text)
        held = {n: m[f'pellucid_requests_running{{replica="{n}"}}'] + m[f'pellucid_requests_waiting{{replica="{n}"}}'] for n in names}
        streaming = {n: sum(out["replica"] == n for out in live) for n in names}
        pids = {out["replica"]: out["pid"] for out in live}
        victim = max(names, key=lambda n: held[n] - streaming[n])  # a replica holding non-streaming requests
        unstarted = held[victim] - streaming[victim]
        assert unstarted >= 1 and victim in pids, (held, streaming)
        os.kill(pids[victim], signal.SIGKILL)
        t_kill = time.monotonic()
        after = [ex.submit(lambda i=i: client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": f"Hello number {i}."}])) for i in range(4)]  # fmt: skip
        results = [s.result() for s in streams]
        late = [w.result() for w in waiting]
        fresh = [a.result() for a in after]

    on_victim = [r for r in results if r["replica"] == victim]
    on_survivor = [r for r in results if r["replica"] != victim]
    assert on_victim and on_survivor, results
    for r in on_victim:
        assert r["error"] is not None and "died mid-stream" in r["error"] and "send the request again" in r["error"], r
    for r in on_survivor:
        assert r["error"] is None and r["finish"] == "length", r
    assert all(w.headers["x-pellucid-replica"] != victim and w.parse().usage.completion_tokens == 300 for w in late)
    assert sum(int(w.headers.get("x-pellucid-retries", "0")) >= 1 for w in late) == unstarted  # those on the victim, sent again
    assert all(f.headers["x-pellucid-replica"] != victim and f.parse().choices[0].message.content for f in fresh)
    while True:  # Ray replaces the dead replica
        now = set(_replicas(cluster))
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() - t_kill < 90, f"no new replica after 90 s: {now}"
        time.sleep(1)
    assert len(now & names) == 1
