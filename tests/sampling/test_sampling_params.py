"""SamplingParams validation: errors name the field, the value and the valid range."""

from __future__ import annotations

import pytest

from pellucid.errors import PellucidError
from pellucid.sampling.bias import parse_bias_entry
from pellucid.sampling.params import SamplingParams


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"temperature": -0.1}, ["temperature", "-0.1", "[0, 100]"]),
        ({"temperature": "hot"}, ["temperature", "'hot'", "[0, 100]"]),
        ({"top_p": 0.0}, ["top_p", "0.0", "(0, 1]"]),
        ({"top_p": 1.5}, ["top_p", "1.5", "(0, 1]"]),
        ({"top_k": -1}, ["top_k", "-1", "0..inf", "0 = off"]),
        ({"top_k": 2.5}, ["top_k", "2.5", "integer"]),
        ({"min_p": 2}, ["min_p", "2", "[0, 1]"]),
        ({"frequency_penalty": 3}, ["frequency_penalty", "3", "[-2, 2]"]),
        ({"presence_penalty": -2.5}, ["presence_penalty", "-2.5", "[-2, 2]"]),
        ({"repetition_penalty": 0}, ["repetition_penalty", "0", "(0, 10]"]),
        ({"max_tokens": 0}, ["max_tokens", "0", "1..inf"]),
        ({"min_tokens": 5, "max_tokens": 3}, ["min_tokens", "5", "0..3", "at most max_tokens"]),
        ({"top_logprobs": 21}, ["top_logprobs", "21", "0..20"]),
        ({"logit_bias": {5: 101}}, ["logit_bias[5]", "101", "[-100, 100]"]),
        ({"logit_bias": {"Paris": 1}}, ["logit_bias key 'Paris'", "token id"]),
        ({"logit_bias": {-3: 1}}, ["logit_bias key -3", ">= 0"]),
        ({"stop": [""]}, ["stop sequence ''", "non-empty"]),
        ({"stop_token_ids": [-1]}, ["stop_token_ids entry -1", "0..inf"]),
        ({"seed": 1.5}, ["seed", "1.5", "integer"]),
        ({"logprobs": "yes"}, ["logprobs", "true or false"]),
    ],
)
def test_errors_name_field_value_and_range(kw, words):
    with pytest.raises(PellucidError) as e:
        SamplingParams(**kw)
    for w in words:
        assert w in e.value.message, (w, e.value.message)
    assert e.value.param == next(iter(kw))


def test_normalisation():
    p = SamplingParams(stop="END", logit_bias={"12": 5, 7: -100}, top_logprobs=3, stop_token_ids=(4,))
    assert p.stop == ["END"]
    assert p.logit_bias == {12: 5.0, 7: -100.0}  # JSON-style string ids become ints
    assert p.logprobs is True  # top_logprobs turns logprobs on
    assert p.stop_token_ids == [4]
    assert SamplingParams(stop=["a", "a", "b"]).stop == ["a", "b"]


def test_defaults_are_neutral():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (1.0, 0, 1.0, 0.0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)


def test_check_vocab():
    with pytest.raises(PellucidError, match=r"logit_bias token id 100 is not in the vocabulary \(0..99\)"):
        SamplingParams(logit_bias={100: 1}).check_vocab(100)
    SamplingParams(logit_bias={99: 1}).check_vocab(100)


@pytest.mark.parametrize(
    "entry, parsed",
    [("9=5", (9, 5.0)), (" Paris=-100", (" Paris", -100.0)), ('"9"=5', ("9", 5.0)), ("==1", ("=", 1.0)),
     ("a=b=2", ("a=b", 2.0))],
)  # fmt: skip
def test_parse_bias_entry(entry, parsed):
    assert parse_bias_entry(entry) == parsed


@pytest.mark.parametrize("entry, words", [("Paris", ["TOKEN=BIAS"]), ("x=lots", ["'lots'", "[-100, 100]"]),
                                          ("x=200", ["200", "[-100, 100]"])])  # fmt: skip
def test_parse_bias_entry_errors(entry, words):
    with pytest.raises(PellucidError) as e:
        parse_bias_entry(entry)
    for w in words:
        assert w in e.value.message


def test_one_builder_for_every_door():
    """pellucid.sampling exports SamplingParams and build_params, the one builder the API,
    the config, the CLI and the server use: layers low to high, a key replaces the one
    below it, unknown names and token ids outside the vocabulary are errors naming them."""
    from pellucid import sampling

    assert sampling.SamplingParams is SamplingParams
    p = sampling.build_params({"temperature": 0.0, "max_tokens": 10}, SamplingParams(top_k=5), {"max_tokens": None})
    assert (p.temperature, p.top_k, p.max_tokens) == (1.0, 5, None)  # a SamplingParams layer holds every field
    with pytest.raises(PellucidError, match="unknown sampling parameter 'temprature'"):
        sampling.build_params({"temprature": 0.5})
    with pytest.raises(PellucidError, match=r"logit_bias token id 99 is not in the vocabulary \(0\.\.49\)"):
        sampling.build_params({"logit_bias": {99: 1.0}}, vocab_size=50)
