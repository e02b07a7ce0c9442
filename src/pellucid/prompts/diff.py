"""What changed between two prompt versions: field by field, and the rendered text."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pellucid.prompts.files import PromptFile
from pellucid.prompts.schema import PromptSpec


@dataclass
class FieldChange:
    """One field that differs between two prompt versions (None: absent on that side)."""

    field: str
    before: Any
    after: Any


@dataclass
class PromptDiff:
    """What changed between two prompts: field by field, and the rendered text."""

    a: str  # NAME@VERSION, and the file when both sides have the same NAME@VERSION
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
    label_a, label_b = _label(a, b), _label(b, a)
    now = now or datetime.now()
    unified = "".join(
        difflib.unified_diff(
            (a.render(now) + "\n").splitlines(keepends=True),
            (b.render(now) + "\n").splitlines(keepends=True),
            fromfile=label_a,
            tofile=label_b,
        )
    )
    return PromptDiff(label_a, label_b, a.sha256, b.sha256, changes, unified)


def _label(p: PromptFile, other: PromptFile) -> str:
    """NAME@VERSION, with the file when the other side has the same NAME@VERSION."""
    same = p.ref == other.ref and p.path is not None and p.path != other.path
    return f"{p.ref} ({p.path})" if same else p.ref
