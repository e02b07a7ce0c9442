"""The default format is chosen per model by measured quality, in one place (pellucid.runtime).

A model's default is the first of int4, int8, none whose recorded mean KL from float32 is no
worse than llama.cpp's on the same file; a model that falls back says so when it loads.
"""

from __future__ import annotations

import logging

import pytest
from tiny import tiny_hf_llama, write_llama_gguf

from pellucid import runtime


def test_both_real_models_keep_int4_by_their_measured_quality():
    for name, kl in runtime.MEASURED_KL.items():
        assert kl["int4"] <= kl["llama.cpp"], name
        assert runtime.resolve_quant("auto", name) == ("int4", "")


def test_a_model_whose_int4_fails_falls_back_and_says_why(monkeypatch):
    monkeypatch.setitem(runtime.MEASURED_KL, "some-model", {"llama.cpp": 0.01, "int4": 0.5, "int8": 0.002})
    fmt, why = runtime.resolve_quant("auto", "some-model")
    assert fmt == "int8"
    assert "int4" in why and "0.5" in why and "0.01" in why
    monkeypatch.setitem(runtime.MEASURED_KL, "worse-model", {"llama.cpp": 0.01, "int4": 0.5, "int8": 0.2})
    assert runtime.resolve_quant("auto", "worse-model")[0] is None  # no quantized format passes: float weights
    assert runtime.resolve_quant("auto-a8", "some-model") == ("int8-a8", why)  # the same choice, 8-bit activations
    assert runtime.resolve_quant("auto-a8", "worse-model")[0] is None


def test_unmeasured_models_and_explicit_formats_are_left_alone():
    assert runtime.resolve_quant("auto", "/some/new.gguf") == ("int4", "")
    assert runtime.resolve_quant("int8", "smollm2-135m-instruct") == ("int8", "")
    assert runtime.resolve_quant("none", "gemma3-270m") == (None, "")
    assert runtime.resolve_quant("auto-a8", "qwen2.5-coder-1.5b-instruct") == ("int4-a8", "")


def test_loading_with_auto_applies_the_rule_and_logs_it(tmp_path, monkeypatch, caplog):
    from pellucid.loading import load_model

    path = write_llama_gguf(tiny_hf_llama(seed=5, d_model=64, heads=4, kv_heads=2, d_ff=128), tmp_path / "tiny.gguf")
    monkeypatch.setitem(runtime.MEASURED_KL, str(path), {"llama.cpp": 0.01, "int4": 0.5, "int8": 0.002})
    with caplog.at_level(logging.WARNING, logger="pellucid"):
        lm = load_model(path, quant="auto")
    assert lm.quant == "int8"
    assert any("falls back" in r.message or "using int8" in r.message for r in caplog.records)


@pytest.mark.parametrize("surface", ["api", "cli", "server"])
def test_api_cli_and_server_default_to_the_rule(surface):
    import inspect

    from pellucid.api import LLM
    from pellucid.cli import common
    from pellucid.server.state import ServerConfig

    default = {"api": inspect.signature(LLM).parameters["quant"].default, "cli": common.DEFAULT_QUANT,
               "server": ServerConfig().quant}[surface]  # fmt: skip
    assert default == runtime.DEFAULT_QUANT == "auto"
