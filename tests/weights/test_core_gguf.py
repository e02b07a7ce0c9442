"""GGUF reading: dequantization against llama.cpp's own package, and bad files."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from tiny import tiny_hf_llama, write_llama_gguf

from pellucid.errors import PellucidError
from pellucid.loading import load_model
from pellucid.weights.gguf import GGUFFile, TensorInfo, dequantize_blocks


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_dequantize_matches_gguf_package(qtype):
    t = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 64)).astype(np.float32)
    q = gguf.quants.quantize(x, t)
    info = TensorInfo("w", (8, 64), t, 0, q.nbytes)
    ours = dequantize_blocks(q.reshape(-1), info).reshape(8, 64)
    ref = gguf.quants.dequantize(q, t)
    np.testing.assert_array_equal(ours, ref)
    assert np.abs(ours - x).max() < 0.5  # and it is a quantization of x


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_hf_llama(seed=1)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model):
    return write_llama_gguf(tiny_model, tmp_path_factory.mktemp("g") / "tiny.gguf")


def test_metadata_and_directory(tiny_gguf, tiny_model):
    f = GGUFFile(tiny_gguf)
    assert f.get("general.architecture") == "llama"
    assert f.get("llama.block_count") == tiny_model.config.num_hidden_layers
    t = f.tensors["blk.0.ffn_gate.weight"]
    assert t.shape == (tiny_model.config.intermediate_size, tiny_model.config.hidden_size)
    assert len(f.metadata["tokenizer.ggml.tokens"]) == tiny_model.config.vocab_size


def test_missing_file(tmp_path):
    with pytest.raises(PellucidError, match="does not exist"):
        load_model(tmp_path / "nope.gguf")


def test_truncated_file(tmp_path, tiny_gguf):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(PellucidError, match="truncated"):
        load_model(bad)
    bad.write_bytes(data[:100])
    with pytest.raises(PellucidError, match="truncated or corrupt"):
        load_model(bad)


def test_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(PellucidError, match="not a GGUF file"):
        load_model(bad)


def test_absurd_counts_are_refused(tmp_path):
    bad = tmp_path / "huge.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 10**12, 1) + b"\x00" * 64)
    with pytest.raises(PellucidError, match="implausible"):
        GGUFFile(bad)


def test_unsupported_architecture(tmp_path, tiny_model):
    p = write_llama_gguf(tiny_model, tmp_path / "x.gguf", arch="rwkv9")
    with pytest.raises(PellucidError, match=r"Unsupported architecture 'rwkv9'.*Supported: .*llama"):
        load_model(p)


def test_unknown_ggml_type(tmp_path, tiny_gguf):
    # Rewrite the type id of the first tensor to a value no GGML type has.
    f = GGUFFile(tiny_gguf)
    data = bytearray(tiny_gguf.read_bytes())
    name = next(iter(f.tensors)).encode()
    i = data.index(name) + len(name)
    n_dims = struct.unpack_from("<I", data, i)[0]
    struct.pack_into("<I", data, i + 4 + 8 * n_dims, 250)
    bad = tmp_path / "badtype.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(PellucidError, match="unknown GGML type 250"):
        load_model(bad)


def test_missing_tensor(tmp_path, tiny_model):
    import gguf as g

    p = write_llama_gguf(tiny_model, tmp_path / "full.gguf")
    f = GGUFFile(p)
    assert "blk.1.ffn_up.weight" in f.tensors
    # Same file with one tensor renamed: the loader must name what is missing.
    data = p.read_bytes().replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_XX.weight")
    bad = tmp_path / "missing.gguf"
    bad.write_bytes(data)
    with pytest.raises(PellucidError, match=r"blk\.1\.ffn_up\.weight.*missing"):
        load_model(bad)
    assert g  # the gguf package is the writer used above


def test_quantized_load_equals_dequantized_reference(tmp_path, tiny_model):
    p = write_llama_gguf(tiny_model, tmp_path / "q8.gguf", qtype="Q8_0")
    lm = load_model(p, dtype="float32")
    f = GGUFFile(p)
    t = f.tensors["blk.0.ffn_down.weight"]
    ref = gguf.quants.dequantize(np.asarray(f.raw(t.name)).reshape(t.shape[0], -1), t.qtype)
    assert torch.equal(lm.model.blocks[0].mlp.down_proj.weight, torch.from_numpy(ref))
    assert lm.storage["blocks.0.mlp.down_proj.weight"] == "Q8_0"
