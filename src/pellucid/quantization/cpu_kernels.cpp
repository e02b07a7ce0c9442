// pellucid's weight-only matmul kernels for x86 CPUs (AVX2 + FMA baseline, AVX-512 at run time).
//
// Old float32-activation kernels (AVX2 only), still used by int8.py / int4.py:
//
//   pellucid::int8_mm(x (M, K) f32, w (N, K) int8, scale (N,) f32) -> (M, N) f32
//       y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]
//   pellucid::int4_mm(x (M, K) f32, qs (N, K/2) uint8, d (N, G) f32, mn (N, G) f32, group) -> (M, N) f32
//       w[n, k] = d[n, g] * q + mn[n, g], g = k / group, q the k-th nibble of row n in
//       blocks of 32: byte j of a block holds element j (low nibble) and j + 16 (high),
//       GGUF's Q4_0/Q4_1 order, so those files' nibbles are used as stored.
//
// Integer-dot kernels (activations quantized to int16 per row per block of 32):
//
//   pellucid::q4_mm(x (M, K) f32, qs (N, K/2) uint8, d (N, K/32) f32, m (N, K/32) f32) -> (M, N) f32
//       w[n, k] = d[n, b] * q + m[n, b], b = k / 32, q the nibble (same order as int4_mm)
//   pellucid::q8_mm(x (M, K) f32, qs (N, K) int8, d (N, K/bs) f32) -> (M, N) f32
//       w[n, k] = d[n, k / bs] * q, bs = 32 or 16 (from d's shape)
//   pellucid::cpu_isa() -> str: "avx512_vnni", "avx512" or "avx2", the path q4_mm / q8_mm take
//
//   Arithmetic: per row of x and block of 32, amax = max |x|, dx = amax / 32767,
//   xq = nearbyint(x / dx) (int16; all 0 with dx = 0 when amax is 0). Per output and
//   weight scale group: isum = sum q * xq exactly in int32 (madd / VPDPWSSD on int16),
//   acc += float(isum) * (d * dx) with one fused multiply-add per vector lane, for q4 also
//   acc += m * sx with sx = dx * float(sum xq) of the block; lanes summed once at the end.
//   Every output (m, n) runs the same instruction sequence whatever M, the tile that
//   holds it, the thread or the other rows are (no split-K, no contraction), so a row's
//   result is bit-identical batched or alone. AVX2 and AVX-512 paths differ in lane
//   layout (and so in the last bits); PELLUCID_ISA=avx2|avx512 (read when the library is
//   loaded) forces a lower path.
//
//   Layout: a "unit" is 4 (AVX-512) or 2 (AVX2) weight scale groups, one per 128-bit lane:
//   lane group g of every int16 operand holds 8 consecutive elements of group g, so one
//   float vector carries the partial integer sums of 4 (2) groups and is scaled by one
//   multiply-add. The activations are stored in that order when they are quantized (once
//   per row), so the weights are only widened in registers: in-lane unpacks for 4-bit,
//   one qword permute + sign extension for int8.

#ifndef PELLUCID_KERNEL_BODY

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 widen8(const int8_t* p) {  // 8 int8 -> 8 float
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// MB input rows against weight rows [n0, n1); U independent sums per input row.
template <int MB>
void int8_rows(const float* x, const int8_t* w, const float* scale, float* y, int64_t K, int64_t N,
               int64_t n0, int64_t n1) {
  constexpr int U = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
    __m256 acc[MB][U];
    for (int i = 0; i < MB; ++i)
      for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
      for (int u = 0; u < U; ++u) {
        __m256 wf = widen8(wr + k + 8 * u);
        for (int i = 0; i < MB; ++i)
          acc[i][u] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + i * K + k + 8 * u), acc[i][u]);
      }
    }
    for (; k + 8 <= K; k += 8) {
      __m256 wf = widen8(wr + k);
      for (int i = 0; i < MB; ++i) acc[i][0] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + i * K + k), acc[i][0]);
    }
    for (int i = 0; i < MB; ++i) {
      __m256 a = acc[i][0];
      for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[i][u]);
      float s = hsum(a);
      for (int64_t kk = k; kk < K; ++kk) s += x[i * K + kk] * static_cast<float>(wr[kk]);
      y[i * N + n] = s * scale[n];
    }
  }
}

// One input row against two weight rows at a time: 8 independent sums keep both FMA ports
// busy and two streams of weights in flight (decode, M = 1).
void int8_row1(const float* x, const int8_t* w, const float* scale, float* y, int64_t K, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    const int8_t* a = w + n * K;
    const int8_t* b = a + K;
    __m256 sa0 = _mm256_setzero_ps(), sa1 = _mm256_setzero_ps(), sa2 = _mm256_setzero_ps(), sa3 = _mm256_setzero_ps();
    __m256 sb0 = _mm256_setzero_ps(), sb1 = _mm256_setzero_ps(), sb2 = _mm256_setzero_ps(), sb3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      __m256 x2 = _mm256_loadu_ps(x + k + 16), x3 = _mm256_loadu_ps(x + k + 24);
      sa0 = _mm256_fmadd_ps(widen8(a + k), x0, sa0);
      sb0 = _mm256_fmadd_ps(widen8(b + k), x0, sb0);
      sa1 = _mm256_fmadd_ps(widen8(a + k + 8), x1, sa1);
      sb1 = _mm256_fmadd_ps(widen8(b + k + 8), x1, sb1);
      sa2 = _mm256_fmadd_ps(widen8(a + k + 16), x2, sa2);
      sb2 = _mm256_fmadd_ps(widen8(b + k + 16), x2, sb2);
      sa3 = _mm256_fmadd_ps(widen8(a + k + 24), x3, sa3);
      sb3 = _mm256_fmadd_ps(widen8(b + k + 24), x3, sb3);
    }
    for (; k + 8 <= K; k += 8) {
      __m256 xv = _mm256_loadu_ps(x + k);
      sa0 = _mm256_fmadd_ps(widen8(a + k), xv, sa0);
      sb0 = _mm256_fmadd_ps(widen8(b + k), xv, sb0);
    }
    float ta = hsum(_mm256_add_ps(_mm256_add_ps(sa0, sa1), _mm256_add_ps(sa2, sa3)));
    float tb = hsum(_mm256_add_ps(_mm256_add_ps(sb0, sb1), _mm256_add_ps(sb2, sb3)));
    for (; k < K; ++k) ta += x[k] * static_cast<float>(a[k]), tb += x[k] * static_cast<float>(b[k]);
    y[n] = ta * scale[n];
    y[n + 1] = tb * scale[n + 1];
  }
  if (n < n1) int8_rows<1>(x, w, scale, y, K, 0, n, n1);
}

// MB input rows against weight rows [n0, n1) of a 4-bit matrix; xs (MB, K/32): sums of x per block.
template <int MB>
void int4_rows(const float* x, const float* xs, const uint8_t* qs, const float* d, const float* mn, float* y,
               int64_t K, int64_t N, int64_t group, int64_t n0, int64_t n1) {
  const int64_t B = K / 32, G = K / group, per = group / 32;
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qr = qs + n * (K / 2);
    const float* dr = d + n * G;
    const float* mr = mn + n * G;
    __m256 acc[MB];
    float off[MB];
    for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps(), off[i] = 0.f;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t g = b / per;
      __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + 16 * b));
      __m128i lo = _mm_and_si128(raw, low);
      __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
      __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
      __m256 dv = _mm256_set1_ps(dr[g]);
      for (int i = 0; i < MB; ++i) {
        const float* xb = x + i * K + 32 * b;
        __m256 p0 = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
        __m256 p1 = _mm256_mul_ps(w1, _mm256_loadu_ps(xb + 8));
        p0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), p0);
        p1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), p1);
        acc[i] = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), dv, acc[i]);
        off[i] += mr[g] * xs[i * B + b];
      }
    }
    for (int i = 0; i < MB; ++i) y[i * N + n] = hsum(acc[i]) + off[i];
  }
}

constexpr int64_t kGrain = 16;  // output rows per task

at::Tensor int8_mm(const at::Tensor& x_, const at::Tensor& w_, const at::Tensor& scale_) {
  TORCH_CHECK(x_.dim() == 2 && w_.dim() == 2 && x_.size(1) == w_.size(1), "int8_mm: x (M, K), w (N, K)");
  TORCH_CHECK(w_.scalar_type() == at::kChar && scale_.numel() == w_.size(0), "int8_mm: w int8, scale (N,)");
  auto x = x_.to(at::kFloat).contiguous();
  auto w = w_.contiguous();
  auto scale = scale_.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const int8_t* W = w.data_ptr<int8_t>();
  const float* S = scale.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) int8_rows<4>(X + m * K, W, S, Y + m * N, K, N, n0, n1);
    for (; m + 2 <= M; m += 2) int8_rows<2>(X + m * K, W, S, Y + m * N, K, N, n0, n1);
    for (; m < M; ++m) int8_row1(X + m * K, W, S, Y + m * N, K, n0, n1);
  });
  return y;
}

at::Tensor int4_mm(const at::Tensor& x_, const at::Tensor& qs_, const at::Tensor& d_, const at::Tensor& mn_,
                   int64_t group) {
  TORCH_CHECK(x_.dim() == 2 && qs_.dim() == 2 && qs_.scalar_type() == at::kByte, "int4_mm: x (M, K), qs (N, K/2) uint8");
  const int64_t M = x_.size(0), K = x_.size(1), N = qs_.size(0);
  TORCH_CHECK(K % 32 == 0 && group % 32 == 0 && K % group == 0 && qs_.size(1) * 2 == K,
              "int4_mm: K a multiple of 32 and of the group, group a multiple of 32");
  TORCH_CHECK(d_.numel() == N * (K / group) && mn_.numel() == N * (K / group), "int4_mm: d, mn (N, K / group)");
  auto x = x_.to(at::kFloat).contiguous();
  auto qs = qs_.contiguous();
  auto d = d_.to(at::kFloat).contiguous();
  auto mn = mn_.to(at::kFloat).contiguous();
  auto xs = x.view({M, K / 32, 32}).sum(-1).contiguous();  // (M, K/32)
  auto y = at::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const float* XS = xs.data_ptr<float>();
  const uint8_t* Q = qs.data_ptr<uint8_t>();
  const float* D = d.data_ptr<float>();
  const float* MN = mn.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t B = K / 32;
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) int4_rows<4>(X + m * K, XS + m * B, Q, D, MN, Y + m * N, K, N, group, n0, n1);
    for (; m + 2 <= M; m += 2) int4_rows<2>(X + m * K, XS + m * B, Q, D, MN, Y + m * N, K, N, group, n0, n1);
    for (; m < M; ++m) int4_rows<1>(X + m * K, XS + m * B, Q, D, MN, Y + m * N, K, N, group, n0, n1);
  });
  return y;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Integer-dot kernels: shared plumbing (baseline target).

namespace {

enum class Isa : int { avx2 = 0, avx512 = 1, avx512_vnni = 2 };

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::avx512_vnni: return "avx512_vnni";
    case Isa::avx512: return "avx512";
    default: return "avx2";
  }
}

Isa detect_isa() {
  __builtin_cpu_init();
  Isa best = Isa::avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
    best = __builtin_cpu_supports("avx512vnni") ? Isa::avx512_vnni : Isa::avx512;
  }
  if (const char* e = std::getenv("PELLUCID_ISA")) {  // only ever a lower path than the CPU's
    const std::string s(e);
    Isa want = best;
    if (s == "avx2") want = Isa::avx2;
    else if (s == "avx512") want = Isa::avx512;
    else if (s == "avx512_vnni") want = Isa::avx512_vnni;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

const Isa kIsa = detect_isa();  // chosen once, when the library is loaded

// One call's operands, the activations already quantized and laid out for the path.
struct Job {
  int64_t M, N, K;
  int64_t G;    // weight scale groups per row (K / 32 or K / 16)
  int64_t B;    // activation blocks of 32 per row
  int64_t KP;   // int16 per row of xq (units * elements per unit)
  int64_t DXP;  // floats per row of dxl (units * lanes)
  int64_t SXP;  // floats per row of sx (B rounded up to 16, zero padded)
  int64_t wrow;  // bytes per weight row
  const int16_t* xq;  // (M, KP) quantized activations in unit order
  const float* dxl;   // (M, DXP) each lane's activation scale dx
  const float* sx;    // (M, SXP) dx * sum(xq) per block (q4 only)
  const uint8_t* w;   // (N, wrow) quantized weights
  const float* d;     // (N, G)
  const float* mn;    // (N, B) q4 only
  float* y;           // (M, N)
};

// Quantize one row of x to int16 per block of 32 and write it in the unit order of a path
// with `gpu` scale groups of `gs` elements per unit. Plain IEEE max / divide / round to
// nearest even: the same bits whatever the path or vector width.
void prep_row(const float* x, int64_t K, int gs, int gpu, int16_t* xq, int64_t KP, float* dxl, int64_t DXP,
              float* sx, int64_t SXP) {
  const int64_t B = K / 32, unit = static_cast<int64_t>(gpu) * gs, lanes = 4 * gpu;
  const int64_t U = KP / unit;
  std::memset(xq + (U - 1) * unit, 0, unit * sizeof(int16_t));  // the last unit may be part empty
  std::memset(dxl + (U - 1) * lanes, 0, lanes * sizeof(float));
  if (sx) std::memset(sx + B, 0, (SXP - B) * sizeof(float));
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  alignas(32) int16_t q[32];
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + 32 * b;
    __m256 v[4];
    __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], absmask));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    float dx = amax / 32767.0f;
    int32_t qsum = 0;
    if (_mm256_movemask_ps(bad) != 0 || !std::isfinite(amax)) {  // NaN / inf in: NaN out
      dx = std::numeric_limits<float>::quiet_NaN();
      std::memset(q, 0, sizeof(q));
    } else if (dx > 0.0f) {
      const __m256 dv = _mm256_set1_ps(dx);
      // |x / dx| <= 32767 but for a subnormal dx (amax < ~4e-34): clamp, so xq and its sum agree
      const __m256i hi = _mm256_set1_epi32(32767), lo = _mm256_set1_epi32(-32767);
      __m256i s = _mm256_setzero_si256();
      for (int i = 0; i < 4; i += 2) {  // cvtps: the MXCSR rounding, to nearest even
        __m256i a = _mm256_max_epi32(lo, _mm256_min_epi32(hi, _mm256_cvtps_epi32(_mm256_div_ps(v[i], dv))));
        __m256i c = _mm256_max_epi32(lo, _mm256_min_epi32(hi, _mm256_cvtps_epi32(_mm256_div_ps(v[i + 1], dv))));
        s = _mm256_add_epi32(s, _mm256_add_epi32(a, c));
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), _MM_SHUFFLE(3, 1, 2, 0));
        _mm256_store_si256(reinterpret_cast<__m256i*>(q + 8 * i), p);
      }
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
      qsum = _mm_cvtsi128_si32(t);
    } else {  // amax == 0 (or so small that dx underflows)
      dx = 0.0f;
      std::memset(q, 0, sizeof(q));
    }
    if (sx) sx[b] = dx * static_cast<float>(qsum);
    for (int c = 0; c < 4; ++c) {  // 8-element chunks to (unit, operand j, lane group g)
      const int64_t e = 32 * b + 8 * c, g = e / gs, j = (e % gs) / 8, u = g / gpu, gg = g % gpu;
      std::memcpy(xq + u * unit + j * (8 * gpu) + gg * 8, q + 8 * c, 16);
    }
    for (int64_t g = 32 * b / gs; g < 32 * (b + 1) / gs; ++g) {
      float* p = dxl + (g / gpu) * lanes + (g % gpu) * 4;
      p[0] = p[1] = p[2] = p[3] = dx;
    }
  }
}

}  // namespace

// The kernel body, compiled three times: AVX2 (baseline flags), AVX-512BW and AVX-512 VNNI
// (GCC target pragmas, chosen at run time). It uses no templates or inline functions from
// headers, so nothing compiled for AVX-512 can be shared with (and picked by the linker
// for) baseline code.
#define PELLUCID_KERNEL_BODY 1

#define PK_NS k_avx2
#define PK_WIDTH 256
#define PK_VNNI 0
#include __FILE__
#undef PK_NS
#undef PK_WIDTH
#undef PK_VNNI

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#define PK_NS k_avx512
#define PK_WIDTH 512
#define PK_VNNI 0
#include __FILE__
#undef PK_NS
#undef PK_WIDTH
#undef PK_VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
#define PK_NS k_avx512_vnni
#define PK_WIDTH 512
#define PK_VNNI 1
#include __FILE__
#undef PK_NS
#undef PK_WIDTH
#undef PK_VNNI
#pragma GCC pop_options

#undef PELLUCID_KERNEL_BODY

namespace {

enum class Fmt { q4, q8_32, q8_16 };

using KernelFn = void (*)(const Job&, int64_t, int64_t);

KernelFn pick(Isa isa, Fmt f) {
  switch (isa) {
    case Isa::avx512_vnni:
      return f == Fmt::q4 ? k_avx512_vnni::q4 : (f == Fmt::q8_32 ? k_avx512_vnni::q8_32 : k_avx512_vnni::q8_16);
    case Isa::avx512:
      return f == Fmt::q4 ? k_avx512::q4 : (f == Fmt::q8_32 ? k_avx512::q8_32 : k_avx512::q8_16);
    default:
      return f == Fmt::q4 ? k_avx2::q4 : (f == Fmt::q8_32 ? k_avx2::q8_32 : k_avx2::q8_16);
  }
}

std::string dtype_name(at::ScalarType t) {  // torch's Python names
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32, got ", dtype_name(x.scalar_type()));
  TORCH_CHECK(x.size(1) > 0 && x.size(1) % 32 == 0, op, ": x (M, K) needs K a positive multiple of 32, got K = ",
              x.size(1));
}

void check_w(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t rows,
             int64_t cols, const char* shape) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", name, " must be ", shape, " = (",
              rows, ", ", cols, ") ", dtype_name(dtype), ", got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", shape, " ", dtype_name(dtype), ", got ",
              dtype_name(t.scalar_type()));
}

// x (M, K) @ W^T for a weight of N rows in format f with scale groups of gs elements.
at::Tensor run_mm(Fmt f, int gs, const at::Tensor& x_, const at::Tensor& qs, const at::Tensor& d,
                  const at::Tensor* mn) {
  const Isa isa = kIsa;
  const int gpu = isa == Isa::avx2 ? 2 : 4;  // scale groups per unit (one per 128-bit lane)
  const int64_t M = x_.size(0), K = x_.size(1), N = qs.size(0);
  auto y = at::empty({M, N}, x_.options());
  if (M == 0 || N == 0) return y;
  auto x = x_.contiguous();
  auto w = qs.contiguous();
  auto dc = d.contiguous();
  at::Tensor mc = mn ? mn->contiguous() : at::Tensor();

  Job J{};
  J.M = M, J.N = N, J.K = K, J.G = K / gs, J.B = K / 32;
  const int64_t unit = static_cast<int64_t>(gpu) * gs, U = (J.G + gpu - 1) / gpu;
  J.KP = U * unit, J.DXP = U * 4 * gpu, J.SXP = (J.B + 15) / 16 * 16;
  J.wrow = w.size(1);  // bytes: K / 2 or K
  // one buffer: xq (M, KP) int16 | dxl (M, DXP) f32 | sx (M, SXP) f32, each 64-byte aligned
  auto up = [](int64_t bytes) { return (bytes + 63) / 64 * 64; };
  const int64_t b_xq = up(M * J.KP * 2), b_dx = up(M * J.DXP * 4), b_sx = mn ? up(M * J.SXP * 4) : 0;
  auto buf = at::empty({b_xq + b_dx + b_sx + 64}, x.options().dtype(at::kByte));
  auto base = reinterpret_cast<uintptr_t>(buf.data_ptr<uint8_t>());
  base = (base + 63) / 64 * 64;
  auto* xq = reinterpret_cast<int16_t*>(base);
  auto* dxl = reinterpret_cast<float*>(base + b_xq);
  float* sx = mn ? reinterpret_cast<float*>(base + b_xq + b_dx) : nullptr;
  const float* X = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      prep_row(X + m * K, K, gs, gpu, xq + m * J.KP, J.KP, dxl + m * J.DXP, J.DXP, sx ? sx + m * J.SXP : nullptr,
               J.SXP);
  });
  J.xq = xq, J.dxl = dxl, J.sx = sx;
  J.w = reinterpret_cast<const uint8_t*>(w.data_ptr());
  J.d = dc.data_ptr<float>();
  J.mn = mn ? mc.data_ptr<float>() : nullptr;
  J.y = y.data_ptr<float>();

  const KernelFn fn = pick(isa, f);
  // threads take contiguous ranges of weight rows; small products stay on one thread
  const int64_t grain = std::max<int64_t>(2, (int64_t{1} << 16) / (M * K));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { fn(J, n0, n1); });
  return y;
}

at::Tensor q4_mm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m) {
  check_x("q4_mm", x);
  const int64_t K = x.size(1);
  TORCH_CHECK(qs.dim() == 2, "q4_mm: qs must be (N, K/2) uint8, got shape ", qs.sizes());
  const int64_t N = qs.size(0);
  check_w("q4_mm", "qs", qs, at::kByte, N, K / 2, "(N, K/2)");
  check_w("q4_mm", "d", d, at::kFloat, N, K / 32, "(N, K/32)");
  check_w("q4_mm", "m", m, at::kFloat, N, K / 32, "(N, K/32)");
  return run_mm(Fmt::q4, 32, x, qs, d, &m);
}

at::Tensor q8_mm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d) {
  check_x("q8_mm", x);
  const int64_t K = x.size(1);
  TORCH_CHECK(qs.dim() == 2, "q8_mm: qs must be (N, K) int8, got shape ", qs.sizes());
  const int64_t N = qs.size(0);
  check_w("q8_mm", "qs", qs, at::kChar, N, K, "(N, K)");
  TORCH_CHECK(d.dim() == 2 && d.size(0) == N && (d.size(1) == K / 32 || d.size(1) == K / 16),
              "q8_mm: d must be (N, K/32) or (N, K/16) = (", N, ", ", K / 32, ") or (", N, ", ", K / 16,
              ") float32 (blocks of 32 or 16), got shape ", d.sizes());
  TORCH_CHECK(d.scalar_type() == at::kFloat, "q8_mm: d must be float32, got ", dtype_name(d.scalar_type()));
  const bool b16 = d.size(1) == K / 16;
  return run_mm(b16 ? Fmt::q8_16 : Fmt::q8_32, b16 ? 16 : 32, x, qs, d, nullptr);
}

std::string cpu_isa() { return isa_name(kIsa); }

}  // namespace

TORCH_LIBRARY(pellucid, m) {
  m.def("int8_mm(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor qs, Tensor d, Tensor mn, int group) -> Tensor");
  m.def("q4_mm(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor qs, Tensor d) -> Tensor");
  m.def("cpu_isa() -> str", &cpu_isa);
}

TORCH_LIBRARY_IMPL(pellucid, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
  m.impl("q4_mm", &q4_mm);
  m.impl("q8_mm", &q8_mm);
}

#else  // PELLUCID_KERNEL_BODY
// ---------------------------------------------------------------------------------------
// Kernel body: namespace PK_NS, units of PK_WIDTH bits, VPDPWSSD if PK_VNNI.

namespace {
namespace PK_NS {

// --- 256-bit pieces: the whole AVX2 path, and the last part-filled unit (1 or 2 groups) of
// the AVX-512 path, which reads the first 256 bits of each operand of its unit.
typedef __m256i iv2;
typedef __m256 fv2;

inline iv2 ldi2(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline iv2 dot2(iv2 acc, iv2 w, iv2 x) {
#if PK_VNNI
  return _mm256_dpwssd_epi32(acc, w, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
#endif
}
inline float hsum2(fv2 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline fv2 expand_d2(const float* p, int r) {  // scales of r (1, 2) groups over 4 lanes each
  const __m128 v = r == 2 ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p))) : _mm_load_ss(p);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
inline fv2 ldf2_n(const float* p, int r) {  // r (0..8) floats, zeros after
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// 4-bit, 2 blocks of 16 bytes (one per 128-bit lane): unpacking each lane's bytes 0..7 / 8..15
// to int16 gives elements 0..7 / 8..15 (low nibbles) and 16..23 / 24..31 (high nibbles).
inline void q4_load2(const uint8_t* p, int r, iv2* W) {
  const iv2 raw = r == 2 ? ldi2(p) : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const iv2 zero = _mm256_setzero_si256(), low = _mm256_set1_epi16(0x0F);
  const iv2 a = _mm256_unpacklo_epi8(raw, zero), b = _mm256_unpackhi_epi8(raw, zero);
  W[0] = _mm256_and_si256(a, low);
  W[1] = _mm256_and_si256(b, low);
  W[2] = _mm256_srli_epi16(a, 4);
  W[3] = _mm256_srli_epi16(b, 4);
}
// int8, 2 blocks of 32 bytes: operand j = qword j of each block, sign-extended.
inline void q8_32_load2(const uint8_t* p, int r, iv2* W) {
  const iv2 a = ldi2(p), b = r == 2 ? ldi2(p + 32) : _mm256_setzero_si256();
  const iv2 lo = _mm256_unpacklo_epi64(a, b), hi = _mm256_unpackhi_epi64(a, b);
  W[0] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(lo));
  W[1] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(hi));
  W[2] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(lo, 1));
  W[3] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(hi, 1));
}
// int8, 2 groups of 16 bytes: operand 0 = qwords 0, 2; operand 1 = qwords 1, 3.
inline void q8_16_load2(const uint8_t* p, int r, iv2* W) {
  const iv2 a = r == 2 ? ldi2(p) : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const iv2 q = _mm256_permute4x64_epi64(a, _MM_SHUFFLE(3, 1, 2, 0));
  W[0] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
  W[1] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
}

#if PK_WIDTH == 512

typedef __m512i iv;
typedef __m512 fv;
constexpr int GPU = 4;  // scale groups per unit: one per 128-bit lane
constexpr int MR = 4;   // activation rows per tile
constexpr int NR = 2;   // weight rows per tile

inline iv ldi(const void* p) { return _mm512_loadu_si512(p); }
inline fv ldf(const float* p) { return _mm512_loadu_ps(p); }
inline fv ldf_n(const float* p, int r) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << r) - 1u), p); }
inline fv fzero() { return _mm512_setzero_ps(); }
inline fv fmul(fv a, fv b) { return _mm512_mul_ps(a, b); }
inline fv fadd(fv a, fv b) { return _mm512_add_ps(a, b); }
inline fv ffma(fv a, fv b, fv c) { return _mm512_fmadd_ps(a, b, c); }
inline fv i2f(iv a) { return _mm512_cvtepi32_ps(a); }
inline iv madd(iv w, iv x) { return _mm512_madd_epi16(w, x); }
inline iv dot(iv acc, iv w, iv x) {
#if PK_VNNI
  return _mm512_dpwssd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}
inline float hsum(fv v) {
  const fv2 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum2(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}
inline fv2 lo_half(fv v) { return _mm512_castps512_ps256(v); }
inline fv with_lo_half(fv v, fv2 lo) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(v), _mm256_castps_pd(lo), 0));
}
inline fv expand_d(const float* p, int r) {  // scales of r (1..4) groups over 4 lanes each
  const __m128 v = r == GPU ? _mm_loadu_ps(p) : _mm_maskz_loadu_ps(static_cast<__mmask8>((1u << r) - 1u), p);
  return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                               _mm512_castps128_ps512(v));
}
inline iv ld_bytes(const uint8_t* p, int64_t n) {  // n (<= 64) bytes, zeros after
  if (n >= 64) return ldi(p);
  return _mm512_maskz_loadu_epi8(n <= 0 ? 0 : ((~0ULL) >> (64 - n)), p);
}

// 4-bit: 4 blocks of 16 bytes, one per 128-bit lane (as q4_load2, twice as wide).
struct Q4 {
  static constexpr int NOPS = 4, GS = 32;
  static constexpr bool MIN = true;
  static constexpr int64_t UNIT_BYTES = GPU * 16;
  static inline void load(const uint8_t* p, int r, iv* W) { decode(r == GPU ? ldi(p) : ld_bytes(p, 16 * r), W); }
  static inline void decode(iv raw, iv* W) {
    const iv zero = _mm512_setzero_si512(), low = _mm512_set1_epi16(0x0F);
    const iv a = _mm512_unpacklo_epi8(raw, zero), b = _mm512_unpackhi_epi8(raw, zero);
    W[0] = _mm512_and_si512(a, low);
    W[1] = _mm512_and_si512(b, low);
    W[2] = _mm512_srli_epi16(a, 4);
    W[3] = _mm512_srli_epi16(b, 4);
  }
  static inline void load2(const uint8_t* p, int r, iv2* W) { q4_load2(p, r, W); }
};

// int8, blocks of 32: 4 blocks = 128 bytes; operand j gathers qword j of each block.
struct Q8_32 {
  static constexpr int NOPS = 4, GS = 32;
  static constexpr bool MIN = false;
  static constexpr int64_t UNIT_BYTES = GPU * 32;
  static inline void load(const uint8_t* p, int r, iv* W) {
    if (r == GPU) return decode(ldi(p), ldi(p + 64), W);
    decode(ld_bytes(p, 32 * r), ld_bytes(p + 64, 32 * r - 64), W);
  }
  static inline void decode(iv a, iv b, iv* W) {  // a: blocks 0, 1; b: blocks 2, 3
    const iv p01 = _mm512_permutex2var_epi64(a, _mm512_set_epi64(13, 9, 5, 1, 12, 8, 4, 0), b);
    const iv p23 = _mm512_permutex2var_epi64(a, _mm512_set_epi64(15, 11, 7, 3, 14, 10, 6, 2), b);
    W[0] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(p01));
    W[1] = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(p01, 1));
    W[2] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(p23));
    W[3] = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(p23, 1));
  }
  static inline void load2(const uint8_t* p, int r, iv2* W) { q8_32_load2(p, r, W); }
};

// int8, blocks of 16: 4 groups = 64 bytes; operand 0 the even qwords, operand 1 the odd.
struct Q8_16 {
  static constexpr int NOPS = 2, GS = 16;
  static constexpr bool MIN = false;
  static constexpr int64_t UNIT_BYTES = GPU * 16;
  static inline void load(const uint8_t* p, int r, iv* W) {
    decode(r == GPU ? ldi(p) : ld_bytes(p, 16 * r), W);
  }
  static inline void decode(iv a, iv* W) {
    const iv q = _mm512_permutexvar_epi64(_mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0), a);
    W[0] = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(q));
    W[1] = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(q, 1));
  }
  static inline void load2(const uint8_t* p, int r, iv2* W) { q8_16_load2(p, r, W); }
};

#else  // PK_WIDTH == 256: every unit is 2 groups

typedef iv2 iv;
typedef fv2 fv;
constexpr int GPU = 2;
constexpr int MR = 4;
constexpr int NR = 1;

inline iv ldi(const void* p) { return ldi2(p); }
inline fv ldf(const float* p) { return _mm256_loadu_ps(p); }
inline fv ldf_n(const float* p, int r) { return ldf2_n(p, r); }
inline fv fzero() { return _mm256_setzero_ps(); }
inline fv fmul(fv a, fv b) { return _mm256_mul_ps(a, b); }
inline fv fadd(fv a, fv b) { return _mm256_add_ps(a, b); }
inline fv ffma(fv a, fv b, fv c) { return _mm256_fmadd_ps(a, b, c); }
inline fv i2f(iv a) { return _mm256_cvtepi32_ps(a); }
inline iv madd(iv w, iv x) { return _mm256_madd_epi16(w, x); }
inline iv dot(iv acc, iv w, iv x) { return dot2(acc, w, x); }
inline float hsum(fv v) { return hsum2(v); }
inline fv expand_d(const float* p, int r) { return expand_d2(p, r); }

struct Q4 {
  static constexpr int NOPS = 4, GS = 32;
  static constexpr bool MIN = true;
  static constexpr int64_t UNIT_BYTES = GPU * 16;
  static inline void load(const uint8_t* p, int r, iv* W) { q4_load2(p, r, W); }
};
struct Q8_32 {
  static constexpr int NOPS = 4, GS = 32;
  static constexpr bool MIN = false;
  static constexpr int64_t UNIT_BYTES = GPU * 32;
  static inline void load(const uint8_t* p, int r, iv* W) { q8_32_load2(p, r, W); }
};
struct Q8_16 {
  static constexpr int NOPS = 2, GS = 16;
  static constexpr bool MIN = false;
  static constexpr int64_t UNIT_BYTES = GPU * 16;
  static inline void load(const uint8_t* p, int r, iv* W) { q8_16_load2(p, r, W); }
};

#endif

constexpr int L = 4 * GPU;        // float lanes
constexpr int64_t kPrefetch = 4096;  // bytes ahead in a weight stream that software prefetch asks for

// One unit (GPU scale groups, r of them present) of an mr x nr tile. Each output's
// sequence: integer dot over the unit, one convert, one scale product, one fused add.
template <class F, int mr, int nr, bool PF>
__attribute__((always_inline)) inline void unit_step(fv (&acc)[mr][nr], const uint8_t* const* wp,
                                                     const float* const* dp, const int16_t* const* xp,
                                                     const float* const* xd, int64_t u, int r) {
  iv W[nr][F::NOPS];
  fv dw[nr];
  for (int nn = 0; nn < nr; ++nn) {
    const uint8_t* p = wp[nn] + u * F::UNIT_BYTES;
    if constexpr (PF)  // decode reads the weights once, from memory: ask for them ahead
      for (int64_t o = 0; o < F::UNIT_BYTES; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch + o), _MM_HINT_T0);
    F::load(p, r, W[nn]);
    dw[nn] = expand_d(dp[nn] + u * GPU, r);
  }
  for (int mm = 0; mm < mr; ++mm) {
    const int16_t* x = xp[mm] + u * (GPU * F::GS);
    iv X[F::NOPS];
    for (int j = 0; j < F::NOPS; ++j) X[j] = ldi(x + j * (8 * GPU));
    const fv dxm = ldf(xd[mm] + u * L);
    for (int nn = 0; nn < nr; ++nn) {
      iv s = madd(W[nn][0], X[0]);
      for (int j = 1; j < F::NOPS; ++j) s = dot(s, W[nn][j], X[j]);
      acc[mm][nn] = ffma(i2f(s), fmul(dw[nn], dxm), acc[mm][nn]);
    }
  }
}

#if PK_WIDTH == 512
// The last unit when only r = 1 or 2 of its groups exist: the same per-lane arithmetic on
// the low 8 lanes at half the width (the high lanes would only add zeros).
template <class F, int mr, int nr>
__attribute__((always_inline)) inline void half_step(fv (&acc)[mr][nr], const uint8_t* const* wp,
                                                     const float* const* dp, const int16_t* const* xp,
                                                     const float* const* xd, int64_t u, int r) {
  iv2 W[nr][F::NOPS];
  fv2 dw[nr];
  for (int nn = 0; nn < nr; ++nn) {
    F::load2(wp[nn] + u * F::UNIT_BYTES, r, W[nn]);
    dw[nn] = expand_d2(dp[nn] + u * GPU, r);
  }
  for (int mm = 0; mm < mr; ++mm) {
    const int16_t* x = xp[mm] + u * (GPU * F::GS);
    iv2 X[F::NOPS];
    for (int j = 0; j < F::NOPS; ++j) X[j] = ldi2(x + j * (8 * GPU));
    const fv2 dxm = _mm256_loadu_ps(xd[mm] + u * L);
    for (int nn = 0; nn < nr; ++nn) {
      iv2 s = _mm256_madd_epi16(W[nn][0], X[0]);
      for (int j = 1; j < F::NOPS; ++j) s = dot2(s, W[nn][j], X[j]);
      const fv2 a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw[nn], dxm), lo_half(acc[mm][nn]));
      acc[mm][nn] = with_lo_half(acc[mm][nn], a);
    }
  }
}
#endif

// Outputs y[m0 + i, n0 + j * ns] for i < mr, j < nr.
template <class F, int mr, int nr, bool PF>
void tile(const Job& J, int64_t m0, int64_t n0, int64_t ns) {
  const uint8_t* wp[nr];
  const float* dp[nr];
  const int16_t* xp[mr];
  const float* xd[mr];
  int64_t n[nr];
  for (int nn = 0; nn < nr; ++nn) n[nn] = n0 + nn * ns, wp[nn] = J.w + n[nn] * J.wrow, dp[nn] = J.d + n[nn] * J.G;
  for (int mm = 0; mm < mr; ++mm) xp[mm] = J.xq + (m0 + mm) * J.KP, xd[mm] = J.dxl + (m0 + mm) * J.DXP;
  if constexpr (PF) {  // the scales of the rows a few tiles ahead
    for (int nn = 0; nn < nr; ++nn) {
      _mm_prefetch(reinterpret_cast<const char*>(dp[nn] + 8 * J.G), _MM_HINT_T0);
      if constexpr (F::MIN) _mm_prefetch(reinterpret_cast<const char*>(J.mn + (n[nn] + 8) * J.B), _MM_HINT_T0);
    }
  }
  fv acc[mr][nr];
  for (int mm = 0; mm < mr; ++mm)
    for (int nn = 0; nn < nr; ++nn) acc[mm][nn] = fzero();
  const int64_t full = J.G / GPU;
  const int rem = static_cast<int>(J.G % GPU);
  for (int64_t u = 0; u < full; ++u) unit_step<F, mr, nr, PF>(acc, wp, dp, xp, xd, u, GPU);
#if PK_WIDTH == 512
  if (rem == 1 || rem == 2)
    half_step<F, mr, nr>(acc, wp, dp, xp, xd, full, rem);
  else if (rem)
    unit_step<F, mr, nr, false>(acc, wp, dp, xp, xd, full, rem);
#else
  if (rem) unit_step<F, mr, nr, false>(acc, wp, dp, xp, xd, full, rem);
#endif
  if constexpr (F::MIN) {  // + sum_b m[n, b] * sx[m, b], L blocks per vector
    fv macc[mr][nr];
    for (int mm = 0; mm < mr; ++mm)
      for (int nn = 0; nn < nr; ++nn) macc[mm][nn] = fzero();
    for (int64_t c = 0; c < J.B; c += L) {
      const int r = J.B - c < L ? static_cast<int>(J.B - c) : L;
      fv mv[nr];
      for (int nn = 0; nn < nr; ++nn) {
        const float* p = J.mn + n[nn] * J.B + c;
        mv[nn] = r == L ? ldf(p) : ldf_n(p, r);
      }
      for (int mm = 0; mm < mr; ++mm) {
        const fv s = ldf(J.sx + (m0 + mm) * J.SXP + c);
        for (int nn = 0; nn < nr; ++nn) macc[mm][nn] = ffma(mv[nn], s, macc[mm][nn]);
      }
    }
    for (int mm = 0; mm < mr; ++mm)
      for (int nn = 0; nn < nr; ++nn) acc[mm][nn] = fadd(acc[mm][nn], macc[mm][nn]);
  }
  for (int mm = 0; mm < mr; ++mm)
    for (int nn = 0; nn < nr; ++nn) J.y[(m0 + mm) * J.N + n[nn]] = hsum(acc[mm][nn]);
}

// Weight rows [n0, n1) against activation rows [m0, m0 + mr). A tile's nr weight rows are
// taken from nr equal parts of the range, so the weights are read as nr sequential
// streams: rows side by side (n, n + 1) would be read as interleaved streams, which halves
// the bandwidth the hardware prefetchers reach from memory.
template <class F, int mr, int nr, bool PF>
void rows(const Job& J, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t part = (n1 - n0) / nr;
  for (int64_t i = 0; i < part; ++i) tile<F, mr, nr, PF>(J, m0, n0 + i, part);
  for (int64_t n = n0 + nr * part; n < n1; ++n) tile<F, mr, 1, PF>(J, m0, n, 1);
}

// Weight rows [n_begin, n_end). A few activation rows (decode): one pass over the weights,
// from memory, with software prefetch ahead. More rows: blocks of weight rows that stay in
// L2 while every tile of MR activation rows passes over them.
template <class F>
void run(const Job& J, int64_t n_begin, int64_t n_end) {
  switch (J.M) {
    case 1: return rows<F, 1, NR, true>(J, 0, n_begin, n_end);
    case 2: return rows<F, 2, NR, true>(J, 0, n_begin, n_end);
    case 3: return rows<F, 3, NR, true>(J, 0, n_begin, n_end);
    default: break;
  }
  const int64_t row_bytes = J.wrow + 4 * J.G + (F::MIN ? 4 * J.B : 0);
  int64_t nb = (int64_t{256} << 10) / row_bytes;
  nb = nb < 8 ? 8 : nb - nb % 8;
  for (int64_t b0 = n_begin; b0 < n_end; b0 += nb) {
    const int64_t b1 = b0 + nb < n_end ? b0 + nb : n_end;
    for (int64_t m0 = 0; m0 < J.M; m0 += MR) {
      const int64_t left = J.M - m0;
      switch (left >= MR ? MR : left) {
        case 1: rows<F, 1, NR, false>(J, m0, b0, b1); break;
        case 2: rows<F, 2, NR, false>(J, m0, b0, b1); break;
        case 3: rows<F, 3, NR, false>(J, m0, b0, b1); break;
        default: rows<F, MR, NR, false>(J, m0, b0, b1); break;
      }
    }
  }
}

void q4(const Job& J, int64_t n0, int64_t n1) { run<Q4>(J, n0, n1); }
void q8_32(const Job& J, int64_t n0, int64_t n1) { run<Q8_32>(J, n0, n1); }
void q8_16(const Job& J, int64_t n0, int64_t n1) { run<Q8_16>(J, n0, n1); }

}  // namespace PK_NS
}  // namespace

#endif  // PELLUCID_KERNEL_BODY
