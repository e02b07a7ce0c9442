"""`pellucid serve` as a user runs it: a subprocess on a free port, a YAML config, an API key."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")



def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from pellucid.cli import main; main()", "serve", *args]


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.Popen(_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    t = time.monotonic()
    while time.monotonic() - t < 120:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"running on http://127\.0\.0\.1:(\d+)", line)
        if m:
            return p, f"http://127.0.0.1:{m.group(1)}"
    p.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


def test_serve_help():
    r = subprocess.run(_cmd("--help"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for flag in ("--model", "--host", "--port", "--api-key", "--config", "--max-batch", "--dtype"):
        assert flag in r.stdout


def test_serve_reports_a_model_that_does_not_load(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    p, url = _start(["--model", str(bad), "--port", "0"])
    try:
        out, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 1
    assert "error:" in out and "did not load" in out and "Traceback" not in out


def test_a_busy_port_is_the_first_thing_said():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(_cmd("--port", str(port)), capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert f"port {port} on 127.0.0.1 is already in use" in out and "--port" in out
    assert "serving" not in out and "loading" not in out and "Traceback" not in out


@pytest.mark.real
def test_a_model_given_by_path_is_served_under_its_file_stem(real_path):
    p, url = _start(["--model", str(real_path), "--port", "0", "--max-len", "512"])
    try:
        t = time.monotonic()
        while httpx.get(f"{url}/health").status_code != 200:
            assert p.poll() is None and time.monotonic() - t < 120
            time.sleep(0.2)
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in oa.models.list().data] == [real_path.stem]
        r = oa.chat.completions.create(model=real_path.stem, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert r.model == real_path.stem
        r = oa.completions.create(model=str(real_path), prompt="Hi", max_tokens=2)  # the path itself still answers
        assert r.model == real_path.stem
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)


@pytest.mark.real
def test_serve_with_config_and_key(tmp_path: Path, real_llm, real_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model:\n  max_tokens: 5\nsampling:\n  temperature: 0\nsystem_prompt: You are a pirate.\n")
    p, url = _start(["--model", str(real_path), "--served-model-name", "local", "--port", "0", "--api-key", "sekrit",
                     "--config", str(cfg), "--dtype", "float32", "--max-len", "1024"])  # fmt: skip
    try:
        t = time.monotonic()
        while httpx.get(f"{url}/health").status_code != 200:
            assert p.poll() is None and time.monotonic() - t < 120
            time.sleep(0.2)
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        msgs = [{"role": "user", "content": "Where is the treasure?"}]
        r = oa.chat.completions.create(model="local", messages=msgs, extra_body={"ignore_eos": True})
        ref = real_llm.chat([{"role": "system", "content": "You are a pirate."}, *msgs], max_tokens=5, temperature=0)
        assert r.choices[0].message.content == ref.text and r.usage.completion_tokens == 5
        assert r.usage.prompt_tokens == ref.prompt_tokens
        # the request's own values win over the config's
        r = oa.chat.completions.create(model="local", messages=msgs, max_tokens=2)
        assert r.usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        p.send_signal(signal.SIGINT)
        try:
            out, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    assert p.returncode == 0, out


@pytest.mark.real
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_running_streams_cleanly_and_exits_soon(real_path, sig):
    """SIGTERM (or Ctrl-C) while a stream runs: the stream gets a last error event saying the server
    is shutting down and a proper end (no cut connection), and the process exits within seconds."""
    import json
    import threading

    p, url = _start(["--model", str(real_path), "--port", "0", "--max-len", "1024"])
    try:
        t = time.monotonic()
        while httpx.get(f"{url}/health").status_code != 200:
            assert p.poll() is None and time.monotonic() - t < 120
            time.sleep(0.2)
        body = {"model": "x", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 900,
                "stream": True, "ignore_eos": True}  # fmt: skip
        seen: dict = {"lines": []}
        started = threading.Event()

        def read():
            try:
                with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "model": str(real_path)}, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            seen["lines"].append(line[6:])
                            started.set()
                seen["end"] = "complete"
            except httpx.HTTPError as e:
                seen["end"] = f"{type(e).__name__}: {e}"
            started.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(60)
        t = time.monotonic()
        p.send_signal(sig)
        p.communicate(timeout=30)
        took = time.monotonic() - t
        reader.join(30)
    finally:
        if p.poll() is None:
            p.kill()
    assert took < 10, took
    assert seen["end"] == "complete", seen["end"]
    errors = [json.loads(x)["error"] for x in seen["lines"] if x != "[DONE]" and "error" in json.loads(x)]
    assert errors and "shutting down" in errors[-1]["message"], seen["lines"][-3:]
