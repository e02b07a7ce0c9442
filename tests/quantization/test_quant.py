"""Weight-only int8/int4: torch's kernels against their own dequantized weights, shape checks,
pellucid's block quantizers (Q8_0, Q4_1), bytes per parameter, and the module swap on a tiny model."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_hf_llama, write_llama_gguf

from pellucid import kernels
from pellucid.errors import PellucidError
from pellucid.quantization.apply import (
    activation_bits,
    model_nbytes,
    parse_quant,
    quantize_model,
    quantized_layers,
)
from pellucid.quantization.blocks import BlockEmbedding, BlockLinear, quantize_blocks
from pellucid.quantization.embedding import RowEmbedding
from pellucid.quantization.int4 import (
    Int4Linear,
    Int4PairLinear,
    dequantize_int4,
    pack_int4,
    quantize_int4,
)
from pellucid.quantization.int8 import Int8Linear, quantize_int8
from pellucid.quantization.kernels import check_linear_shapes, has_kernel


def test_kernels_exist_on_cpu():
    assert has_kernel("int8", "cpu")
    assert has_kernel("int4", "cpu")


@pytest.mark.parametrize(("bits", "group"), [(8, 32), (4, 32), (4, 64)])
def test_block_quantizers_round_to_the_nearest_step(bits, group):
    """Q8_0 (bits 8) and Q4_1 (bits 4, groups of 32 or 64): every value within half a step of
    the float weight, read back by the kernels' own dequantizer; the layer's matmul equal to
    the float64 product of those values (up to the int16 activations)."""
    torch.manual_seed(bits + group)
    w = torch.randn(48, 256)
    w[3] = 0.0  # an all-zero row: d = 0, values 0
    lin = BlockLinear.from_float(w, bits=bits, group_size=group)
    assert lin.qtype == (kernels.Q8_0 if bits == 8 else kernels.Q4_1)
    back = lin.dequantize()
    g = w.view(48, -1, group if bits == 4 else 32)
    step = (g.abs().amax(-1) / 127) if bits == 8 else (g.amax(-1) - g.amin(-1)) / 15
    tol = step.repeat_interleave(g.shape[-1], dim=1) * 0.51 + 1e-3 * step.max()  # half a step (float16 scales)
    assert ((back - w).abs() <= tol).all()
    assert torch.equal(back[3], torch.zeros(256))
    if kernels.available():
        x = torch.randn(5, 256)
        ref = x.double() @ back.double().t()
        assert ((lin(x).double() - ref).abs().max() <= 1e-4 * ref.abs().max())


def test_block_layers_refuse_shapes_they_cannot_hold():
    with pytest.raises(PellucidError, match="blocks of 32"):
        quantize_blocks(torch.randn(4, 48), kernels.Q8_0)
    with pytest.raises(PellucidError, match="group size 48"):
        quantize_blocks(torch.randn(4, 96), kernels.Q4_1, 48)
    with pytest.raises(PellucidError, match="are 34 bytes"):
        BlockLinear(torch.zeros(4, 30, dtype=torch.uint8), kernels.Q8_0, 32)


@pytest.mark.parametrize("M", [1, 3, 17])
def test_int8_kernel_matches_its_dequantized_weight(M):
    torch.manual_seed(0)
    w = torch.randn(192, 576) * 0.05
    lin = Int8Linear.from_float(w)
    x = torch.randn(M, 576)
    ref = x.to(torch.bfloat16).float() @ lin.dequantize(torch.float32).t()
    y = lin(x)
    assert y.shape == (M, 192) and y.dtype == torch.float32
    assert torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    # per-channel int8 keeps the weights within half a step of each row's scale
    err = (lin.dequantize(torch.float32) - w).abs().amax(1)
    assert (err <= 0.5 * lin.scales.float() * 1.01 + 1e-6).all()


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("M", [1, 5])
def test_int4_kernel_matches_its_dequantized_weight(group, M):
    torch.manual_seed(1)
    w = torch.randn(320, 576) * 0.05
    q, sz = quantize_int4(w, group)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (576 // group, 320, 2)
    lin = Int4Linear.from_quantized(q, sz, group_size=group)
    x = torch.randn(M, 2, 576)  # any leading shape
    deq = dequantize_int4(q, sz, group)
    ref = x.to(torch.bfloat16).float() @ deq.t()
    y = lin(x)
    assert y.shape == (M, 2, 320)
    assert torch.allclose(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    assert torch.allclose(lin.dequantize(torch.float32), deq, atol=1e-2 * deq.abs().max().item())


def test_int4_keeps_q4_1_blocks_bit_for_bit():
    """A Q4_1 block (d * q + m, q in 0..15, both ends used) comes back with the same nibbles."""
    torch.manual_seed(2)
    N, K = 64, 256
    d = torch.rand(N, K // 32) * 0.01 + 1e-3
    m = -8 * d * (1 + 0.1 * torch.randn(N, K // 32))  # centred blocks, as real weights are
    q = torch.randint(0, 16, (N, K))
    q[:, ::32], q[:, 1::32] = 0, 15
    w = (q.float().reshape(N, K // 32, 32) * d[..., None] + m[..., None]).reshape(N, K)
    q2, sz = quantize_int4(w, 32)
    assert (q2.long() == q).float().mean() > 0.995
    err = (dequantize_int4(q2, sz, 32) - w).abs().reshape(N, K // 32, 32).amax(-1)
    assert (err <= 0.05 * d).float().mean() > 0.97  # bfloat16 scale/zero rounding (and the rare nibble it moves)


def test_int4_pair_holds_what_one_int4_loses():
    """The head's format: int4 + an int4 of the residual, about 8 bits per group of 32."""
    torch.manual_seed(4)
    w = torch.randn(256, 576) * 0.05
    one = Int4Linear.from_float(w).dequantize(torch.float32)
    pair = Int4PairLinear.from_float(w)
    two = pair.dequantize(torch.float32)
    rms = lambda d: d.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(two - w) < rms(one - w) / 8
    x = torch.randn(3, 576)
    assert torch.allclose(pair(x), x.to(torch.bfloat16).float() @ two.t(), rtol=2e-2, atol=1e-2)
    assert pair.nbytes == 2 * Int4Linear.from_float(w).nbytes


def test_pack_in_row_chunks_equals_one_pack():
    q = torch.randint(0, 16, (8192 + 64, 64), dtype=torch.uint8)
    assert torch.equal(pack_int4(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))


@pytest.mark.parametrize(
    ("K", "N", "group", "match"),
    [(72, 64, 32, "multiple of the group size"), (96, 64, 64, "multiple of the group size"),
     (64, 40, 32, "multiple of 16"), (64, 64, 48, "group size 48")],
)  # fmt: skip
def test_int4_rejects_shapes_the_kernel_cannot_take(K, N, group, match):
    with pytest.raises(PellucidError, match=match):
        check_linear_shapes("int4", K, N, group, "blocks.0.mlp.up_proj")
    with pytest.raises(PellucidError, match=match):
        Int4Linear.from_float(torch.randn(N, K), group_size=group)


def test_parse_quant():
    assert parse_quant("int4") == ("int4", 32)
    assert parse_quant("int4-g64") == ("int4", 64)
    assert parse_quant("int8") == ("int8", 0)
    assert parse_quant(None) == (None, 0) and parse_quant("none") == (None, 0)
    assert parse_quant("int4-a8") == ("int4", 32) and parse_quant("int4-g64-a8") == ("int4", 64)
    assert [activation_bits(q) for q in ("int4", "int4-a8", "int8-a8", "int4-g64-a8", None)] == [16, 8, 8, 8, 16]
    for bad in ("int3", "int8-g32", "int4-gx", "int4-a4", "a8", "none-a8"):
        with pytest.raises(PellucidError, match="quant"):
            parse_quant(bad)


def test_bytes_per_parameter():
    w = torch.randn(576, 1536)
    i8, i4 = Int8Linear.from_float(w), Int4Linear.from_float(w, group_size=32)
    s8 = s4 = 2  # torch's kernels take bfloat16 scales
    assert i8.nbytes == 576 * 1536 + s8 * 576  # int8 values + a scale per row
    assert i4.nbytes == 576 * 1536 // 2 + (1536 // 32) * 576 * 2 * s4  # nibbles + scale and zero per group
    assert abs(i4.nbytes / w.numel() - (0.5 + 2 * s4 / 32)) < 1e-9
    q8, q4 = BlockLinear.from_float(w, bits=8), BlockLinear.from_float(w, bits=4)
    assert q8.nbytes == 576 * 1536 // 32 * 34 and q4.nbytes == 576 * 1536 // 32 * 20  # Q8_0, Q4_1 blocks


def test_quantize_int8_scale_rounding_is_consistent():
    w = torch.randn(16, 64)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16
    assert (q.abs() <= 127).all()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    hf = tiny_hf_llama(seed=3, d_model=64, heads=4, kv_heads=2, d_ff=128)
    return write_llama_gguf(hf, tmp_path_factory.mktemp("q") / "tiny.gguf")


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_load_with_quant_swaps_every_linear(tiny_gguf, quant):
    from pellucid.loading import load_model

    ref = load_model(tiny_gguf, dtype="float32")
    lm = load_model(tiny_gguf, dtype="float32", quant=quant)
    assert lm.quant == quant
    layers = quantized_layers(lm.model)
    assert len(layers) == 2 * 7 + 1  # 7 per block and the tied head
    assert not any(isinstance(m, torch.nn.Linear) for m in lm.model.modules())
    rows = lm.model.embed(torch.tensor([[1, 2]]))
    assert rows.dtype == torch.float32
    assert next(lm.model.parameters()).dtype == torch.float32  # the engine reads the activation type here
    if kernels.available():  # block layers: a Q8_0 head, and the tied embedding reads the head's own bytes
        assert isinstance(layers["lm_head"], BlockLinear) and layers["lm_head"].qtype == kernels.Q8_0
        assert isinstance(lm.model.embed, BlockEmbedding) and lm.model.embed.data is layers["lm_head"].data
        assert torch.equal(rows[0], layers["lm_head"].dequantize()[[1, 2]])
        assert torch.allclose(rows[0], ref.model.embed.weight[[1, 2]], atol=0.01 * float(ref.model.embed.weight.detach().abs().max()))
    else:  # torch's kernels: the embedding is a bfloat16 table; the tiny vocabulary (273) is not a multiple of 16: int8 head
        assert isinstance(lm.model.embed, RowEmbedding) and lm.model.embed.weight.dtype == torch.bfloat16
        assert torch.equal(lm.model.embed.weight, ref.model.embed.weight.to(torch.bfloat16))
        assert isinstance(layers["lm_head"], Int8Linear)
    assert model_nbytes(lm.model) < model_nbytes(ref.model)
    ids = torch.tensor([[5, 60, 61, 62, 70, 80, 90, 100]])
    with torch.no_grad():
        a, b = ref.model(ids), lm.model(ids)
    assert torch.isfinite(b).all()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > (0.99 if quant == "int8" else 0.95)


@pytest.mark.skipif(not kernels.available(), reason="8-bit activations are a mode of pellucid's CPU kernels")
def test_eight_bit_activations_reach_every_block_layer(tiny_gguf):
    """'int4-a8': the same blocks, every block layer (the head too, and the fused C++ stack
    through its types) on int8 activations; logits close to the 16-bit ones, not equal."""
    from pellucid.engine.kv_cache import KVCache
    from pellucid.loading import load_model
    from pellucid.models.layers import ForwardContext

    a16 = load_model(tiny_gguf, dtype="float32", quant="int4")
    a8 = load_model(tiny_gguf, dtype="float32", quant="int4-a8")
    layers = quantized_layers(a8.model)
    assert layers and all(isinstance(m, BlockLinear) and m.act_bits == 8 and m.mm_type == m.qtype + kernels.A8
                          for m in layers.values())  # fmt: skip
    assert "int8 activations" in repr(layers["lm_head"])
    ids = torch.tensor([[5, 60, 61, 62, 70, 80, 90, 100]])
    out = []
    for lm in (a16, a8):
        ctx = ForwardContext(torch.arange(8)[None], KVCache(lm.config, 1, 8, torch.float32), torch.tensor([0]), 8)
        with torch.no_grad():
            out.append(lm.model(ids, ctx).flatten())  # the cached (fused) path
    assert not torch.equal(out[0], out[1])
    assert torch.nn.functional.cosine_similarity(out[0], out[1], dim=0) > 0.99


def test_quantize_model_keeps_head_when_asked(tiny_gguf):
    from pellucid.loading import load_model

    lm = load_model(tiny_gguf, dtype="float32")
    quantize_model(lm.model, "int8", head=None)
    assert isinstance(lm.model.lm_head, torch.nn.Linear)
    assert lm.model.lm_head.weight is lm.model.embed.weight  # still tied


def test_quantize_report_cli_on_a_tiny_model(tiny_gguf, tmp_path):
    """Float and quantized formats side by side: float32 is the reference (KL 0, top-1 1)."""
    import json

    from typer.testing import CliRunner

    from pellucid.cli import _register, app

    _register()
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    r = CliRunner().invoke(app, ["quantize-report", str(tiny_gguf), "--text", str(text), "--tokens", "96", "--window", "32",
                                 "--formats", "float32,bfloat16,int8,int8-a8", "--out", str(tmp_path), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = {row["label"]: row for row in json.loads(r.stdout[r.stdout.index("{"):])["rows"]}
    assert set(rows) == {"float32", "bfloat16", "int8", "int8-a8"}
    assert rows["float32"]["kl_mean"] == 0 and rows["float32"]["top1_agreement"] == 1
    assert rows["int8"]["bytes_per_param"] < rows["bfloat16"]["bytes_per_param"] < rows["float32"]["bytes_per_param"]
    assert rows["int8-a8"]["bytes_per_param"] == rows["int8"]["bytes_per_param"]  # the same weights
    if kernels.available():  # int8 activations add their own rounding
        assert rows["int8-a8"]["kl_mean"] > rows["int8"]["kl_mean"]
    assert (tmp_path / "quantize_report.png").is_file()
    bad = CliRunner().invoke(app, ["quantize-report", str(tiny_gguf), "--text", str(text), "--formats", "int4-a4"])
    assert bad.exit_code != 0 and "'int4-a4' is not one of" in f"{bad.output}{bad.exception}"


def test_quantize_report_default_text_comes_with_pellucid(tiny_gguf, tmp_path, monkeypatch):
    """Without --text the report scores the WikiText-2 excerpt shipped in the package (not a
    file beside a checkout), from any working directory."""
    import json

    from typer.testing import CliRunner

    from pellucid.cli import _register, app
    from pellucid.quantization.report import DEFAULT_TEXT

    assert DEFAULT_TEXT.is_file() and DEFAULT_TEXT.stat().st_size > 90_000
    monkeypatch.delenv("PELLUCID_EVAL_TEXT", raising=False)
    monkeypatch.chdir(tmp_path)
    _register()
    r = CliRunner().invoke(app, ["quantize-report", str(tiny_gguf), "--tokens", "64", "--window", "32",
                                 "--formats", "int8", "--out", str(tmp_path), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert rep["text"] == str(DEFAULT_TEXT) and rep["n_tokens"] == 64
