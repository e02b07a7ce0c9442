"""Putting a system prompt, a style and the user's messages together.

A system prompt is given as text, a `SystemPrompt`, a `PromptFile`, or a string that
refers to a prompt file: `NAME@VERSION` (looked up in a `PromptStore`), or the path of a
YAML file, optionally with `@VERSION` when it holds several versions. Plain text that is
not such a reference is used as it is.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pellucid.errors import PellucidError
from pellucid.prompts.files import PromptFile, load_file
from pellucid.prompts.schema import NAME_RE, VERSION_RE, version_key
from pellucid.prompts.store import PromptStore
from pellucid.prompts.styles import DIMENSIONS, Style
from pellucid.prompts.system import SystemPrompt

Message = dict[str, Any]
SystemLike = str | SystemPrompt | PromptFile | None
_YAML = (".yaml", ".yml")


def is_prompt_ref(value: str) -> bool:
    """Is `value` exactly NAME@VERSION (a prompt-file reference, not prompt text)?"""
    name, at, version = value.strip().partition("@")
    return bool(at) and bool(NAME_RE.match(name)) and bool(VERSION_RE.match(version))


def _file_and_version(value: str) -> tuple[Path, str | None] | None:
    """(path, version) when `value` names a YAML file (FILE or FILE@VERSION), else None."""
    if not value or "\n" in value or "\x00" in value or len(value) > 1024:
        return None  # prompt text, not a path
    head, at, version = value.rpartition("@")
    try:
        if Path(value).expanduser().is_file():
            return Path(value).expanduser(), None
        if at and Path(head).expanduser().is_file():
            return Path(head).expanduser(), version
    except OSError:  # a name too long for the file system: text
        return None
    looks_like_path = not any(c.isspace() for c in value)  # prose that ends in ".yaml" is text
    if looks_like_path and (value.endswith(_YAML) or (at and head.endswith(_YAML))):
        raise PellucidError(
            f"prompt file {head if at else value!r} does not exist", param="prompt_file"
        )
    return None


def load_prompt(ref: str | os.PathLike, store: PromptStore | None = None) -> PromptFile:
    """A prompt file version from NAME[@VERSION] (through the store) or FILE[@VERSION]."""
    value = str(ref).strip()
    found = _file_and_version(value)
    if found is None:
        return (store or PromptStore()).resolve(value)
    path, version = found
    versions = load_file(path)
    if version is None:
        return max(versions, key=lambda p: version_key(p.version))
    for p in versions:
        if p.version == version:
            return p
    raise PellucidError(
        f"{path} has no version {version}; versions: " + ", ".join(p.version for p in versions),
        param="prompt_file",
    )


def as_system_prompt(
    system: SystemLike, store: PromptStore | None = None
) -> SystemPrompt | str | None:
    """A SystemPrompt (from a prompt file or reference) or plain system text."""
    if isinstance(system, PromptFile):
        return system.prompt
    if isinstance(system, str) and (
        is_prompt_ref(system) or _file_and_version(system.strip()) is not None
    ):
        return load_prompt(system, store).prompt
    if system is None or isinstance(system, SystemPrompt | str):
        return system
    raise PellucidError(f"system must be text, a SystemPrompt or a PromptFile, got {type(system).__name__}",
                        param="system")  # fmt: skip


def merge_styles(base: Style | None, override: Style | None) -> Style | None:
    """`base` with every field that `override` sets replaced (None: not set)."""
    if override is None:
        return base
    if base is None:
        return override
    fields = [*DIMENSIONS, "max_words", "skeleton"]
    return Style(
        **{
            f: getattr(override, f) if getattr(override, f) is not None else getattr(base, f)
            for f in fields
        }
    )


def effective_style(
    system: SystemLike, style: Style | None = None, store: PromptStore | None = None
) -> Style | None:
    """The style a reply is checked against: the prompt's own, overridden by `style`."""
    sp = as_system_prompt(system, store)
    return merge_styles(sp.style if isinstance(sp, SystemPrompt) else None, style)


def system_messages(system: SystemLike, style: Style | None = None, *, now: datetime | None = None,
                    store: PromptStore | None = None) -> list[Message]:  # fmt: skip
    """The messages a system prompt contributes: the system message, then few-shot turns.

    A style is merged into a SystemPrompt's own style (its fields win); with plain text it
    is appended after a blank line; alone it becomes the system text.
    """
    sp = as_system_prompt(system, store)
    if isinstance(sp, SystemPrompt):
        return dataclasses.replace(sp, style=merge_styles(sp.style, style)).prefix_messages(now)
    text = sp or ""
    if style is not None and (extra := style.render()):
        text = f"{text}\n\n{extra}" if text.strip() else extra
    return [{"role": "system", "content": text}] if text.strip() else []


def with_system(messages: Sequence[Message], system: SystemLike = None, style: Style | None = None, *,
                now: datetime | None = None, store: PromptStore | None = None) -> list[Message]:  # fmt: skip
    """`messages` preceded by the system prompt's messages; a style alone is added to a
    system message the conversation already has."""
    msgs = [dict(m) for m in messages]
    has_system = bool(msgs) and msgs[0].get("role") == "system"
    if system is not None and has_system:
        raise PellucidError(
            "the messages already start with a system message; give the system prompt either "
            "there or as the system prompt option, not both",
            param="system",
        )
    if system is None and style is None:
        return msgs
    if system is None and has_system:
        text = msgs[0]["content"]
        return system_messages(text, style, now=now) + msgs[1:]
    return system_messages(system, style, now=now, store=store) + msgs


def resolve_system_value(value: str, base_dir: str | os.PathLike | None = None) -> str | PromptFile:
    """A config's `system_prompt`: a PromptFile for NAME@VERSION or FILE[@VERSION] (files
    relative to `base_dir`, the config's folder, which is also searched for prompt files
    before the user's folder and the built-ins), else the text itself."""
    base = Path(base_dir) if base_dir is not None else None
    ref = value.strip()
    if base is not None and not is_prompt_ref(ref) and not Path(ref).expanduser().is_absolute():
        head, at, version = ref.rpartition("@")
        for candidate in (ref, head if at else None):
            if candidate and (base / candidate).is_file():
                ref = str(base / candidate) + (f"@{version}" if candidate == head else "")
                break
    if is_prompt_ref(ref) or _file_and_version(ref) is not None:
        return load_prompt(ref, PromptStore([base] if base is not None else []))
    return value


def system_text(
    value: str, base_dir: str | os.PathLike | None = None, now: datetime | None = None
) -> str:
    """The system text of a config's `system_prompt`: a prompt file's rendered text with its
    few-shot examples as text (doors that can send messages should use `system_messages`,
    which sends the examples as real prior turns), or the text itself."""
    resolved = resolve_system_value(value, base_dir)
    return resolved.render(now) if isinstance(resolved, PromptFile) else resolved
