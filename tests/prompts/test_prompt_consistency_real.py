"""One conversation, one prompt: every door shows and counts what the engine feeds the model.

For each real model in the registry, the same conversation goes through `pellucid render`,
`pellucid count`, `pellucid budget`, `pellucid chat --show-prompt`, `LLM.render_chat`,
`LLM.count_tokens`, a ChatSession, the server's /tokenize and a chat completion; all must
give the same prompt text and the same token count. Gemma 3 270M's file carries no chat
template, so this catches a door that falls back to another template than the loader's.
"""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from pellucid import registry
from pellucid.api import LLM
from pellucid.cli import _register, app, common
from pellucid.prompts import ChatSession
from pellucid.server.app import ServerThread, create_app
from pellucid.server.state import ServerConfig

pytestmark = pytest.mark.real

_register()

SYSTEM = "You are a terse geography tutor."
HISTORY = [
    {"role": "user", "content": "Where is the Danube?"},
    {"role": "assistant", "content": "In central and eastern Europe."},
]
USER = "Which sea does it reach?"
MESSAGES = [{"role": "system", "content": SYSTEM}, *HISTORY, {"role": "user", "content": USER}]


def cli(*args: str) -> tuple[str, str]:
    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, (r.output, r.exception)
    return r.stdout, r.stderr


@pytest.mark.parametrize("model", sorted(registry.REGISTRY))
def test_every_door_renders_and_counts_the_same_prompt(model, tmp_path):
    llm = LLM(model, dtype="float32", quant="none", max_batch=2, max_len=1024)
    prompt = llm.render_chat(MESSAGES)  # what the engine is fed for a chat request
    n = len(llm.tokenizer.encode(prompt))
    marker = "<start_of_turn>" if model.startswith("gemma") else "<|im_start|>system"
    assert marker in prompt, prompt  # the model's own turn format

    messages_file = tmp_path / "messages.json"
    messages_file.write_text(json.dumps(MESSAGES))
    history_file = tmp_path / "history.json"
    history_file.write_text(json.dumps(HISTORY))

    # the CLI's weightless doors: render, count, budget
    data = json.loads(
        cli("render", "--messages", str(messages_file), "--model", model, "--json")[0]
    )
    assert (data["prompt"], data["tokens"]) == (prompt, n)
    assert cli("render", "--messages", str(messages_file), "--model", model)[0] == prompt
    data = json.loads(cli("count", "--messages", str(messages_file), "--model", model, "--json")[0])
    assert data["total"] == n
    budget = ["budget", USER, "--system", SYSTEM, "--history", str(history_file), "--model", model]
    data = json.loads(cli(*budget, "--window", "1024", "--reserve", "16", "--json")[0])
    assert (data["messages"], data["prompt_tokens"]) == (MESSAGES, n)
    assert prompt in cli(*budget, "--window", "1024", "--reserve", "16", "--show-prompt")[0]

    # the Python API and a chat session
    assert llm.count_tokens(MESSAGES) == n
    assert llm.count_tokens([*HISTORY, {"role": "user", "content": USER}], system=SYSTEM) == n
    turn = ChatSession(llm, system=SYSTEM, history=list(HISTORY), window=1024).prepare(USER)
    assert (turn.prompt, turn.prompt_tokens) == (prompt, n)
    out = llm.chat(MESSAGES, max_tokens=1, temperature=0.0)
    assert (out.prompt, out.prompt_tokens) == (prompt, n)

    # `pellucid chat --show-prompt` on the same loaded model (one turn: system and message)
    first = llm.render_chat(MESSAGES[:1] + MESSAGES[-1:])
    key = (model, "float32", None)
    common.LOADED[key] = llm
    try:
        _, err = cli("chat", "--model", model, "--dtype", "float32", "--quant", "none", "--system", SYSTEM,
                     "--once", USER, "--max-tokens", "1", "--show-prompt", "--temperature", "0")  # fmt: skip
    finally:
        common.LOADED.pop(key, None)
    assert first in err and f"prompt: {len(llm.tokenizer.encode(first))} tokens" in err

    # the server: /tokenize and a chat completion's usage, with and without its own system prompt
    cfg = ServerConfig(model=model, max_batch=2, max_len=1024, system_prompt=SYSTEM)
    srv = ServerThread(create_app(cfg, loader=lambda c: llm)).start()
    try:
        assert srv.wait_ready(120)
        for msgs in (MESSAGES, MESSAGES[1:]):  # without a system message the server adds its own
            tok = httpx.post(f"{srv.url}/tokenize", json={"messages": msgs}, timeout=60).json()
            assert tok["tokens"] == llm.tokenizer.encode(prompt) and tok["count"] == n
            body = {"model": model, "messages": msgs, "max_tokens": 1, "temperature": 0}
            usage = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120).json()[
                "usage"
            ]
            assert usage["prompt_tokens"] == n
    finally:
        srv.stop()
