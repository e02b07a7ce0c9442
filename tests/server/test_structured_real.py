"""Structured output on the real default model: finished outputs always parse and validate.

Schemas: 34 from JSONSchemaBench (../shared/data/jsonschemabench beside the checkout, or $PELLUCID_JSONSCHEMABENCH;
its Github_trivial folder for patterns, bounds, ranges, refs and anyOf, Glaiveai2K for
function-calling arguments of real-world shape) and 7 of our own in OpenAI's strict style.
Outputs cut by max_tokens are counted apart and must be marked incomplete.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import uuid
from pathlib import Path

import jsonschema
import pytest
from paths import SHARED

from pellucid.engine.request import Request
from pellucid.errors import PellucidError
from pellucid.sampling.constraints import is_incomplete, make_constraint
from pellucid.sampling.params import SamplingParams

pytestmark = pytest.mark.real



BENCH_DIR = Path(os.environ.get("PELLUCID_JSONSCHEMABENCH", SHARED / "data" / "jsonschemabench"))
BENCH = [
    # Github_trivial: patterns, array bounds, numeric ranges, multipleOf, refs, anyOf, formats
    "Github_trivial/o78451.json", "Github_trivial/o42291.json", "Github_trivial/o69510.json",
    "Github_trivial/o25189.json", "Github_trivial/o66644.json", "Github_trivial/o76868.json",
    "Github_trivial/o53905.json", "Github_trivial/o78110.json", "Github_trivial/o69511.json",
    "Github_trivial/o75595.json", "Github_trivial/o51224.json", "Github_trivial/o10082.json",
    "Github_trivial/o83695.json", "Github_trivial/o83688.json", "Github_trivial/o91001.json",
    "Github_trivial/o25159.json", "Github_trivial/o70327.json", "Github_trivial/o78117.json",
    "Github_trivial/o17657.json", "Github_trivial/o10018.json", "Github_trivial/o25981.json",
    "Github_trivial/o44238.json", "Github_trivial/o41673.json", "Github_trivial/o74178.json",
    # Glaiveai2K: nested objects, arrays of objects, enums, ranges, date/time/email formats
    "Glaiveai2K/analyze_health_data_4ad104b4.json", "Glaiveai2K/find_restaurants_ca892923.json",
    "Glaiveai2K/create_user_633f87f7.json", "Glaiveai2K/generate_random_password_09ce64ee.json",
    "Glaiveai2K/calculate_area_4030dbbd.json", "Glaiveai2K/generate_invoice_65aa9269.json",
    "Glaiveai2K/create_calendar_event_9f783663.json", "Glaiveai2K/search_news_8cfb92ac.json",
    "Glaiveai2K/track_calories_ecbd9766.json", "Glaiveai2K/search_hotels_7c13ce22.json",
]  # fmt: skip

OWN = {
    "colors": {"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]}, "minItems": 3, "maxItems": 3}},
               "required": ["colors"], "additionalProperties": False},
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
               "email": {"type": "string", "format": "email"}, "nickname": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]}},
               "required": ["name", "age", "email", "nickname"], "additionalProperties": False},
    "order": {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
              "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
                  "sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{3}$"}, "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                  "unit_price": {"type": "number", "exclusiveMinimum": 0, "maximum": 10000}}, "required": ["sku", "quantity", "unit_price"], "additionalProperties": False}},
              "status": {"type": "string", "enum": ["pending", "shipped", "delivered"]}, "created": {"type": "string", "format": "date-time"}},
              "required": ["order_id", "items", "status", "created"], "additionalProperties": False},
    "weather": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "temperature_c": {"type": "number", "minimum": -90, "maximum": 60},
                "conditions": {"type": "string", "enum": ["sunny", "cloudy", "rain", "snow"]},
                "forecast": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {"day": {"type": "string", "format": "date"},
                             "high": {"type": "integer", "minimum": -90, "maximum": 60}}, "required": ["day", "high"]}}},
                "required": ["city", "temperature_c", "conditions"]},
    "event_ref": {"$defs": {"point": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                  "lon": {"type": "number", "minimum": -180, "maximum": 180}}, "required": ["lat", "lon"]}},
                  "type": "object", "properties": {"title": {"type": "string", "minLength": 3, "maxLength": 40}, "where": {"$ref": "#/$defs/point"},
                  "id": {"type": "string", "format": "uuid"}}, "required": ["title", "where", "id"]},
    "answer_or_error": {"anyOf": [{"type": "object", "properties": {"answer": {"type": "integer"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
                                   "required": ["answer", "confidence"], "additionalProperties": False},
                                  {"type": "object", "properties": {"error": {"type": "string", "maxLength": 60}}, "required": ["error"], "additionalProperties": False}]},
    "tags": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 50}, "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+(-[a-z]+)*$", "maxLength": 15},
             "minItems": 1, "maxItems": 4}, "published": {"type": "boolean"}, "rating": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["title", "tags", "published"]},
}  # fmt: skip

MAX_TOKENS = 96
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
TIME = re.compile(r"^\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?$")
HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def format_checker() -> jsonschema.FormatChecker:
    """jsonschema's checker plus the formats whose optional checkers are not installed here."""
    fc = jsonschema.FormatChecker()

    @fc.checks("date-time", raises=ValueError)
    def _dt(v):
        if not isinstance(v, str):
            return True
        if not RFC3339.match(v):
            raise ValueError(v)
        dt.datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00").replace("t", "T"))
        return True

    @fc.checks("time", raises=ValueError)
    def _time(v):
        if isinstance(v, str) and not TIME.match(v):
            raise ValueError(v)
        return True

    @fc.checks("uuid", raises=ValueError)
    def _uuid(v):
        if isinstance(v, str):
            uuid.UUID(v)
        return True

    @fc.checks("hostname")
    def _host(v):
        return not isinstance(v, str) or bool(HOSTNAME.match(v))

    return fc


def validate(schema: dict, value) -> None:
    jsonschema.validators.validator_for(schema)(schema, format_checker=format_checker()).validate(value)


def prompt_for(llm, schema: dict) -> str:
    desc = schema.get("description") or schema.get("title") or ""
    msg = ("Fill in realistic example values. Reply with JSON that follows this JSON schema"
           + (f" ({desc})" if desc else "") + ":\n" + json.dumps(schema, separators=(",", ":")))  # fmt: skip
    return llm.render_chat([{"role": "user", "content": msg}])


def run_all(llm, reqs: list[Request]) -> None:
    """Run requests with different constraints (or none) as one continuous batch."""
    for r in reqs:
        llm.engine.add_request(r)
    try:
        while not all(r.finished for r in reqs):
            llm.engine.step()
    finally:
        for r in reqs:
            if not r.finished:
                llm.engine.abort(r.request_id)


def load_schemas() -> list[tuple[str, dict]]:
    if not BENCH_DIR.is_dir():
        pytest.skip(f"JSONSchemaBench not found at {BENCH_DIR} (set PELLUCID_JSONSCHEMABENCH)")
    return [(f, json.loads((BENCH_DIR / f).read_text())) for f in BENCH] + list(OWN.items())


# -- the concept note's example -----------------------------------------------------------------
def test_list_3_colors_as_json(real_llm):
    messages = [{"role": "user", "content": "List 3 colors as JSON"}]
    out = real_llm.chat(messages, response_format={"type": "json_object"}, temperature=0, max_tokens=128)
    print("\nList 3 colors as JSON ->", out.text, out.finish_reason)
    assert out.finish_reason == "stop" and not out.incomplete
    value = json.loads(out.text)
    assert isinstance(value, dict)
    assert out.text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)  # compact, no stray whitespace
    assert out.token_ids[-1] not in real_llm.tokenizer.eog_ids  # ended by the grammar, right after the root value
    free = real_llm.chat(messages, temperature=0, max_tokens=64)
    with pytest.raises(ValueError):  # what the constraint is for: unconstrained, the model wraps it in prose/fences
        json.loads(free.text)


# -- 41 schemas, one continuous batch ---------------------------------------------------------------
def test_finished_outputs_validate(real_llm):
    schemas = load_schemas()
    assert len(schemas) >= 40
    reqs = []
    for name, schema in schemas:
        c = make_constraint(real_llm.tokenizer, json_schema=schema)  # strict: every one is supported
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, repetition_penalty=1.2)
        reqs.append(real_llm.request(prompt_for(real_llm, schema), params, request_id=f"schema-{name}", constraint=c))
    run_all(real_llm, reqs)
    finished, cut = [], []
    for (name, schema), r in zip(schemas, reqs, strict=True):
        if r.finish_reason == "stop":
            assert not is_incomplete(r.constraint, r.finish_reason, r.stop_reason), name
            validate(schema, json.loads(r.text))  # parses and validates, or the test fails here
            finished.append(name)
        else:
            assert r.finish_reason == "length", (name, r.finish_reason)
            assert len(r.output_ids) == MAX_TOKENS
            assert is_incomplete(r.constraint, r.finish_reason, r.stop_reason), name
            cut.append(name)
    print(f"\n{len(finished)} of {len(schemas)} finished and validate; {len(cut)} cut by max_tokens={MAX_TOKENS} "
          f"(incomplete): {cut}")  # fmt: skip
    assert len(finished) >= 30, cut


# -- batches mixing constrained and unconstrained requests -----------------------------------------
def test_mixed_batch_does_not_disturb(real_llm):
    tok = real_llm.tokenizer
    plain_prompt = real_llm.render_chat([{"role": "user", "content": "Name a famous painter."}])
    params = SamplingParams(temperature=0, max_tokens=24)
    alone = real_llm.request(plain_prompt, params)
    run_all(real_llm, [alone])

    schema = OWN["person"]
    mixed = [
        real_llm.request(plain_prompt, params),
        real_llm.request(prompt_for(real_llm, schema), SamplingParams(temperature=0, max_tokens=64),
                         constraint=make_constraint(tok, json_schema=schema)),  # fmt: skip
        real_llm.request(real_llm.render_chat([{"role": "user", "content": "Is water wet? Answer yes or no."}]),
                         SamplingParams(temperature=0, max_tokens=8), constraint=make_constraint(tok, choice=["yes", "no"])),  # fmt: skip
        real_llm.request(plain_prompt, SamplingParams(temperature=0.8, seed=5, max_tokens=12)),
    ]
    run_all(real_llm, mixed)
    assert mixed[0].output_ids == alone.output_ids  # the unconstrained request is not disturbed
    person = mixed[1]
    if person.finish_reason == "stop":
        validate(schema, json.loads(person.text))
    assert mixed[2].text in ("yes", "no") and mixed[2].finish_reason == "stop"
    # and the constrained one gives the same greedy tokens as when run alone
    again = real_llm.request(prompt_for(real_llm, schema), SamplingParams(temperature=0, max_tokens=64),
                             constraint=make_constraint(tok, json_schema=schema))  # fmt: skip
    run_all(real_llm, [again])
    assert again.output_ids == person.output_ids


# -- limits and errors ---------------------------------------------------------------------------------
def test_cut_by_max_tokens_is_incomplete(real_llm):
    schema = OWN["order"]
    out = real_llm.generate(prompt_for(real_llm, schema), json_schema=schema, temperature=0, max_tokens=6)
    assert out.finish_reason == "length" and out.incomplete
    with pytest.raises(ValueError):
        json.loads(out.text)
    cut = real_llm.generate("Say hi.", choice=["hello there", "hi"], temperature=0, max_tokens=12, stop=["hello"])
    assert cut.finish_reason != "stop" or cut.incomplete or cut.text == "hi"


def test_invalid_schema_rejected_before_generation(real_llm):
    before = real_llm.engine.stats.generated_tokens
    bad = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}
    with pytest.raises(PellucidError) as e:
        real_llm.chat([{"role": "user", "content": "Tags?"}], json_schema=bad, max_tokens=16)
    assert "'uniqueItems' at #/properties/tags" in e.value.message
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"when": {"type": "string", "format": "jsonpath"}}}}}  # fmt: skip
    with pytest.raises(PellucidError) as e:
        real_llm.chat([{"role": "user", "content": "When?"}], response_format=rf, max_tokens=16)
    assert "'format' at #/properties/when/format" in e.value.message and e.value.param == "response_format.json_schema.schema"
    assert real_llm.engine.stats.generated_tokens == before and not real_llm.engine.has_unfinished()


# -- other kinds and other sampling controls --------------------------------------------------------
def test_regex_choice_grammar_on_the_model(real_llm):
    tok = real_llm.tokenizer

    def ask(q: str) -> str:
        return real_llm.render_chat([{"role": "user", "content": q}])

    date_re = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,4}/'
    reqs = [
        real_llm.request(ask("When did the first person walk on the moon? Give the date."), SamplingParams(temperature=0, max_tokens=16),
                         constraint=make_constraint(tok, regex=date_re)),
        real_llm.request(ask("Review: 'I loved this film.' Sentiment?"), SamplingParams(temperature=0, max_tokens=8),
                         constraint=make_constraint(tok, choice=["positive", "negative", "neutral"])),
        real_llm.request(ask("What is 12 + 30?"), SamplingParams(temperature=0, max_tokens=16), constraint=make_constraint(tok, grammar=lark)),
    ]  # fmt: skip
    run_all(real_llm, reqs)
    assert all(r.finish_reason == "stop" for r in reqs), [(r.text, r.finish_reason) for r in reqs]
    assert re.fullmatch(date_re, reqs[0].text), reqs[0].text
    assert reqs[1].text in ("positive", "negative", "neutral")
    assert re.fullmatch(r"The answer is [0-9]{1,4}\.", reqs[2].text), reqs[2].text


def test_schema_with_sampling_controls_is_valid_and_seeded(real_llm):
    schema = OWN["weather"]
    kw = dict(json_schema=schema, temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, frequency_penalty=0.4,
              presence_penalty=0.2, seed=11, max_tokens=MAX_TOKENS)  # fmt: skip
    outs = real_llm.generate([prompt_for(real_llm, schema)] * 2, **kw)
    again = real_llm.generate(prompt_for(real_llm, schema), **kw)
    assert outs[0].text == outs[1].text == again.text  # same seed, same request: the same tokens
    for o in (*outs, again):
        assert o.finish_reason in ("stop", "length")
        if o.finish_reason == "stop":
            assert not o.incomplete
            validate(schema, json.loads(o.text))
        else:
            assert o.incomplete
