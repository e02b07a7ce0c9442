"""Constraints without the model's forward pass: the vocabulary llguidance sees, masks
replayed over known token sequences, errors with schema paths, the sampler chain under a
mask. The tokenizer is the real default model's."""

from __future__ import annotations

import json

import pytest
import torch

from pellucid.errors import PellucidError
from pellucid.sampling import constraints as C
from pellucid.sampling import json_schema as S
from pellucid.sampling.params import SamplingParams
from pellucid.sampling.sampler import SequenceSampler, sample

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def tok(real_lm):
    return real_lm.tokenizer


def replay(c: C.Constraint, tok, text: str) -> None:
    """Feed `text` token by token, checking that each token is in the mask first."""
    for t in tok.encode(text, parse_special=False):
        m = c.allowed_mask()
        assert m[t], f"{tok.piece(t)!r} not allowed after {c.num_accepted} tokens"
        c.accept(t)


def allowed_pieces(c: C.Constraint, tok) -> set[bytes]:
    return {tok.token_bytes(i) for i in c.allowed_mask().nonzero().flatten().tolist()}


# -- the vocabulary ---------------------------------------------------------------------------
def test_llguidance_vocabulary_is_pellucids(tok):
    ll = C.ll_tokenizer(tok)
    assert ll is C.ll_tokenizer(tok)  # built once
    assert ll.vocab_size == tok.vocab_size
    assert sorted(ll.eos_tokens) == sorted(tok.eog_ids)
    ids = tok.encode('{"name": "Ünïcode ☃", "n": 12}')
    assert ll.decode_bytes(ids) == b"".join(tok.token_bytes(i) for i in ids)
    for i in sorted(tok.special_ids):
        assert ll.is_special_token(i)


def test_json_object_replay_ends_with_only_eog(tok):
    c = C.make_constraint(tok, json=True)
    assert c.allowed_mask().shape == (tok.vocab_size,) and c.allowed_mask().dtype == torch.bool
    assert allowed_pieces(c, tok) <= {b"{", b"{}", b'{"'}  # an object, nothing before it
    replay(c, tok, '{"colors":["red","green",{"x":null}],"n":-1.5e3,"ok":true}')
    assert c.is_finished() and c.is_accepting()
    assert set(c.allowed_mask().nonzero().flatten().tolist()) == set(tok.eog_ids)


def test_json_is_compact(tok):
    c = C.make_constraint(tok, json=True)
    replay(c, tok, '{"a"')
    assert all(p.startswith(b":") for p in allowed_pieces(c, tok))
    replay(c, tok, ":1")
    pieces = allowed_pieces(c, tok)
    assert pieces and all(p[:1] in b",}0123456789.eE" for p in pieces), sorted(pieces)[:20]
    assert not any(p.strip() == b"" for p in pieces)  # no whitespace-only tokens


def test_json_loose_separators(tok):
    c = C.make_constraint(tok, json_schema={"type": "object", "properties": {"a": {"type": "integer"}}}, compact=False)
    replay(c, tok, '{"a": 1}')
    assert c.is_finished()


def test_special_tokens_never_inside_json(tok):
    c = C.make_constraint(tok, json=True)
    replay(c, tok, '{"a":"')
    m = c.allowed_mask()
    assert not any(m[i] for i in tok.special_ids)


def test_schema_replay_and_order(tok):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
              "required": ["name", "age"]}  # fmt: skip
    c = C.make_constraint(tok, json_schema=schema)
    replay(c, tok, '{"name":"Ada","age":')
    assert not c.allowed_mask()[tok.encode("-")[0]]  # minimum 0
    replay(c, tok, "36}")
    assert c.is_finished()


def test_enum_and_pattern(tok):
    schema = {"type": "object", "properties": {"s": {"enum": ["low", "high"]}, "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"}},
              "required": ["s", "code"]}  # fmt: skip
    c = C.make_constraint(tok, json_schema=schema)
    replay(c, tok, '{"s":"')
    assert all(b"low".startswith(p) or b"high".startswith(p) or p in (b'low"', b'high"') for p in allowed_pieces(c, tok))
    replay(c, tok, 'high","code":"AB')
    assert all(p[:1].isdigit() for p in allowed_pieces(c, tok))
    replay(c, tok, '7"}')
    assert c.is_finished()


def test_regex_choice_lark_gbnf(tok):
    c = C.make_constraint(tok, regex=r"[0-9]{3}-[0-9]{4}")
    replay(c, tok, "555-0199")
    assert c.is_finished()
    c = C.make_constraint(tok, choice=["yes", "no", "maybe later"])
    assert allowed_pieces(c, tok) <= {b"y", b"ye", b"yes", b"n", b"no", b"m", b"ma", b"may", b"mayb", b"maybe"}
    replay(c, tok, "maybe later")
    assert c.is_finished()
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]+/'
    c = C.make_constraint(tok, grammar=lark)
    replay(c, tok, "The answer is 42.")
    assert c.is_finished()
    c = C.make_constraint(tok, grammar='root ::= "A" [0-9]+')  # GBNF is converted to Lark
    replay(c, tok, "A12")
    assert c.is_accepting() and not c.is_finished()  # more digits could follow
    m = c.allowed_mask()
    assert all(m[i] for i in tok.eog_ids)  # ...or the end: the end-of-generation token is let through


def test_copy_starts_fresh(tok):
    c = C.make_constraint(tok, choice=["alpha", "beta"])
    replay(c, tok, "alpha")
    d = c.copy()
    assert d.num_accepted == 0 and not d.is_accepting()
    replay(d, tok, "beta")
    assert d.is_finished() and c.is_finished()


def test_wider_logits_are_masked_past_the_vocabulary(tok):
    c = C.make_constraint(tok, json=True, vocab_size=tok.vocab_size + 40)
    m = c.allowed_mask()
    assert m.shape == (tok.vocab_size + 40,) and not m[tok.vocab_size :].any()
    replay(c, tok, "{}")
    assert not c.allowed_mask()[tok.vocab_size :].any()


def test_batch_masks_match_single(tok):
    a = C.make_constraint(tok, json=True)
    b = C.make_constraint(tok, regex="[a-c]+")
    replay(a, tok, '{"k":')
    masks = C.allowed_masks([a, None, b], tok.vocab_size)
    assert masks.shape == (3, tok.vocab_size)
    assert torch.equal(masks[0], a.allowed_mask()) and torch.equal(masks[2], b.allowed_mask())
    assert masks[1].all()
    assert C.allowed_masks([None, None], tok.vocab_size) is None


def test_incomplete(tok):
    c = C.make_constraint(tok, json=True)
    replay(c, tok, '{"a":')
    assert C.is_incomplete(c, "length") and C.is_incomplete(c, "stop")
    replay(c, tok, "1}")
    assert not C.is_incomplete(c, "stop")
    assert C.is_incomplete(c, "stop", "}")  # cut by a stop string: the text lacks part of it
    assert C.is_incomplete(c, "abort") and not C.is_incomplete(None, "length")


# -- kinds and errors -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("schema", "keyword", "path"),
    [
        ({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}, "uniqueItems", "#/properties/tags"),
        ({"type": "object", "properties": {"a": {"type": "strnig"}}}, "type", "#/properties/a/type"),
        ({"properties": {"a": {"type": "string", "format": "jsonpath"}}}, "format", "#/properties/a/format"),
        ({"properties": {"a": {"type": "string", "pattern": "(?=x)a"}}}, "pattern", "#/properties/a/pattern"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "$ref", "#/properties/a/$ref"),
        ({"properties": {"a": {"oneOf": [{"type": "string"}, {"type": "string", "minLength": 2}]}}}, "oneOf", "#/properties/a/oneOf"),
        ({"type": "integer", "minimum": 5, "maximum": 2}, "minimum", "#/minimum"),
        ({"properties": {"a": {"type": "string", "minLength": "x"}}}, "minLength", "#/properties/a/minLength"),
        ({"properties": {"a": {"type": "object", "if": {"required": ["x"]}, "then": {}}}}, "if", "#/properties/a"),
        ({"properties": {"a/b": {"items": {"not": {"type": "string"}}}}}, "not", "#/properties/a~1b/items"),
        ({"$defs": {"d": {"type": "array", "contains": {"type": "integer"}}}, "properties": {"x": {"$ref": "#/$defs/d"}}}, "contains", "#/$defs/d"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "b"], "additionalProperties": False}, "required", "#/required"),
    ],
)  # fmt: skip
def test_bad_schema_names_keyword_and_path(tok, schema, keyword, path):
    with pytest.raises(PellucidError) as e:
        C.make_constraint(tok, json_schema=schema, strict=True)
    assert f"keyword '{keyword}' at {path}" in e.value.message, e.value.message
    assert e.value.param == "json_schema"


def test_lenient_ignores_what_it_cannot_enforce(tok):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}
    with pytest.raises(PellucidError, match="uniqueItems"):
        C.make_constraint(tok, json_schema=schema)
    c = C.make_constraint(tok, json_schema=schema, strict=False)
    assert any("uniqueItems" in w for w in c.warnings)
    replay(c, tok, '{"tags":["a","a"]}')
    assert c.is_finished()


@pytest.mark.parametrize(
    ("kw", "param", "match"),
    [
        ({}, "json", "exactly one"),
        ({"json": True, "regex": "a"}, "json", "exactly one"),
        ({"json_schema": "{not json"}, "json_schema", "not valid JSON"),
        ({"json_schema": [1]}, "json_schema", "must be a JSON object"),
        ({"regex": ""}, "regex", "non-empty"),
        ({"regex": "(unclosed"}, "regex", "regex"),
        ({"choice": "yes"}, "choice", "list of non-empty strings"),
        ({"choice": []}, "choice", "list of non-empty strings"),
        ({"grammar": "start: foo"}, "grammar", "grammar"),
    ],
)  # fmt: skip
def test_bad_arguments(tok, kw, param, match):
    with pytest.raises(PellucidError, match=match) as e:
        C.make_constraint(tok, **kw)
    assert e.value.param == param


def test_json_schema_forms(tok):
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int
        y: int

    for spec in (Point, json.dumps(Point.model_json_schema())):
        c = C.make_constraint(tok, json_schema=spec)
        replay(c, tok, '{"x":1,"y":-2}')
        assert c.is_finished()


def test_response_format(tok):
    assert C.from_response_format(tok, None) is None
    assert C.from_response_format(tok, {"type": "text"}) is None
    assert C.from_response_format(tok, {"type": "json_object"}).kind == "json"
    rf = {"type": "json_schema", "json_schema": {"name": "pt", "strict": True, "schema": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"], "additionalProperties": False}}}  # fmt: skip
    c = C.from_response_format(tok, rf)
    assert c.kind == "json_schema"
    replay(c, tok, '{"x":3}')
    assert c.is_finished()
    for bad, param in [({"type": "xml"}, "response_format.type"), ({"kind": "json_object"}, "response_format"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "response_format.json_schema.name"),
                       ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "array", "uniqueItems": True}}}, "response_format.json_schema.schema")]:  # fmt: skip
        with pytest.raises(PellucidError) as e:
            C.from_response_format(tok, bad)
        assert e.value.param == param, (bad, e.value.param)


def test_pop_constraint(tok):
    kw = {"json_schema": {"type": "object"}, "strict": False, "temperature": 0.5}
    c = C.pop_constraint(tok, kw)
    assert c.kind == "json_schema" and kw == {"temperature": 0.5}
    assert C.pop_constraint(tok, {"json": False}) is None
    with pytest.raises(PellucidError, match="not several"):
        C.pop_constraint(tok, {"json": True, "response_format": {"type": "json_object"}})
    assert C.pop_constraint(tok, {"constraint": c}) is c


# -- strict mode closes objects, but only where that is safe ---------------------------------
def test_close_objects():
    s = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}},
         "$defs": {"d": {"properties": {"x": {}}}, "e": {"properties": {"y": {}}}},
         "allOf": [{"properties": {"c": {}}}],
         "anyOf": [{"properties": {"u": {}}}],
         "oneOf": [{"properties": {"v": {}}}]}  # fmt: skip
    out = S.close_objects(s)
    assert "additionalProperties" not in s["properties"]["a"]  # the input is not changed
    assert "additionalProperties" not in out  # intersected with allOf / anyOf
    assert "additionalProperties" not in out["allOf"][0] and "additionalProperties" not in out["anyOf"][0]
    assert "additionalProperties" not in out["oneOf"][0]
    assert "additionalProperties" not in out["properties"]["a"]  # below an intersected schema
    plain = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}}, "r": {"$ref": "#/$defs/d"},
             "s": {"$ref": "#/$defs/e", "required": ["y"]}, "m": {"properties": {"q": {}}, "required": ["q", "z"]}},
             "$defs": {"d": {"properties": {"x": {}}}, "e": {"properties": {"y": {}}}}}  # fmt: skip
    out = S.close_objects(plain)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["$defs"]["d"]["additionalProperties"] is False  # used alone through $ref
    assert "additionalProperties" not in out["$defs"]["e"]  # used with sibling keywords
    assert "additionalProperties" not in out["properties"]["m"]  # requires a name it does not list
    assert S.close_objects({"type": "object"}) == {"type": "object"}  # json mode stays any object


def test_strict_closes_open_objects(tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    strict = C.make_constraint(tok, json_schema=schema)
    loose = C.make_constraint(tok, json_schema=schema, strict=False)
    for c in (strict, loose):
        replay(c, tok, '{"a":1')
    assert not any(p.startswith(b",") for p in allowed_pieces(strict, tok))
    assert any(p.startswith(b",") for p in allowed_pieces(loose, tok))


def test_narrow_bounds_integers_and_dates():
    s = {"type": "object", "properties": {"n": {"type": "integer"}, "m": {"type": ["integer", "null"], "minimum": 0},
         "e": {"type": "integer", "enum": [1, 2]}, "d": {"type": "string", "format": "date"},
         "t": {"type": "string", "format": "date-time", "pattern": "^2"}, "x": {"not": {"type": "integer"}}}}  # fmt: skip
    out = S.narrow(s)
    n, m = out["properties"]["n"], out["properties"]["m"]
    assert (n["minimum"], n["maximum"]) == (-S.SAFE_INTEGER, S.SAFE_INTEGER)
    assert (m["minimum"], m["maximum"]) == (0, S.SAFE_INTEGER)
    assert "maximum" not in out["properties"]["e"] and "maximum" not in out["properties"]["x"]["not"]
    assert out["properties"]["d"]["pattern"] == S.FORMAT_PATTERNS["date"]
    assert out["properties"]["t"]["pattern"] == "^2" and out["properties"]["t"]["allOf"] == [{"pattern": S.FORMAT_PATTERNS["date-time"]}]
    assert "minimum" not in s["properties"]["n"]  # the input is not changed


def test_no_runaway_integers(tok):
    c = C.make_constraint(tok, json_schema={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    replay(c, tok, '{"n":' + "1" * 16)  # 1111111111111111 < 2**53 - 1
    assert all(p.startswith(b"}") for p in allowed_pieces(c, tok))  # no 17th digit
    c = C.make_constraint(tok, json_schema={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    replay(c, tok, '{"n":' + "9" * 15)
    assert not any(p[:1].isdigit() for p in allowed_pieces(c, tok))  # 9999999999999999 > 2**53 - 1


@pytest.mark.parametrize(("fmt", "good", "bad"), [
    ("date", ["2024-02-29", "2000-02-29", "0001-01-01"], ["2023-02-29", "1900-02-29", "2023-04-31", "0000-01-01"]),
    ("date-time", ["2024-02-29T23:59:59.5Z", "1999-12-31t00:00:00+05:30"], ["2023-02-29T00:00:00Z", "2024-01-01T10:15:60Z", "2024-01-01T24:00:00Z"]),
    ("time", ["00:00:00Z", "12:34:56.789-08:00"], ["12:34:60Z", "25:00:00Z", "12:00:00"]),
])  # fmt: skip
def test_date_time_formats_are_real_dates(tok, fmt, good, bad):
    def accepts(s: str) -> bool:
        c = C.make_constraint(tok, json_schema={"type": "string", "format": fmt})
        for t in tok.encode(json.dumps(s)):
            if not c.allowed_mask()[t]:
                return False
            c.accept(t)
        return c.is_finished()

    assert [accepts(s) for s in good] == [True] * len(good)
    assert [accepts(s) for s in bad] == [False] * len(bad)


def test_random_walks_through_formats_validate(tok):
    """Draw tokens uniformly from the mask until the grammar ends: every string satisfies
    a strict checker of its format (this found llguidance's leap-second and Feb 29 gaps)."""
    import datetime as dt
    import ipaddress
    import random
    import re
    import uuid

    def ok_time(s):
        m = re.fullmatch(r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])", s)
        return m is not None

    def ok_date(s):
        return re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", s) is not None and dt.date.fromisoformat(s) is not None

    checks = {
        "date": ok_date, "time": ok_time, "date-time": lambda s: ok_date(s[:10]) and s[10] in "Tt" and ok_time(s[11:]),
        "ipv4": ipaddress.IPv4Address, "ipv6": ipaddress.IPv6Address,
        "uuid": lambda s: uuid.UUID(s) and all(s[i] == "-" for i in (8, 13, 18, 23)),
    }  # fmt: skip
    eog = torch.tensor(sorted(tok.eog_ids))
    rng = random.Random(0)
    for fmt, check in checks.items():
        base = C.make_constraint(tok, json_schema={"type": "string", "format": fmt})
        done = 0
        for _ in range(25):
            c, ids = base.copy(), []
            while not c.is_finished() and len(ids) < 60:
                m = c.allowed_mask().clone()
                m[eog] = False
                allowed = m.nonzero().flatten()
                ids.append(int(allowed[rng.randrange(len(allowed))]))
                c.accept(ids[-1])
            if c.is_finished():
                done += 1
                s = json.loads(tok.decode(ids))
                assert check(s), (fmt, s)
        assert done >= 8, (fmt, done)


# -- the sampler chain under a mask -----------------------------------------------------------
def test_sampler_honours_mask_with_every_control(tok):
    """Random logits, every other control on: each drawn token is one the grammar allows,
    and a row without a constraint in the same batch draws outside the mask."""
    torch.manual_seed(0)
    V = tok.vocab_size
    params = SamplingParams(temperature=1.3, top_k=200, top_p=0.95, min_p=0.01, frequency_penalty=0.5,
                            presence_penalty=0.3, repetition_penalty=1.2, logit_bias={tok.encode("{")[0]: -100.0,
                            tok.encode('{"')[0]: 5.0}, seed=7, max_tokens=64)  # fmt: skip
    c = C.make_constraint(tok, json_schema={"type": "object", "properties": {"k": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
                                            "required": ["k"]})  # fmt: skip
    seq = SequenceSampler(params, vocab_size=V, prompt_ids=[1, 2, 3], eog_ids=tok.eog_ids, constraint=c)
    free = SequenceSampler(SamplingParams(temperature=1.0, seed=1), vocab_size=V, prompt_ids=[1], eog_ids=tok.eog_ids)
    outside = 0
    for _ in range(64):
        if c.is_finished():
            break
        mask = c.allowed_mask().clone()
        out = sample(torch.randn(2, V) * 3, [seq, free])
        t, u = out.tokens.tolist()
        assert mask[t], tok.piece(t)
        outside += not mask[u]
        seq.accept(t)
        free.accept(u)
    assert c.is_finished()
    json.loads(tok.decode(seq.output_ids))
    assert outside > 0



def test_one_pass_mask_draws_what_the_bool_mask_draws(tok, monkeypatch):
    """The sampler's one-pass mask (pellucid::apply_bitmask, where the kernels are) and the
    bool-mask path give the same greedy tokens and log-probabilities, grammar rows beside a free one."""
    from pellucid.sampling import sampler as sampler_mod

    torch.manual_seed(1)
    V = tok.vocab_size
    params = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3, max_tokens=32)
    runs = []
    for one_pass in (True, False):
        if not one_pass:
            monkeypatch.setattr(sampler_mod, "_one_pass", lambda *a: False)
        c = C.make_constraint(tok, json_schema={"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]})
        seqs = [SequenceSampler(params, vocab_size=V, prompt_ids=[1], eog_ids=tok.eog_ids, constraint=c),
                SequenceSampler(params, vocab_size=V, prompt_ids=[1], eog_ids=tok.eog_ids)]  # fmt: skip
        g = torch.Generator().manual_seed(5)
        got = []
        for _ in range(12):
            if c.is_finished():
                break
            out = sample(torch.randn(2, V, generator=g) * 3, seqs)
            got.append((out.tokens.tolist(), out.logprobs.tolist() if out.logprobs is not None else None))
            for s_, t in zip(seqs, out.tokens.tolist(), strict=True):
                s_.accept(t)
        runs.append(got)
    assert runs[0] == runs[1] and len(runs[0]) >= 4
