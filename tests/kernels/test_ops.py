"""pellucid's fused CPU ops (kernels/ops.cpp) against the reference compositions they replace:
norms (RMSNorm, GemmaRMSNorm), the gated MLP's activation, rotary + cache write + masked
softmax attention (layers.py, kv_cache.py); rows that keep their bits
whatever the batch, the chunking and the thread; bad arguments named in the error."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pellucid import kernels
from pellucid.engine.kv_cache import KVCache
from pellucid.models.gemma3 import GemmaRMSNorm
from pellucid.models.layers import ForwardContext, ModelConfig, RMSNorm, apply_rope, rope_table

pytestmark = pytest.mark.skipif(not kernels.available(), reason="pellucid's CPU ops need an x86 CPU with AVX2, g++ and ninja")

ops = torch.ops.pellucid if kernels.available() else None
D = 64


def head_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    norm = GemmaRMSNorm(x.shape[-1], eps)
    norm.weight.data.copy_(w)
    with torch.no_grad():
        return norm(x)


def reference_attention(qkv, kc, vc, slots, pos, cos, sin, H, K, scale, window, qn=None, kn=None, eps=1e-6):
    """What the op fuses: Gemma's q/k norms, apply_rope, KVCache.update, the query rounded to
    the cache type, softmax attention under ForwardContext's mask (float32 math)."""
    B, T, _ = qkv.shape
    D = kc.shape[-1]
    q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
    q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, K, D), v.reshape(B, T, K, D)
    if qn is not None:
        q, k = head_norm(q, qn, eps), head_norm(k, kn, eps)
    q, k = apply_rope(q, cos[pos], sin[pos]), apply_rope(k, cos[pos], sin[pos])
    cfg = ModelConfig("t", 10, H * D, 1, H, K, D, 4 * D, kc.shape[2])
    cache = KVCache(cfg, kc.shape[0], kc.shape[2], kc.dtype)
    cache.k, cache.v = kc[None], vc[None]  # the caller's tensors, written in place
    kv_len = int(pos.max()) + 1
    keys, values = cache.update(0, slots, pos, k, v, kv_len)  # (B, K, L, D)
    ctx = ForwardContext(input_pos=pos, cache=cache, slots=slots, kv_len=kv_len)
    mask = ctx.mask(window if window > 0 else None)  # (B, 1, T, L)
    qh = q.to(kc.dtype).float().transpose(1, 2)  # (B, H, T, D)
    keys = keys.float().repeat_interleave(H // K, dim=1)
    values = values.float().repeat_interleave(H // K, dim=1)
    scores = (qh @ keys.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ values).transpose(1, 2).reshape(B, T, H * D)


def make_cache(S, K, Lmax, dtype, seed=0, D=D):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(S, K, Lmax, D, generator=g).to(dtype)  # earlier tokens' keys and values
    vc = torch.randn(S, K, Lmax, D, generator=g).to(dtype)
    return kc, vc


def call(qkv, kc, vc, slots, pos, rope, H, K, scale, window, qn=None, kn=None, eps=1e-6):
    return ops.attention(qkv, kc, vc, slots, pos, *rope, H, K, scale, window, qn, kn, eps, 1.0)


# ------------------------------------------------------------------ norms, activation, embedding


@pytest.mark.parametrize("E", [576, 64, 13])
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm_and_add_rms_norm_match_the_norm_modules(E, gemma):
    torch.manual_seed(E)
    norm = GemmaRMSNorm(E, 1e-6) if gemma else RMSNorm(E, 1e-5)
    norm.weight.data.normal_()
    offset = 1.0 if gemma else 0.0
    x, a = torch.randn(3, 5, E) * 4, torch.randn(3, 5, E)
    with torch.no_grad():
        y = ops.rms_norm(x, norm.weight, norm.eps, offset)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert torch.allclose(y, norm(x), rtol=1e-6, atol=1e-6)
        res = x.clone()
        y2 = ops.add_rms_norm(res, a, norm.weight, norm.eps, offset)
        assert torch.equal(res, x + a)  # updated in place
        assert torch.allclose(y2, norm(x + a), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("Fd", [1536, 13])
def test_glu_matches_silu_and_gelu_tanh(Fd):
    torch.manual_seed(Fd)
    gu = torch.randn(4, 2 * Fd) * 3
    gu[0, :Fd] = torch.linspace(-30, 30, Fd)  # both tails of the activations
    gate, up = gu.chunk(2, dim=-1)
    assert torch.allclose(ops.glu(gu, 0), F.silu(gate) * up, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ops.glu(gu, 1), F.gelu(gate, approximate="tanh") * up, rtol=1e-6, atol=1e-6)
    assert ops.glu(gu.view(2, 2, 2 * Fd), 1).shape == (2, 2, Fd)


def test_norm_and_glu_rows_keep_their_bits_in_any_batch():
    """A row alone (inline) and inside 300 rows (split across threads): the same bits."""
    torch.manual_seed(0)
    x, a, w = torch.randn(300, 576), torch.randn(300, 576), torch.randn(576)
    gu = torch.randn(300, 2 * 1536)
    many = ops.rms_norm(x, w, 1e-6, 1.0), ops.glu(gu, 1), ops.add_rms_norm(x.clone(), a, w, 1e-5, 0.0)
    for i in (0, 151, 299):
        assert torch.equal(ops.rms_norm(x[i : i + 1], w, 1e-6, 1.0)[0], many[0][i])
        assert torch.equal(ops.glu(gu[i : i + 1], 1)[0], many[1][i])
        assert torch.equal(ops.add_rms_norm(x[i : i + 1].clone(), a[i : i + 1], w, 1e-5, 0.0)[0], many[2][i])


# ------------------------------------------------------------------ attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize(("H", "K"), [(9, 3), (4, 1)])
def test_attention_matches_the_reference_composition(dtype, window, gemma, H, K):
    """Two rows at different places of their slots (a prefill from 0, a chunk after 21 cached
    tokens: full blocks of eight and tails), over a cache holding earlier tokens."""
    torch.manual_seed(H + window + gemma)
    S, Lmax, T = 4, 48, 11
    cos, sin = rope_table(D, 64, 10_000.0)
    qkv = torch.randn(2, T, (H + 2 * K) * D)
    if gemma and dtype != torch.float32:
        # q, k on a grid of quarters: every sum of squares is exact in any order, so the norms
        # give the reference's bits and no key or query rounds the other way to the cache type
        qkv[..., : (H + K) * D] = torch.randint(-8, 9, (2, T, (H + K) * D)) / 4
    slots = torch.tensor([3, 1])
    pos = torch.stack([torch.arange(T), torch.arange(21, 21 + T)])
    qn, kn = (torch.randn(D) * 0.3, torch.randn(D) * 0.3) if gemma else (None, None)
    scale = 256**-0.5 if gemma else 1 / math.sqrt(D)
    kc, vc = make_cache(S, K, Lmax, dtype)
    kr, vr = kc.clone(), vc.clone()
    z = call(qkv, kc, vc, slots, pos, (cos, sin), H, K, scale, window, qn, kn)
    ref = reference_attention(qkv, kr, vr, slots, pos, cos, sin, H, K, scale, window, qn, kn)
    assert z.shape == (2, T, H * D) and z.dtype == torch.float32 and z.is_contiguous()
    assert torch.allclose(z, ref, rtol=1e-5, atol=1e-5), (z - ref).abs().max()
    assert torch.equal(vc, vr)  # values are copied
    if gemma and dtype == torch.float32:  # the norm's sum of squares runs in another order
        assert torch.allclose(kc, kr, rtol=1e-6, atol=1e-6)
    else:  # rotary is the reference's own arithmetic: the same bits
        assert torch.equal(kc, kr)


@pytest.mark.parametrize(("H", "K", "Dh"), [(8, 1, 72), (7, 1, 128), (5, 1, 256), (4, 4, 80), (6, 2, 64)])
def test_attention_head_dims_and_group_sizes(H, K, Dh):
    """Head dims past the 64-wide tiles, groups of 8, 7, 5, 3 and 1 query heads per kv head."""
    torch.manual_seed(Dh)
    T = 10
    cos, sin = rope_table(Dh, 40, 10_000.0)
    qkv = torch.randn(1, T, (H + 2 * K) * Dh)
    slots, pos = torch.tensor([1]), torch.arange(20, 20 + T)[None]
    qn, kn = torch.randn(Dh) * 0.3, torch.randn(Dh) * 0.3
    kc, vc = make_cache(2, K, 32, torch.float32, D=Dh)
    kr, vr = kc.clone(), vc.clone()
    z = ops.attention(qkv, kc, vc, slots, pos, cos, sin, H, K, Dh**-0.5, 7, qn, kn, 1e-6, 1.0)
    ref = reference_attention(qkv, kr, vr, slots, pos, cos, sin, H, K, Dh**-0.5, 7, qn, kn)
    assert torch.allclose(z, ref, rtol=1e-5, atol=1e-5), (z - ref).abs().max()
    assert torch.allclose(kc, kr, rtol=1e-6, atol=1e-6) and torch.equal(vc, vr)


def test_attention_float32_matches_scaled_dot_product_attention():
    """The float32 fast path of Attention.forward (SDPA with ForwardContext's mask, GQA)."""
    torch.manual_seed(1)
    H, K, T = 9, 3, 6
    cos, sin = rope_table(D, 64, 10_000.0)
    kc, vc = make_cache(2, K, 32, torch.float32)
    qkv, slots, pos = torch.randn(1, T, (H + 2 * K) * D), torch.tensor([1]), torch.arange(10, 10 + T)[None]
    z = call(qkv, kc, vc, slots, pos, (cos, sin), H, K, D**-0.5, 0)
    q = apply_rope(qkv[..., : H * D].reshape(1, T, H, D), cos[pos], sin[pos]).transpose(1, 2)
    ctx = ForwardContext(input_pos=pos, cache=object(), slots=slots, kv_len=16)
    ref = F.scaled_dot_product_attention(q, kc[1:, :, :16], vc[1:, :, :16], attn_mask=ctx.mask(), scale=D**-0.5, enable_gqa=True)
    assert torch.allclose(z, ref.transpose(1, 2).reshape(1, T, H * D), rtol=1e-5, atol=1e-5)


def run_chunks(seq_qkv, chunks, slot, dtype, rope, window, norms):
    """Feed one sequence's tokens in chunks (T = chunk size) to a fresh cache."""
    H, K = 9, 3
    kc, vc = torch.zeros(6, K, 64, D, dtype=dtype), torch.zeros(6, K, 64, D, dtype=dtype)
    out, p = [], 0
    for n in chunks:
        pos = torch.arange(p, p + n)[None]
        out.append(call(seq_qkv[None, p : p + n], kc, vc, torch.tensor([slot]), pos, rope, H, K, 0.125, window, *norms))
        p += n
    return torch.cat(out, dim=1)[0], kc, vc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "chunkings", "window"), [
    (7, [[7], [1] * 7], 0),
    (7, [[7], [1] * 7], 3),
    (40, [[40], [17, 1, 22], [1] * 40], 0),
    (40, [[40], [9, 31], [1] * 40], 16),
])  # fmt: skip
@pytest.mark.parametrize("gemma", [False, True])
def test_attention_rows_keep_their_bits_whatever_the_batch(dtype, n, chunkings, window, gemma):
    """One sequence as a prefill, in chunks, one token per call, and as row 3 of a batch of 5
    (enough work to be split across threads): identical outputs and cache contents."""
    torch.manual_seed(n)
    H, K = 9, 3
    rope = rope_table(D, 64, 10_000.0)
    norms = (torch.randn(D) * 0.3, torch.randn(D) * 0.3) if gemma else (None, None)
    batch = torch.randn(5, n, (H + 2 * K) * D)
    runs = [run_chunks(batch[3], c, 2, dtype, rope, window, norms) for c in chunkings]
    kc, vc = torch.zeros(6, K, 64, D, dtype=dtype), torch.zeros(6, K, 64, D, dtype=dtype)
    slots = torch.tensor([0, 5, 1, 2, 4])
    z = call(batch, kc, vc, slots, torch.arange(n).expand(5, n), rope, H, K, 0.125, window, *norms)
    runs.append((z[3], kc, vc))
    z0, k0, v0 = runs[0]
    for z1, k1, v1 in runs[1:]:
        assert torch.equal(z1, z0)
        assert torch.equal(k1[2], k0[2]) and torch.equal(v1[2], v0[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 200])
def test_a_long_prompt_chunk_in_tiles_keeps_every_bit(dtype, window):
    """Deep in a long prompt, a chunk's tokens attend in tiles (the keys in blocks shared by up to
    16 tokens): the same bits as each token alone, beside a decode row of another slot, and close
    to the reference composition. Six query heads per kv head, as Qwen2.5's."""
    torch.manual_seed(window)
    H, K, n = 12, 2, 700
    rope = rope_table(D, n, 10_000.0)
    seq = torch.randn(n, (H + 2 * K) * D)
    pieces = {}
    for name, chunks in (("whole", [400, 300]), ("odd", [390, 1, 309]), ("alone", [400] + [1] * 300)):
        kc, vc = torch.zeros(3, K, n, D, dtype=dtype), torch.zeros(3, K, n, D, dtype=dtype)
        out, p = [], 0
        for c in chunks:
            out.append(call(seq[None, p : p + c], kc, vc, torch.tensor([1]), torch.arange(p, p + c)[None], rope, H, K,
                            0.125, window)[0])  # fmt: skip
            p += c
        pieces[name] = (torch.cat(out), kc, vc)
    z, kc, vc = pieces["whole"]
    for other, k2, v2 in (pieces["odd"], pieces["alone"]):
        assert torch.equal(other, z) and torch.equal(k2, kc) and torch.equal(v2, vc)
    # rows of one forward: the chunk's last 300 tokens (slot 1) and a decode row of slot 2
    kb, vb = kc.clone(), vc.clone()
    kb[2], vb[2] = kc[1], vc[1]
    kb[1, :, 400:], vb[1, :, 400:] = 0, 0
    rows = torch.cat([seq[400:], seq[650:651]])[:, None]  # (301, 1, ...): each row its own slot and position
    pos = torch.cat([torch.arange(400, 700), torch.tensor([650])])[:, None]
    slots = torch.tensor([1] * 300 + [2])
    zr = call(rows, kb, vb, slots, pos, rope, H, K, 0.125, window)[:, 0]
    assert torch.equal(zr[:300], z[400:]) and torch.equal(zr[300], z[650])
    ref = reference_attention(seq[None, 400:], kc[1:2].clone(), vc[1:2].clone(), torch.tensor([0]),
                              torch.arange(400, 700)[None], *rope, H, K, 0.125, window)[0]  # fmt: skip
    assert torch.allclose(z[400:], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_rounds_to_the_cache_type_as_torch_does(dtype):
    """Values written to the cache: ties to even, overflow, infinities, denormals as .to(dtype)."""
    H, K = 1, 1
    eps = torch.finfo(dtype).eps
    special = torch.tensor([1 + eps / 2, 1 + 3 * eps / 2, -(1 + eps / 2), 3e38, 7e4, float("inf"), -float("inf"),
                            float("nan"), 1e-40, -0.0])  # fmt: skip
    v = torch.cat([special, torch.randn(D - len(special))])
    qkv = torch.cat([torch.randn(2 * D), v])[None, None]
    kc, vc = torch.zeros(1, K, 4, D, dtype=dtype), torch.zeros(1, K, 4, D, dtype=dtype)
    call(qkv, kc, vc, torch.tensor([0]), torch.tensor([[2]]), rope_table(D, 4, 10_000.0), H, K, 0.125, 0)
    got, want = vc[0, 0, 2], v.to(dtype)
    assert got[7].isnan()  # a NaN (its payload may differ from torch's vectorised conversion)
    got[7] = want[7] = 0
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_attention_window_reads_nothing_outside_it():
    """NaN everywhere outside a row's window (and beyond its position): no NaN in the output."""
    H, K, W = 4, 1, 5
    rope = rope_table(D, 64, 10_000.0)
    kc, vc = torch.full((2, K, 32, D), float("nan")), torch.full((2, K, 32, D), float("nan"))
    kc[1, :, 12:20], vc[1, :, 12:20] = torch.randn(K, 8, D), torch.randn(K, 8, D)
    qkv = torch.randn(1, 1, (H + 2 * K) * D)
    z = call(qkv, kc, vc, torch.tensor([1]), torch.tensor([[16]]), rope, H, K, 0.125, W)
    assert not z.isnan().any()


def test_attention_bad_arguments_are_named():
    H, K = 4, 2
    rope = rope_table(D, 16, 10_000.0)
    kc, vc = make_cache(2, K, 8, torch.float32)
    qkv, slots, pos = torch.randn(1, 2, (H + 2 * K) * D), torch.tensor([1]), torch.tensor([[3, 4]])

    def bad(match, **kw):
        a = dict(qkv=qkv, kc=kc, vc=vc, slots=slots, pos=pos, rope=rope, H=H, K=K, scale=0.125, window=0)
        a.update(kw)
        with pytest.raises(RuntimeError, match=match):
            call(**a)

    call(qkv, kc, vc, slots, pos, rope, H, K, 0.125, 0)  # the good call works
    bad("qkv must be", qkv=torch.randn(1, 2, (H + K) * D))
    bad("pos.* outside the cache's Lmax", pos=torch.tensor([[7, 8]]))
    bad("pos.* beyond cos/sin", pos=torch.tensor([[3, 4]]), rope=rope_table(D, 4, 10_000.0))
    bad("slots.* outside", slots=torch.tensor([2]))
    bad("slots must be", slots=torch.tensor([0, 1]))
    bad("pos must be", pos=torch.tensor([3, 4]))
    bad("v_cache must match", vc=vc.to(torch.bfloat16))
    bad("n_heads", H=3)
    bad("k_cache and v_cache must be contiguous", kc=kc[..., :32], vc=vc[..., :32])
    bad(r"k_cache must be \(S, n_kv_heads=2", kc=kc[:, :1].clone(), vc=vc[:, :1].clone())
    bad("qkv must be float32", qkv=qkv.double())
    with pytest.raises(RuntimeError, match="q_norm must be"):
        call(qkv, kc, vc, slots, pos, rope, H, K, 0.125, 0, torch.ones(D - 1), torch.ones(D))


def test_other_ops_bad_arguments_are_named():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="w must be"):
        ops.rms_norm(x, torch.ones(7), 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="residual must be"):
        ops.add_rms_norm(x.double(), x, torch.ones(8), 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="x must have residual's shape"):
        ops.add_rms_norm(x, x[:1], torch.ones(8), 1e-6, 0.0)
    with pytest.raises(RuntimeError, match="gu must be"):
        ops.glu(torch.randn(2, 7), 0)
    with pytest.raises(RuntimeError, match="act must be"):
        ops.glu(x, 2)


@pytest.mark.parametrize("V", [64, 100, 49_152, 49_155])
def test_apply_bitmask_equals_the_unpacked_mask(V):
    """pellucid::apply_bitmask: the grammar bitmask applied in one pass equals masked_fill
    with the unpacked bool mask, bit for bit (words all set, all clear, mixed; a part-filled
    last word; fewer words than the vocabulary), and alive says which rows kept a finite logit."""
    from pellucid.sampling.constraints import unpack_bitmask

    g = torch.Generator().manual_seed(V)
    B, W = 5, (V + 31) // 32
    x = torch.randn(B, V, generator=g)
    x[3, ::2] = float("-inf")
    bits = torch.randint(-(2**31), 2**31 - 1, (B, W), dtype=torch.int32, generator=g)
    bits[1] = -1  # every token
    bits[2] = 0  # none: a dead row
    bits[3] = 0x55555555  # only the even tokens, which are -inf: dead too
    bits[4, W // 2 :] = 0
    y, alive = torch.ops.pellucid.apply_bitmask(x, bits, float("-inf"))
    ref = x.masked_fill(~unpack_bitmask(bits, V), float("-inf"))
    assert torch.equal(y, ref)
    assert alive.tolist() == (ref.amax(-1) > float("-inf")).tolist() == [True, True, False, False, True]
    short, _ = torch.ops.pellucid.apply_bitmask(x, bits[:, : W // 2].contiguous(), float("-inf"))
    assert torch.equal(short[:, 32 * (W // 2) :], torch.full_like(short[:, 32 * (W // 2) :], float("-inf")))
    with pytest.raises(RuntimeError, match=r"bits must be \(B, W\) int32"):
        torch.ops.pellucid.apply_bitmask(x, bits.long(), float("-inf"))
