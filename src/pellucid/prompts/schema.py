"""The prompt-file schema: names, versions, the fields and their checks, and errors that
name the file, the line and the field.

    name: coding-assistant         # lowercase letters, digits, '.', '_', '-'
    version: "1.2.0"               # MAJOR.MINOR.PATCH
    description: ...
    role: a senior Python engineer # the five parts of SystemPrompt ...
    domain: ...
    objective: ...
    guidelines: [...]
    output_format: ...             # text, or a mapping/list shown as JSON
    constraints: [...]
    context: {today: auto, timezone: auto}
    style: {length: concise, structure: code, max_words: 150, skeleton: ...}
    examples: [{user: ..., assistant: ...}]

Unknown keys are errors.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    field_validator,
)

from pellucid.errors import PellucidError
from pellucid.prompts.styles import SKELETONS, style_choice_error
from pellucid.prompts.system import format_template

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
VERSION_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")

Text = Annotated[str, StringConstraints(strip_whitespace=True)]


# ---------------------------------------------------------------------------------------
# schema


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SectionSpec(_Spec):
    title: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    hint: Text = ""
    optional: bool = False


class SkeletonSpec(_Spec):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
    sections: Annotated[list[SectionSpec], Field(min_length=1)]
    level: Annotated[int, Field(ge=1, le=6)] = 2


def _skeleton_kind(value: Any) -> str:
    return "inline" if isinstance(value, dict | SkeletonSpec) else "builtin"


_UNION_TAGS = {"builtin", "inline"}  # discriminator tags that pydantic puts in error locations


class StyleSpec(_Spec):
    length: str | None = None
    formality: str | None = None
    structure: str | None = None
    persona: str | None = None
    depth: str | None = None
    max_words: Annotated[int, Field(ge=1)] | None = None
    skeleton: (
        Annotated[
            Annotated[str, Tag("builtin")] | Annotated[SkeletonSpec, Tag("inline")],
            Discriminator(_skeleton_kind),
        ]
        | None
    ) = None

    @field_validator("length", "formality", "structure", "persona", "depth")
    @classmethod
    def _preset(cls, value: str | None, info: Any) -> str | None:
        if msg := style_choice_error(info.field_name, value):
            raise ValueError(msg)
        return value

    @field_validator("skeleton")
    @classmethod
    def _builtin_skeleton(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in SKELETONS:
            raise ValueError(
                f"unknown skeleton {value!r}; built-in skeletons: {', '.join(SKELETONS)} "
                "(or give a mapping with name and sections)"
            )
        return value


class ExampleSpec(_Spec):
    user: Text
    assistant: Text


class PromptSpec(_Spec):
    """The prompt-file schema."""

    name: str
    version: str
    description: Text = ""
    role: Text = ""
    domain: Text = ""
    objective: Text = ""
    guidelines: list[Text] = []
    output_format: Text = ""
    constraints: list[Text] = []
    context: dict[str, Text] = {}
    style: StyleSpec | None = None
    examples: list[ExampleSpec] = []

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                "a prompt name is lowercase letters, digits, '.', '_' and '-', starting with "
                "a letter or digit"
            )
        return value

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError(f'a version is a string MAJOR.MINOR.PATCH; quote it: "{value}.0"')
        if isinstance(value, str) and not VERSION_RE.match(value):
            raise ValueError("a version is MAJOR.MINOR.PATCH, e.g. 1.2.0")
        return value

    @field_validator("output_format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        return format_template(value) if isinstance(value, dict | list) else value

    @field_validator("context", mode="before")
    @classmethod
    def _context(cls, value: Any) -> Any:
        # YAML reads `today: 2025-01-15` as a date and `x: 3` as an int; keep them as text
        if isinstance(value, dict):
            return {k: _scalar_text(v) for k, v in value.items()}
        return value

    @field_validator("style")
    @classmethod
    def _empty_style(cls, value: StyleSpec | None) -> StyleSpec | None:
        return None if value is not None and not value.model_dump(exclude_defaults=True) else value


def _scalar_text(v: Any) -> Any:
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, int | float) and not isinstance(v, bool):
        return str(v)
    return v


def version_key(version: str) -> tuple[int, int, int]:
    """Sort key for MAJOR.MINOR.PATCH (semantic version order, not string order)."""
    m = VERSION_RE.match(version)
    if not m:
        raise PellucidError(
            f"version {version!r} is not MAJOR.MINOR.PATCH, e.g. 1.2.0", param="version"
        )
    return int(m[1]), int(m[2]), int(m[3])


def bump(version: str, part: str = "patch") -> str:
    """The next version: bump('1.2.3') == '1.2.4', bump('1.2.3', 'minor') == '1.3.0'."""
    major, minor, patch = version_key(version)
    if part == "major":
        return f"{major + 1}.0.0"
    if part == "minor":
        return f"{major}.{minor + 1}.0"
    if part == "patch":
        return f"{major}.{minor}.{patch + 1}"
    raise PellucidError(f"bump part must be major, minor or patch, got {part!r}", param="part")


# ---------------------------------------------------------------------------------------
# errors that name the file, the line and the field


def located(path: Path | str, node: yaml.Node | None) -> str:
    """FILE:LINE of a YAML node (FILE alone without one)."""
    return f"{path}:{node.start_mark.line + 1}" if node is not None else str(path)


def _walk(
    root: yaml.Node | None, loc: Sequence[Any]
) -> tuple[yaml.Node | None, yaml.Node | None, list[str]]:
    """Where an error location points in the YAML: (value node, key node, field path)."""
    node, key, names = root, None, []
    for item in loc:
        if item in _UNION_TAGS:
            continue
        names.append(f"[{item}]" if isinstance(item, int) else str(item))
        key = None
        if isinstance(node, yaml.MappingNode):
            # a missing key leaves us on the mapping that should hold it
            match = next(((k, v) for k, v in node.value if k.value == item), None)
            if match is not None:
                key, node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(item, int):
            if item < len(node.value):
                node = node.value[item]
    return node, key, names


def _field_name(names: list[str]) -> str:
    return "".join(n if n.startswith("[") or not i else f".{n}" for i, n in enumerate(names))


def validation_error(
    e: ValidationError, *, where: str, node: yaml.Node | None = None
) -> PellucidError:
    """The first error of a schema check as one line: FILE:LINE: field F: what is wrong."""
    # an unknown key is usually a misspelt one, the root cause of a "missing" next to it
    err = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
    loc = err["loc"]
    target, key, names = _walk(node, loc)
    if err["type"] == "extra_forbidden":
        target = key or target  # point at the unknown key, not at its value
    fieldname = _field_name(names) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field; allowed here: " + ", ".join(_allowed_fields(loc))
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif "input" in err and not isinstance(err["input"], dict | list):
        msg += f" (got {err['input']!r})"
    more = len(e.errors()) - 1
    tail = f" (and {more} more error{'s' * (more > 1)})" if more else ""
    return PellucidError(
        f"{located(where, target)}: field {fieldname}: {msg}{tail}", param=fieldname
    )


_MODELS_AT: dict[tuple[str, ...], type[BaseModel]] = {
    (): PromptSpec,
    ("style",): StyleSpec,
    ("style", "skeleton"): SkeletonSpec,
    ("style", "skeleton", "sections"): SectionSpec,
    ("examples",): ExampleSpec,
}


def _allowed_fields(loc: Sequence[Any]) -> list[str]:
    key = tuple(x for x in loc[:-1] if isinstance(x, str) and x not in _UNION_TAGS)
    model = _MODELS_AT.get(key)
    return list(model.model_fields) if model else []
