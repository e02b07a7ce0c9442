"""pellucid::block_mm / block_rows, the kernels on GGUF's block formats read in place: every
block type's values equal to gguf's own dequantizer bit for bit, the matmul's exact
arithmetic (int16 activations per block of 32 or super-block of 256, exact integer dots,
float32 scaling; the integer sums at their bound), the same for 8-bit activations (types +
kernels.A8: VPDPBUSD kernels for Q4_K and Q6_K where the CPU has VNNI)
against a float64 reference, bit-identical rows whatever the batch and thread count,
several matrices of mixed types in one call (with a bias and reordered outputs), both ISA
paths (AVX2 forced in a subprocess), and argument checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from pellucid import kernels

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason="pellucid's CPU kernels need an x86 CPU with AVX2, g++ and ninja"
)

TYPES = [kernels.Q4_0, kernels.Q4_1, kernels.Q5_0, kernels.Q8_0, kernels.Q4_K, kernels.Q6_K]
NAMES = {t: kernels.BLOCK_TYPES[t] for t in TYPES}
# where each block keeps its float16 scales (byte offsets): everything else is quantized data
SCALES = {kernels.Q4_0: (0,), kernels.Q4_1: (0, 2), kernels.Q5_0: (0,), kernels.Q8_0: (0,),
          kernels.Q4_K: (0, 2), kernels.Q6_K: (208,)}  # fmt: skip


def random_blocks(qtype: int, N: int, K: int, seed: int = 0) -> torch.Tensor:
    """(N, row bytes) of random block data (every bit pattern) with sane float16 scales."""
    g = np.random.default_rng(seed)
    block, size = kernels.BLOCK_SIZES[qtype]
    b = g.integers(0, 256, (N, K // block, size), dtype=np.uint8)
    for off in SCALES[qtype]:
        scale = (g.random((N, K // block)) * 0.02 + 0.001).astype(np.float16)
        if qtype == kernels.Q4_1 and off == 2:
            scale = -scale * 4  # the offset m: negative, larger
        b[..., off : off + 2] = scale.view(np.uint8).reshape(N, K // block, 2)
    return torch.from_numpy(b.reshape(N, -1))


def reference(data: torch.Tensor, qtype: int, K: int) -> torch.Tensor:
    """gguf's numpy dequantizer: the file's values (float32)."""
    return torch.from_numpy(dequantize(data.numpy(), GGMLQuantizationType(qtype)).reshape(data.shape[0], K))


def quantized_activations(x: torch.Tensor, qtype: int, bits: int = 16) -> torch.Tensor:
    """The kernels' activations as float64: per row and scale block (32 values; a super-block
    of 256 for Q4_K and Q6_K), dx = max|x| / 32767 (bits 16; 127 for 8), xq =
    round-half-even(x / dx) in float32 (0 when the block is all zero), xq * dx."""
    M, K = x.shape
    block = 256 if qtype in (kernels.Q4_K, kernels.Q6_K) else 32
    xb = x.view(M, K // block, block)
    dx = xb.abs().amax(-1, keepdim=True) / (32767 if bits == 16 else 127)
    xq = torch.where(dx > 0, torch.round(xb / torch.where(dx > 0, dx, 1)), 0)
    return (xq.double() * dx.double()).view(M, K)


def mm(x, data, qtype, bias=None, out_index=None, bits=16):
    return torch.ops.pellucid.block_mm(x, [data], [qtype + (kernels.A8 if bits == 8 else 0)], bias, out_index)


def check_accuracy(qtype: int, N: int, K: int, M: int, seed: int = 0, bits: int = 16) -> None:
    data = random_blocks(qtype, N, K, seed)
    w = reference(data, qtype, K).double()
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed + 1))
    x[0, :32] = 0.0  # an all-zero block: dx = 0
    y = mm(x, data, qtype, bits=bits)
    assert y.shape == (M, N) and y.dtype == torch.float32
    ref = quantized_activations(x, qtype, bits) @ w.t()
    err = (y.double() - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), (NAMES[qtype], N, K, M, bits, err)
    exact = x.double() @ w.t()  # int16 activations are within ~1e-5 of float32's, int8 ones ~1e-2
    err32 = (y.double() - exact).abs().max().item()
    assert err32 <= (2e-4 if bits == 16 else 5e-2) * exact.abs().max().item(), (NAMES[qtype], N, K, M, bits, err32)


def check_batch_invariance(qtype: int, N: int, K: int, bits: int = 16) -> None:
    """Row i of any batch equals row i alone, bit for bit, with 1 or 2 threads."""
    data = random_blocks(qtype, N, K, seed=3)
    x = torch.randn(128, K, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([mm(x[i : i + 1], data, qtype, bits=bits) for i in range(128)])
        for t in sorted({1, 2, threads}):
            torch.set_num_threads(t)
            for M in (1, 2, 3, 4, 5, 15, 16, 31, 32, 33, 128):  # each path: one pass, blocks in registers, panels
                assert torch.equal(mm(x[:M], data, qtype, bits=bits), alone[:M]), (NAMES[qtype], N, K, M, t, bits)
            assert torch.equal(mm(x[37:42], data, qtype, bits=bits), alone[37:42]), (NAMES[qtype], N, K, t, bits)
    finally:
        torch.set_num_threads(threads)


def shapes(qtype: int) -> list[tuple[int, int]]:
    """Odd row counts; for blocks of 32, K with part-filled last units (3, 1, 18 and 5 blocks)."""
    if qtype in (kernels.Q4_K, kernels.Q6_K):
        return [(37, 256), (130, 1536), (9, 512)]
    return [(37, 96), (64, 576), (9, 32), (45, 160)]


@pytest.mark.parametrize("qtype", TYPES, ids=NAMES.get)
def test_rows_equal_ggufs_dequantized_values_bit_for_bit(qtype):
    for N, K in shapes(qtype):
        data = random_blocks(qtype, N, K)
        ids = torch.tensor([[0, N - 1, 3], [5, 5, 1]])
        got = torch.ops.pellucid.block_rows(data, qtype, K, ids)
        want = reference(data, qtype, K)
        assert got.shape == (2, 3, K) and torch.equal(got, want[ids]), (NAMES[qtype], N, K)
        assert torch.equal(kernels.dequantize(data, qtype, K), want)


@pytest.mark.parametrize("qtype", [kernels.F32, kernels.F16, kernels.BF16], ids=["F32", "F16", "BF16"])
def test_float_rows_are_read_as_stored(qtype):
    w = torch.randn(7, 64)
    stored = {kernels.F32: w, kernels.F16: w.half(), kernels.BF16: w.bfloat16()}[qtype]
    data = stored.contiguous().view(torch.uint8).view(7, -1)
    got = torch.ops.pellucid.block_rows(data, qtype, 64, torch.tensor([6, 0]))
    assert torch.equal(got, stored.float()[[6, 0]])


@pytest.mark.parametrize("bits", [16, 8], ids=["a16", "a8"])
@pytest.mark.parametrize("qtype", TYPES, ids=NAMES.get)
@pytest.mark.parametrize("M", [1, 4, 7])
def test_mm_equals_float64_reference_of_its_arithmetic(qtype, M, bits):
    for N, K in shapes(qtype):
        check_accuracy(qtype, N, K, M, bits=bits)


@pytest.mark.parametrize("bits", [16, 8], ids=["a16", "a8"])
@pytest.mark.parametrize("qtype", TYPES, ids=NAMES.get)
def test_rows_bit_identical_whatever_the_batch_and_threads(qtype, bits):
    for N, K in shapes(qtype)[:2]:
        check_batch_invariance(qtype, N, K, bits)


@pytest.mark.parametrize("bits", [16, 8], ids=["a16", "a8"])
def test_several_matrices_of_mixed_types_in_one_call(bits):
    """q/k/v of a Q4_K_M file mix Q4_K and Q6_K: one call, outputs side by side, each part's
    bits as alone; a bias added in output order; out_index moves row n to column out_index[n]."""
    K = 512
    a = kernels.A8 if bits == 8 else 0
    parts = [(random_blocks(kernels.Q4_K, 40, K, 1), kernels.Q4_K + a), (random_blocks(kernels.Q6_K, 24, K, 2), kernels.Q6_K + a),
             (random_blocks(kernels.Q8_0, 8, K, 3), kernels.Q8_0 + a)]  # fmt: skip
    x = torch.randn(5, K)
    alone = torch.cat([torch.ops.pellucid.block_mm(x, [d], [t]) for d, t in parts], dim=1)
    ws, ts = [d for d, _ in parts], [t for _, t in parts]
    assert torch.equal(torch.ops.pellucid.block_mm(x, ws, ts), alone)
    bias = torch.randn(72)
    perm = torch.randperm(72)
    y = torch.ops.pellucid.block_mm(x, ws, ts, bias, perm)
    expect = torch.empty_like(alone)
    expect[:, perm] = alone
    assert torch.equal(y, expect + bias)


@pytest.mark.parametrize("bits", [16, 8], ids=["a16", "a8"])
@pytest.mark.parametrize("qtype", [kernels.Q4_K, kernels.Q6_K], ids=["Q4_K", "Q6_K"])
def test_super_block_integer_sums_at_their_bound(qtype, bits):
    """Every product at its largest (Q4_K: q 15 times sub-block scale 63; Q6_K: q -32 times
    scale -128) against activations all at the integer limit: the int32 sums over a
    super-block reach their bound (2,147,418,112 for Q6_K on int16) without wrapping."""
    K = 512
    b = np.zeros((3, K // 256, kernels.BLOCK_SIZES[qtype][1]), dtype=np.uint8)
    if qtype == kernels.Q4_K:
        b[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # d
        b[..., 2:4] = np.frombuffer(np.float16(0.02).tobytes(), np.uint8)  # dmin
        b[..., 4:16] = 0xFF  # every 6-bit scale and min 63
        b[..., 16:] = 0xFF  # every q 15
    else:
        b[..., 0:192] = 0  # q = 0 - 32
        b[..., 192:208] = 0x80  # every scale -128
        b[..., 208:210] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    data = torch.from_numpy(b.reshape(3, -1))
    w = reference(data, qtype, K).double()
    for sign in (1.0, -1.0):
        x = torch.full((2, K), sign * 3.5)
        y = mm(x, data, qtype, bits=bits).double()
        exact = x.double() @ w.t()
        assert torch.allclose(y, exact, rtol=1e-6, atol=0), (NAMES[qtype], y[0, 0].item(), exact[0, 0].item())


def test_cpu_isa_names_the_path():
    assert torch.ops.pellucid.cpu_isa() in ("avx512_vnni", "avx512", "avx2")


def test_zero_tiny_and_nan_activations():
    data = random_blocks(kernels.Q8_0, 16, 64)
    w = reference(data, kernels.Q8_0, 64).double()
    assert torch.equal(mm(torch.zeros(2, 64), data, kernels.Q8_0), torch.zeros(2, 16))
    x = torch.randn(3, 64)
    x[1, 40] = float("nan")
    x[2] *= 1e-36  # dx subnormal: still finite, still close
    y = mm(x, data, kernels.Q8_0)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and torch.isfinite(y[2]).all()
    exact = x[2:].double() @ w.t()
    assert (y[2:].double() - exact).abs().max() <= 1e-2 * exact.abs().max()


def test_read_bytes_sums_every_byte():
    buf = torch.randint(0, 256, (1 << 20,) , dtype=torch.uint8)
    assert torch.ops.pellucid.read_bytes(buf) == int(buf.long().sum())
    assert torch.ops.pellucid.read_bytes(buf[:1000].clone()) == int(buf[:1000].long().sum())


ORDER = ["avx2", "avx512", "avx512_vnni"]

SUBPROCESS_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(2)
from pellucid import kernels
assert kernels.available()
print(torch.ops.pellucid.cpu_isa())
import test_blocks as t
for bits in (16, 8):
    for qtype in t.TYPES:
        for N, K in t.shapes(qtype):
            for M in (1, 5):
                t.check_accuracy(qtype, N, K, M, bits=bits)
        for N, K in t.shapes(qtype)[:2]:
            t.check_batch_invariance(qtype, N, K, bits)
    t.test_several_matrices_of_mixed_types_in_one_call(bits)
    for qtype in (kernels.Q4_K, kernels.Q6_K):
        t.test_super_block_integer_sums_at_their_bound(qtype, bits)
"""


@pytest.mark.parametrize("want", ["avx2", "avx512"])
def test_forced_isa_path_in_a_subprocess(want):
    """PELLUCID_ISA (read when the library loads) picks a lower path; it must be as exact
    and as batch invariant as the native one, on every block type."""
    native = torch.ops.pellucid.cpu_isa()
    expect = min(want, native, key=ORDER.index)
    env = dict(os.environ, PELLUCID_ISA=want)
    code = SUBPROCESS_CHECK.format(tests=str(Path(__file__).parent))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[0] == expect


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 256)
    q4k = random_blocks(kernels.Q4_K, 8, 256)
    bm = torch.ops.pellucid.block_mm
    cases = [
        (lambda: bm(x.double(), [q4k], [kernels.Q4_K]), "x must be float32, got float64"),
        (lambda: bm(x[0], [q4k], [kernels.Q4_K]), "x must be 2-D"),
        (lambda: bm(torch.randn(2, 48), [q4k], [kernels.Q4_K]), "multiple of 32"),
        (lambda: bm(torch.randn(2, 96), [q4k], [kernels.Q4_K]), "blocks of 256 values; K = 96"),
        (lambda: bm(x, [q4k], [kernels.Q4_K, kernels.Q6_K]), "one type per weight"),
        (lambda: bm(x, [q4k], [kernels.Q5_K if hasattr(kernels, "Q5_K") else 13]), "GGML type 13, which pellucid cannot read"),
        (lambda: bm(x, [q4k.view(torch.int8)], [kernels.Q4_K]), r"\(N, row bytes\) uint8, got int8"),
        (lambda: bm(x, [q4k[:, :100]], [kernels.Q4_K]), "rows must be 144 bytes for K = 256, got 100"),
        (lambda: bm(x, [q4k], [kernels.Q4_K], torch.ones(7)), r"bias must be \(8,\) float32"),
        (lambda: bm(x, [q4k], [kernels.Q4_K], None, torch.zeros(8, dtype=torch.long)), "permutation of 0..7"),
        (lambda: bm(x, [torch.zeros(4, 1024, dtype=torch.uint8)], [kernels.F32]), "block formats only"),
        (lambda: bm(x, [q4k, q4k], [kernels.Q4_K + kernels.A8, kernels.Q4_K]), "mix 8-bit activations"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    with pytest.raises(RuntimeError, match=r"ids must be in \[0, 8\), found 8"):
        torch.ops.pellucid.block_rows(q4k, kernels.Q4_K, 256, torch.tensor([1, 8]))


def test_non_contiguous_activations_and_empty_batch():
    data = random_blocks(kernels.Q4_1, 24, 64)
    x = torch.randn(64, 5).t()  # (5, 64), not contiguous
    assert torch.equal(mm(x, data, kernels.Q4_1), mm(x.contiguous(), data, kernels.Q4_1))
    assert mm(torch.randn(0, 64), data, kernels.Q4_1).shape == (0, 24)
