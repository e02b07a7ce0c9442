"""The command line on the real default model, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PELLUCID = [sys.executable, "-m", "pellucid"]


def run(*args: str, input: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*PELLUCID, *args], capture_output=True, text=True, input=input, timeout=timeout)


def test_generate_prints_only_the_continuation(real_path):
    r = run("generate", "The capital of France is", "--max-tokens", "8", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "The capital of France is" not in r.stdout
    assert "Paris" in r.stdout


def test_chat_once_answers(real_path):
    r = run("chat", "--once", "What is the capital of France?", "--max-tokens", "20", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_chat_multi_turn_from_stdin(real_path):
    r = run("chat", "--max-tokens", "12", "--system", "You answer in one short sentence.",
            input="What is the capital of France?\nAnd of Italy?\n")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.strip()]
    assert "Paris" in r.stdout and "Rome" in r.stdout and len(lines) >= 2


@pytest.mark.parametrize("args, message", [
    (["generate", "hi", "--model", "gpt-4o"], "Unknown model 'gpt-4o'"),
    (["generate", "hi", "--model", "/no/such/file.gguf"], "does not exist"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "hi", "--dtype", "float8"], "dtype 'float8'"),
])  # fmt: skip
def test_bad_input_is_one_clear_line(args, message):
    r = run(*args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_models_json():
    r = run("models", "--json")
    assert r.returncode == 0
    names = {m["name"] for m in json.loads(r.stdout)}
    assert {"smollm2-135m-instruct", "gemma3-270m"} <= names
