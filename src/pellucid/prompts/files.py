"""Prompt files: one version of a named prompt (`PromptFile`), its content hash, and
reading and writing the YAML.

A file holds one prompt, or several versions of one prompt as YAML documents separated
by `---`; the fields are in `schema.py`. Any file name will do here: only the store
(`store.py`), which finds prompts by file name, asks for NAME.yaml or NAME@VERSION.yaml.

The content hash is the sha256 of the canonical JSON (sorted keys, defaults left out,
strings stripped) of everything except name and version, so it changes exactly when what
the prompt says changes, whatever the YAML layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pellucid.errors import PellucidError
from pellucid.prompts.schema import PromptSpec, SkeletonSpec, located, validation_error
from pellucid.prompts.styles import SKELETONS, Section, Skeleton, Style
from pellucid.prompts.system import Example, SystemPrompt

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
            raise validation_error(e, where=f"prompt {self.name}@{self.version}") from None
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
# reading, with errors that name the file, the line and the field


def _check_duplicate_keys(node: yaml.Node, path: Path | str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for k, v in node.value:
            if k.value in seen:
                raise PellucidError(
                    f"{located(path, k)}: field {k.value}: appears twice", param=str(k.value)
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
                f"{located(path, node)}: a prompt file holds a mapping (name: ..., "
                f"version: ...), got {type(data).__name__}"
            )
        try:
            spec = PromptSpec.model_validate(data)
        except ValidationError as e:
            raise validation_error(e, where=str(path), node=node) from None
        out.append(PromptFile.from_spec(spec, Path(path) if path != "<string>" else None))
    return out


def load_file(path: str | os.PathLike) -> list[PromptFile]:
    """All versions in one prompt file, whatever the file is called: versions of one name,
    each version once."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PellucidError(f"cannot read prompt file {path}: {e.strerror}") from None
    prompts = parse_prompts(text, path)
    seen: set[str] = set()
    for p in prompts:
        if p.name != prompts[0].name:
            raise PellucidError(
                f"{path}: field name: {p.name!r} differs from the first document's "
                f"{prompts[0].name!r}; a prompt file holds versions of one prompt",
                param="name",
            )
        if p.version in seen:
            raise PellucidError(
                f"{path}: field version: {p.version} appears twice in one file", param="version"
            )
        seen.add(p.version)
    return prompts
