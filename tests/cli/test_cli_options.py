"""The shared CLI sampling and structured-output flags: declared once (cli/common.py), the
same on every command that generates, checked before the model loads."""

from __future__ import annotations

import pytest
import typer.main
from typer.testing import CliRunner

from pellucid.cli import _register, app
from pellucid.cli.common import SAMPLING_OPTIONS, STRUCTURED_OPTIONS

_register()


def _flags(command: str) -> set[str]:
    click_cmd = typer.main.get_command(app).commands[command]
    return {opt for p in click_cmd.params for opt in p.opts if opt.startswith("--")}


def _declared(group: dict, without: tuple[str, ...] = ()) -> set[str]:
    names = set()
    for name, (annotation, _default) in group.items():
        if name not in without:
            info = annotation.__metadata__[0]
            names |= {d for decl in info.param_decls for d in decl.split("/") if d.startswith("--")}
    return names


@pytest.mark.parametrize("command, without", [("generate", ()), ("chat", ()), ("speculate", ()),
                                              ("next-token", ("max_tokens", "stop"))])  # fmt: skip
def test_every_generating_command_takes_the_one_set_of_sampling_flags(command, without):
    flags = _flags(command)
    assert _declared(SAMPLING_OPTIONS, without) <= flags
    assert "--stop-token-ids" in flags or command == "next-token"


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_structured_output_flags_are_declared_once(command):
    assert _declared(STRUCTURED_OPTIONS) <= _flags(command)


def test_stop_token_ids_is_the_apis_name(real_cli, real_llm):
    """--stop-token-ids (SamplingParams.stop_token_ids in kebab case) stops where the token is
    generated (one name per flag: the singular alias is gone, so help reads at 80 columns)."""
    greedy = real_llm.generate("The capital of France is", max_tokens=8, temperature=0)
    stop_at = greedy.token_ids[3]
    r = real_cli("generate", "The capital of France is", "-n", "8", "--stop-token-ids", str(stop_at))
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == real_llm.tokenizer.decode(greedy.token_ids[:3]).strip()


def test_a_logit_bias_by_text_is_checked_before_the_model_loads(real_path, monkeypatch):
    """A --logit-bias text that is not one token fails from the tokenizer in the file's
    metadata: no model is loaded for a command that cannot run."""
    import pellucid.cli.generate as gen

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(gen, "load_llm", no_load)
    r = CliRunner().invoke(app, ["generate", "hi", "--logit-bias", " Parisxyzzy=5"])
    message = str(r.exception)  # (the CLI's main() prints a PellucidError as one line)
    assert r.exit_code != 0 and "was loaded" not in message
    assert message.startswith("--logit-bias") and "not a single token" in message, message
