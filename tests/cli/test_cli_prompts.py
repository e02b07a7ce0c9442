"""pellucid prompt / render / count / budget as a user runs them, on the real model's tokenizer.

Most commands run in-process (typer's runner; they read only the tokenizer and template
from the model file); the error paths run as a real process, to see the one-line message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pellucid.cli import _register, app
from pellucid.errors import PellucidError
from pellucid.prompts import TokenCounter

_register()
PELLUCID = [sys.executable, "-m", "pellucid"]

GREETER_1 = """\
name: greeter
version: "1.0.0"
description: Greets people.
role: a friendly receptionist
guidelines:
  - Always greet the visitor by name.
  - Never discuss prices.
style:
  length: concise
"""
GREETER_2 = GREETER_1.replace('"1.0.0"', '"1.1.0"').replace(
    "  - Never discuss prices.\n", "  - Never discuss prices.\n  - When asked for directions, point to the map.\n"
)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A private $PELLUCID_HOME for the prompt store (no command here needs the model)."""
    monkeypatch.setenv("PELLUCID_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def cli(*args: str, ok: bool = True):
    r = CliRunner().invoke(app, list(args))
    if ok:
        assert r.exit_code == 0, (r.output, r.exception)
    return r


def proc(*args: str, input: str | None = None, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*PELLUCID, *args], capture_output=True, text=True, input=input, timeout=timeout, env=env)


def show(ref: str, folder: Path) -> dict:
    return json.loads(cli("prompt", "show", ref, "--dir", str(folder), "--json").stdout)


@pytest.fixture(scope="module")
def counter(real_path):
    return TokenCounter.for_model(real_path)


# -- prompt files -----------------------------------------------------------------------------
def test_a_content_change_changes_the_hash_and_the_version_shown(tmp_path, home):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "greeter@1.0.0.yaml").write_text(GREETER_1)
    first = show("greeter", folder)
    assert first["version"] == "1.0.0" and first["path"].endswith("greeter@1.0.0.yaml")

    (folder / "greeter@1.1.0.yaml").write_text(GREETER_2)
    latest = show("greeter", folder)
    assert latest["version"] == "1.1.0" and latest["sha256"] != first["sha256"]
    assert "3. When asked for directions, point to the map." in latest["system"]
    assert show("greeter@1.0.0", folder)["sha256"] == first["sha256"]  # old versions stay

    text = cli("prompt", "show", "greeter", "--dir", str(folder)).stdout
    assert "greeter@1.1.0" in text and latest["sha256"] in text and "greeter@1.1.0.yaml" in text

    # layout and comments are not content: same hash; a changed word is
    (folder / "greeter@1.0.0.yaml").write_text("# reformatted\n" + GREETER_1.replace("style:\n  length: concise\n", "style: {length: concise}\n"))
    assert show("greeter@1.0.0", folder)["sha256"] == first["sha256"]
    (folder / "greeter@1.0.0.yaml").write_text(GREETER_1.replace("by name", "by first name"))
    assert show("greeter@1.0.0", folder)["sha256"] != first["sha256"]


def test_diff_shows_what_changed(tmp_path, home):
    folder = tmp_path / "prompts"
    folder.mkdir()
    a, b = folder / "greeter@1.0.0.yaml", folder / "greeter@1.1.0.yaml"
    a.write_text(GREETER_1)
    b.write_text(GREETER_2)
    by_ref = cli("prompt", "diff", "greeter@1.0.0", "greeter@1.1.0", "--dir", str(folder)).stdout
    by_file = cli("prompt", "diff", str(a), str(b)).stdout
    assert by_ref == by_file
    assert 'version: "1.0.0" -> "1.1.0"' in by_ref
    assert "guidelines:" in by_ref
    assert "+3. When asked for directions, point to the map." in by_ref
    assert by_ref.count("\n-") == 1  # only the version header line is removed... no rendered line is
    d = json.loads(cli("prompt", "diff", str(a), str(b), "--json").stdout)
    assert not d["same_content"] and [f["field"] for f in d["fields"]] == ["version", "guidelines"]
    same = cli("prompt", "diff", str(a), str(a)).stdout
    assert "(no changes)" in same


def test_list_and_save(tmp_path, home):
    src = tmp_path / "greeter.yaml"
    src.write_text(GREETER_1 + "---\n" + GREETER_2)
    saved = cli("prompt", "save", str(src)).stdout
    assert "greeter@1.0.0" in saved and "greeter@1.1.0" in saved
    store = tmp_path / "home" / "prompts"
    assert sorted(p.name for p in store.iterdir()) == ["greeter@1.0.0.yaml", "greeter@1.1.0.yaml"]
    rows = json.loads(cli("prompt", "list", "--json").stdout)
    refs = {f"{r['name']}@{r['version']}" for r in rows}
    assert {"greeter@1.0.0", "greeter@1.1.0", "tutor@1.1.0", "coding-assistant@1.0.0"} <= refs
    # saving again is a no-op; other content under a saved version is refused
    cli("prompt", "save", str(src))
    src.write_text(GREETER_1.replace("by name", "warmly"))
    r = cli("prompt", "save", str(src), ok=False)
    assert isinstance(r.exception, PellucidError)
    assert "already exists" in r.exception.message and "greeter@1.1.1" in r.exception.message


def test_diff_and_save_take_files_of_any_name(tmp_path, home):
    # the docs' own examples: `prompt diff old.yaml new.yaml`, `prompt save my-prompt.yaml`
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(GREETER_1)
    new.write_text(GREETER_2)
    d = json.loads(cli("prompt", "diff", str(old), str(new), "--json").stdout)
    assert (d["a"], d["b"]) == ("greeter@1.0.0", "greeter@1.1.0")
    assert [f["field"] for f in d["fields"]] == ["version", "guidelines"]
    new.write_text(GREETER_1.replace("by name", "warmly"))  # same NAME@VERSION: the files tell them apart
    text = cli("prompt", "diff", str(old), str(new)).stdout
    assert f"--- greeter@1.0.0 ({old})" in text and f"+++ greeter@1.0.0 ({new})" in text

    mine = tmp_path / "my-prompt.yaml"
    mine.write_text(GREETER_2)
    saved = cli("prompt", "save", str(mine)).stdout
    assert "greeter@1.1.0" in saved and "greeter@1.1.0.yaml" in saved
    assert show("greeter", home / "prompts")["version"] == "1.1.0"

    # in a store folder the file name must say what the file holds, and the error says why
    (home / "prompts" / "my-prompt.yaml").write_text(GREETER_1)
    r = cli("prompt", "list", ok=True)
    assert "does not match the file name" in r.stderr and "found by its file name" in r.stderr


MALFORMED = {
    "unknown field": (GREETER_1.replace("guidelines:", "guidelnes:"), ":5", "field guidelnes", "unknown field"),
    "bad style": (GREETER_1.replace("length: concise", "length: brief"), ":9", "field style.length", "concise"),
    "number version": (GREETER_1.replace('"1.0.0"', "1.0"), ":2", "field version", "quote it"),
    "missing reply": (GREETER_1 + "examples:\n  - user: hi\n", ":11", "field examples[0].assistant", "missing"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_prompt_file_names_file_and_field(tmp_path, home, case):
    text, line, field, why = MALFORMED[case]
    bad = tmp_path / "greeter@1.0.0.yaml"
    bad.write_text(text)
    r = cli("prompt", "show", str(bad), ok=False)
    assert isinstance(r.exception, PellucidError), r.output
    msg = r.exception.message
    assert msg.startswith(f"{bad}{line}:"), msg
    assert field in msg and why in msg


def test_malformed_prompt_file_is_one_line_from_every_command(tmp_path, home):
    bad = tmp_path / "greeter@1.0.0.yaml"
    bad.write_text(MALFORMED["bad style"][0])
    for args in (["prompt", "show", str(bad)], ["chat", "--prompt-file", str(bad), "--once", "hi"],
                 ["render", "hi", "--prompt-file", str(bad)]):  # fmt: skip
        r = proc(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert f"{bad}:9: field style.length" in r.stderr.replace("\n", "")
        assert "Traceback" not in r.stderr
    # the config's system_prompt too, with the config's line
    (tmp_path / "cfg").mkdir()
    cfg = tmp_path / "cfg" / "chat.yaml"
    cfg.write_text("sampling:\n  temperature: 0\nsystem_prompt: greeter@9.9.9\n")
    r = proc("render", "hi", "--config", str(cfg))
    assert r.returncode == 1 and f"{cfg}:3: system_prompt" in r.stderr.replace("\n", "")
    assert "no prompt named 'greeter'" in r.stderr.replace("\n", "")


# -- render and count -------------------------------------------------------------------------
def test_render_shows_the_exact_prompt_and_its_count(counter):
    r = cli("render", "What is 2+2?", "--prompt-file", "tutor@1.1.0", "--length", "concise")
    text = r.stdout
    assert text.startswith("<|im_start|>system\nYou are a patient tutor.")
    assert "Keep your answers short" in text and "## Details" in text
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert f"{counter.count_text(text)} tokens" in r.stderr
    data = json.loads(cli("render", "What is 2+2?", "-p", "tutor@1.1.0", "--length", "concise", "--json").stdout)
    assert data["prompt"] == text and data["tokens"] == counter.count_messages(data["messages"]) == len(data["token_ids"])
    # few-shot examples are turns of the template
    fs = cli("render", "Reverse a list", "-p", "coding-assistant@1.0.0").stdout
    assert "<|im_start|>user\nHow do I read a file line by line in Python?<|im_end|>\n<|im_start|>assistant\n```python" in fs


def test_render_messages_file_with_system_and_style(tmp_path, real_path):
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}))
    text = cli("render", "Bye", "--messages", str(msgs), "--system", "Be brief.", "--format-skeleton", "answer-explanation").stdout
    assert text.startswith("<|im_start|>system\nBe brief.\n\nAlways structure your response as:\n## Answer")
    assert "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>" in text
    r = cli("render", "x", "--length", "brief", ok=False)
    assert "--length" in r.exception.message and "concise" in r.exception.message


def test_count_text_file_and_messages(tmp_path, counter):
    r = cli("count", "Hello world, how are you?", "--tokens")
    assert r.stdout.startswith(f"{counter.count_text('Hello world, how are you?')} tokens")
    assert "905:' world'" in r.stdout

    f1, f2 = tmp_path / "a.txt", tmp_path / "b.txt"
    f1.write_text("The Danube flows through ten countries.\n")
    f2.write_text("日本語のテキスト — with a dash.\n")
    data = json.loads(cli("count", "--file", str(f1), "--file", str(f2), "--json").stdout)
    assert [x["tokens"] for x in data["files"]] == [counter.count_file(f1), counter.count_file(f2)]
    assert data["total"] == counter.count_file(f1) + counter.count_file(f2)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"}]  # fmt: skip
    m = tmp_path / "m.json"
    m.write_text(json.dumps(messages))
    data = json.loads(cli("count", "--messages", str(m), "--json").stdout)
    assert data["total"] == counter.count_messages(messages)
    assert sum(x["tokens"] for x in data["messages"]) + data["generation_prompt"] == data["total"]
    assert data["content"] + data["overhead"] == data["total"]
    assert [x["role"] for x in data["messages"]] == ["system", "user", "assistant", "user"]
    table = cli("count", "--messages", str(m)).stdout
    assert "generation prompt" in table and f"{data['total']}" in table

    for args in ([], ["hi", "--file", str(f1)]):
        r = cli("count", *args, ok=False)
        assert "exactly one of TEXT" in r.exception.message
    m.write_text("[{")
    r = cli("count", "--messages", str(m), ok=False)
    assert str(m) in r.exception.message and "not valid JSON" in r.exception.message


# -- budget -----------------------------------------------------------------------------------
def _history(turns: int) -> list[dict]:
    out = []
    for i in range(turns):
        out.append({"role": "user", "content": f"Question {i}: tell me about river number {i} in some detail."})
        out.append({"role": "assistant", "content": f"River {i} is long and winds through many valleys and towns."})
    return out


def test_budget_table_and_json(tmp_path, counter):
    hist = tmp_path / "history.json"
    hist.write_text(json.dumps(_history(12)))
    docs = []
    for i, words in enumerate((30, 200, 40)):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(" ".join(f"fact{i}-{k}" for k in range(words)))
        docs.append(p)
    args = ["budget", "What about river 12?", "--window", "700", "--reserve", "100", "-p", "json-answer@1.0.0",
            "--history", str(hist)] + [x for d in docs for x in ("--retrieved", str(d))]  # fmt: skip
    data = json.loads(cli(*args, "--json").stdout)
    assert data["prompt_tokens"] + data["reserve"] <= data["window"] == 700
    assert counter.count_messages(data["messages"]) == data["prompt_tokens"]
    sections = {s["name"]: s["tokens"] for s in data["sections"]}
    assert sum(v for k, v in sections.items() if k != "reserved for response") == data["prompt_tokens"]
    assert [r["status"] for r in data["retrieved"]][0] == "kept"
    assert data["history_dropped"] > 0 and data["history_dropped"] % 2 == 0

    text = cli(*args, "--show-prompt").stdout
    for row in ("template overhead", "system prompt", "retrieved context", "conversation history",
                "current message", "reserved for response", "context window"):  # fmt: skip
        assert row in text
    assert f"history: kept the newest {24 - data['history_dropped']} of 24 messages" in text
    assert "<|im_start|>user\nWhat about river 12?<|im_end|>\n<|im_start|>assistant\n" in text


def test_budget_error_when_the_undroppable_parts_do_not_fit(tmp_path):
    r = proc("budget", "word " * 200, "--window", "150", "--reserve", "50", "--system", "Be brief.")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    err = " ".join(r.stderr.split())
    assert "the parts that are never dropped do not fit" in err
    assert "50 reserved for the response" in err and "over the context window of 150" in err


# -- chat -------------------------------------------------------------------------------------
def test_chat_show_prompt_prompt_file_from_config_and_format_check(tmp_path, real_path):
    cfg = tmp_path / "chat.yaml"
    cfg.write_text("sampling:\n  temperature: 0\nsystem_prompt: tutor@1.1.0\n")
    r = proc("chat", "--config", str(cfg), "--once", "What is rain?", "--max-tokens", "6", "--show-prompt",
             "--dtype", "float32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "<|im_start|>system\nYou are a patient tutor." in r.stderr
    assert "<|im_start|>user\nWhat is rain?<|im_end|>\n<|im_start|>assistant\n" in r.stderr
    assert "check format:" in r.stderr and "check max_words:" in r.stderr
    assert r.stdout.strip()


@pytest.mark.slow
def test_chat_200_turns_inside_a_small_window(real_path):
    # a 128-token window holds about three turns: the budget drops the oldest turn on
    # almost every one of the 200 turns, and each answer must still come
    lines = [f"Q{i}: what is {i} plus {i}?" for i in range(200)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # on a shared machine one thread wastes the least
    r = proc("chat", "--ctx-size", "128", "--max-tokens", "4", "--max-words", "30", "--dtype", "float32",
             input="\n".join(lines) + "\n", timeout=3600, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "error" not in r.stderr.lower() and "Traceback" not in r.stderr
    assert r.stdout.count("\n") >= 200  # every question answered (a reply may hold newlines)
    assert r.stderr.count("check max_words:") == 200  # one style check per answer
    notes = [x for x in r.stderr.splitlines() if x.startswith("context: dropped")]
    assert len(notes) >= 150, len(notes)
    for note in notes:  # "... to fit the 128-token window (P prompt + 4 reserved); N dropped so far"
        prompt = int(note.split("window (")[1].split(" prompt")[0])
        assert prompt + 4 <= 128
    assert int(notes[-1].split("; ")[-1].split(" dropped")[0]) >= 2 * 150
