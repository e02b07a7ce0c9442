"""pellucid.q4_mm / q8_mm, the integer-dot CPU kernels: the exact arithmetic they promise
(int16 activations per block of 32, exact integer block dots, float32 scaling) against a
float64 reference, closeness to the float32 matmul, bit-identical rows whatever the batch
and thread count, both ISA paths (AVX2 forced in a subprocess), and argument checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pellucid.quantization import cpu

pytestmark = pytest.mark.skipif(
    not cpu.available(), reason="pellucid's CPU kernels need an x86 CPU with AVX2, g++ and ninja"
)

FORMATS = ("q4", "q8_32", "q8_16")


def make_weight(fmt: str, N: int, K: int, seed: int = 0):
    """Random quantized weight: the op's arguments and its float64 dequantization (N, K)."""
    g = torch.Generator().manual_seed(seed)
    if fmt == "q4":
        qs = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
        d = torch.rand(N, K // 32, generator=g) * 0.02 + 0.001
        m = -torch.rand(N, K // 32, generator=g) * 0.1
        blocks = qs.view(N, K // 32, 16)
        q = torch.cat([blocks & 15, blocks >> 4], -1).double()  # byte j: element j low, j + 16 high
        w = (q * d.double()[..., None] + m.double()[..., None]).view(N, K)
        return (qs, d, m), w
    bs = 32 if fmt == "q8_32" else 16
    qs = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    d = torch.rand(N, K // bs, generator=g) * 0.01 + 0.001
    w = (qs.double().view(N, K // bs, bs) * d.double()[..., None]).view(N, K)
    return (qs, d), w


def op(fmt: str, x: torch.Tensor, args) -> torch.Tensor:
    f = torch.ops.pellucid.q4_mm if fmt == "q4" else torch.ops.pellucid.q8_mm
    return f(x, *args)


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """The kernels' activations as float64: per row and block of 32, dx = max|x| / 32767,
    xq = round-half-even(x / dx) in float32 (0 when the block is all zero), xq * dx."""
    M, K = x.shape
    xb = x.view(M, K // 32, 32)
    dx = xb.abs().amax(-1, keepdim=True) / 32767
    xq = torch.where(dx > 0, torch.round(xb / torch.where(dx > 0, dx, 1)), 0)
    return (xq.double() * dx.double()).view(M, K)


def check_accuracy(fmt: str, N: int, K: int, M: int, seed: int = 0) -> None:
    args, w = make_weight(fmt, N, K, seed)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed + 1))
    x[0, :32] = 0.0  # an all-zero block: dx = 0
    y = op(fmt, x, args)
    assert y.shape == (M, N) and y.dtype == torch.float32
    ref = quantized_activations(x) @ w.t()
    err = (y.double() - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), (fmt, N, K, M, err)
    exact = x.double() @ w.t()  # int16 activations are within ~1e-5 of float32's
    err32 = (y.double() - exact).abs().max().item()
    assert err32 <= 2e-4 * exact.abs().max().item(), (fmt, N, K, M, err32)


def check_batch_invariance(fmt: str, N: int, K: int) -> None:
    """Row i of any batch equals row i alone, bit for bit, with 1 or 2 threads."""
    args, _ = make_weight(fmt, N, K, seed=3)
    x = torch.randn(128, K, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([op(fmt, x[i : i + 1], args) for i in range(128)])
        for t in sorted({1, 2, threads}):
            torch.set_num_threads(t)
            for M in (1, 2, 3, 5, 16, 33, 128):
                y = op(fmt, x[:M], args)
                assert torch.equal(y, alone[:M]), (fmt, N, K, M, t)
            y = op(fmt, x[37:42], args)  # rows in another position of the batch
            assert torch.equal(y, alone[37:42]), (fmt, N, K, t)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("N", "K"), [(37, 96), (64, 576), (9, 32), (130, 1536)])
@pytest.mark.parametrize("M", [1, 4, 7])
def test_equal_float64_reference_of_their_arithmetic(fmt, N, K, M):
    """Shapes with part-filled last units (K / 32 = 3, 1; 18 blocks), odd N, 4-row tiles
    with a remainder."""
    check_accuracy(fmt, N, K, M)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("N", "K"), [(301, 576), (67, 96), (45, 160), (40, 32)])
def test_rows_bit_identical_whatever_the_batch_and_threads(fmt, N, K):
    check_batch_invariance(fmt, N, K)


def test_cpu_isa_names_the_path():
    assert torch.ops.pellucid.cpu_isa() in ("avx512_vnni", "avx512", "avx2")


def test_zero_tiny_and_nan_activations():
    args, w = make_weight("q8_32", 16, 64)
    assert torch.equal(op("q8_32", torch.zeros(2, 64), args), torch.zeros(2, 16))
    x = torch.randn(3, 64)
    x[1, 40] = float("nan")
    x[2] *= 1e-36  # dx subnormal: still finite, still close
    y = op("q8_32", x, args)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and torch.isfinite(y[2]).all()
    exact = x[2:].double() @ w.t()
    assert (y[2:].double() - exact).abs().max() <= 1e-2 * exact.abs().max()


ORDER = ["avx2", "avx512", "avx512_vnni"]

SUBPROCESS_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(2)
from pellucid.quantization import cpu
assert cpu.available()
print(torch.ops.pellucid.cpu_isa())
import test_cpu_kernels_mm as t
for fmt in t.FORMATS:
    for M in (1, 5):
        t.check_accuracy(fmt, 37, 96, M)
        t.check_accuracy(fmt, 64, 576, M)
    t.check_batch_invariance(fmt, 301, 576)
    t.check_batch_invariance(fmt, 67, 96)
    t.check_batch_invariance(fmt, 45, 160)
"""


@pytest.mark.parametrize("want", ["avx2", "avx512"])
def test_forced_isa_path_in_a_subprocess(want):
    """PELLUCID_ISA (read when the library loads) picks a lower path; it must be as exact
    and as batch invariant as the native one."""
    native = torch.ops.pellucid.cpu_isa()
    expect = min(want, native, key=ORDER.index)
    env = dict(os.environ, PELLUCID_ISA=want)
    code = SUBPROCESS_CHECK.format(tests=str(Path(__file__).parent))
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[0] == expect


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 64)
    (qs, d, m), _ = make_weight("q4", 8, 64)
    (q8, d8), _ = make_weight("q8_32", 8, 64)
    q4_mm, q8_mm = torch.ops.pellucid.q4_mm, torch.ops.pellucid.q8_mm
    cases = [
        (lambda: q4_mm(x.double(), qs, d, m), "x must be float32"),
        (lambda: q4_mm(x[0], qs, d, m), r"x must be 2-D"),
        (lambda: q4_mm(torch.randn(2, 48), qs[:, :24], d[:, :1], m[:, :1]), "multiple of 32"),
        (lambda: q4_mm(x, qs.view(torch.int8), d, m), r"qs must be \(N, K/2\) uint8, got int8"),
        (lambda: q4_mm(x, qs[:, :16], d, m), r"qs must be \(N, K/2\)"),
        (lambda: q4_mm(x, qs, d[:, :1], m), r"d must be \(N, K/32\)"),
        (lambda: q4_mm(x, qs, d, m[:7]), r"m must be \(N, K/32\)"),
        (lambda: q4_mm(x, qs, d.double(), m), r"d must be \(N, K/32\) float32, got float64"),
        (lambda: q8_mm(x, q8.view(torch.uint8), d8), r"qs must be \(N, K\) int8"),
        (lambda: q8_mm(x, q8[:, :32], d8), r"qs must be \(N, K\)"),
        (lambda: q8_mm(x, q8, d8[:, :1]), r"d must be \(N, K/32\) or \(N, K/16\)"),
        (lambda: q8_mm(x, q8, d8.half()), "d must be float32, got float16"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_non_contiguous_inputs_and_empty_batch():
    (qs, d, m), _ = make_weight("q4", 24, 64)
    x = torch.randn(64, 5).t()  # (5, 64), not contiguous
    assert torch.equal(op("q4", x, (qs, d, m)), op("q4", x.contiguous(), (qs, d, m)))
    wide = torch.randint(0, 256, (24, 64), dtype=torch.uint8)
    wide[:, :32] = qs
    assert torch.equal(op("q4", x, (wide[:, :32], d, m)), op("q4", x, (qs, d, m)))
    assert op("q4", torch.randn(0, 64), (qs, d, m)).shape == (0, 24)
