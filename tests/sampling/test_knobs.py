"""The numeric sampling controls are declared once (sampling.params.KNOBS) and every door
takes each of them from that declaration: the CLI flag, the YAML config's `sampling:` key,
the HTTP bodies (OpenAI chat and completions, the Responses API, Anthropic messages), the
inspector's next-token body and slider, and the chain view's stage. A new control is its
SamplingParams field, its KNOBS entry and its sampler stage; nothing here names one."""

from __future__ import annotations

from dataclasses import fields

import pytest
from typer.testing import CliRunner

from pellucid.cli.common import SAMPLING_OPTIONS
from pellucid.config import SCHEMA
from pellucid.errors import PellucidError
from pellucid.sampling.params import KNOBS, SamplingParams
from pellucid.sampling.sampler import STAGES
from pellucid.server import protocol
from pellucid.server.inspector import NextTokenBody, page_html

DEFAULTS = {f.name: f.default for f in fields(SamplingParams)}
BODIES = [protocol.ChatCompletionRequest, protocol.CompletionRequest, protocol.ResponsesRequest,
          protocol.AnthropicMessagesRequest]  # fmt: skip


@pytest.mark.parametrize("name", list(KNOBS))
def test_every_door_takes_the_control_from_its_declaration(name):
    k = KNOBS[name]
    assert DEFAULTS[name] == k.off  # the default changes nothing
    assert name in SAMPLING_OPTIONS  # a flag of generate, chat, bench ...
    assert SCHEMA["sampling"][name] == name  # a key under the config's sampling:
    for body in BODIES:
        assert name in body.model_fields, (body.__name__, name)
    assert (name in protocol._Extras.model_fields) == k.extra
    assert name in NextTokenBody.model_fields
    assert f'id="{name}" type="range"' in page_html()
    assert name in STAGES or name.endswith("_penalty")  # its own stage, or one of the penalties'


@pytest.mark.parametrize("name", list(KNOBS))
def test_a_value_out_of_range_is_refused_naming_the_control_and_the_range(name):
    k = KNOBS[name]
    bad = k.low - 1
    with pytest.raises(PellucidError, match=f"{name} = .* out of range; allowed: ") as e:
        SamplingParams(**{name: k.kind(bad)})
    assert e.value.param == name
    on = next(v for v in (k.slider[3], k.slider[0], k.slider[1]) if v != k.off)  # a slider value that acts
    assert k.setting(k.off) == "off" and k.setting(k.kind(on)) == f"{k.label}={on:g}"


def test_generate_help_lists_every_control():
    from pellucid.cli import _register, app

    _register()
    r = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for name in KNOBS:
        assert "--" + name.replace("_", "-") in r.output
