"""Versioned prompt files: a YAML schema, a content hash, a store, and diffs.

A prompt file holds one prompt (or several versions of one prompt, as YAML documents
separated by `---`):

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

Unknown keys are errors. The content hash is the sha256 of the canonical JSON (sorted
keys, defaults left out, strings stripped) of everything except name and version, so it
changes exactly when what the prompt says changes, whatever the YAML layout.

The store searches, in order: directories the caller adds, `$PELLUCID_HOME/prompts`
(default `~/.cache/pellucid/prompts`), and the built-in prompts shipped with pellucid.
Files are named `NAME@VERSION.yaml` (one version) or `NAME.yaml` (versions inside).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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
from pellucid.prompts.styles import SKELETONS, Section, Skeleton, Style, style_choice_error
from pellucid.prompts.system import Example, SystemPrompt, format_template

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
VERSION_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
BUILTIN_DIR = Path(__file__).parent / "builtin"
_SUFFIXES = (".yaml", ".yml")

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


# ---------------------------------------------------------------------------------------
# conversions


def _style_data(style: Style | None) -> dict[str, Any] | None:
    if style is None or style.is_empty:
        return None
    data: dict[str, Any] = {
        k: getattr(style, k)
        for k in ("length", "formality", "structure", "persona", "depth", "max_words")
    }
    sk = style.skeleton
    if isinstance(sk, Skeleton):
        if SKELETONS.get(sk.name) == sk:
            data["skeleton"] = sk.name
        else:
            data["skeleton"] = {
                "name": sk.name,
                "level": sk.level,
                "sections": [
                    {"title": s.title, "hint": s.hint, "optional": s.optional} for s in sk.sections
                ],
            }
    return data


def system_prompt_data(prompt: SystemPrompt) -> dict[str, Any]:
    """The parts of a SystemPrompt as prompt-file data (no name, version, description)."""
    return {
        "role": prompt.role,
        "domain": prompt.domain,
        "objective": prompt.objective,
        "guidelines": list(prompt.guidelines),
        "output_format": prompt.output_format,
        "constraints": list(prompt.constraints),
        "context": dict(prompt.context),
        "style": _style_data(prompt.style),
        "examples": [{"user": e.user, "assistant": e.assistant} for e in prompt.examples],
    }


def _prompt_from_spec(spec: PromptSpec) -> SystemPrompt:
    style = None
    if spec.style is not None:
        s = spec.style
        sk: Skeleton | str | None = None
        if isinstance(s.skeleton, SkeletonSpec):
            sk = Skeleton(
                s.skeleton.name,
                [Section(x.title, x.hint, x.optional) for x in s.skeleton.sections],
                s.skeleton.level,
            )
        else:
            sk = s.skeleton
        style = Style(s.length, s.formality, s.structure, s.persona, s.depth, s.max_words, sk)
    return SystemPrompt(
        role=spec.role,
        domain=spec.domain,
        objective=spec.objective,
        guidelines=list(spec.guidelines),
        output_format=spec.output_format,
        constraints=list(spec.constraints),
        context=dict(spec.context),
        style=style,
        examples=[Example(e.user, e.assistant) for e in spec.examples],
    )


def canonical_json(spec: PromptSpec) -> str:
    """The hashed content: all fields but name and version, defaults left out, sorted keys."""
    data = spec.model_dump(mode="json", exclude={"name", "version"}, exclude_defaults=True)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


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


@dataclass
class PromptFile:
    """One version of a named prompt, with its content hash and where it was loaded from.

    Building one validates name, version and parts, and normalizes the prompt the way a
    file would (strings stripped, a format template as JSON text).
    """

    name: str
    version: str
    prompt: SystemPrompt
    description: str = ""
    path: Path | None = None
    sha256: str = field(default="", init=False)
    spec: PromptSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        data = {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            **system_prompt_data(self.prompt),
        }
        try:
            spec = PromptSpec.model_validate(data, strict=False)
        except ValidationError as e:
            raise _validation_error(e, where=f"prompt {self.name}@{self.version}") from None
        self._set_spec(spec)

    @classmethod
    def from_spec(cls, spec: PromptSpec, path: Path | None = None) -> PromptFile:
        self = cls.__new__(cls)
        self.path = path
        self._set_spec(spec)
        return self

    def _set_spec(self, spec: PromptSpec) -> None:
        self.name, self.version, self.description = spec.name, spec.version, spec.description
        self.prompt = _prompt_from_spec(spec)
        self.spec = spec
        self.sha256 = hashlib.sha256(canonical_json(spec).encode()).hexdigest()

    @property
    def ref(self) -> str:
        """NAME@VERSION."""
        return f"{self.name}@{self.version}"

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of the content hash."""
        return self.sha256[:12]

    def render(self, now: datetime | None = None) -> str:
        """The system text, then the few-shot examples as text (for show and diff)."""
        parts = [self.prompt.render(now), self.prompt.render_examples()]
        return "\n\n".join(p for p in parts if p)

    def header(self) -> str:
        """One line: NAME@VERSION, short hash, file."""
        where = f"  {self.path}" if self.path else ""
        return f"{self.ref}  sha256:{self.short_hash}{where}"

    def to_yaml(self) -> str:
        """The prompt file text (defaults left out, multi-line text as block scalars)."""
        data = self.spec.model_dump(mode="json", exclude_defaults=True)
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=88)


class _Dumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _represent_str)


# ---------------------------------------------------------------------------------------
# loading, with errors that name the file, the line and the field


def _located(path: Path | str, node: yaml.Node | None) -> str:
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


def _validation_error(
    e: ValidationError, *, where: str, node: yaml.Node | None = None
) -> PellucidError:
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
        f"{_located(where, target)}: field {fieldname}: {msg}{tail}", param=fieldname
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


def _check_duplicate_keys(node: yaml.Node, path: Path | str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for k, v in node.value:
            if k.value in seen:
                raise PellucidError(
                    f"{_located(path, k)}: field {k.value}: appears twice", param=str(k.value)
                )
            seen.add(k.value)
            _check_duplicate_keys(v, path)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _check_duplicate_keys(v, path)


def parse_prompts(text: str, path: Path | str = "<string>") -> list[PromptFile]:
    """Every prompt document in a YAML text; errors name the file, the line and the field."""
    loader = yaml.SafeLoader(text)
    docs: list[tuple[yaml.Node, Any]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _check_duplicate_keys(node, path)
            docs.append((node, loader.construct_document(node)))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise PellucidError(f"{path}{line}: not valid YAML: {e.problem or e}") from None
    finally:
        loader.dispose()
    if not docs:
        raise PellucidError(f"{path}: empty prompt file (need at least name and version)")
    out = []
    for node, data in docs:
        if not isinstance(data, dict):
            raise PellucidError(
                f"{_located(path, node)}: a prompt file holds a mapping (name: ..., "
                f"version: ...), got {type(data).__name__}"
            )
        try:
            spec = PromptSpec.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e, where=str(path), node=node) from None
        out.append(PromptFile.from_spec(spec, Path(path) if path != "<string>" else None))
    return out


def _split_filename(path: Path) -> tuple[str, str | None]:
    stem = path.name
    for suffix in _SUFFIXES:
        stem = stem.removesuffix(suffix)
    name, _, version = stem.partition("@")
    return name, (version or None)


def load_file(path: str | os.PathLike) -> list[PromptFile]:
    """All versions in one prompt file, checked against its name (NAME[@VERSION].yaml)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PellucidError(f"cannot read prompt file {path}: {e.strerror}") from None
    prompts = parse_prompts(text, path)
    name, version = _split_filename(path)
    if version is not None and len(prompts) != 1:
        raise PellucidError(
            f"{path}: a NAME@VERSION file holds one prompt, found {len(prompts)} documents"
        )
    seen: dict[str, PromptFile] = {}
    for p in prompts:
        if p.name != name:
            raise PellucidError(
                f"{path}: field name: {p.name!r} does not match the file name (expected {name!r})",
                param="name",
            )
        if version is not None and p.version != version:
            raise PellucidError(
                f"{path}: field version: {p.version!r} does not match the file name "
                f"(expected {version!r})",
                param="version",
            )
        if p.version in seen:
            raise PellucidError(
                f"{path}: field version: {p.version} appears twice in one file", param="version"
            )
        seen[p.version] = p
    return prompts


# ---------------------------------------------------------------------------------------
# the store


def default_prompt_dir() -> Path:
    """$PELLUCID_HOME/prompts (default ~/.cache/pellucid/prompts)."""
    from pellucid.registry import home

    return home() / "prompts"


def split_ref(ref: str) -> tuple[str, str | None]:
    """'NAME@VERSION' -> (NAME, VERSION); 'NAME' -> (NAME, None); both validated."""
    name, at, version = ref.strip().partition("@")
    if not NAME_RE.match(name):
        raise PellucidError(
            f"bad prompt reference {ref!r}: expected NAME or NAME@VERSION, a name being "
            "lowercase letters, digits, '.', '_' and '-'",
            param="system_prompt",
        )
    if at and not VERSION_RE.match(version):
        raise PellucidError(
            f"bad prompt reference {ref!r}: version {version!r} is not MAJOR.MINOR.PATCH",
            param="system_prompt",
        )
    return name, (version if at else None)


class PromptStore:
    """Prompt files found along a search path: caller's dirs, the user's dir, built-ins."""

    def __init__(
        self,
        paths: Iterable[str | os.PathLike] = (),
        *,
        home: str | os.PathLike | None = None,
        builtin: bool = True,
    ):
        self.home = Path(home) if home is not None else default_prompt_dir()
        self.extra = [Path(p) for p in paths]
        self.builtin = builtin

    @property
    def dirs(self) -> list[Path]:
        """The search path, first match first."""
        return [*self.extra, self.home, *([BUILTIN_DIR] if self.builtin else [])]

    def add_path(self, path: str | os.PathLike) -> None:
        """Search `path` before everything already on the search path."""
        self.extra.insert(0, Path(path))

    def _files(self, name: str | None = None) -> list[Path]:
        out = []
        for d in self.dirs:
            if not d.is_dir():
                continue
            for f in sorted(d.iterdir()):
                if not f.is_file() or f.suffix not in _SUFFIXES:
                    continue
                if name is None or _split_filename(f)[0] == name:
                    out.append(f)
        return out

    def _collect(
        self, files: Iterable[Path], errors: list[PellucidError] | None
    ) -> list[PromptFile]:
        found: dict[tuple[str, str], PromptFile] = {}
        for f in files:
            try:
                fname, _ = _split_filename(f)
                if not NAME_RE.match(fname):
                    raise PellucidError(
                        f"{f}: a prompt file is named NAME.yaml or NAME@VERSION.yaml, with a "
                        "lowercase name"
                    )
                prompts = load_file(f)
            except PellucidError as e:
                if errors is None:
                    raise
                errors.append(e)
                continue
            for p in prompts:
                first = found.get((p.name, p.version))
                if first is None:
                    found[(p.name, p.version)] = p
                elif first.sha256 != p.sha256:
                    e = PellucidError(
                        f"prompt {p.ref} has different content in {first.path} "
                        f"(sha256:{first.short_hash}) and {p.path} (sha256:{p.short_hash}); "
                        "one of them needs a new version"
                    )
                    if errors is None:
                        raise e
                    errors.append(e)
        return sorted(found.values(), key=lambda p: (p.name, version_key(p.version)))

    def scan(self) -> tuple[list[PromptFile], list[PellucidError]]:
        """Every prompt version on the search path, and the errors of files that failed."""
        errors: list[PellucidError] = []
        return self._collect(self._files(), errors), errors

    def list(self) -> list[PromptFile]:
        """Every prompt version, sorted by name then version; a bad file is an error."""
        return self._collect(self._files(), None)

    def versions(self, name: str) -> list[PromptFile]:
        """All versions of one prompt, oldest first."""
        split_ref(name)
        return self._collect(self._files(name), None)

    def resolve(self, ref: str) -> PromptFile:
        """'NAME@VERSION' exactly, or 'NAME': its latest version in semantic-version order."""
        name, version = split_ref(ref)
        found = self.versions(name)
        if not found:
            raise PellucidError(
                f"no prompt named {name!r} in {', '.join(str(d) for d in self.dirs)}",
                param="system_prompt",
                status=404,
            )
        if version is None:
            return found[-1]
        for p in found:
            if p.version == version:
                return p
        raise PellucidError(
            f"prompt {name!r} has no version {version}; versions: "
            + ", ".join(p.version for p in found),
            param="system_prompt",
            status=404,
        )

    def save(self, prompt: PromptFile, directory: str | os.PathLike | None = None) -> Path:
        """Write NAME@VERSION.yaml atomically into `directory` (default: the user's dir).

        Saving content that already exists under the same NAME@VERSION is a no-op that
        returns the existing file; different content under an existing NAME@VERSION is
        refused: bump the version instead.
        """
        existing = {p.version: p for p in self.versions(prompt.name)}
        if (old := existing.get(prompt.version)) is not None:
            if old.sha256 == prompt.sha256:
                assert old.path is not None
                return old.path
            raise self._overwrite_error(prompt, old, existing)
        target = Path(directory) if directory is not None else self.home
        target.mkdir(parents=True, exist_ok=True)
        final = target / f"{prompt.ref}.yaml"
        text = prompt.to_yaml()
        check = parse_prompts(text, final)[0]
        assert check.sha256 == prompt.sha256, (check.sha256, prompt.sha256)
        fd, tmp = tempfile.mkstemp(prefix=f".{prompt.ref}.", suffix=".tmp", dir=target)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, final)  # atomic, and never replaces a file that appeared meanwhile
            except FileExistsError:
                old = load_file(final)[0]
                if old.sha256 != prompt.sha256:
                    raise self._overwrite_error(prompt, old, existing) from None
        finally:
            os.unlink(tmp)
        return final

    @staticmethod
    def _overwrite_error(
        new: PromptFile, old: PromptFile, existing: dict[str, PromptFile]
    ) -> PellucidError:
        free = bump(max(existing or {new.version: new}, key=version_key))
        return PellucidError(
            f"prompt {new.ref} already exists in {old.path} with different content "
            f"(sha256:{old.short_hash}, new sha256:{new.short_hash}); prompts are not "
            f"edited in place: save it as a new version, e.g. {new.name}@{free}",
            param="version",
            status=409,
        )


# ---------------------------------------------------------------------------------------
# diff


@dataclass
class FieldChange:
    """One field that differs between two prompt versions (None: absent on that side)."""

    field: str
    before: Any
    after: Any


@dataclass
class PromptDiff:
    """What changed between two prompts: field by field, and the rendered text."""

    a: str  # NAME@VERSION
    b: str
    a_hash: str
    b_hash: str
    fields: list[FieldChange]
    unified: str  # unified diff of the rendered prompts ("" when they render the same)

    @property
    def same_content(self) -> bool:
        return self.a_hash == self.b_hash

    def render(self) -> str:
        """The whole diff as text for a terminal."""
        lines = [
            f"--- {self.a}  sha256:{self.a_hash[:12]}",
            f"+++ {self.b}  sha256:{self.b_hash[:12]}",
        ]
        if not self.fields:
            lines.append("(no changes)")
        for c in self.fields:
            lines.append(f"{c.field}: {_show(c.before)} -> {_show(c.after)}")
        if self.unified:
            lines += ["", self.unified.rstrip("\n")]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _show(value: Any) -> str:
    if value is None:
        return "(absent)"
    return json.dumps(value, ensure_ascii=False)


def _flat(spec: PromptSpec) -> dict[str, Any]:
    data = spec.model_dump(mode="json", exclude={"name"}, exclude_defaults=True)
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and k in ("context", "style"):
            for k2, v2 in v.items():
                out[f"{k}.{k2}"] = v2
        else:
            out[k] = v
    return out


def diff(a: PromptFile, b: PromptFile, now: datetime | None = None) -> PromptDiff:
    """Field-level changes and a unified diff of the rendered prompts, `a` to `b`."""
    fa, fb = _flat(a.spec), _flat(b.spec)
    if a.name != b.name:
        fa["name"], fb["name"] = a.name, b.name
    rank = {k: i for i, k in enumerate(PromptSpec.model_fields)}
    order = sorted(dict.fromkeys([*fa, *fb]), key=lambda k: rank.get(k.split(".")[0], -1))
    changes = [FieldChange(k, fa.get(k), fb.get(k)) for k in order if fa.get(k) != fb.get(k)]
    now = now or datetime.now()
    unified = "".join(
        difflib.unified_diff(
            (a.render(now) + "\n").splitlines(keepends=True),
            (b.render(now) + "\n").splitlines(keepends=True),
            fromfile=a.ref,
            tofile=b.ref,
        )
    )
    return PromptDiff(a.ref, b.ref, a.sha256, b.sha256, changes, unified)
