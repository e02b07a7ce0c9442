"""Structured output: a grammar that decides which tokens may come next.

A `Constraint` wraps an llguidance matcher built over pellucid's own vocabulary (the exact
bytes of every token). The sampler asks it for `allowed_mask()` at the constraint step of
the chain (after penalties, before temperature) and calls `accept(token)` for each token
the request keeps; the engine ends the request with finish_reason "stop" once
`is_finished()` (the grammar is complete and nothing but end-of-generation may follow).

Kinds: any JSON object, a JSON schema, a regular expression, a choice among strings, a
Lark (or GBNF) grammar. JSON is compact by default (no whitespace outside strings) and
the grammar ends right after the root value, so a constrained request stops by itself.

Semantics of `strict` for JSON schemas (OpenAI's `strict: true` made concrete):
- strict=True (default): what the output must satisfy is exactly the schema. A keyword
  the grammar engine cannot enforce is an error before generation, naming the keyword and
  its path. An object schema that lists `properties` and says nothing about
  `additionalProperties` is closed (no keys beyond those listed), as OpenAI's strict
  mode requires; this only narrows the outputs, which still validate against the schema.
- strict=None (the default): as strict=True, except that `oneOf` (which the grammar
  enforces only when its branches cannot overlap, and most real ones can) is generated as
  `anyOf`; the finished output is then validated against the real schema
  (`check_output`) and a non-match is reported, never silently passed.
- strict=False: keywords that cannot be enforced are ignored (listed in `warnings`) and
  objects stay as open as the schema says; the output is JSON following the rest.

Whatever the mode, strings and arrays the schema leaves unbounded get a default bound
(`DEFAULT_MAX_STRING` characters, `DEFAULT_MAX_ITEMS` items): a greedy small model caught
in a loop inside a string ends there instead of at the token limit. Outputs within the
bound still validate; a schema's own maxLength / maxItems always wins.
"""

from __future__ import annotations

import functools
import json as _json
import re
import sys
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llguidance as llg

from pellucid.errors import PellucidError
from pellucid.sampling.json_schema import (
    check_ref_cycles,
    prepare_schema,
    schema_dict,
    schema_error,
    subschemas,
)

if TYPE_CHECKING:
    import torch

# Building and checking a constraint needs no torch (the CLI checks a schema before any model
# loads, and weightless commands never import torch); the masks import it where they are made.

KINDS = ("json", "json_schema", "regex", "choice", "grammar")


@functools.cache
def _shifts():
    import torch

    return torch.arange(32, dtype=torch.int32)  # bit i of each int32 word of the bitmask


# -- the vocabulary, as llguidance sees it ------------------------------------------------
class _Vocab:
    """pellucid's Tokenizer in the shape llguidance.TokenizerWrapper reads."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eog_ids, default=0)
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_ids)

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_bos=False, parse_special=False)


_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LL_LOCK = threading.Lock()


def ll_tokenizer(tokenizer) -> llg.LLTokenizer:
    """The llguidance tokenizer for a pellucid Tokenizer, built once (about 0.4 s) and cached."""
    with _LL_LOCK:
        ll = _LL_TOKENIZERS.get(tokenizer)
        if ll is None:
            eos = sorted(tokenizer.eog_ids) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else None)
            ll = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tokenizer)), eos_token=eos)
            _LL_TOKENIZERS[tokenizer] = ll
        return ll


# -- compiled grammars, cached: a new request copies a ready matcher ------------------------
_MATCHERS: OrderedDict[tuple[int, str], llg.LLMatcher] = OrderedDict()
_MATCHERS_MAX = 64


def _matcher(ll: llg.LLMatcher, grammar: str) -> llg.LLMatcher:
    key = (id(ll), grammar)
    with _LL_LOCK:
        m = _MATCHERS.get(key)
        if m is not None:
            _MATCHERS.move_to_end(key)
            return m.deep_copy()
    m = llg.LLMatcher(ll, grammar, log_level=0)
    if m.is_error():
        raise PellucidError(f"the grammar could not be compiled: {m.get_error()}", param="grammar")
    with _LL_LOCK:
        _MATCHERS[key] = m
        while len(_MATCHERS) > _MATCHERS_MAX:
            _MATCHERS.popitem(last=False)
    return m.deep_copy()


# -- the constraint --------------------------------------------------------------------------
@dataclass
class Constraint:
    """One request's grammar state: `allowed_mask()`, `accept(token)`, `is_finished()`."""

    kind: str  # one of KINDS
    spec: Any  # what the user gave (schema dict, regex, choices, grammar text)
    grammar: str  # the llguidance grammar it compiled to
    matcher: llg.LLMatcher
    vocab_size: int  # V of the model's logits; ids past the tokenizer's vocabulary are masked
    tokenizer_vocab: int  # the vocabulary llguidance knows (the tokenizer's)
    warnings: list[str] = field(default_factory=list)
    num_accepted: int = 0
    _mask: torch.Tensor | None = field(default=None, repr=False)

    # -- the sampler's side
    def allowed_mask(self) -> torch.Tensor:
        """(V,) bool: True where the grammar allows the token; cached until the next accept."""
        if self._mask is None:
            import torch

            bits = torch.empty((1, mask_words(self.vocab_size)), dtype=torch.int32)  # (1, W)
            self.fill_bitmask(bits, 0)
            self._mask = unpack_bitmask(bits, self.vocab_size)[0]
        return self._mask

    def accept(self, token: int) -> None:
        """Advance the grammar by one token drawn under this constraint's mask."""
        self._mask = None
        self.num_accepted += 1
        if not self.matcher.consume_token(int(token)):
            # Reachable only when a token bypassed the mask: a bug upstream, not bad input.
            raise AssertionError(f"token {token} is not allowed by the {self.kind} constraint: {self.matcher.get_error()}")

    def fill_bitmask(self, bits: torch.Tensor, row: int) -> None:
        """Write the allowed tokens as bits into row `row` of an int32 (B, W) tensor (W >= V/32)."""
        v = bits[row]  # (W,)
        words = mask_words(self.tokenizer_vocab)
        assert bits.dtype.itemsize == 4 and not bits.dtype.is_floating_point and v.is_contiguous() and v.numel() >= words, (bits.dtype, bits.shape, words)
        if v.numel() > words:
            v[words:] = 0  # ids past the tokenizer's vocabulary are never allowed
        self.matcher.unsafe_compute_mask_ptr(v.data_ptr(), words * 4)
        if self.tokenizer_vocab % 32 and self.tokenizer_vocab < self.vocab_size:
            v[words - 1] &= (1 << (self.tokenizer_vocab % 32)) - 1

    # -- the engine's side
    def is_finished(self) -> bool:
        """The grammar is complete and nothing but end-of-generation may follow."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    def is_accepting(self) -> bool:
        """The tokens so far form a complete match (the output is valid if it ends here)."""
        return self.matcher.is_accepting() and not self.matcher.is_error()

    def copy(self) -> Constraint:
        """A fresh constraint with the same grammar, at its start (for n > 1)."""
        m = self.matcher.deep_copy()
        m.reset()
        return Constraint(self.kind, self.spec, self.grammar, m, self.vocab_size, self.tokenizer_vocab, list(self.warnings))

    def __repr__(self) -> str:
        spec = self.spec if isinstance(self.spec, str) else _json.dumps(self.spec, default=str)
        return f"Constraint({self.kind}, {spec[:60]!r}, accepted={self.num_accepted})"


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 (B, W) bitmask -> bool (B, V): token 32 w + i is bit i of word w."""
    if bits.device.type == "cpu" and sys.byteorder == "little":  # numpy's unpackbits: ~10x faster than the shifts
        import numpy as np
        import torch

        u8 = bits.contiguous().numpy().view(np.uint8)  # word w's bit i is byte 4 w + i // 8's bit i % 8
        return torch.from_numpy(np.unpackbits(u8, axis=1, bitorder="little").view(np.bool_))[:, :vocab_size]
    return ((bits[:, :, None] >> _shifts()) & 1).bool().reshape(bits.shape[0], -1)[:, :vocab_size]  # (B, V)


def bitmasks(constraints: list[Constraint | None], vocab_size: int) -> torch.Tensor | None:
    """A batch's allowed tokens as one int32 (B, W) bitmask (token 32 w + i is bit i of word
    w; a row without a constraint allows every token), or None when no row has a constraint."""
    if all(c is None for c in constraints):
        return None
    import torch

    bits = torch.full((len(constraints), mask_words(vocab_size)), -1, dtype=torch.int32)  # (B, W)
    for i, c in enumerate(constraints):
        if c is not None:
            c.fill_bitmask(bits, i)
    return bits


def allowed_masks(constraints: list[Constraint | None], vocab_size: int) -> torch.Tensor | None:
    """One bool (B, V) mask for a batch (rows without a constraint allow every token), or
    None when no row has a constraint. Cheaper than B calls of `allowed_mask()`."""
    bits = bitmasks(constraints, vocab_size)
    return None if bits is None else unpack_bitmask(bits, vocab_size)


# -- building constraints --------------------------------------------------------------------
def make_constraint(tokenizer, *, json: bool = False, json_schema: Any = None, regex: str | None = None,
                    choice: list[str] | None = None, grammar: str | None = None, strict: bool | None = None,
                    compact: bool = True, vocab_size: int | None = None) -> Constraint:  # fmt: skip
    """A constraint of exactly one kind (tokenizer None: only check the arguments, as the
    CLI does before it loads a model, and return None).

    json: any JSON object. json_schema: a dict, JSON text, or a pydantic model class.
    regex: the whole output matches it. choice: the output is exactly one of the strings.
    grammar: Lark text (llguidance's dialect; GBNF is converted). strict: see the module
    docstring. compact: JSON without whitespace (False: ", " and ": " separators).
    vocab_size: the model's logits width when it exceeds the tokenizer's vocabulary.
    """
    given = {k: v for k, v in (("json", json or None), ("json_schema", json_schema), ("regex", regex),
                               ("choice", choice), ("grammar", grammar)) if v is not None}  # fmt: skip
    if len(given) != 1:
        names = ", ".join(given) if given else "none"
        raise PellucidError(f"give exactly one of json, json_schema, regex, choice, grammar (got: {names})", param=next(iter(given), "json"))
    kind, spec = next(iter(given.items()))
    warnings: list[str] = []
    if kind in ("json", "json_schema"):
        schema = {"type": "object"} if kind == "json" else schema_dict(spec)
        spec = schema if kind == "json_schema" else True
        compiled = _compile_schema(schema, strict=strict, compact=compact, param=kind, warnings=warnings)
    elif kind == "regex":
        if not isinstance(spec, str) or not spec:
            raise PellucidError(f"regex must be a non-empty string, got {spec!r}", param="regex")
        compiled = llg.LLMatcher.grammar_from_regex(spec)
    elif kind == "choice":
        if isinstance(spec, str) or not isinstance(spec, list | tuple) or not spec or not all(isinstance(x, str) and x for x in spec):
            raise PellucidError(f"choice must be a list of non-empty strings, got {spec!r}", param="choice")
        spec = list(spec)
        compiled = llg.LLMatcher.grammar_from_lark("start: " + " | ".join(_json.dumps(x) for x in spec))
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise PellucidError("grammar must be the text of a Lark (or GBNF) grammar", param="grammar")
        try:
            compiled = llg.grammar_from("grammar", spec)
        except ValueError as e:
            raise PellucidError(f"grammar: {e}", param="grammar") from None
    ll = ll_tokenizer(tokenizer) if tokenizer is not None else None
    is_error, msgs = llg.LLMatcher.validate_grammar_with_warnings(compiled, ll)
    if is_error:
        raise PellucidError(_explain(kind, spec, msgs[0]), param=kind)
    if tokenizer is None:
        return None
    warnings += [m for m in msgs if m not in warnings]
    v = vocab_size or tokenizer.vocab_size
    if v < tokenizer.vocab_size:
        raise PellucidError(f"vocab_size {v} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})", param="vocab_size")
    return Constraint(kind, spec, compiled, _matcher(ll, compiled), v, tokenizer.vocab_size, warnings)


def from_response_format(tokenizer, response_format: dict | None, **kw: Any) -> Constraint | None:
    """OpenAI's response_format: {"type": "text" | "json_object" | "json_schema", ...}.

    {"type": "json_object", "schema": {...}} (llama-server's and vLLM's form) is honoured
    like json_schema.

    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}; strict left out
    is pellucid's default (None: oneOf as anyOf, checked afterwards); OpenAI's False, which
    there means "no guarantee", only loosens what cannot be enforced, since a grammar
    always guarantees the rest. pellucid adds
    {"type": "regex", "regex": R}, {"type": "choice", "choice": [...]} and
    {"type": "grammar", "grammar": LARK} (used by the config file's control.response_format)."""
    if response_format is None:
        return None
    if hasattr(response_format, "model_dump"):
        response_format = response_format.model_dump(exclude_none=True, by_alias=True)
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise PellucidError(f"response_format must be an object with a 'type', got {response_format!r}", param="response_format")
    t = response_format["type"]
    if t == "text":
        return None
    if t == "json_object":
        schema = response_format.get("schema")  # llama-server's and vLLM's form (instructor's JSON_SCHEMA mode sends it)
        if schema is not None:
            try:
                return make_constraint(tokenizer, json_schema=schema, **kw)
            except PellucidError as e:
                raise PellucidError(e.message, param="response_format.schema") from None
        return make_constraint(tokenizer, json=True, **kw)
    if t == "json_schema":
        js = response_format.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise PellucidError("response_format.json_schema must be an object with 'name' and 'schema'", param="response_format.json_schema")
        name = js.get("name")
        if name is not None and not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)):
            raise PellucidError(f"response_format.json_schema.name {name!r} must be 1-64 of a-z, A-Z, 0-9, _ and -", param="response_format.json_schema.name")
        strict = js.get("strict")
        try:
            return make_constraint(tokenizer, json_schema=js["schema"], strict=None if strict is None else bool(strict), **kw)
        except PellucidError as e:
            msg = e.message.replace("pass strict=False", "set json_schema.strict to false")
            raise PellucidError(msg, param="response_format.json_schema.schema") from None
    if t in ("regex", "choice", "grammar"):  # pellucid's own types, same shape
        if t not in response_format:
            raise PellucidError(f"response_format of type {t!r} needs a {t!r} field", param=f"response_format.{t}")
        return make_constraint(tokenizer, **{t: response_format[t]}, **kw)
    raise PellucidError(f"response_format.type {t!r} is not one of: text, json_object, json_schema (OpenAI's), "
                        f"regex, choice, grammar (pellucid's)", param="response_format.type")  # fmt: skip


# -- the front doors' side ----------------------------------------------------------------------
STRUCTURED_KEYS = ("constraint", "response_format", "json", "json_schema", "regex", "choice", "grammar", "strict")


def pop_constraint(tokenizer, kw: dict[str, Any], *, vocab_size: int | None = None) -> Constraint | None:
    """Take the structured-output keywords out of `kw` (the rest are sampling parameters)
    and build the constraint they ask for, or None. Keywords: constraint (a ready
    Constraint), response_format (OpenAI's), json, json_schema, regex, choice, grammar, strict."""
    got = {k: kw.pop(k) for k in STRUCTURED_KEYS if k in kw}
    ready = got.pop("constraint", None)
    strict = got.pop("strict", None)
    rf = got.pop("response_format", None)
    kinds = {k: v for k, v in got.items() if v is not None and v is not False}
    asked = [n for n, v in (("constraint", ready), ("response_format", rf)) if v is not None] + list(kinds)
    if len(asked) > 1:
        raise PellucidError(f"give one way to constrain the output, not several: {', '.join(asked)}", param=asked[1])
    if ready is not None:
        if not isinstance(ready, Constraint):
            raise PellucidError(f"constraint must be a Constraint (from make_constraint), got {type(ready).__name__}", param="constraint")
        return ready
    if rf is not None:
        return from_response_format(tokenizer, rf, vocab_size=vocab_size)
    if kinds:
        return make_constraint(tokenizer, **kinds, strict=strict, vocab_size=vocab_size)
    return None


def from_cli(tokenizer, *, json: bool = False, json_schema: str | None = None, regex: str | None = None,
             choice: list[str] | None = None, grammar: str | None = None, strict: bool | None = None,
             vocab_size: int | None = None) -> Constraint | None:  # fmt: skip
    """The CLI's flags: --json, --json-schema FILE, --regex R, --choice A --choice B,
    --grammar FILE (Lark or GBNF), --no-strict. Files are read here; errors name the flag."""

    def read(flag: str, path: str) -> str:
        p = Path(path).expanduser()
        if not p.is_file():
            raise PellucidError(f"{flag} {path!r}: no such file", param=flag)
        return p.read_text(encoding="utf-8")

    kinds = {"json": json or None, "json_schema": json_schema and read("--json-schema", json_schema), "regex": regex,
             "choice": list(choice) if choice else None, "grammar": grammar and read("--grammar", grammar)}  # fmt: skip
    kinds = {k: v for k, v in kinds.items() if v is not None}
    if not kinds:
        return None
    if len(kinds) > 1:
        flags = ", ".join("--" + k.replace("_", "-") for k in kinds)
        raise PellucidError(f"give one of --json, --json-schema, --regex, --choice, --grammar (got {flags})", param="--json")
    try:
        return make_constraint(tokenizer, **kinds, strict=strict, vocab_size=vocab_size)
    except PellucidError as e:
        kind = next(iter(kinds))
        flag = "--" + kind.replace("_", "-")
        where = f" {json_schema}" if json_schema else f" {grammar}" if grammar else ""
        msg = e.message.removeprefix(f"{kind}: ").replace("pass strict=False", "pass --no-strict")
        raise PellucidError(f"{flag}{where}: {msg}", param=flag) from None


def is_incomplete(constraint: Constraint | None, finish_reason: str | None, stop_reason: str | int | None = None) -> bool:
    """A constrained output that must not be taken as valid: cut by max_tokens ("length"),
    aborted, cut by a stop string, or otherwise ended before the grammar was complete."""
    if constraint is None:
        return False
    return finish_reason != "stop" or isinstance(stop_reason, str) or not constraint.is_accepting()


# -- JSON schemas ------------------------------------------------------------------------------
def _compile_schema(schema: dict, *, strict: bool | None, compact: bool, param: str, warnings: list[str]) -> str:
    check_ref_cycles(schema, param)
    try:
        return llg.LLMatcher.grammar_from_json_schema(prepare_schema(schema, strict=strict, compact=compact, warnings=warnings))
    except ValueError as e:
        raise PellucidError(f"{param}: {e}", param=param) from None


def instruction(constraint: Constraint | None) -> str | None:
    """What a chat prompt tells the model about the constraint, as hosted APIs do, so a small
    model answers inside the grammar instead of wandering against it (None: nothing to say)."""
    if constraint is None:
        return None
    if constraint.kind == "json":
        return "Answer in JSON."
    if constraint.kind == "json_schema":
        schema = _json.dumps(constraint.spec, ensure_ascii=False, separators=(",", ":"))
        return f"Answer in JSON that follows this JSON schema:\n{schema}"
    if constraint.kind == "choice":
        return "Answer with exactly one of: " + ", ".join(_json.dumps(c, ensure_ascii=False) for c in constraint.spec) + "."
    if constraint.kind == "regex":
        return f"Answer with text that matches the regular expression {constraint.spec}"
    return None


def check_output(constraint: Constraint | None, text: str) -> str | None:
    """For a finished JSON-schema output: None if `text` validates against the schema the
    user gave, else why not (possible only where the grammar was looser than the schema:
    oneOf generated as anyOf, keywords ignored with strict=False)."""
    if constraint is None or constraint.kind != "json_schema":
        return None
    return schema_error(constraint.spec, text)


def _explain(kind: str, spec: Any, message: str) -> str:
    """llguidance's error, with the keyword and its path in the schema where we can find them."""
    message = message.strip()
    if kind not in ("json", "json_schema"):
        return f"{kind}: {message}"
    where = _locate(spec, message)
    if where is None:
        return f"json_schema: {message}"
    path, keyword = where
    if keyword == "oneOf" and message.startswith("oneOf"):
        return (f"json_schema: keyword 'oneOf' at {path}: oneOf ('exactly one branch') is enforced only when its "
                f"branches cannot overlap, and these can. Use anyOf, or pass strict=False to treat it as anyOf.")  # fmt: skip
    if message.startswith("Unimplemented keys"):
        return (f"json_schema: keyword '{keyword}' at {path} is not supported by the grammar engine, so the output "
                f"could not be guaranteed to satisfy it. Remove it, or pass strict=False to ignore it.")  # fmt: skip
    return f"json_schema: keyword '{keyword}' at {path}: {message}"


def _locate(schema: Any, message: str) -> tuple[str, str] | None:
    """(path, keyword) of the part of `schema` that llguidance's error message is about."""
    subs = list(subschemas(schema))
    if m := re.match(r"Unimplemented keys: (\[.*\])", message):
        keys = _json.loads(m.group(1))
        for path, s in subs:
            for k in keys:
                if k in s:
                    return path, k
    if m := re.match(r"Unknown format: (.*)", message):
        for path, s in subs:
            if s.get("format") == m.group(1).strip():
                return f"{path}/format", "format"
    if m := re.match(r"Invalid type: (.*)", message):
        for path, s in subs:
            t = s.get("type")
            if t is not None and (t if isinstance(t, list) else [t]) and m.group(1).strip() in map(str, t if isinstance(t, list) else [t]):
                return f"{path}/type", "type"
    if message.startswith("regex parse error") or "regex" in message.lower():
        for path, s in subs:
            p = s.get("pattern")
            if isinstance(p, str) and llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_json_schema({"type": "string", "pattern": p})):
                return f"{path}/pattern", "pattern"
            for name in (s.get("patternProperties") or {}) if isinstance(s.get("patternProperties"), dict) else ():
                if llg.LLMatcher.validate_grammar(llg.LLMatcher.grammar_from_regex(name)):
                    return f"{path}/patternProperties", "patternProperties"
    if m := re.search(r"[Pp]ointer '([^']*)'|\$ref[^'\"]*['\"]([^'\"]+)", message):
        target = m.group(1) or m.group(2)
        for path, s in subs:
            ref = s.get("$ref")
            if isinstance(ref, str) and (ref.endswith(target) or target.endswith(ref.lstrip("#"))):
                return f"{path}/$ref", "$ref"
    if m := re.search(r"for '([A-Za-z$]+)', got (.*)$", message):
        kw, got = m.group(1), m.group(2).strip()
        for path, s in subs:
            if kw in s and _json.dumps(s[kw]) == got:
                return f"{path}/{kw}", kw
        for path, s in subs:
            if kw in s:
                return f"{path}/{kw}", kw
    if message.startswith("oneOf"):
        for path, s in subs:
            if "oneOf" in s:
                return f"{path}/oneOf", "oneOf"
    if m := re.search(r"(minimum|maximum|minLength|maxLength|minItems|maxItems|minProperties|maxProperties) \(", message):
        kw = m.group(1)
        for path, s in subs:
            if kw in s:
                return f"{path}/{kw}", kw
    if m := re.search(r"required property '([^']*)'", message):
        for path, s in subs:
            if m.group(1) in (s.get("required") or []):
                return f"{path}/required", "required"
    return None


