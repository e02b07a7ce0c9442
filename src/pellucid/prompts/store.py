"""The prompt store: prompt files found by name along a search path, and saving into it.

The store searches, in order: directories the caller adds, `$PELLUCID_HOME/prompts`
(default `~/.cache/pellucid/prompts`), and the built-in prompts shipped with pellucid.
It finds a prompt by its file name, so in a store a file is named `NAME@VERSION.yaml`
(one version) or `NAME.yaml` (versions inside), and what the file holds must agree.
Files read by path (`load_file`, `pellucid prompt diff FILE`, `prompt save FILE`) may be
called anything; saving writes `NAME@VERSION.yaml`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pellucid import registry
from pellucid.errors import PellucidError
from pellucid.prompts.files import PromptFile, load_file, parse_prompts
from pellucid.prompts.schema import NAME_RE, VERSION_RE, bump, version_key

BUILTIN_DIR = Path(__file__).parent / "builtin"
_SUFFIXES = (".yaml", ".yml")


def default_prompt_dir() -> Path:
    """$PELLUCID_HOME/prompts (default ~/.cache/pellucid/prompts)."""
    return registry.home() / "prompts"


def split_filename(path: Path) -> tuple[str, str | None]:
    """NAME.yaml -> (NAME, None); NAME@VERSION.yaml -> (NAME, VERSION)."""
    stem = path.name
    for suffix in _SUFFIXES:
        stem = stem.removesuffix(suffix)
    name, _, version = stem.partition("@")
    return name, (version or None)


def load_store_file(path: Path) -> list[PromptFile]:
    """load_file, and the store's rule: the file name says what the file holds (the store
    finds a prompt by its file name alone)."""
    name, version = split_filename(path)
    rule = (
        f"a prompt file in the store {path.parent} is found by its file name, so it is "
        "named NAME.yaml or NAME@VERSION.yaml after what it holds"
    )
    if not NAME_RE.match(name):
        raise PellucidError(f"{path}: {rule}, with a lowercase name", param="name")
    prompts = load_file(path)
    held = prompts[0]
    if held.name != name:
        raise PellucidError(
            f"{path}: field name: {held.name!r} does not match the file name: {rule}; "
            f"rename it {held.name}.yaml",
            param="name",
        )
    if version is not None and len(prompts) != 1:
        raise PellucidError(
            f"{path}: {rule}; a NAME@VERSION file holds one version, found {len(prompts)}",
            param="version",
        )
    if version is not None and held.version != version:
        raise PellucidError(
            f"{path}: field version: {held.version!r} does not match the file name: {rule}; "
            f"rename it {held.ref}.yaml",
            param="version",
        )
    return prompts


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
                if name is None or split_filename(f)[0] == name:
                    out.append(f)
        return out

    def _collect(
        self, files: Iterable[Path], errors: list[PellucidError] | None
    ) -> list[PromptFile]:
        found: dict[tuple[str, str], PromptFile] = {}
        for f in files:
            try:
                prompts = load_store_file(f)
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
                old = load_store_file(final)[0]
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
