"""pellucid.steering without a model: specs, layers, the file format, the folder, capture
specs and their encoding (the fast lane; tests/test_steering_real.py runs the real model)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pellucid import steering
from pellucid.errors import PellucidError
from pellucid.steering import Capture, SteeringLibrary, SteeringVector

CFG = SimpleNamespace(d_model=8, n_layers=6, arch="llama")


def test_specs_and_layers():
    assert steering.parse_spec("happy") == {"vector": "happy"}
    assert steering.parse_spec("happy:-0.5@2-4") == {"vector": "happy", "scale": -0.5, "layers": [2, 3, 4]}
    assert steering.parse_layers("1,3-4,3") == [1, 3, 4]
    for bad, words in (("happy:x", "not a number"), ("happy@4-2", "backwards"), ("happy@a", "not a layer")):
        with pytest.raises(PellucidError, match=words):
            steering.parse_spec(bad)


def test_file_round_trip_and_a_folder_with_a_broken_file(tmp_path):
    vec = SteeringVector({i: torch.arange(8.0) * i for i in (1, 2, 5)}, "llama", {"n_layers": 6, "method": "mean_difference"}, "v")
    vec.save(tmp_path / "v.gguf")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(40))
    lib = SteeringLibrary(tmp_path)
    assert lib.names() == ["v"]
    back = lib.get("v")
    assert back.layers == [1, 2, 5] and all(torch.equal(back.directions[i], vec.directions[i]) for i in back.layers)
    assert back.meta["n_layers"] == 6 and back.model_hint == "llama"
    with pytest.raises(PellucidError, match="'broken' cannot be used: .*version"):
        lib.get("broken")
    with pytest.raises(PellucidError, match="did you mean 'v'"):
        lib.get("vv")


def test_resolve_sums_items_and_keys_the_result():
    vec = SteeringVector({1: torch.ones(8), 2: torch.full((8,), 2.0)}, "llama", {}, "v")
    s = steering.resolve([{"vector": vec, "scale": 2}, {"vector": [1.0] * 8, "layers": [2]}], CFG)
    assert torch.equal(s.layers[1], torch.full((8,), 2.0)) and torch.equal(s.layers[2], torch.full((8,), 5.0))
    same = steering.resolve([{"vector": vec, "scale": 2}, {"vector": [1.0] * 8, "layers": 2}], CFG)
    assert same.key == s.key
    assert steering.resolve({"vector": vec, "scale": 0}, CFG) is None
    with pytest.raises(PellucidError, match="made for a 'qwen2' model"):
        steering.resolve({"vector": SteeringVector({1: torch.ones(8)}, "qwen2")}, CFG)
    with pytest.raises(PellucidError, match="named vectors need a steering folder"):
        steering.resolve("happy", CFG)


def test_capture_specs_limits_and_encoding():
    cap = steering.parse_capture({"layers": "1-2", "positions": [0, -1]}, CFG)
    assert cap == Capture((1, 2), (0, -1)) and cap.resolve(5, 8) == [0, 4]
    assert steering.parse_capture({"layers": 3}, CFG).resolve(5, 8) == [4]
    for spec, words in (({"layers": [6]}, "out of range"), ({"layers": [1], "what": "attn"}, "resid_post"),
                        ({"layers": [1], "positions": "first"}, "'last', 'all'"), ({"layer": 1}, "unknown capture field")):  # fmt: skip
        with pytest.raises(PellucidError, match=words):
            steering.parse_capture(spec, CFG)
    with pytest.raises(PellucidError, match="at most"):
        Capture((1,), "all").resolve(steering.CAPTURE_LIMIT, 8)
    rows = {1: torch.randn(2, 8), 2: torch.randn(2, 8)}
    payload = steering.encode(rows, [0, 4])
    assert payload["shape"] == [2, 2, 8] and payload["positions"] == [0, 4]
    assert np.array_equal(steering.decode(payload), torch.stack([rows[1], rows[2]]).half().numpy())
