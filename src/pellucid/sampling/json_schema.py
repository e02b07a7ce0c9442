"""JSON schemas as pellucid generates from them: read, checked and reshaped for the grammar.

What the grammar is built from (`prepare_schema`): objects closed in strict mode
(`close_objects`), oneOf generated as anyOf where the default asks for it
(`one_of_as_any_of`), unbounded strings, arrays and numbers given a default bound
(`narrow`); reference cycles refused before generation (`check_ref_cycles`); a finished
output validated against the schema the user gave (`schema_error`). Plain JSON in and
out: nothing here knows about tokens or llguidance (pellucid.sampling.constraints does).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema

from pellucid.errors import PellucidError


def schema_dict(spec: Any) -> dict | bool:
    if isinstance(spec, type) and hasattr(spec, "model_json_schema"):  # a pydantic model class
        return spec.model_json_schema()
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise PellucidError(f"json_schema is not valid JSON: {e}", param="json_schema") from None
    if isinstance(spec, bool) or not isinstance(spec, dict):
        raise PellucidError(f"json_schema must be a JSON object (a schema), got {type(spec).__name__}", param="json_schema")
    return spec


def prepare_schema(schema: dict, *, strict: bool | None = None, compact: bool = True, warnings: list[str] | None = None) -> dict:
    """The schema the grammar is built from (see the module docstring for `strict`), with
    llguidance's options in its "x-guidance" key: compact JSON, strictness. It accepts a
    subset of what `schema` accepts, so whatever it generates validates against `schema`,
    except where oneOf became anyOf (strict=None) or keywords were ignored (strict=False)."""
    warnings = [] if warnings is None else warnings
    options: dict[str, Any] = {"whitespace_flexible": False, "lenient": strict is False}
    if not compact:
        options.update(item_separator=", ", key_separator=": ")
    if strict is not False:
        schema = close_objects(schema)
    if strict is None:
        schema, paths = one_of_as_any_of(schema)
        warnings += [f"oneOf at {p} is generated as anyOf; the output is checked against the schema afterwards" for p in paths]
    schema = narrow(schema)
    if isinstance(schema, dict) and schema.get("x-guidance") is not None:
        warnings.append("the schema's own 'x-guidance' options are overridden by pellucid's (compact JSON, strictness)")
    return {**schema, "x-guidance": options} if isinstance(schema, dict) else schema


def one_of_as_any_of(schema: dict) -> tuple[dict, list[str]]:
    """A copy of `schema` with every oneOf renamed anyOf (not under not/if/then/else, where
    that would change the meaning the other way), and the paths it renamed."""

    out = copy.deepcopy(schema)
    paths = []
    skip = set()
    for path, s in subschemas(out):
        if any(path.startswith(p) for p in skip):
            continue
        for k in ("not", "if", "then", "else"):
            if k in s:
                skip.add(f"{path}/{k}")
        if isinstance(s.get("oneOf"), list) and "anyOf" not in s:
            s["anyOf"] = s.pop("oneOf")
            paths.append(f"{path}/oneOf")
    return out, paths


def schema_error(schema: dict, text: str) -> str | None:
    """None if `text` is JSON that validates against `schema`, else a one-line reason."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not valid JSON: {e}"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(map(str, e.absolute_path))
        return f"does not match the schema at #/{where}: {e.message}"
    except jsonschema.SchemaError as e:
        return f"the schema itself is not valid: {e.message}"
    return None


# Keywords whose value is a subschema, a list of subschemas, or a map of name -> subschema.
_ONE = ("additionalProperties", "additionalItems", "items", "not", "if", "then", "else", "contains",
        "propertyNames", "unevaluatedProperties", "unevaluatedItems")  # fmt: skip
_LIST = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_OBJECT_WORDS = ("properties", "required", "additionalProperties", "patternProperties", "minProperties",
                 "maxProperties", "propertyNames", "dependentRequired", "unevaluatedProperties")  # fmt: skip


def subschemas(schema: Any, path: str = "#"):
    """Every (path, subschema dict) in a schema, depth first; paths are JSON pointers."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for k in _ONE:
        if isinstance(schema.get(k), dict):
            yield from subschemas(schema[k], f"{path}/{k}")
    for k in _LIST:
        if isinstance(schema.get(k), list):
            for i, s in enumerate(schema[k]):
                yield from subschemas(s, f"{path}/{k}/{i}")
    for k in _MAP:
        if isinstance(schema.get(k), dict):
            for name, s in schema[k].items():
                yield from subschemas(s, f"{path}/{k}/{_pointer(name)}")


def check_ref_cycles(schema: Any, param: str = "json_schema") -> None:
    """Refuse a schema whose $ref chain comes back to where it started without describing a value
    (`{"$ref": "#"}`, a -> b -> a, or through allOf): it allows nothing, and would generate nothing."""
    if not isinstance(schema, dict):
        return
    for path, node in subschemas(schema):
        chain, seen = [path], {id(node)}
        while isinstance(node, dict):
            nxt = None
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                nxt, where = _resolve(schema, ref), ref
            elif isinstance(node.get("allOf"), list) and len(node["allOf"]) == 1 and isinstance(node["allOf"][0], dict):
                nxt, where = node["allOf"][0], chain[-1] + "/allOf/0"
            if nxt is None or not _only_refers(node):
                break
            if id(nxt) in seen:
                cycle = " -> ".join([*chain, where])
                raise PellucidError(f"{param}: the $ref chain {cycle} comes back to itself without describing any "
                                    "value, so no JSON can match it; give the schema a type or properties",
                                    param=param)  # fmt: skip
            seen.add(id(nxt))
            chain.append(where)
            node = nxt


def _only_refers(node: dict) -> bool:
    """A schema node that says nothing of its own beyond what it refers to."""
    return not (set(node) - {"$ref", "allOf", "$defs", "definitions", "$schema", "$id", "title", "description", "$comment"})


def _resolve(root: dict, ref: str) -> Any:
    """The subschema a local JSON pointer ("#", "#/$defs/a") names, or None."""
    node: Any = root
    for part in ref[1:].lstrip("/").split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _pointer(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")


def close_objects(schema: dict) -> dict:
    """A copy of `schema` where object schemas that list `properties` and leave
    `additionalProperties` unsaid are closed (OpenAI's strict mode). Schemas that are
    intersected with others (allOf, $ref with siblings, anyOf next to object keywords) are
    left open, with everything below them (closing one side of an intersection could make
    it unsatisfiable), and so are oneOf branches and whatever sits under not/if/then/else."""

    out = copy.deepcopy(schema)
    if not isinstance(out, dict):
        return out
    defs = {f"#/{k}/{_pointer(n)}": s for k in ("$defs", "definitions") if isinstance(out.get(k), dict)
            for n, s in out[k].items() if isinstance(s, dict)}  # fmt: skip
    open_targets: set[str] = set()  # $ref targets used where they are intersected
    closable: list[dict] = []

    def only_requires(s: dict, k: str) -> bool:
        """s[k] is a list of branches that only require some of s's own properties (a common
        "give these fields or those" pattern): closing s cannot make a branch unsatisfiable."""
        props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
        return all(isinstance(b, dict) and set(b) <= {"required", "description", "title", "$comment"}
                   and isinstance(b.get("required", []), list) and all(r in props for r in b.get("required", []))
                   for b in s[k])  # fmt: skip

    def intersected(s: dict) -> bool:
        has_obj = any(k in s for k in _OBJECT_WORDS)
        mixed = [k for k in ("anyOf", "oneOf") if isinstance(s.get(k), list) and not only_requires(s, k)]
        return "allOf" in s or ("$ref" in s and len(set(s) - {"$ref", "description", "title", "$comment"}) > 0) or (
            has_obj and bool(mixed))

    def walk(s: Any, free: bool) -> None:
        if not isinstance(s, dict):
            return
        ref = s.get("$ref")
        if isinstance(ref, str) and (not free or intersected(s)):
            open_targets.add(ref)
        free = free and not intersected(s)
        props, required = s.get("properties"), s.get("required") or []
        if (free and isinstance(props, dict) and isinstance(required, list) and all(r in props for r in required)
                and not any(k in s for k in ("additionalProperties", "patternProperties", "unevaluatedProperties"))):
            closable.append(s)  # (a required name missing from properties would become unsatisfiable)
        for k in _ONE:
            walk(s.get(k), free and k not in ("not", "if", "then", "else"))
        for k in _LIST:  # oneOf means "exactly one": closing a branch could hide an overlap
            for x in s.get(k) if isinstance(s.get(k), list) else ():
                walk(x, free and k != "oneOf")
        for k in ("properties", "patternProperties", "dependentSchemas"):
            for x in s.get(k).values() if isinstance(s.get(k), dict) else ():
                walk(x, free)

    # A def is walked as free unless some $ref to it is intersected; repeat until stable.
    while True:
        before = set(open_targets)
        closable.clear()
        walk(out, "#" not in open_targets)  # (walk does not enter $defs: they come next)
        for ptr, s in defs.items():
            walk(s, ptr not in open_targets)
        if open_targets == before:
            break
    odd_refs = [r for _, s in subschemas(out) if isinstance(r := s.get("$ref"), str) and r != "#" and r not in defs]
    if odd_refs:  # refs into other places: leave everything as the schema says
        return copy.deepcopy(schema)
    for s in closable:
        s["additionalProperties"] = False
    return out


SAFE_INTEGER = 2**53 - 1  # I-JSON (RFC 7493): integers every JSON parser reads exactly
# llguidance's date formats accept Feb 29 of any year and the year 0000, its time formats
# a leap second (:60) at any time of day; RFC 3339 (and Python's date parser, which the
# jsonschema package uses) do not. These patterns, intersected with the format, narrow
# them: Feb 29 only in leap years, no year 0000, no leap seconds, at most 6 digits of a
# second's fraction (a model caught in a loop cannot write 12:00:00.0000000...).
_YEAR = r"([0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
_LEAP_YEAR = r"([0-9]{2}(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DATE = rf"({_YEAR}-(0[13-9]|1[0-2])-[0-9]{{2}}|{_YEAR}-02-(0[1-9]|1[0-9]|2[0-8])|{_LEAP_YEAR}-02-29)"
_TIME = r"[0-9]{2}:[0-9]{2}:[0-5][0-9](\.[0-9]{1,6})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
FORMAT_PATTERNS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}[Tt]{_TIME}$"}


DEFAULT_MAX_STRING = 128  # characters of a string the schema leaves unbounded
DEFAULT_MAX_ITEMS = 8  # items of an array the schema leaves unbounded
NUMBER_STEP = 0.000001  # numbers without a multipleOf get at most 6 decimals (no 10.56666666... loop)
# (None or 0 turns a bound off: benchmarks/schemas.py measures without them)


def narrow(schema: dict) -> dict:
    """A copy of `schema` that only narrows what it accepts, so outputs still validate:
    integers and numbers without a bound get I-JSON's safe range (a model caught in a loop
    cannot write a 100-digit number), numbers at most 6 decimals (NUMBER_STEP), strings,
    arrays and open objects without a bound DEFAULT_MAX_STRING characters and
    DEFAULT_MAX_ITEMS items (keys), and
    date/time formats keep only real dates and times. Not under
    not/if/then/else, where narrowing would change the meaning."""

    out = copy.deepcopy(schema)

    def typed(s: dict, name: str) -> bool:
        t = s.get("type")
        return (t == name or (isinstance(t, list) and name in t)) and "enum" not in s and "const" not in s

    def walk(s: Any, branch: bool = False) -> None:
        if not isinstance(s, dict):
            return
        if "type" not in s and "properties" in s and not any(k in s for k in ("anyOf", "oneOf", "allOf", "$ref", "not", "enum", "const")):
            s["type"] = "object"  # (it lists properties: an object is what it describes; a bare string would loop)
        fmt = s.get("format")
        if fmt in FORMAT_PATTERNS:
            if "pattern" not in s:
                s["pattern"] = FORMAT_PATTERNS[fmt]
            elif isinstance(s.get("allOf", []), list):
                s["allOf"] = [*s.get("allOf", []), {"pattern": FORMAT_PATTERNS[fmt]}]
        if DEFAULT_MAX_STRING and typed(s, "string") and "maxLength" not in s and "pattern" not in s and fmt not in FORMAT_PATTERNS:
            if not isinstance(s.get("minLength"), int) or s["minLength"] <= DEFAULT_MAX_STRING:
                s["maxLength"] = DEFAULT_MAX_STRING
        if DEFAULT_MAX_ITEMS and typed(s, "array") and "maxItems" not in s and not isinstance(s.get("items"), list) and "prefixItems" not in s:
            if not isinstance(s.get("minItems"), int) or s["minItems"] <= DEFAULT_MAX_ITEMS:
                s["maxItems"] = DEFAULT_MAX_ITEMS
        props, required = s.get("properties") or {}, s.get("required") or []
        if (DEFAULT_MAX_ITEMS and not branch and typed(s, "object") and "maxProperties" not in s and s.get("additionalProperties") is not False
                and isinstance(props, dict) and isinstance(required, list) and set(props) <= set(required)
                and not any(k in s for k in ("anyOf", "oneOf", "allOf", "$ref", "if", "patternProperties"))):
            # (llguidance bounds an object's size only where every listed key is required,
            # schemas combined with it included: so never a branch of anyOf/oneOf/allOf)
            bound = max(DEFAULT_MAX_ITEMS, len(props))
            if not isinstance(s.get("minProperties"), int) or s["minProperties"] <= bound:
                s["maxProperties"] = bound
        if NUMBER_STEP and typed(s, "number") and "multipleOf" not in s:
            s["multipleOf"] = NUMBER_STEP
        if (typed(s, "integer") or typed(s, "number")) and "enum" not in s and "const" not in s:
            if "maximum" not in s and "exclusiveMaximum" not in s:
                s["maximum"] = SAFE_INTEGER
            if "minimum" not in s and "exclusiveMinimum" not in s:
                s["minimum"] = -SAFE_INTEGER
        for k in _ONE:
            if k not in ("not", "if", "then", "else"):
                walk(s.get(k))
        for k in _LIST:
            for x in s.get(k) if isinstance(s.get(k), list) else ():
                walk(x, branch=k in ("anyOf", "oneOf", "allOf"))
        for k in _MAP:
            for x in s.get(k).values() if isinstance(s.get(k), dict) else ():
                walk(x)

    walk(out)
    return out
