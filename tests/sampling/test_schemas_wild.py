"""Schemas as written in the wild, without a model: oneOf accepted by default (as anyOf, the
output checked afterwards), strict=True still refusing it, default bounds that only narrow."""

from __future__ import annotations

import json

import llguidance as llg
import pytest
from tiny import byte_tokenizer

from pellucid.errors import PellucidError
from pellucid.sampling import constraints as C
from pellucid.sampling import json_schema as S

OVERLAP = {"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}, {"type": "string", "minLength": 2}]}}, "required": ["a"]}


def accepts(schema: dict, text: str, strict: bool | None = None) -> bool:
    g = llg.LLMatcher.grammar_from_json_schema(S.prepare_schema(schema, strict=strict))
    m = llg.LLMatcher(byte_tokenizer(), g, log_level=0)
    return all(m.consume_token(b) for b in text.encode()) and m.is_accepting()


def test_one_of_default_strict_and_lenient():
    with pytest.raises(PellucidError, match="oneOf"):
        C.make_constraint(None, json_schema=OVERLAP, strict=True)
    assert C.make_constraint(None, json_schema=OVERLAP) is None  # accepted (checked only: no tokenizer)
    assert C.make_constraint(None, json_schema=OVERLAP, strict=False) is None
    assert accepts(OVERLAP, '{"a":"xy"}') and accepts(OVERLAP, '{"a":"x"}')
    # afterwards, against the real schema: "xy" matches both branches, so not exactly one
    assert S.schema_error(OVERLAP, '{"a":"x"}') is None
    assert "valid under each of" in S.schema_error(OVERLAP, '{"a":"xy"}')
    assert S.schema_error(OVERLAP, '{"a":').startswith("not valid JSON")


def test_one_of_renamed_but_not_under_not():
    s = {"oneOf": [{"type": "string"}], "not": {"oneOf": [{"type": "integer"}]}}
    out, paths = S.one_of_as_any_of(s)
    assert paths == ["#/oneOf"] and out["anyOf"] == [{"type": "string"}] and "oneOf" in out["not"]


def test_default_bounds_only_narrow():
    s = {"type": "object", "properties": {
        "s": {"type": "string"}, "own": {"type": "string", "maxLength": 500}, "pat": {"type": "string", "pattern": "^a+$"},
        "arr": {"type": "array", "items": {"type": "integer"}}, "big": {"type": "array", "minItems": 20},
        "x": {"type": "number"}, "step": {"type": "number", "multipleOf": 0.5}, "free": {"type": "object"},
        "t": {"type": "string", "format": "time"}}}  # fmt: skip
    p = S.narrow(s)["properties"]
    assert p["s"]["maxLength"] == S.DEFAULT_MAX_STRING and p["own"]["maxLength"] == 500 and "maxLength" not in p["pat"]
    assert p["arr"]["maxItems"] == S.DEFAULT_MAX_ITEMS and "maxItems" not in p["big"]  # never below the schema's minimum
    assert p["x"]["multipleOf"] == S.NUMBER_STEP and p["step"]["multipleOf"] == 0.5
    assert p["x"]["maximum"] == S.SAFE_INTEGER and p["free"]["maxProperties"] == S.DEFAULT_MAX_ITEMS
    assert accepts(s, '{"x":10.566777}') and not accepts(s, '{"x":10.5666666}')  # no endless decimals
    assert not accepts(s, json.dumps({"s": "a" * (S.DEFAULT_MAX_STRING + 1)}, separators=(",", ":")))
    assert accepts(s, '{"t":"12:00:00.123456Z"}') and not accepts(s, '{"t":"12:00:00.1234567Z"}')
    # branches of a combination are left alone: a bound there could contradict the other side
    combo = {"allOf": [{"type": "object", "properties": {"a": {}}, "required": ["a"]}, {"properties": {"b": {}}}]}
    assert "maxProperties" not in S.narrow(combo)["allOf"][0]
    assert C.make_constraint(None, json_schema=combo) is None


def test_close_objects_through_required_only_branches():
    s = {"type": "object", "properties": {"a": {}, "b": {}}, "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}
    assert S.close_objects(s)["additionalProperties"] is False
    other = {**s, "anyOf": [{"required": ["a"]}, {"properties": {"c": {}}}]}
    assert "additionalProperties" not in S.close_objects(other)
