"""Versioned prompt files: schema, hashes, the store, saving and diffs."""

import os
from pathlib import Path

import pytest

from pellucid.errors import PellucidError
from pellucid.prompts import (
    Example,
    PromptFile,
    PromptStore,
    Style,
    SystemPrompt,
    bump,
    diff,
    load_file,
    parse_prompts,
    split_ref,
    version_key,
)
from pellucid.prompts.store import BUILTIN_DIR, default_prompt_dir

BASE = """\
name: helper
version: "1.0.0"
description: A helper.
role: a helpful assistant
guidelines:
  - Always be brief.
  - Never guess.
style:
  length: concise
examples:
  - user: hi
    assistant: hello
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("PELLUCID_HOME", str(tmp_path / "home"))
    return PromptStore(builtin=False)


def test_parse_builds_a_system_prompt():
    (p,) = parse_prompts(BASE)
    assert (p.name, p.version, p.ref, p.description) == (
        "helper",
        "1.0.0",
        "helper@1.0.0",
        "A helper.",
    )
    assert p.prompt.guidelines == ["Always be brief.", "Never guess."]
    assert p.prompt.style == Style(length="concise")
    assert p.prompt.examples == [Example("hi", "hello")]
    assert p.prompt.render().startswith("You are a helpful assistant.\n\nFollow these rules:\n1.")
    assert len(p.sha256) == 64 and p.short_hash == p.sha256[:12]


def test_hash_is_stable_across_layout_and_changes_with_content():
    (a,) = parse_prompts(BASE)
    # same content, different YAML layout, key order, quoting and comments
    relaid = (
        "# a comment\nversion: '1.0.0'\nrole: >-\n  a helpful assistant\nname: helper\n"
        "examples: [{assistant: hello, user: hi}]\nstyle: {length: concise}\n"
        "guidelines: ['Always be brief.', 'Never guess.']\ndescription: A helper.\n"
        "constraints: []\n"
    )
    (b,) = parse_prompts(relaid)
    assert a.sha256 == b.sha256
    # the version is not content: the same text under another version hashes the same
    (c,) = parse_prompts(BASE.replace('"1.0.0"', '"2.0.0"'))
    assert c.sha256 == a.sha256
    for old, new in [
        ("Never guess.", "Never guess at all."),
        ("concise", "detailed"),
        ("assistant: hello", "assistant: hello there"),
        ("A helper.", "A better helper."),
    ]:
        (d,) = parse_prompts(BASE.replace(old, new))
        assert d.sha256 != a.sha256, old


def test_python_built_prompt_hashes_like_its_file():
    prompt = SystemPrompt(
        role="a helpful assistant",
        guidelines=["Always be brief.", "Never guess."],
        style=Style(length="concise"),
        examples=[Example("hi", "hello")],
    )
    built = PromptFile("helper", "1.0.0", prompt, description="A helper.")
    (loaded,) = parse_prompts(BASE)
    assert built.sha256 == loaded.sha256
    (again,) = parse_prompts(built.to_yaml())
    assert again.sha256 == built.sha256


def test_builtin_prompts_load_and_render():
    store = PromptStore(home="/nonexistent-pellucid-test-dir")
    refs = [p.ref for p in store.list()]
    assert {"coding-assistant@1.0.0", "json-answer@1.0.0", "tutor@1.0.0", "tutor@1.1.0"} <= set(
        refs
    )
    for p in store.list():
        assert p.path is not None and p.path.parent == BUILTIN_DIR
        assert p.prompt.render()
    js = store.resolve("json-answer")
    assert '"confidence": 0.0-1.0' in js.prompt.render()
    assert js.prompt.to_messages("q")[1] == {
        "role": "user",
        "content": "What is the capital of France?",
    }


def test_resolve_latest_by_semantic_version(store, tmp_path):
    d = store.home
    for v in ["1.2.0", "1.10.0", "1.9.3", "0.99.99"]:
        write(d / f"helper@{v}.yaml", BASE.replace("1.0.0", v).replace("A helper.", f"v{v}"))
    assert store.resolve("helper").version == "1.10.0"  # not "1.9.3" by string order
    assert store.resolve("helper@1.2.0").description == "v1.2.0"
    assert [p.version for p in store.versions("helper")] == ["0.99.99", "1.2.0", "1.9.3", "1.10.0"]
    with pytest.raises(PellucidError, match="no version 3.0.0; versions: 0.99.99, 1.2.0"):
        store.resolve("helper@3.0.0")
    with pytest.raises(PellucidError, match="no prompt named 'missing'"):
        store.resolve("missing")


def test_name_yaml_holds_several_versions(store):
    two = BASE + "---\n" + BASE.replace('"1.0.0"', '"1.1.0"').replace("Never guess.", "Be kind.")
    write(store.home / "helper.yaml", two)
    assert store.resolve("helper").version == "1.1.0"
    assert store.resolve("helper@1.0.0").prompt.guidelines[1] == "Never guess."


def test_search_path_order_and_conflicts(store, tmp_path):
    extra = tmp_path / "project"
    write(extra / "helper@1.0.0.yaml", BASE)
    write(store.home / "helper@1.0.0.yaml", BASE)  # same content in two places: fine
    store.add_path(extra)
    assert store.dirs[0] == extra
    assert store.resolve("helper").path == extra / "helper@1.0.0.yaml"
    write(store.home / "helper@1.0.0.yaml", BASE.replace("Never guess.", "Guess freely."))
    with pytest.raises(PellucidError, match="different content"):
        store.resolve("helper")


def test_default_dir_follows_pellucid_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PELLUCID_HOME", str(tmp_path))
    assert default_prompt_dir() == tmp_path / "prompts"
    assert PromptStore().dirs == [tmp_path / "prompts", BUILTIN_DIR]


def test_save_writes_and_refuses_to_overwrite(store):
    (p,) = parse_prompts(BASE)
    path = store.save(p)
    assert path == store.home / "helper@1.0.0.yaml"
    assert load_file(path)[0].sha256 == p.sha256
    assert store.save(p) == path  # same content again: nothing to do
    changed = PromptFile("helper", "1.0.0", SystemPrompt(role="someone else"))
    with pytest.raises(PellucidError) as e:
        store.save(changed)
    assert "already exists" in str(e.value) and "helper@1.0.1" in str(e.value)
    assert e.value.status == 409
    assert load_file(path)[0].sha256 == p.sha256  # untouched
    bumped = PromptFile("helper", bump("1.0.0"), changed.prompt)
    assert store.save(bumped).name == "helper@1.0.1.yaml"
    assert store.resolve("helper").prompt.role == "someone else"
    # no temp files are left behind
    assert sorted(os.listdir(store.home)) == ["helper@1.0.0.yaml", "helper@1.0.1.yaml"]


def test_save_refuses_a_file_that_appeared_in_another_directory(store, tmp_path):
    (p,) = parse_prompts(BASE)
    other = tmp_path / "other"
    write(other / "helper@1.0.0.yaml", BASE.replace("Never guess.", "x"))
    with pytest.raises(PellucidError, match="already exists"):
        store.save(p, directory=other)


def test_diff_shows_fields_and_text():
    (a,) = parse_prompts(BASE)
    (b,) = parse_prompts(
        BASE.replace('"1.0.0"', '"1.1.0"').replace("Never guess.", "Never guess; ask instead.")
        + "constraints: [Keep it short.]\n"
    )
    d = diff(a, b)
    assert not d.same_content
    fields = {c.field: (c.before, c.after) for c in d.fields}
    assert fields["version"] == ("1.0.0", "1.1.0")
    assert fields["guidelines"][1] == ["Always be brief.", "Never guess; ask instead."]
    assert fields["constraints"] == (None, ["Keep it short."])
    assert "-2. Never guess.\n+2. Never guess; ask instead.\n" in d.unified
    assert "+Constraints:\n+- Keep it short.\n" in d.unified
    text = d.render()
    assert text.startswith(f"--- helper@1.0.0  sha256:{a.short_hash}\n+++ helper@1.1.0")
    assert "constraints: (absent) -> " in text
    same = diff(a, a)
    assert same.same_content and same.fields == [] and same.unified == ""
    assert "(no changes)" in same.render()


def test_diff_of_examples_and_style():
    (a,) = parse_prompts(BASE)
    (b,) = parse_prompts(
        BASE.replace("assistant: hello", "assistant: hey").replace("concise", "detailed")
    )
    d = diff(a, b)
    assert {c.field for c in d.fields} == {"examples", "style.length"}
    assert "-Assistant: hello\n+Assistant: hey\n" in d.unified


MALFORMED = [
    # (file text, line, field, words in the message)
    ("name: helper\nversion: '1.0.0'\nstyle:\n  length: short\n", 4, "style.length", "concise"),
    ("name: helper\nversion: '1.0.0'\nrole: x\ncolour: red\n", 4, "colour", "unknown field"),
    ("name: helper\nversion: 1.0\n", 2, "version", "quote it"),
    ("name: helper\nversion: '1.0'\n", 2, "version", "MAJOR.MINOR.PATCH"),
    (
        "name: helper\nversion: '1.0.0'\nexamples:\n  - user: hi\n    assistent: ho\n",
        5,
        "examples[0].assistent",
        "unknown field",
    ),
    (
        "name: helper\nversion: '1.0.0'\nexamples:\n  - user: hi\n",
        4,
        "examples[0].assistant",
        "required",
    ),
    (
        "name: helper\nversion: '1.0.0'\nguidelines:\n  - ok\n  - [not, text]\n",
        5,
        "guidelines[1]",
        "valid string",
    ),
    ("name: helper\nversion: '1.0.0'\nrole: a\nrole: b\n", 4, "role", "twice"),
    ("name: helper\n", 1, "version", "required"),
    (
        "name: helper\nversion: '1.0.0'\nstyle:\n  skeleton:\n    name: s\n    sections:\n"
        "      - hint: h\n",
        7,
        "style.skeleton.sections[0].title",
        "required",
    ),
    (
        "name: helper\nversion: '1.0.0'\nstyle:\n  skeleton: nope\n",
        4,
        "style.skeleton",
        "built-in skeletons",
    ),
]


@pytest.mark.parametrize(("text", "line", "field", "words"), MALFORMED)
def test_malformed_file_error_names_file_line_and_field(tmp_path, text, line, field, words):
    path = write(tmp_path / "helper@1.0.0.yaml", text)
    with pytest.raises(PellucidError) as e:
        load_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: field {field}: "), msg
    assert words in msg
    assert e.value.param == field


def test_malformed_yaml_and_file_shape(tmp_path):
    cases = {
        "helper@1.0.0.yaml": ("name: helper\nrole: [a\n", ":3: not valid YAML"),
        "helper@1.0.1.yaml": ("", "empty prompt file"),
        "helper@1.0.2.yaml": ("- a\n- b\n", "holds a mapping"),
        "helper.yaml": (
            "name: helper\nversion: '1.0.0'\n---\nname: helper\nversion: '1.0.0'\n",
            "appears twice",
        ),
        "mixed.yaml": (
            "name: helper\nversion: '1.0.0'\n---\nname: other\nversion: '1.0.1'\n",
            "versions of one prompt",
        ),
    }
    for fname, (text, words) in cases.items():
        path = write(tmp_path / fname, text)
        with pytest.raises(PellucidError) as e:
            load_file(path)
        assert str(e.value).startswith(str(path)), e.value
        assert words in str(e.value), e.value


def test_a_file_read_by_path_may_have_any_name(tmp_path, store):
    # the file name is the user's business: only the store finds prompts by file name
    old = write(tmp_path / "old.yaml", BASE)
    new = write(tmp_path / "drafts" / "helper@9.9.9.yaml", BASE.replace("Never guess.", "Be kind."))
    ((a,), (b,)) = load_file(old), load_file(new)
    assert (a.ref, b.ref, a.path, b.path) == ("helper@1.0.0", "helper@1.0.0", old, new)
    d = diff(a, b)
    assert [c.field for c in d.fields] == ["guidelines"]
    assert (d.a, d.b) == (f"helper@1.0.0 ({old})", f"helper@1.0.0 ({new})")  # same ref: the files
    # saving names the stored file after what it holds
    saved = store.save(a)
    assert saved == store.home / "helper@1.0.0.yaml" and store.resolve("helper").sha256 == a.sha256


@pytest.mark.parametrize(
    ("fname", "text", "words"),
    [
        ("my-prompt.yaml", BASE, "field name: 'helper' does not match the file name"),
        ("helper@1.0.4.yaml", BASE, "field version: '1.0.0' does not match the file name"),
        ("helper@1.0.0.yaml", BASE + "---\n" + BASE.replace("1.0.0", "1.0.1"), "holds one version"),
        ("Helper.yaml", BASE, "with a lowercase name"),
    ],
)
def test_the_store_asks_file_names_to_say_what_they_hold(store, fname, text, words):
    path = write(store.home / fname, text)
    load_file(path)  # fine as a file
    good, errors = store.scan()
    assert good == [] and len(errors) == 1
    msg = str(errors[0])
    assert msg.startswith(f"{path}: ") and words in msg, msg
    assert "is found by its file name" in msg  # the error says why the rule exists


def test_store_scan_reports_bad_files_and_keeps_good_ones(store):
    write(store.home / "helper@1.0.0.yaml", BASE)
    write(store.home / "broken@1.0.0.yaml", "name: broken\nversion: '1.0.0'\nrole: [\n")
    good, errors = store.scan()
    assert [p.ref for p in good] == ["helper@1.0.0"]
    assert len(errors) == 1 and "broken@1.0.0.yaml" in str(errors[0])
    with pytest.raises(PellucidError, match="broken"):
        store.list()
    assert store.resolve("helper").ref == "helper@1.0.0"  # other names are unaffected


def test_refs_and_versions():
    assert split_ref("a-b.c_d@1.2.3") == ("a-b.c_d", "1.2.3")
    assert split_ref("tutor") == ("tutor", None)
    for bad in ["", "Tutor", "a/b", "a@1.2", "a@latest"]:
        with pytest.raises(PellucidError):
            split_ref(bad)
    assert sorted(["1.10.0", "1.9.0", "2.0.0", "1.9.10"], key=version_key) == [
        "1.9.0",
        "1.9.10",
        "1.10.0",
        "2.0.0",
    ]
    assert (bump("1.2.3"), bump("1.2.3", "minor"), bump("1.2.3", "major")) == (
        "1.2.4",
        "1.3.0",
        "2.0.0",
    )


def test_python_prompt_file_validates():
    with pytest.raises(PellucidError, match="version"):
        PromptFile("ok", "one", SystemPrompt(role="x"))
    with pytest.raises(PellucidError, match="name"):
        PromptFile("Bad Name", "1.0.0", SystemPrompt(role="x"))
