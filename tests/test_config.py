"""The YAML inference config: the concept note's example, errors with lines and near-misses,
defaults < config < flags."""

from __future__ import annotations

import textwrap

import pytest

from pellucid.config import load_config, merge_params, parse_config
from pellucid.errors import PellucidError

NOTE_CONFIG = """\
# Complete inference config
model:
  name: gpt-4o
  max_tokens: 4096

sampling:
  temperature: 0.7
  top_p: 0.9
  top_k: 50
  frequency_penalty: 0.5
  presence_penalty: 0.0

control:
  stop_sequences: ["\\n\\n", "END"]
  logit_bias: {}

system_prompt: |
  You are a helpful assistant.
  Be concise and accurate.
"""


def err(text: str) -> str:
    with pytest.raises(PellucidError) as e:
        parse_config(textwrap.dedent(text), "my.yaml")
    return e.value.message


def test_the_concept_note_config_names_a_model_we_cannot_serve():
    msg = err(NOTE_CONFIG)
    assert msg.startswith("my.yaml:3:")
    assert "'gpt-4o' is not a model pellucid can serve" in msg
    assert "smollm2-135m-instruct" in msg and "never substitutes" in msg


def test_the_concept_note_config_with_a_model_we_serve():
    cfg = parse_config(NOTE_CONFIG.replace("gpt-4o", "smollm2-135m-instruct"), "note.yaml")
    assert cfg.model == "smollm2-135m-instruct"
    assert cfg.system_prompt == "You are a helpful assistant.\nBe concise and accurate.\n"
    p = merge_params({"max_tokens": 128, "temperature": 0.0}, cfg, {})
    assert (p.temperature, p.top_p, p.top_k, p.frequency_penalty, p.presence_penalty) == (0.7, 0.9, 50, 0.5, 0.0)
    assert p.stop == ["\n\n", "END"] and p.max_tokens == 4096 and p.logit_bias == {}


def test_extras_and_empty_sections():
    cfg = parse_config("sampling:\n  min_p: 0.1\n  repetition_penalty: 1.2\n  seed: 3\ncontrol:\nmodel:\n", "x.yaml")
    p = merge_params({}, cfg, {})
    assert (p.min_p, p.repetition_penalty, p.seed) == (0.1, 1.2, 3)
    assert parse_config("", "empty.yaml").values == {}


def test_unknown_key_near_miss_and_line():
    msg = err("""\
        model:
          name: smollm2-135m-instruct
        sampling:
          temprature: 0.7
    """)
    assert msg.startswith("my.yaml:4:")
    assert "unknown key 'sampling.temprature'" in msg and "did you mean 'sampling.temperature'?" in msg
    assert "did you mean 'control.stop_sequences'" in err("control:\n  stop_sequence: [END]\n")
    assert "did you mean 'system_prompt'" in err("systemprompt: hi\n")


def test_key_in_the_wrong_section():
    msg = err("sampling:\n  temperature: 0.5\n  stop_sequences: [END]\n")
    assert msg.startswith("my.yaml:3:") and "belongs in the 'control' section" in msg


def test_unknown_section_lists_the_allowed_ones():
    msg = err("decoding:\n  temperature: 1\n")
    assert msg.startswith("my.yaml:1:") and "model, sampling, control, system_prompt" in msg


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("sampling:\n  top_p: 1.5\n", 2, ["sampling.top_p", "1.5", "(0, 1]"]),
        ("sampling:\n  temperature: hot\n", 2, ["sampling.temperature", "'hot'"]),
        ("model:\n  max_tokens: 0\n", 2, ["model.max_tokens", "1..inf"]),
        ("sampling:\n  top_k: 5\n  seed: x\n", 3, ["sampling.seed", "integer"]),
        ("control:\n  stop_sequences: 5\n", 2, ["control.stop_sequences", "list of non-empty strings"]),
        ("control:\n  logit_bias:\n    12: 5\n    ' Paris': -200\n", 4, ["logit_bias", "-200", "[-100, 100]"]),
        ("control:\n  logit_bias:\n    12: 500\n", 3, ["logit_bias[12]", "500"]),
        ("control:\n  logit_bias: [1, 2]\n", 2, ["control.logit_bias", "mapping"]),
        ("sampling: 0.7\n", 1, ["sampling", "must be a mapping"]),
        ("system_prompt: [a, b]\n", 1, ["system_prompt", "must be text"]),
        ("sampling:\n  top_k: 5\n  top_k: 6\n", 3, ["sampling.top_k", "appears twice"]),
        ("sampling:\n  top_k: [\n", 3, ["not valid YAML"]),
    ],
)
def test_bad_values_name_key_and_line(text, line, words):
    msg = err(text)
    assert msg.startswith(f"my.yaml:{line}:"), msg
    for w in words:
        assert w in msg, (w, msg)


def test_flags_override_config_override_defaults():
    cfg = parse_config("model:\n  max_tokens: 64\nsampling:\n  temperature: 0.7\n  top_k: 40\ncontrol:\n  stop_sequences: [END]\n")
    defaults = {"max_tokens": 128, "temperature": 0.0, "top_p": 0.95}
    p = merge_params(defaults, cfg, {"temperature": 0.2, "top_k": None, "stop": ["STOP"]})
    assert p.temperature == 0.2  # flag
    assert p.top_k == 40 and p.max_tokens == 64  # config (the None flag was not given)
    assert p.top_p == 0.95  # command default
    assert p.stop == ["STOP"]  # a list flag replaces the config's list


def test_flag_errors_name_the_flag_config_errors_the_line():
    cfg = parse_config("sampling:\n  temperature: 0.7\n", "c.yaml")
    with pytest.raises(PellucidError, match=r"^--top-p: top_p = 2.0 is out of range"):
        merge_params({}, cfg, {"top_p": 2.0}, flag_names={"top_p": "--top-p"})
    cfg = parse_config("model:\n  max_tokens: 5\ncontrol:\n  min_tokens: 3\n", "c.yaml")
    with pytest.raises(PellucidError, match=r"^c.yaml:4: control.min_tokens: min_tokens = 3 is out of range; allowed: 0..2") as e:
        merge_params({}, cfg, {"max_tokens": 2}, flag_names={"max_tokens": "--max-tokens"})
    assert e.value.param == "control.min_tokens"


def test_model_name_paths(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    cfg = parse_config(f"model:\n  name: {f}\n")
    assert cfg.model == str(f)
    (tmp_path / "conf.yaml").write_text("model:\n  name: m.gguf\n")
    assert load_config(tmp_path / "conf.yaml").model == str(tmp_path / "m.gguf")  # relative to the config
    assert "Did you mean 'smollm2-135m-instruct'" in err("model:\n  name: smollm2-135m\n")


def test_missing_config_file(tmp_path):
    with pytest.raises(PellucidError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_system_prompt_goes_through_the_resolver(monkeypatch):
    import pellucid.config as config

    monkeypatch.setattr(config, "resolve_system_prompt", lambda v, base_dir=None: f"<{v}>")
    assert parse_config("system_prompt: coding-assistant@1.0.0\n").system_prompt == "<coding-assistant@1.0.0>"
