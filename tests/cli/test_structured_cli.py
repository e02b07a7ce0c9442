"""`pellucid generate --json / --json-schema / --regex / --choice / --grammar` and the
config's control.response_format, in-process on the already loaded real model."""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.real




def test_json_schema_file(real_cli, tmp_path):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"]}  # fmt: skip
    f = tmp_path / "person.json"
    f.write_text(json.dumps(schema))
    r = real_cli("generate", "A person as JSON:", "--json-schema", str(f), "--max-tokens", "40")
    assert r.exit_code == 0, r.output
    value = json.loads(r.stdout)
    assert set(value) == {"name", "age"} and 0 <= value["age"] <= 120


def test_choice_regex_grammar(real_cli, tmp_path):
    r = real_cli("generate", "Q: Is the sky blue? A:", "--choice", " yes", "--choice", " no")
    assert r.exit_code == 0, r.output
    assert r.stdout.rstrip("\n") in (" yes", " no")
    r = real_cli("generate", "The year the Berlin wall fell:", "--regex", " [0-9]{4}")
    assert r.exit_code == 0 and re.fullmatch(r" [0-9]{4}\n", r.stdout), r.output
    g = tmp_path / "answer.lark"
    g.write_text('start: " The answer is " NUMBER "."\nNUMBER: /[0-9]+/\n')
    r = real_cli("generate", "What is 2 + 2?", "--grammar", str(g), "--max-tokens", "12")
    assert r.exit_code == 0 and re.fullmatch(r" The answer is [0-9]+\.\n", r.stdout), r.output


def test_cut_output_is_reported_incomplete(real_cli):
    r = real_cli("generate", "List 3 colors as JSON:", "--json", "--max-tokens", "4")
    assert r.exit_code == 1
    assert "incomplete" in r.output and "length" in r.output


def test_config_response_format(real_cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  max_tokens: 64\ncontrol:\n  response_format:\n    type: json_schema\n    json_schema:\n"
                   "      name: colors\n      schema:\n        type: object\n        properties:\n"
                   "          colors: {type: array, items: {type: string, maxLength: 12}, minItems: 3, maxItems: 3}\n"
                   "        required: [colors]\n")  # fmt: skip
    r = real_cli("generate", "List 3 colors as JSON:", "--config", str(cfg))
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["colors"]) == 3
    cfg.write_text("control:\n  response_format:\n    type: json_schema\n    json_schema: {name: x, schema: {type: array, uniqueItems: true}}\n")
    r = real_cli("generate", "x", "--config", str(cfg))
    said = r.output + str(r.exception)  # in-process, a PellucidError reaches us as the exception main() prints
    assert r.exit_code != 0 and "c.yaml:3" in said and "uniqueItems" in said, said


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--json", "--regex", "a"], "give one of --json"),
        (["--json-schema", "/nonexistent/schema.json"], "no such file"),
        (["--regex", "(a"], "--regex"),
    ],
)
def test_bad_flags_fail_before_generation(real_cli, args, message):
    r = real_cli("generate", "x", *args)
    said = r.output + str(r.exception)
    assert r.exit_code != 0 and message in said, said
