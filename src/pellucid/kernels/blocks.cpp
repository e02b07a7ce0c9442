// Matmuls and row lookups on GGUF's block formats, read where they lie (x86: AVX2 + FMA
// baseline, AVX-512 / VNNI chosen at run time).
//
//   pellucid::block_mm(x (M, K) f32, ws uint8[] (N_i, row bytes), types int[], bias (sum N_i,)?,
//                      out_index (sum N_i,) int64?) -> (M, sum N_i) f32
//       y[m, c(n)] = sum_k x[m, k] * W[n, k] (+ bias[c(n)]), W the rows of every w in order,
//       each dequantized as ggml does (dequantize_row_*), c(n) = out_index[n] or n. Types
//       (ggml's ids): Q4_0 2, Q4_1 3, Q5_0 6, Q8_0 8, Q4_K 12, Q6_K 14; each plus 256 (kA8)
//       for 8-bit activations (every type of a call alike; see below).
//   pellucid::block_rows(w uint8 (N, row bytes), type, K, ids int64 (...)) -> (..., K) f32
//       rows ids of W, each value equal to ggml's dequantized value bit for bit (also for F32 0,
//       F16 1, BF16 30).
//   pellucid::cpu_isa() -> str: "avx512_vnni", "avx512" or "avx2", the path block_mm takes
//   pellucid::read_bytes(buf uint8) -> int: a sum over every byte, read with all threads (a
//       probe of the machine's read bandwidth)
//
// Arithmetic of block_mm: per row of x and scale block (32 values; a super-block of 256 for
// Q4_K and Q6_K), amax = max |x|, dx = amax / 32767, xq = nearbyint(x / dx) as int16 (all 0
// with dx = 0 when amax is 0). Blocks of 32 (Q4_0, Q4_1, Q5_0, Q8_0): per output and block,
// isum = sum q * xq exactly in int32 (madd / VPDPWSSD), acc += float(isum) * (dw * dx) and,
// for formats with an offset (w = dw * q + mw: Q4_0 with mw = -8 dw, Q4_1, Q5_0 with -16 dw),
// acc += mw * (dx * sum xq). Super-blocks (w = d * sc_j * q - dmin * mn_j in sub-block j):
// per output, isum = sum (sc_j * q) * xq exactly in int32 over the super-block (over half of
// it for Q6_K on AVX2: |isum| < 2^31 is guaranteed), acc += float(isum) * (d * dx), and for
// Q4_K acc += -(dmin * mn_j) * (dx * sum of sub-block j's xq) per sub-block. So the weights
// summed are exactly the file's dequantized values (d * sc * q is exact in float32), and one
// float step serves a whole super-block. Every fused multiply-add is per vector lane; lanes
// are summed once at the end. Every output runs the same instruction sequence whatever M,
// the tile that holds it, the thread or the other rows are (no split-K), so a row's result
// is bit-identical batched or alone. AVX2 and AVX-512 paths differ in lane layout (and so in
// the last bits); PELLUCID_ISA=avx2|avx512 (read when the library is loaded) forces a
// lower path.
//
// 8-bit activations (types + 256): the same arithmetic with dx = amax / 127 and xq in
// -127..127 per scale block, as llama.cpp quantizes them (its fidelity, not float32's). On
// AVX-512 VNNI, Q4_K and Q6_K run their own kernels (VPDPBUSD, twice the products an
// instruction; see q4_k8); elsewhere the 16-bit kernels sum the same 8-bit values.
//
// Layout: a unit is GPU scale groups (4 on AVX-512, 2 on AVX2), one per 128-bit lane:
// operand j (of gs / 8) holds, in lane g, elements 8j..8j+7 of group g. Each format's
// decoder turns the file's bytes into that order in registers (nibble unpacks, lane
// permutes); the activations are quantized into the same order once per call.

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
#include <vector>

namespace {

constexpr int64_t kA8 = 256;  // added to a type id in block_mm's types: 8-bit activations

enum Type : int64_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14, BF16 = 30 };

struct TypeInfo {
  int64_t block;  // values per block
  int64_t bytes;  // bytes per block
};

bool type_info(int64_t t, TypeInfo* out) {
  switch (t) {
    case F32: *out = {1, 4}; return true;
    case F16: *out = {1, 2}; return true;
    case BF16: *out = {1, 2}; return true;
    case Q4_0: *out = {32, 18}; return true;
    case Q4_1: *out = {32, 20}; return true;
    case Q5_0: *out = {32, 22}; return true;
    case Q8_0: *out = {32, 34}; return true;
    case Q4_K: *out = {256, 144}; return true;
    case Q6_K: *out = {256, 210}; return true;
    default: return false;
  }
}

const char* type_name(int64_t t) {
  switch (t) {
    case F32: return "F32";
    case F16: return "F16";
    case BF16: return "BF16";
    case Q4_0: return "Q4_0";
    case Q4_1: return "Q4_1";
    case Q5_0: return "Q5_0";
    case Q8_0: return "Q8_0";
    case Q4_K: return "Q4_K";
    case Q6_K: return "Q6_K";
    default: return "an unsupported type";
  }
}

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline uint32_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Q4_K's 12 bytes of 6-bit scales and mins for 8 sub-blocks -> sc[8], mn[8].
inline void q4k_scales(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// One row of K values, exactly as ggml's dequantize_row_* computes them.
void dequant_row(int64_t t, const uint8_t* p, int64_t K, float* y) {
  switch (t) {
    case F32:
      std::memcpy(y, p, K * 4);
      return;
    case F16:
      for (int64_t k = 0; k < K; ++k) y[k] = fp16(p + 2 * k);
      return;
    case BF16:
      for (int64_t k = 0; k < K; ++k) {
        uint16_t h;
        std::memcpy(&h, p + 2 * k, 2);
        const uint32_t u = static_cast<uint32_t>(h) << 16;
        std::memcpy(y + k, &u, 4);
      }
      return;
    case Q4_0:
      for (int64_t b = 0; b < K / 32; ++b, p += 18, y += 32) {
        const float d = fp16(p);
        for (int j = 0; j < 16; ++j) {
          y[j] = static_cast<float>((p[2 + j] & 0x0F) - 8) * d;
          y[j + 16] = static_cast<float>((p[2 + j] >> 4) - 8) * d;
        }
      }
      return;
    case Q4_1:
      for (int64_t b = 0; b < K / 32; ++b, p += 20, y += 32) {
        const float d = fp16(p), m = fp16(p + 2);
        for (int j = 0; j < 16; ++j) {
          y[j] = static_cast<float>(p[4 + j] & 0x0F) * d + m;
          y[j + 16] = static_cast<float>(p[4 + j] >> 4) * d + m;
        }
      }
      return;
    case Q5_0:
      for (int64_t b = 0; b < K / 32; ++b, p += 22, y += 32) {
        const float d = fp16(p);
        const uint32_t qh = load32(p + 2);
        for (int j = 0; j < 16; ++j) {
          const int x0 = (p[6 + j] & 0x0F) | static_cast<int>(((qh >> j) << 4) & 0x10);
          const int x1 = (p[6 + j] >> 4) | static_cast<int>((qh >> (j + 12)) & 0x10);
          y[j] = static_cast<float>(x0 - 16) * d;
          y[j + 16] = static_cast<float>(x1 - 16) * d;
        }
      }
      return;
    case Q8_0:
      for (int64_t b = 0; b < K / 32; ++b, p += 34, y += 32) {
        const float d = fp16(p);
        for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(p[2 + j])) * d;
      }
      return;
    case Q4_K:
      for (int64_t b = 0; b < K / 256; ++b, p += 144) {
        const float d = fp16(p), dmin = fp16(p + 2);
        uint8_t sc[8], mn[8];
        q4k_scales(p + 4, sc, mn);
        const uint8_t* q = p + 16;
        for (int c = 0; c < 4; ++c, q += 32) {  // 64 values: 32 low nibbles, then 32 high
          const float d1 = d * sc[2 * c], m1 = dmin * mn[2 * c];
          const float d2 = d * sc[2 * c + 1], m2 = dmin * mn[2 * c + 1];
          for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0x0F) - m1;
          for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
        }
      }
      return;
    case Q6_K:
      for (int64_t b = 0; b < K / 256; ++b, p += 210) {
        const float d = fp16(p + 208);
        const uint8_t* ql = p;
        const uint8_t* qh = p + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
        for (int h = 0; h < 2; ++h, ql += 64, qh += 32, sc += 8, y += 128) {
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = static_cast<int8_t>((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = static_cast<int8_t>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = static_cast<int8_t>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = static_cast<int8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is + 0] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
          }
        }
      }
      return;
    default:
      TORCH_CHECK(false, "pellucid: cannot read GGML type ", t);
  }
}

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

// One weight matrix's share of a call, the activations already quantized for its layout.
struct Job {
  int64_t M, K;
  int64_t ldy;        // floats per row of y
  int64_t KP;         // int16 per row of xq (whole units)
  int64_t LP;         // floats per row of dxl / sxl (one per lane of every unit, or of every super-block)
  int64_t wrow;       // bytes per weight row
  const int16_t* xq;  // (M, KP) quantized activations in unit order
  const float* dxl;   // (M, LP) activation scales dx (see prep_row)
  const float* sxl;   // (M, LP) dx * sum(xq) of each group of 32 (see prep_row), or null
  const uint8_t* w;   // (N, wrow) the file's blocks
  const float* bias;  // (ldy,) in output order, or null
  const int64_t* col; // output column of each row, or null (column = n0 + row)
  int64_t col0;       // first output column of this matrix when col is null
  float* y;           // (M, ldy)
  // 8-bit activations for the VPDPBUSD super-block kernels (prep_row8), else null
  const int8_t* xb;   // (M, K)
  const float* xbd;   // (M, K / 256) dx
  const int32_t* xbg; // (M, K / 16) 32 * sum(xq) per group of 16
  const float* xbs;   // (M, K / 16) dx * sum(xq) per group of 16
};

// The scale of one scale block of n values: dx = amax / qmax (plain IEEE max and divide: the
// same bits whatever the path); NaN when x holds a NaN or an infinity (NaN out); 0 when amax
// is 0 or dx underflows.
inline float block_dx(const float* x, int64_t n, float qmax) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  const float dx = amax / qmax;
  if (_mm256_movemask_ps(bad) != 0 || !std::isfinite(amax)) return std::numeric_limits<float>::quiet_NaN();
  return dx > 0.0f ? dx : 0.0f;
}

// 32 values of x as q = nearbyint(x / dx) (to nearest even), clamped to +-qmax (only a
// subnormal dx reaches the clamp), into q[32] in order; returns their sum. All 0 unless dx > 0.
inline int32_t quant32(const float* x, float dx, int qmax, int16_t* q) {
  if (!(dx > 0.0f)) {
    std::memset(q, 0, 32 * sizeof(int16_t));
    return 0;
  }
  const __m256 dv = _mm256_set1_ps(dx);
  const __m256i hi = _mm256_set1_epi32(qmax), lo = _mm256_set1_epi32(-qmax);
  __m256i s = _mm256_setzero_si256();
  for (int i = 0; i < 4; i += 2) {  // cvtps: the MXCSR rounding, to nearest even
    const __m256 va = _mm256_loadu_ps(x + 8 * i), vc = _mm256_loadu_ps(x + 8 * i + 8);
    __m256i a = _mm256_max_epi32(lo, _mm256_min_epi32(hi, _mm256_cvtps_epi32(_mm256_div_ps(va, dv))));
    __m256i d = _mm256_max_epi32(lo, _mm256_min_epi32(hi, _mm256_cvtps_epi32(_mm256_div_ps(vc, dv))));
    s = _mm256_add_epi32(s, _mm256_add_epi32(a, d));
    __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, d), _MM_SHUFFLE(3, 1, 2, 0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 8 * i), p);
  }
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(t);
}

// Quantize one row of x per scale block (32 values, or 256 for the K-quant super-block
// formats) to integers of at most qmax (32767: 16-bit activations; 127: 8-bit) and write
// it in the unit order of a path with `gpu` scale groups of `gs` elements per unit. Scales
// and sums: per block of 32, dxl holds dx in each lane of its group and sxl dx * sum(xq) in
// the group's first lane; per super-block c, dxl[c] holds dx and sxl[c * lanes + lanes - 8
// + j] dx * sum(xq) of its group j of 32.
void prep_row(const float* x, int64_t K, int qmax, int gs, int gpu, bool super, int16_t* xq, int64_t KP, float* dxl,
              float* sxl, int64_t LP) {
  const int64_t SB = super ? 256 : 32, unit = static_cast<int64_t>(gpu) * gs, lanes = 4 * gpu;
  std::memset(xq + KP - unit, 0, unit * sizeof(int16_t));  // the last unit may be part empty
  std::memset(dxl, 0, LP * sizeof(float));
  if (sxl) std::memset(sxl, 0, LP * sizeof(float));
  alignas(32) int16_t q[32];
  for (int64_t c = 0; c < K / SB; ++c) {
    const float dx = block_dx(x + SB * c, SB, static_cast<float>(qmax));
    if (super) dxl[c] = dx;
    for (int64_t b = SB * c / 32; b < SB * (c + 1) / 32; ++b) {  // blocks of 32
      const int32_t qsum = quant32(x + 32 * b, dx, qmax, q);
      for (int k = 0; k < 4; ++k) {  // 8-element pieces to (unit, operand j, lane group g)
        const int64_t e = 32 * b + 8 * k, g = e / gs, j = (e % gs) / 8, u = g / gpu, gg = g % gpu;
        std::memcpy(xq + u * unit + j * (8 * gpu) + gg * 8, q + 8 * k, 16);
      }
      if (super) {
        if (sxl) sxl[c * lanes + lanes - 8 + (b - 8 * c)] = dx * static_cast<float>(qsum);
        continue;
      }
      for (int64_t g = 32 * b / gs; g < 32 * (b + 1) / gs; ++g) {
        float* p = dxl + (g / gpu) * lanes + (g % gpu) * 4;
        p[0] = p[1] = p[2] = p[3] = dx;
        if (sxl) sxl[(g / gpu) * lanes + (g % gpu) * 4] = dx * static_cast<float>(qsum);
      }
    }
  }
}

// 8-bit activations for the VPDPBUSD super-block kernels (the same values as prep_row with
// qmax 127): per super-block c of 256, dx[c]; xq in the order those kernels read, byte
// 256 c + 64 t + 4 l + i <- element 16 l + 4 t + i (operand t, int32 lane l: group l of 16
// values); per group l, g32[16 c + l] = 32 * sum(xq) (Q6_K's offset of 32) and
// sx[16 c + l] = dx * sum(xq) (Q4_K's mins).
void prep_row8(const float* x, int64_t K, int8_t* xq, float* dx8, int32_t* g32, float* sx) {
  alignas(32) int16_t q[32];
  for (int64_t c = 0; c < K / 256; ++c) {
    const float dx = block_dx(x + 256 * c, 256, 127.0f);
    dx8[c] = dx;
    for (int64_t b = 0; b < 8; ++b) {  // blocks of 32: groups 2b, 2b + 1
      quant32(x + 256 * c + 32 * b, dx, 127, q);
      const __m128i a0 = _mm_load_si128(reinterpret_cast<const __m128i*>(q)), a1 = _mm_load_si128(reinterpret_cast<const __m128i*>(q + 8));
      const __m128i b0 = _mm_load_si128(reinterpret_cast<const __m128i*>(q + 16)), b1 = _mm_load_si128(reinterpret_cast<const __m128i*>(q + 24));
      // operand t: 4 values of group 2b then 4 of group 2b + 1, at 64 t + 8 b
      const __m128i lo = _mm_packs_epi16(a0, a1), hi = _mm_packs_epi16(b0, b1);
      const __m128i u0 = _mm_unpacklo_epi32(lo, hi), u1 = _mm_unpackhi_epi32(lo, hi);
      int8_t* o = xq + 256 * c + 8 * b;
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o), u0);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o + 64), _mm_unpackhi_epi64(u0, u0));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o + 128), u1);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o + 192), _mm_unpackhi_epi64(u1, u1));
      const __m128i one = _mm_set1_epi16(1);
      __m128i sa = _mm_add_epi32(_mm_madd_epi16(a0, one), _mm_madd_epi16(a1, one));
      __m128i sb = _mm_add_epi32(_mm_madd_epi16(b0, one), _mm_madd_epi16(b1, one));
      sa = _mm_hadd_epi32(sa, sb);  // a a b b
      sa = _mm_hadd_epi32(sa, sa);  // sum a, sum b
      const int32_t s[2] = {_mm_cvtsi128_si32(sa), _mm_extract_epi32(sa, 1)};
      for (int h = 0; h < 2; ++h) {
        g32[16 * c + 2 * b + h] = 32 * s[h];
        sx[16 * c + 2 * b + h] = dx * static_cast<float>(s[h]);
      }
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#define PK_NS k_avx512
#define PK_WIDTH 512
#define PK_VNNI 0
#include __FILE__
#undef PK_NS
#undef PK_WIDTH
#undef PK_VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
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

using KernelFn = void (*)(const Job&, int64_t, int64_t);

KernelFn pick(Isa isa, int64_t t) {
#define PK_PICK(ns)                   \
  switch (t) {                        \
    case Q4_0: return ns::q4_0;       \
    case Q4_1: return ns::q4_1;       \
    case Q5_0: return ns::q5_0;       \
    case Q8_0: return ns::q8_0;       \
    case Q4_K: return ns::q4_k;       \
    case Q6_K: return ns::q6_k;       \
    default: return nullptr;          \
  }
  switch (isa) {
    case Isa::avx512_vnni: PK_PICK(k_avx512_vnni)
    case Isa::avx512: PK_PICK(k_avx512)
    default: PK_PICK(k_avx2)
  }
#undef PK_PICK
}

// K-quant kernels on 8-bit activations (VPDPBUSD): AVX-512 VNNI only; elsewhere, or for
// other types, 8-bit activations run the 16-bit kernels on the same 8-bit values.
KernelFn pick8(Isa isa, int64_t t) {
  if (isa != Isa::avx512_vnni) return nullptr;
  return t == Q4_K ? k_avx512_vnni::q4_k8 : t == Q6_K ? k_avx512_vnni::q6_k8 : nullptr;
}

bool has_offset(int64_t t) { return t == Q4_0 || t == Q4_1 || t == Q5_0 || t == Q4_K; }
int group_size(int64_t t) { return t == Q6_K ? 16 : 32; }
bool is_super(int64_t t) { return t == Q4_K || t == Q6_K; }  // activations scaled per super-block of 256
int layout(int64_t t) { return t == Q6_K ? 2 : t == Q4_K ? 1 : 0; }  // one activation layout per value

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

int64_t row_bytes(int64_t t, int64_t K) {
  TypeInfo ti{};
  type_info(t, &ti);
  return K / ti.block * ti.bytes;
}

void check_weight(const char* op, const at::Tensor& w, int64_t t, int64_t K, size_t i) {
  TypeInfo ti{};
  TORCH_CHECK(type_info(t, &ti), op, ": weight ", i, " has GGML type ", t, ", which pellucid cannot read");
  TORCH_CHECK(K % ti.block == 0, op, ": ", type_name(t), " rows hold blocks of ", ti.block, " values; K = ", K,
              " is not a multiple");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte, op, ": weight ", i, " must be (N, row bytes) uint8, got ",
              dtype_name(w.scalar_type()), " of shape ", w.sizes());
  TORCH_CHECK(w.size(1) == K / ti.block * ti.bytes, op, ": weight ", i, " (", type_name(t), ") rows must be ",
              K / ti.block * ti.bytes, " bytes for K = ", K, ", got ", w.size(1));
  TORCH_CHECK(w.stride(1) == 1 && w.stride(0) == w.size(1), op, ": weight ", i, " must be contiguous");
}

// Activations quantized for one layout (scale groups of gs; scale blocks of 32 or of a
// super-block of 256), shared by the matrices that use it.
struct Prepared {
  int gs = 0;
  int64_t KP = 0, LP = 0;
  at::Tensor xq, dxl, sxl;
};

Prepared prepare(const float* X, int64_t M, int64_t K, int qmax, int gs, bool super, bool offsets,
                 const at::TensorOptions& opt) {
  const int gpu = kIsa == Isa::avx2 ? 2 : 4;  // scale groups per unit (one per 128-bit lane)
  Prepared p;
  p.gs = gs;
  const int64_t unit = static_cast<int64_t>(gpu) * gs, U = (K + unit - 1) / unit;
  p.KP = U * unit, p.LP = super ? K / 256 * 4 * gpu : U * 4 * gpu;
  p.xq = at::empty({M, p.KP}, opt.dtype(at::kShort));
  p.dxl = at::empty({M, p.LP}, opt.dtype(at::kFloat));
  if (offsets) p.sxl = at::empty({M, p.LP}, opt.dtype(at::kFloat));
  int16_t* xq = p.xq.data_ptr<int16_t>();
  float* dxl = p.dxl.data_ptr<float>();
  float* sxl = offsets ? p.sxl.data_ptr<float>() : nullptr;
  const int64_t KP = p.KP, LP = p.LP;
  auto body = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      prep_row(X + m * K, K, qmax, gs, gpu, super, xq + m * KP, KP, dxl + m * LP, sxl ? sxl + m * LP : nullptr, LP);
  };
  if (M * K < (1 << 15)) body(0, M);
  else at::parallel_for(0, M, 16, body);
  return p;
}

// 8-bit activations in the order of the VPDPBUSD super-block kernels (prep_row8).
struct Prepared8 {
  at::Tensor xb, xbd, xbg, xbs;
};

Prepared8 prepare8(const float* X, int64_t M, int64_t K, const at::TensorOptions& opt) {
  Prepared8 p;
  p.xb = at::empty({M, K}, opt.dtype(at::kChar));
  p.xbd = at::empty({M, K / 256}, opt.dtype(at::kFloat));
  p.xbg = at::empty({M, K / 16}, opt.dtype(at::kInt));
  p.xbs = at::empty({M, K / 16}, opt.dtype(at::kFloat));
  int8_t* xb = p.xb.data_ptr<int8_t>();
  float* xbd = p.xbd.data_ptr<float>();
  int32_t* xbg = p.xbg.data_ptr<int32_t>();
  float* xbs = p.xbs.data_ptr<float>();
  auto body = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      prep_row8(X + m * K, K, xb + m * K, xbd + m * (K / 256), xbg + m * (K / 16), xbs + m * (K / 16));
  };
  if (M * K < (1 << 15)) body(0, M);
  else at::parallel_for(0, M, 16, body);
  return p;
}

at::Tensor block_mm(const at::Tensor& x_, at::TensorList ws, at::IntArrayRef types_, const std::optional<at::Tensor>& bias_,
                    const std::optional<at::Tensor>& out_index_) {
  const char* op = "pellucid::block_mm";
  TORCH_CHECK(x_.dim() == 2, op, ": x must be 2-D (M, K), got shape ", x_.sizes());
  TORCH_CHECK(x_.scalar_type() == at::kFloat, op, ": x must be float32, got ", dtype_name(x_.scalar_type()));
  TORCH_CHECK(ws.size() >= 1 && ws.size() == types_.size(), op, ": one type per weight (", ws.size(), " weights, ",
              types_.size(), " types)");
  // a type + kA8: 8-bit activations (every weight of a call alike)
  const bool a8 = (types_[0] & kA8) != 0;
  std::vector<int64_t> types(types_.begin(), types_.end());
  for (size_t i = 0; i < types.size(); ++i) {
    TORCH_CHECK(((types[i] & kA8) != 0) == a8, op, ": types ", types_, " mix 8-bit activations (+", kA8,
                ") with 16-bit ones; one call takes one kind");
    types[i] &= ~kA8;
  }
  const int64_t M = x_.size(0), K = x_.size(1);
  TORCH_CHECK(K > 0 && K % 32 == 0, op, ": x (M, K) needs K a positive multiple of 32, got K = ", K);
  int64_t N = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    check_weight(op, ws[i], types[i], K, i);
    TORCH_CHECK(types[i] != F32 && types[i] != F16 && types[i] != BF16, op, ": weight ", i, " is ",
                type_name(types[i]), "; block_mm reads block formats only");
    N += ws[i].size(0);
  }
  const float* bias = nullptr;
  at::Tensor bias_c;
  if (bias_.has_value()) {
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == N && bias_->scalar_type() == at::kFloat, op,
                ": bias must be (", N, ",) float32, got ", dtype_name(bias_->scalar_type()), " of shape ", bias_->sizes());
    bias_c = bias_->contiguous();
    bias = bias_c.data_ptr<float>();
  }
  const int64_t* col = nullptr;
  at::Tensor index_c;
  if (out_index_.has_value()) {
    TORCH_CHECK(out_index_->dim() == 1 && out_index_->size(0) == N && out_index_->scalar_type() == at::kLong, op,
                ": out_index must be (", N, ",) int64, got ", dtype_name(out_index_->scalar_type()), " of shape ",
                out_index_->sizes());
    index_c = out_index_->contiguous();
    col = index_c.data_ptr<int64_t>();
    std::vector<char> seen(N, 0);
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK(col[n] >= 0 && col[n] < N && !seen[col[n]], op, ": out_index must be a permutation of 0..", N - 1);
      seen[col[n]] = 1;
    }
  }
  auto y = at::empty({M, N}, x_.options());
  if (M == 0 || N == 0) return y;
  auto x = x_.contiguous();
  const float* X = x.data_ptr<float>();

  Prepared preps[3];  // blocks of 32; Q4_K's super-blocks (groups of 32); Q6_K's (groups of 16)
  Prepared8 prep8;    // 8-bit activations for VPDPBUSD (Q4_K and Q6_K alike)
  std::vector<Job> jobs(ws.size());
  std::vector<KernelFn> fns(ws.size());
  std::vector<int64_t> rows(ws.size()), cost(ws.size());
  int64_t n0 = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    Job& J = jobs[i];
    J = Job{};
    J.M = M, J.K = K, J.ldy = N;
    fns[i] = a8 ? pick8(kIsa, types[i]) : nullptr;
    if (fns[i]) {
      if (!prep8.xb.defined()) prep8 = prepare8(X, M, K, x.options());
      J.xb = prep8.xb.data_ptr<int8_t>();
      J.xbd = prep8.xbd.data_ptr<float>();
      J.xbg = prep8.xbg.data_ptr<int32_t>();
      J.xbs = prep8.xbs.data_ptr<float>();
    } else {  // 16-bit operands (with 8-bit values under a8 where no VPDPBUSD kernel is)
      Prepared& p = preps[layout(types[i])];
      if (p.gs == 0) {
        bool off = false;  // one preparation with offsets serves every matrix of this layout
        for (size_t k = 0; k < ws.size(); ++k) off |= layout(types[k]) == layout(types[i]) && has_offset(types[k]);
        p = prepare(X, M, K, a8 ? 127 : 32767, group_size(types[i]), is_super(types[i]), off, x.options());
      }
      J.KP = p.KP, J.LP = p.LP;
      J.xq = p.xq.data_ptr<int16_t>();
      J.dxl = p.dxl.data_ptr<float>();
      J.sxl = p.sxl.defined() ? p.sxl.data_ptr<float>() : nullptr;
      fns[i] = pick(kIsa, types[i]);
    }
    J.wrow = ws[i].size(1);
    J.w = ws[i].data_ptr<uint8_t>();
    J.bias = bias;
    J.col = col ? col + n0 : nullptr;
    J.col0 = n0;
    J.y = y.data_ptr<float>();
    rows[i] = ws[i].size(0);
    cost[i] = J.wrow;
    n0 += rows[i];
  }
  // Threads take contiguous shares of all the rows, weighted by their bytes; a small product
  // stays on one thread (a parallel region costs 5-7 us).
  int64_t total = 0;
  for (size_t i = 0; i < ws.size(); ++i) total += rows[i] * cost[i];
  const int64_t work = total * std::max<int64_t>(M, 1);
  const int64_t T = work < (int64_t{1} << 17) ? 1 : std::min<int64_t>(at::get_num_threads(), N);
  auto share = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t lo = total * t / T, hi = total * (t + 1) / T;  // byte range of this share
      int64_t at = 0;
      for (size_t i = 0; i < ws.size(); ++i) {
        const int64_t a = at, b = at + rows[i] * cost[i];
        at = b;
        const int64_t s = std::max(a, lo), e = std::min(b, hi);
        if (s >= e) continue;
        // rows whose first byte lies in [s, e)
        const int64_t r0 = (s - a + cost[i] - 1) / cost[i], r1 = (e - a + cost[i] - 1) / cost[i];
        if (r0 < r1) fns[i](jobs[i], r0, r1);
      }
    }
  };
  if (T == 1) share(0, 1);
  else at::parallel_for(0, T, 1, share);
  return y;
}

at::Tensor block_rows(const at::Tensor& w_, int64_t t, int64_t K, const at::Tensor& ids_) {
  const char* op = "pellucid::block_rows";
  TORCH_CHECK(ids_.scalar_type() == at::kLong, op, ": ids must be int64, got ", dtype_name(ids_.scalar_type()));
  check_weight(op, w_, t, K, 0);
  const int64_t V = w_.size(0), rb = w_.size(1);
  auto ids = ids_.contiguous();
  const int64_t n = ids.numel();
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(K);
  auto y = at::empty(shape, ids.options().dtype(at::kFloat));
  const int64_t* I = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(I[i] >= 0 && I[i] < V, op, ": ids must be in [0, ", V, "), found ", I[i]);
  const uint8_t* W = w_.data_ptr<uint8_t>();
  float* Y = y.data_ptr<float>();
  auto body = [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) dequant_row(t, W + I[i] * rb, K, Y + i * K);
  };
  if (n * K < (1 << 16)) body(0, n);
  else at::parallel_for(0, n, std::max<int64_t>(1, (1 << 15) / K), body);
  return y;
}

// Sum of the bytes of [p, p + n): two sequential streams (the halves), as block_mm reads its weights.
int64_t sum_bytes(const uint8_t* p, int64_t n) {
  const int64_t half = n / 2 / 128 * 128;
  const uint8_t* q = p + half;
  const __m256i z = _mm256_setzero_si256();
  __m256i s0 = z, s1 = z, s2 = z, s3 = z;
  for (int64_t i = 0; i < half; i += 128) {  // sums of bytes per 8-byte lane: cheap, keeps every load live
    _mm_prefetch(reinterpret_cast<const char*>(p + i + 4096), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + i + 4096 + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(q + i + 4096), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(q + i + 4096 + 64), _MM_HINT_T0);
    s0 = _mm256_add_epi64(s0, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)), z));
    s1 = _mm256_add_epi64(s1, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)), z));
    s2 = _mm256_add_epi64(s2, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i)), z));
    s3 = _mm256_add_epi64(s3, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i + 32)), z));
    s0 = _mm256_add_epi64(s0, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)), z));
    s1 = _mm256_add_epi64(s1, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)), z));
    s2 = _mm256_add_epi64(s2, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i + 64)), z));
    s3 = _mm256_add_epi64(s3, _mm256_sad_epu8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i + 96)), z));
  }
  alignas(32) int64_t v[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(v), _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3)));
  int64_t s = v[0] + v[1] + v[2] + v[3];
  for (int64_t i = 2 * half; i < n; ++i) s += p[i];
  return s;
}

int64_t read_bytes(const at::Tensor& buf) {
  TORCH_CHECK(buf.scalar_type() == at::kByte && buf.is_contiguous(), "pellucid::read_bytes: a contiguous uint8 tensor");
  const int64_t n = buf.numel();
  const uint8_t* p = buf.data_ptr<uint8_t>();
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  std::vector<int64_t> part(T, 0);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t a = n * t / T, b = n * (t + 1) / T;
      part[t] = sum_bytes(p + a, b - a);
    }
  });
  int64_t s = 0;
  for (int64_t v : part) s += v;
  return s;
}

std::string cpu_isa() { return isa_name(kIsa); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(pellucid, m) {
  m.def("block_mm(Tensor x, Tensor[] ws, int[] types, Tensor? bias=None, Tensor? out_index=None) -> Tensor");
  m.def("block_rows(Tensor w, int type, int K, Tensor ids) -> Tensor");
  m.def("read_bytes(Tensor buf) -> int");
  m.def("cpu_isa() -> str", &cpu_isa);
}

TORCH_LIBRARY_IMPL(pellucid, CPU, m) {
  m.impl("block_mm", &block_mm);
  m.impl("block_rows", &block_rows);
  m.impl("read_bytes", &read_bytes);
}

#else  // PELLUCID_KERNEL_BODY
// ---------------------------------------------------------------------------------------
// Kernel body: namespace PK_NS, units of PK_WIDTH bits, VPDPWSSD if PK_VNNI.

namespace {
namespace PK_NS {

typedef __m256i iv2;
typedef __m256 fv2;

inline iv2 ldi2(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline __m128i ldi1(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline float hsum2(fv2 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// 32 bytes: 0xFF where bit i of x is set, 0 elsewhere (byte i <- bit i).
inline iv2 bits_to_bytes(uint32_t x) {
  const iv2 t = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x)),
                                    _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                                       0x0303030303030303));
  const iv2 bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  return _mm256_cmpeq_epi8(_mm256_and_si256(t, bit), bit);
}
// four fp16 at p, p + s, p + 2s, p + 3s (the first r; zeros after) as floats
inline __m128 fp16x4(const uint8_t* p, int64_t s, int r) {
  uint16_t h[4] = {0, 0, 0, 0};
  for (int k = 0; k < r; ++k) std::memcpy(h + k, p + k * s, 2);
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(h)));
}

// Q4_K's 6-bit scales and mins of a super-block at p: bytes 0..7 sc[0..7], 8..15 mn[0..7]
inline __m128i q4k_scale_bytes(const uint8_t* p) {
  const uint32_t u0 = load32(p + 4), u1 = load32(p + 8), u2 = load32(p + 12);
  const uint32_t s_lo = u0 & 0x3F3F3F3F, m_lo = u1 & 0x3F3F3F3F;
  const uint32_t s_hi = (u2 & 0x0F0F0F0F) | ((u0 >> 2) & 0x30303030);
  const uint32_t m_hi = ((u2 >> 4) & 0x0F0F0F0F) | ((u1 >> 2) & 0x30303030);
  return _mm_setr_epi32(static_cast<int>(s_lo), static_cast<int>(s_hi), static_cast<int>(m_lo), static_cast<int>(m_hi));
}

#if PK_WIDTH == 512

typedef __m512i iv;
typedef __m512 fv;
constexpr int GPU = 4;  // scale groups per unit: one per 128-bit lane
constexpr int MR = 4;   // activation rows per tile
constexpr int NR = 2;   // weight rows per tile

inline iv ldi(const void* p) { return _mm512_loadu_si512(p); }
inline fv ldf(const float* p) { return _mm512_loadu_ps(p); }
inline fv fzero() { return _mm512_setzero_ps(); }
inline fv fset1(float a) { return _mm512_set1_ps(a); }
inline fv fmul(fv a, fv b) { return _mm512_mul_ps(a, b); }
inline fv ffma(fv a, fv b, fv c) { return _mm512_fmadd_ps(a, b, c); }
inline fv i2f(iv a) { return _mm512_cvtepi32_ps(a); }
inline iv madd(iv w, iv x) { return _mm512_madd_epi16(w, x); }
inline iv iadd(iv a, iv b) { return _mm512_add_epi32(a, b); }
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
// 4 floats -> each over the 4 floats of its lane
inline fv per_lane(__m128 v) {
  return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                               _mm512_castps128_ps512(v));
}
// 16 bytes at p + k s into lane k, for the first r lanes (zeros after)
inline iv lanes16(const uint8_t* p, int64_t s, int r) {
  if (r == 4) {
    const iv a = _mm512_castsi128_si512(ldi1(p));
    const iv b = _mm512_inserti32x4(a, ldi1(p + s), 1);
    const iv c = _mm512_inserti32x4(b, ldi1(p + 2 * s), 2);
    return _mm512_inserti32x4(c, ldi1(p + 3 * s), 3);
  }
  iv v = _mm512_setzero_si512();
  if (r > 0) v = _mm512_inserti32x4(v, ldi1(p), 0);
  if (r > 1) v = _mm512_inserti32x4(v, ldi1(p + s), 1);
  if (r > 2) v = _mm512_inserti32x4(v, ldi1(p + 2 * s), 2);
  return v;
}
// lo / hi: in lane g, the 16 bytes of elements 0..15 / 16..31 of group g (unsigned values) -> operands
inline void widen_u(iv lo, iv hi, iv* W) {
  const iv z = _mm512_setzero_si512();
  W[0] = _mm512_unpacklo_epi8(lo, z);
  W[1] = _mm512_unpackhi_epi8(lo, z);
  W[2] = _mm512_unpacklo_epi8(hi, z);
  W[3] = _mm512_unpackhi_epi8(hi, z);
}
inline iv sext_lo(iv v) { return _mm512_srai_epi16(_mm512_unpacklo_epi8(v, v), 8); }
inline iv sext_hi(iv v) { return _mm512_srai_epi16(_mm512_unpackhi_epi8(v, v), 8); }

// Q4_0 / Q4_1 / Q5_0 / Q8_0: a unit is 4 file blocks of 32 (r of them present).
template <int64_t BB, int64_t QOFF>
inline void nibbles32(const uint8_t* p, int r, iv* W) {
  const iv raw = lanes16(p + QOFF, BB, r), m = _mm512_set1_epi8(0x0F);
  widen_u(_mm512_and_si512(raw, m), _mm512_and_si512(_mm512_srli_epi16(raw, 4), m), W);
}

struct FQ4_0 {
  static constexpr int GS = 32, NOPS = 4, UPC = 1;
  static constexpr int64_t CE = 128, CB = 4 * 18;  // elements, bytes per chunk
  static constexpr bool OFF = true;
  static inline void unit(const uint8_t* p, int, int r, iv* W, fv& dw, fv& mw) {
    nibbles32<18, 2>(p, r, W);
    dw = per_lane(fp16x4(p, 18, r));
    mw = fmul(dw, _mm512_set1_ps(-8.0f));
  }
};
struct FQ4_1 {
  static constexpr int GS = 32, NOPS = 4, UPC = 1;
  static constexpr int64_t CE = 128, CB = 4 * 20;
  static constexpr bool OFF = true;
  static inline void unit(const uint8_t* p, int, int r, iv* W, fv& dw, fv& mw) {
    nibbles32<20, 4>(p, r, W);
    dw = per_lane(fp16x4(p, 20, r));
    mw = per_lane(fp16x4(p + 2, 20, r));
  }
};
struct FQ5_0 {
  static constexpr int GS = 32, NOPS = 4, UPC = 1;
  static constexpr int64_t CE = 128, CB = 4 * 22;
  static constexpr bool OFF = true;
  static inline void unit(const uint8_t* p, int, int r, iv* W, fv& dw, fv& mw) {
    const iv raw = lanes16(p + 6, 22, r), m = _mm512_set1_epi8(0x0F), b5 = _mm512_set1_epi8(0x10);
    uint64_t klo = 0, khi = 0;  // fifth bits: bit 16 g + i of the masks = element i (lo) / 16 + i (hi) of block g
    for (int g = 0; g < r; ++g) {
      const uint32_t qh = load32(p + g * 22 + 2);
      klo |= static_cast<uint64_t>(qh & 0xFFFF) << (16 * g);
      khi |= static_cast<uint64_t>(qh >> 16) << (16 * g);
    }
    const iv l = _mm512_mask_add_epi8(_mm512_and_si512(raw, m), klo, _mm512_and_si512(raw, m), b5);
    const iv h4 = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m);
    const iv h = _mm512_mask_add_epi8(h4, khi, h4, b5);
    widen_u(l, h, W);
    dw = per_lane(fp16x4(p, 22, r));
    mw = fmul(dw, _mm512_set1_ps(-16.0f));
  }
};
struct FQ8_0 {
  static constexpr int GS = 32, NOPS = 4, UPC = 1;
  static constexpr int64_t CE = 128, CB = 4 * 34;
  static constexpr bool OFF = false;
  static inline void unit(const uint8_t* p, int, int r, iv* W, fv& dw, fv&) {
    const iv lo = lanes16(p + 2, 34, r), hi = lanes16(p + 18, 34, r);
    W[0] = sext_lo(lo);
    W[1] = sext_hi(lo);
    W[2] = sext_lo(hi);
    W[3] = sext_hi(hi);
    dw = per_lane(fp16x4(p, 34, r));
  }
};

// K-quant super-blocks: a unit's operands come out multiplied by their sub-block's integer
// scale (q * sc: at most 945 for Q4_K, 4096 for Q6_K, exact in int16), so the integer sums
// run over IPC units and one float step per IPC units scales them by the super-block's d.
// lane g of unit k (element 8g..8g+7 of 32 int16) <- element 4k + g of v
inline iv lanes_of(iv v, int k) {
  const iv idx = _mm512_add_epi16(_mm512_set1_epi16(static_cast<short>(4 * k)),
                                  _mm512_srli_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18,
                                                                     17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3,
                                                                     2, 1, 0),
                                                    3));
  return _mm512_permutexvar_epi16(idx, v);
}

// Q4_K: a chunk is one super-block of 256 (144 bytes), two units of 4 sub-blocks.
struct FQ4_K {
  static constexpr int GS = 32, NOPS = 4, UPC = 2, IPC = 2;
  static constexpr int64_t CE = 256, CB = 144;
  static constexpr bool OFF = true;
  struct Chunk {
    iv sc;   // int16 sc[0..7] in elements 0..7
    fv d;    // d in every lane
    fv mn;   // lanes 8..15: -(dmin * mn[0..7]); lanes 0..7: 0
    const uint8_t* q;
  };
  static inline Chunk begin(const uint8_t* p) {
    const __m128i b = q4k_scale_bytes(p);
    const fv s = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
    return {_mm512_cvtepu8_epi16(_mm256_castsi128_si256(b)), _mm512_set1_ps(fp16(p)),
            _mm512_maskz_mul_ps(0xFF00, s, _mm512_set1_ps(-fp16(p + 2))), p + 16};
  }
  static inline void unit(const Chunk& c, int k, iv* W) {
    const iv raw = ldi(c.q + 64 * k), m = _mm512_set1_epi8(0x0F);
    const iv lo = _mm512_and_si512(raw, m), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m);
    // lo: lanes = sub-blocks A[0:16], A[16:32], C[0:16], C[16:32]; hi the same for B, D
    const iv P = _mm512_permutex2var_epi64(lo, _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), hi);
    const iv Q = _mm512_permutex2var_epi64(lo, _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2), hi);
    widen_u(P, Q, W);
    const iv s = lanes_of(c.sc, k);
    for (int j = 0; j < NOPS; ++j) W[j] = _mm512_mullo_epi16(W[j], s);
  }
};

// Q6_K: a chunk is one super-block of 256 (210 bytes), four units of 4 groups of 16.
struct FQ6_K {
  static constexpr int GS = 16, NOPS = 2, UPC = 4, IPC = 4;
  static constexpr int64_t CE = 256, CB = 210;
  static constexpr bool OFF = false;
  struct Chunk {
    iv sc;  // int16 sc[0..15] in elements 0..15
    fv d, mn;
    const uint8_t* p;
  };
  static inline Chunk begin(const uint8_t* p) {
    return {_mm512_castsi256_si512(_mm256_cvtepi8_epi16(ldi1(p + 192))), _mm512_set1_ps(fp16(p + 208)), fzero(), p};
  }
  static inline void unit(const Chunk& c, int k, iv* W) {
    const int h = k >> 1, hi = k & 1;
    const iv L = ldi(c.p + 64 * h);
    const iv H = _mm512_broadcast_i64x4(ldi2(c.p + 128 + 32 * h));
    const iv m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(0x03);
    // lanes 0, 1: ql bytes 0..31 with qh bits (2 hi) * 2; lanes 2, 3: ql 32..63 with bits 2 + that
    const iv sh = hi ? _mm512_set_epi64(6 * 0x0001000100010001LL, 6 * 0x0001000100010001LL, 6 * 0x0001000100010001LL,
                                        6 * 0x0001000100010001LL, 4 * 0x0001000100010001LL, 4 * 0x0001000100010001LL,
                                        4 * 0x0001000100010001LL, 4 * 0x0001000100010001LL)
                     : _mm512_set_epi64(2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL,
                                        2 * 0x0001000100010001LL, 0, 0, 0, 0);
    const iv nib = hi ? _mm512_and_si512(_mm512_srli_epi16(L, 4), m4) : _mm512_and_si512(L, m4);
    const iv top = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(H, sh), m2), 4);
    const iv q = _mm512_sub_epi8(_mm512_or_si512(nib, top), _mm512_set1_epi8(32));
    const iv s = lanes_of(c.sc, k);
    W[0] = _mm512_mullo_epi16(sext_lo(q), s);
    W[1] = _mm512_mullo_epi16(sext_hi(q), s);
  }
};

#else  // PK_WIDTH == 256: every unit is 2 groups

typedef iv2 iv;
typedef fv2 fv;
constexpr int GPU = 2;
constexpr int MR = 4;
constexpr int NR = 1;

inline iv ldi(const void* p) { return ldi2(p); }
inline fv ldf(const float* p) { return _mm256_loadu_ps(p); }
inline fv fzero() { return _mm256_setzero_ps(); }
inline fv fset1(float a) { return _mm256_set1_ps(a); }
inline fv fmul(fv a, fv b) { return _mm256_mul_ps(a, b); }
inline fv ffma(fv a, fv b, fv c) { return _mm256_fmadd_ps(a, b, c); }
inline fv i2f(iv a) { return _mm256_cvtepi32_ps(a); }
inline iv madd(iv w, iv x) { return _mm256_madd_epi16(w, x); }
inline iv iadd(iv a, iv b) { return _mm256_add_epi32(a, b); }
inline iv dot(iv acc, iv w, iv x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
inline float hsum(fv v) { return hsum2(v); }
inline fv per_lane(__m128 v) {
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}
inline iv lanes16(const uint8_t* p, int64_t s, int r) {
  const __m128i a = ldi1(p);
  return r == 2 ? _mm256_inserti128_si256(_mm256_castsi128_si256(a), ldi1(p + s), 1) : _mm256_zextsi128_si256(a);
}
inline void widen_u(iv lo, iv hi, iv* W) {
  const iv z = _mm256_setzero_si256();
  W[0] = _mm256_unpacklo_epi8(lo, z);
  W[1] = _mm256_unpackhi_epi8(lo, z);
  W[2] = _mm256_unpacklo_epi8(hi, z);
  W[3] = _mm256_unpackhi_epi8(hi, z);
}
inline iv sext_lo(iv v) { return _mm256_srai_epi16(_mm256_unpacklo_epi8(v, v), 8); }
inline iv sext_hi(iv v) { return _mm256_srai_epi16(_mm256_unpackhi_epi8(v, v), 8); }

template <int64_t BB, int64_t QOFF>
inline void nibbles32(const uint8_t* p, int r, iv* W) {
  const iv raw = lanes16(p + QOFF, BB, r), m = _mm256_set1_epi8(0x0F);
  widen_u(_mm256_and_si256(raw, m), _mm256_and_si256(_mm256_srli_epi16(raw, 4), m), W);
}

struct FQ4_0 {
  static constexpr int GS = 32, NOPS = 4, UPC = 1;
  static constexpr int64_t CE = 64, CB = 2 * 18;
  static constexpr bool OFF = true;
  static inline void unit(const uint8_t* p, int, int r, iv* W, fv& dw, fv& mw) {
    nibbles32<18, 2>(p, r, W);
    dw = per_lane(fp16x4(p, 18, r));
    mw = fmul(dw, _mm256_set1_ps(-8.0f));
  }
};
struct FQ4_1 {
  static constexpr int GS = 32, NOPS = 4, UPC = 1;
  static constexpr int64_t CE = 64, CB = 2 * 20;
  static constexpr bool OFF = true;
  static inline void unit(const uint8_t* p, int, int r, iv* W, fv& dw, fv& mw) {
    nibbles32<20, 4>(p, r, W);
    dw = per_lane(fp16x4(p, 20, r));
    mw = per_lane(fp16x4(p + 2, 20, r));
  }
};
struct FQ5_0 {
  static constexpr int GS = 32, NOPS = 4, UPC = 1;
  static constexpr int64_t CE = 64, CB = 2 * 22;
  static constexpr bool OFF = true;
  static inline void unit(const uint8_t* p, int, int r, iv* W, fv& dw, fv& mw) {
    const iv raw = lanes16(p + 6, 22, r), m = _mm256_set1_epi8(0x0F), b5 = _mm256_set1_epi8(0x10);
    const uint32_t qh0 = load32(p + 2), qh1 = r == 2 ? load32(p + 24) : 0;
    const iv blo = _mm256_and_si256(bits_to_bytes((qh0 & 0xFFFF) | (qh1 << 16)), b5);
    const iv bhi = _mm256_and_si256(bits_to_bytes((qh0 >> 16) | (qh1 & 0xFFFF0000u)), b5);
    widen_u(_mm256_or_si256(_mm256_and_si256(raw, m), blo),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m), bhi), W);
    dw = per_lane(fp16x4(p, 22, r));
    mw = fmul(dw, _mm256_set1_ps(-16.0f));
  }
};
struct FQ8_0 {
  static constexpr int GS = 32, NOPS = 4, UPC = 1;
  static constexpr int64_t CE = 64, CB = 2 * 34;
  static constexpr bool OFF = false;
  static inline void unit(const uint8_t* p, int, int r, iv* W, fv& dw, fv&) {
    const iv lo = lanes16(p + 2, 34, r), hi = lanes16(p + 18, 34, r);
    W[0] = sext_lo(lo);
    W[1] = sext_hi(lo);
    W[2] = sext_lo(hi);
    W[3] = sext_hi(hi);
    dw = per_lane(fp16x4(p, 34, r));
  }
};

// K-quant super-blocks (see the AVX-512 path): lane g of unit k holds group 2k + g.
inline iv two_lanes(int16_t a, int16_t b) { return _mm256_setr_m128i(_mm_set1_epi16(a), _mm_set1_epi16(b)); }

struct FQ4_K {
  static constexpr int GS = 32, NOPS = 4, UPC = 4, IPC = 4;
  static constexpr int64_t CE = 256, CB = 144;
  static constexpr bool OFF = true;
  struct Chunk {
    int16_t sc[8];
    fv d, mn;  // d in every lane; -(dmin * mn[0..7])
    const uint8_t* q;
  };
  static inline Chunk begin(const uint8_t* p) {
    Chunk c;
    uint8_t sc[8], mn[8];
    q4k_scales(p + 4, sc, mn);
    const float dmin = fp16(p + 2);
    alignas(32) float m[8];
    for (int j = 0; j < 8; ++j) c.sc[j] = sc[j], m[j] = -(dmin * mn[j]);
    c.d = _mm256_set1_ps(fp16(p));
    c.mn = _mm256_load_ps(m);
    c.q = p + 16;
    return c;
  }
  static inline void unit(const Chunk& c, int k, iv* W) {
    const iv raw = ldi(c.q + 32 * k), m = _mm256_set1_epi8(0x0F);
    const iv lo = _mm256_and_si256(raw, m), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m);
    widen_u(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31), W);
    const iv s = two_lanes(c.sc[2 * k], c.sc[2 * k + 1]);
    for (int j = 0; j < NOPS; ++j) W[j] = _mm256_mullo_epi16(W[j], s);
  }
};

// Q6_K: eight units of 2 groups of 16; sums of four units at most (2^31 / (32 * 4096 * 32767)).
struct FQ6_K {
  static constexpr int GS = 16, NOPS = 2, UPC = 8, IPC = 4;
  static constexpr int64_t CE = 256, CB = 210;
  static constexpr bool OFF = false;
  struct Chunk {
    int16_t sc[16];
    fv d, mn;
    const uint8_t* p;
  };
  static inline Chunk begin(const uint8_t* p) {
    Chunk c;
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    for (int j = 0; j < 16; ++j) c.sc[j] = sc[j];
    c.d = _mm256_set1_ps(fp16(p + 208));
    c.mn = fzero();
    c.p = p;
    return c;
  }
  static inline void unit(const Chunk& c, int k, iv* W) {
    const int h = k >> 2, qq = k & 3;  // half, quarter of the half
    const iv L = ldi(c.p + 64 * h + 32 * (qq & 1));
    const iv H = ldi(c.p + 128 + 32 * h);
    const iv m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
    const iv nib = qq >= 2 ? _mm256_and_si256(_mm256_srli_epi16(L, 4), m4) : _mm256_and_si256(L, m4);
    const iv top = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(H, _mm_cvtsi32_si128(2 * qq)), m2), 4);
    const iv q = _mm256_sub_epi8(_mm256_or_si256(nib, top), _mm256_set1_epi8(32));
    const iv s = two_lanes(c.sc[2 * k], c.sc[2 * k + 1]);
    W[0] = _mm256_mullo_epi16(sext_lo(q), s);
    W[1] = _mm256_mullo_epi16(sext_hi(q), s);
  }
};

#endif

constexpr int L = 4 * GPU;           // float lanes
constexpr int64_t kPrefetch = 4096;  // bytes ahead in a weight stream that software prefetch asks for

// Formats whose chunk is GPU file blocks of 32 decode a unit straight from the row; super-block
// formats read the chunk's scales once (begin) and decode UPC units from them.
template <class F>
struct IsSuper {
  template <class G>
  static auto test(int) -> decltype(G::begin(nullptr), std::true_type());
  template <class>
  static std::false_type test(...);
  static constexpr bool value = decltype(test<F>(0))::value;
};

// One unit of an mr x nr tile: each output's sequence is an integer dot over the unit, one
// convert, one scale product, one fused add (and one more for the offset).
template <class F, int mr, int nr>
__attribute__((always_inline)) inline void unit_step(fv (&acc)[mr][nr], const iv (&W)[nr][F::NOPS],
                                                     const fv (&dw)[nr], const fv (&mw)[nr],
                                                     const int16_t* const* xp, const float* const* xd,
                                                     const float* const* xs, int64_t u) {
  for (int mm = 0; mm < mr; ++mm) {
    const int16_t* x = xp[mm] + u * (GPU * F::GS);
    iv X[F::NOPS];
    for (int j = 0; j < F::NOPS; ++j) X[j] = ldi(x + j * (8 * GPU));
    const fv dxm = ldf(xd[mm] + u * L);
    fv sxm = fzero();
    if constexpr (F::OFF) sxm = ldf(xs[mm] + u * L);
    for (int nn = 0; nn < nr; ++nn) {
      iv s;  // exact integer sums: two short chains instead of one long one, the same result
      if constexpr (F::NOPS == 4) s = iadd(dot(madd(W[nn][0], X[0]), W[nn][1], X[1]), dot(madd(W[nn][2], X[2]), W[nn][3], X[3]));
      else s = iadd(madd(W[nn][0], X[0]), madd(W[nn][1], X[1]));
      acc[mm][nn] = ffma(i2f(s), fmul(dw[nn], dxm), acc[mm][nn]);
      if constexpr (F::OFF) acc[mm][nn] = ffma(mw[nn], sxm, acc[mm][nn]);
    }
  }
}

// Chunk c of a K-quant super-block format in an mr x nr tile, its units' operands from
// get(nn, k, W): exact int32 sums over IPC units, then per output one convert, one scale
// product (d * dx) and one fused add; with an offset, one more fused add per chunk for
// sum_j mn_j * (dx * sum of group j's xq).
template <class F, int mr, int nr, class Get>
__attribute__((always_inline)) inline void super_step(fv (&acc)[mr][nr], Get get, const fv (&dc)[nr],
                                                      const fv (&mn)[nr], const int16_t* const* xp,
                                                      const float* const* xd, const float* const* xs, int64_t c) {
  // independent integer chains per output: enough in flight to hide the dot's latency
  constexpr int CH = mr * nr >= 8 ? 1 : mr * nr >= 4 ? 2 : 4;
  for (int h = 0; h < F::UPC; h += F::IPC) {
    iv ia[mr][nr][CH];
    for (int k = h; k < h + F::IPC; ++k) {
      iv W[nr][F::NOPS];
      for (int nn = 0; nn < nr; ++nn) get(nn, k, W[nn]);
      const int64_t u = c * F::UPC + k;
      for (int mm = 0; mm < mr; ++mm) {
        const int16_t* x = xp[mm] + u * (GPU * F::GS);
        iv X[F::NOPS];
        for (int j = 0; j < F::NOPS; ++j) X[j] = ldi(x + j * (8 * GPU));
        for (int nn = 0; nn < nr; ++nn)
          for (int j = 0; j < F::NOPS; ++j) {
            const int t = (k - h) * F::NOPS + j;  // the t-th dot of this sum, on chain t % CH
            ia[mm][nn][t % CH] = t < CH ? madd(W[nn][j], X[j]) : dot(ia[mm][nn][t % CH], W[nn][j], X[j]);
          }
      }
    }
    for (int mm = 0; mm < mr; ++mm) {
      const fv dx = fset1(xd[mm][c]);
      for (int nn = 0; nn < nr; ++nn) {
        iv s = ia[mm][nn][0];  // exact: the same sum whatever the chains
        for (int t = 1; t < CH; ++t) s = iadd(s, ia[mm][nn][t]);
        acc[mm][nn] = ffma(i2f(s), fmul(dc[nn], dx), acc[mm][nn]);
      }
    }
  }
  if constexpr (F::OFF)
    for (int mm = 0; mm < mr; ++mm) {
      const fv sx = ldf(xs[mm] + c * L);
      for (int nn = 0; nn < nr; ++nn) acc[mm][nn] = ffma(mn[nn], sx, acc[mm][nn]);
    }
}

// Chunk c of an mr x nr tile (r of its file blocks present: 32-formats only).
template <class F, int mr, int nr, bool PF>
__attribute__((always_inline)) inline void chunk_step(fv (&acc)[mr][nr], const uint8_t* const* wp,
                                                      const int16_t* const* xp, const float* const* xd,
                                                      const float* const* xs, int64_t c, int r) {
  const uint8_t* p[nr];
  for (int nn = 0; nn < nr; ++nn) {
    p[nn] = wp[nn] + c * F::CB;
    if constexpr (PF)  // decode reads the weights once, from memory: ask for them ahead
      for (int64_t o = 0; o < F::CB; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(p[nn] + kPrefetch + o), _MM_HINT_T0);
  }
  if constexpr (IsSuper<F>::value) {
    typename F::Chunk ch[nr];
    fv dc[nr], mn[nr];
    for (int nn = 0; nn < nr; ++nn) ch[nn] = F::begin(p[nn]), dc[nn] = ch[nn].d, mn[nn] = ch[nn].mn;
    super_step<F, mr, nr>(acc, [&](int nn, int k, iv* W) { F::unit(ch[nn], k, W); }, dc, mn, xp, xd, xs, c);
  } else {
    iv W[nr][F::NOPS];
    fv dw[nr], mw[nr];
    for (int nn = 0; nn < nr; ++nn) F::unit(p[nn], 0, r, W[nn], dw[nn], mw[nn]);
    unit_step<F, mr, nr>(acc, W, dw, mw, xp, xd, xs, c);
  }
}

template <int mr, int nr>
__attribute__((always_inline)) inline void store_tile(const Job& J, fv (&acc)[mr][nr], int64_t m0, const int64_t* n) {
  for (int nn = 0; nn < nr; ++nn) {
    const int64_t col = J.col ? J.col[n[nn]] : J.col0 + n[nn];
    const float b = J.bias ? J.bias[col] : 0.0f;
    for (int mm = 0; mm < mr; ++mm) {
      const float s = hsum(acc[mm][nn]);
      J.y[(m0 + mm) * J.ldy + col] = J.bias ? s + b : s;
    }
  }
}

template <int mr>
__attribute__((always_inline)) inline void act_rows(const Job& J, int64_t m0, const int16_t** xp, const float** xd,
                                                    const float** xs) {
  for (int mm = 0; mm < mr; ++mm) {
    xp[mm] = J.xq + (m0 + mm) * J.KP, xd[mm] = J.dxl + (m0 + mm) * J.LP;
    xs[mm] = J.sxl ? J.sxl + (m0 + mm) * J.LP : nullptr;
  }
}

// Outputs y[m0 + i, n0 + j * ns] for i < mr, j < nr, decoding the weights from the row itself.
template <class F, int mr, int nr, bool PF>
void tile(const Job& J, int64_t m0, int64_t n0, int64_t ns) {
  const uint8_t* wp[nr];
  const int16_t* xp[mr];
  const float* xd[mr];
  const float* xs[mr];
  int64_t n[nr];
  for (int nn = 0; nn < nr; ++nn) n[nn] = n0 + nn * ns, wp[nn] = J.w + n[nn] * J.wrow;
  act_rows<mr>(J, m0, xp, xd, xs);
  fv acc[mr][nr];
  for (int mm = 0; mm < mr; ++mm)
    for (int nn = 0; nn < nr; ++nn) acc[mm][nn] = fzero();
  const int64_t full = J.K / F::CE;
  const int rem = static_cast<int>((J.K % F::CE) / 32);  // 32-formats only: blocks in the last chunk
  for (int64_t c = 0; c < full; ++c) chunk_step<F, mr, nr, PF>(acc, wp, xp, xd, xs, c, GPU);
  if (rem) chunk_step<F, mr, nr, false>(acc, wp, xp, xd, xs, full, rem);
  store_tile<mr, nr>(J, acc, m0, n);
}

// Weight rows [n0, n1) against activation rows [m0, m0 + mr). A tile's nr weight rows are
// taken from nr equal parts of the range, so the weights are read as nr sequential streams.
template <class F, int mr, int nr, bool PF>
void rows(const Job& J, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t part = (n1 - n0) / nr;
  for (int64_t i = 0; i < part; ++i) tile<F, mr, nr, PF>(J, m0, n0 + i, part);
  for (int64_t n = n0 + nr * part; n < n1; ++n) tile<F, mr, 1, PF>(J, m0, n, 1);
}

// Many activation rows: a block of weight rows is decoded once into a panel of ready
// operands (int16 in unit order and their scales), which every tile of activation rows
// then reads from cache. The arithmetic after decoding is the same as for a few rows, so a
// row's result is the same bits either way. Panel entries: per unit of a 32-format its
// operands, dw and mw; per chunk of a super-block format its units' operands, d and mn.
template <class F>
constexpr int64_t panel_entry() {  // bytes of one decoded unit (32-formats) or chunk (super-blocks)
  if constexpr (IsSuper<F>::value) return (F::UPC * F::NOPS + 2) * static_cast<int64_t>(sizeof(iv));
  else return (F::NOPS + (F::OFF ? 2 : 1)) * static_cast<int64_t>(sizeof(iv));
}

template <class F>
void decode_rows(const Job& J, int64_t n0, int64_t n1, int64_t E, char* panel) {
  const int64_t S = panel_entry<F>();
  const int64_t full = J.K / F::CE;
  const int rem = static_cast<int>((J.K % F::CE) / 32);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = J.w + n * J.wrow;
    char* out = panel + (n - n0) * E * S;
    if constexpr (IsSuper<F>::value) {
      for (int64_t c = 0; c < full; ++c) {
        const typename F::Chunk ch = F::begin(w + c * F::CB);
        iv* o = reinterpret_cast<iv*>(out + c * S);
        for (int k = 0; k < F::UPC; ++k) {
          iv W[F::NOPS];
          F::unit(ch, k, W);
          for (int j = 0; j < F::NOPS; ++j) std::memcpy(o + k * F::NOPS + j, &W[j], sizeof(iv));
        }
        std::memcpy(o + F::UPC * F::NOPS, &ch.d, sizeof(fv));
        std::memcpy(o + F::UPC * F::NOPS + 1, &ch.mn, sizeof(fv));
      }
    } else {
      auto put = [&](int64_t c, int r) {
        char* o = out + c * S;
        iv W[F::NOPS];
        fv dw = fzero(), mw = fzero();
        F::unit(w + c * F::CB, 0, r, W, dw, mw);
        for (int j = 0; j < F::NOPS; ++j) std::memcpy(o + j * sizeof(iv), &W[j], sizeof(iv));
        std::memcpy(o + F::NOPS * sizeof(iv), &dw, sizeof(fv));
        if constexpr (F::OFF) std::memcpy(o + (F::NOPS + 1) * sizeof(iv), &mw, sizeof(fv));
      };
      for (int64_t c = 0; c < full; ++c) put(c, GPU);
      if (rem) put(full, rem);
    }
  }
}

// A panel tile's weight rows (n0 + r + j: their outputs, pp: their entries) and zero sums.
template <int mr, int nr>
__attribute__((always_inline)) inline void panel_tile_start(const char* panel, int64_t row_bytes, int64_t n0, int64_t r,
                                                            int64_t* n, const char** pp, fv (&acc)[mr][nr]) {
  for (int nn = 0; nn < nr; ++nn) n[nn] = n0 + r + nn, pp[nn] = panel + (r + nn) * row_bytes;
  for (int mm = 0; mm < mr; ++mm)
    for (int nn = 0; nn < nr; ++nn) acc[mm][nn] = fzero();
}

// Outputs y[m0 + i, n0 + r + j] for i < mr, j < nr from the panel of rows n0...
template <class F, int mr, int nr>
void panel_tile(const Job& J, const char* panel, int64_t E, int64_t n0, int64_t r, int64_t m0) {
  const int64_t S = panel_entry<F>();
  const int16_t* xp[mr];
  const float* xd[mr];
  const float* xs[mr];
  act_rows<mr>(J, m0, xp, xd, xs);
  int64_t n[nr];
  const char* pp[nr];
  fv acc[mr][nr];
  panel_tile_start<mr, nr>(panel, E * S, n0, r, n, pp, acc);
  for (int64_t e = 0; e < E; ++e) {
    if constexpr (IsSuper<F>::value) {
      const iv* q[nr];
      fv dc[nr], mn[nr];
      for (int nn = 0; nn < nr; ++nn) {
        q[nn] = reinterpret_cast<const iv*>(pp[nn] + e * S);
        dc[nn] = ldf(reinterpret_cast<const float*>(q[nn] + F::UPC * F::NOPS));
        mn[nn] = F::OFF ? ldf(reinterpret_cast<const float*>(q[nn] + F::UPC * F::NOPS + 1)) : fzero();
      }
      auto get = [&](int nn, int k, iv* W) {
        for (int j = 0; j < F::NOPS; ++j) W[j] = ldi(q[nn] + k * F::NOPS + j);
      };
      super_step<F, mr, nr>(acc, get, dc, mn, xp, xd, xs, e);
    } else {
      iv W[nr][F::NOPS];
      fv dw[nr], mw[nr];
      for (int nn = 0; nn < nr; ++nn) {
        const char* q = pp[nn] + e * S;
        for (int j = 0; j < F::NOPS; ++j) W[nn][j] = ldi(q + j * sizeof(iv));
        dw[nn] = ldf(reinterpret_cast<const float*>(q + F::NOPS * sizeof(iv)));
        if constexpr (F::OFF) mw[nn] = ldf(reinterpret_cast<const float*>(q + (F::NOPS + 1) * sizeof(iv)));
        else mw[nn] = fzero();
      }
      unit_step<F, mr, nr>(acc, W, dw, mw, xp, xd, xs, e);
    }
  }
  store_tile<mr, nr>(J, acc, m0, n);
}

inline char* panel_buffer(int64_t bytes) {  // one per thread, grown as needed, 64-byte aligned
  thread_local std::vector<char> buf;
  if (static_cast<int64_t>(buf.size()) < bytes + 64) buf.resize(bytes + 64);
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<char*>((p + 63) / 64 * 64);
}

// Weight rows [n_begin, n_end) in blocks of nb rows (a multiple of NR): each block decoded
// into a panel of `entry` bytes per row (decode(b0, b1, panel)), then every tile of MR
// activation rows passes over it (tile(mr, nr, panel, b0, r, m0), mr and nr as
// std::integral_constant).
template <class Decode, class Tile>
void panel_pass(const Job& J, int64_t n_begin, int64_t n_end, int64_t nb, int64_t entry, Decode decode, Tile tile) {
  using std::integral_constant;
  char* panel = panel_buffer(nb * entry);
  for (int64_t b0 = n_begin; b0 < n_end; b0 += nb) {
    const int64_t b1 = b0 + nb < n_end ? b0 + nb : n_end;
    decode(b0, b1, panel);
    for (int64_t m0 = 0; m0 < J.M; m0 += MR) {
      const int64_t left = J.M - m0;
      const int mr = left >= MR ? MR : static_cast<int>(left);
      int64_t r = 0;
      for (; r + NR <= b1 - b0; r += NR) {
        switch (mr) {
          case 1: tile(integral_constant<int, 1>(), integral_constant<int, NR>(), panel, b0, r, m0); break;
          case 2: tile(integral_constant<int, 2>(), integral_constant<int, NR>(), panel, b0, r, m0); break;
          case 3: tile(integral_constant<int, 3>(), integral_constant<int, NR>(), panel, b0, r, m0); break;
          default: tile(integral_constant<int, MR>(), integral_constant<int, NR>(), panel, b0, r, m0); break;
        }
      }
      for (; r < b1 - b0; ++r) {
        switch (mr) {
          case 1: tile(integral_constant<int, 1>(), integral_constant<int, 1>(), panel, b0, r, m0); break;
          case 2: tile(integral_constant<int, 2>(), integral_constant<int, 1>(), panel, b0, r, m0); break;
          case 3: tile(integral_constant<int, 3>(), integral_constant<int, 1>(), panel, b0, r, m0); break;
          default: tile(integral_constant<int, MR>(), integral_constant<int, 1>(), panel, b0, r, m0); break;
        }
      }
    }
  }
}

// Weight rows in L2-sized blocks (~256 KiB, a multiple of 8 rows) for the passes below.
inline int64_t l2_block_rows(const Job& J) {
  const int64_t nb = (int64_t{256} << 10) / J.wrow;
  return nb < 8 ? 8 : nb - nb % 8;
}

// Weight rows [n_begin, n_end) in blocks of nb rows, every tile of MR activation rows passing
// over each block in turn (rows_of(mr, m0, b0, b1), mr as std::integral_constant): the weights
// are decoded in registers by each tile and stay in L2 between the tiles.
template <class Rows>
void blocked_pass(const Job& J, int64_t n_begin, int64_t n_end, int64_t nb, Rows rows_of) {
  using std::integral_constant;
  for (int64_t b0 = n_begin; b0 < n_end; b0 += nb) {
    const int64_t b1 = b0 + nb < n_end ? b0 + nb : n_end;
    for (int64_t m0 = 0; m0 < J.M; m0 += MR) {
      const int64_t left = J.M - m0;
      switch (left >= MR ? MR : left) {
        case 1: rows_of(integral_constant<int, 1>(), m0, b0, b1); break;
        case 2: rows_of(integral_constant<int, 2>(), m0, b0, b1); break;
        case 3: rows_of(integral_constant<int, 3>(), m0, b0, b1); break;
        default: rows_of(integral_constant<int, MR>(), m0, b0, b1); break;
      }
    }
  }
}

// Activation rows from which a block of short weight rows is worth decoding once into a
// panel; below it every tile of MR rows decodes the weights in registers. Measured on the
// 2-core AVX-512 host (all of a model's block matmuls, int16 activations): at 4 rows the
// panel took 1.9-2.3x the time of one pass in registers (SmolLM2 Q4_1 10.9 -> 5.9 ms,
// Qwen2.5 1.5B Q4_K/Q6_K 76-91 -> 36-42 ms), at 8 rows 1.3-1.4x, at 16 1.05-1.2x; at 32
// they were even and from 64 on the panel was faster (1.5B: 459 against 474 ms).
constexpr int64_t kPanelRows = 32;

// Weight rows [n_begin, n_end). Up to MR activation rows (decode): one pass over the weights,
// from memory, with software prefetch ahead. More: blocks of weight rows (~256 KiB) that stay
// in L2 while every tile of MR activation rows passes over them, decoded in registers by
// each tile, or, from kPanelRows rows on and when their rows are short, decoded once into a
// panel (measured: faster for K up to ~2,000, slower for K = 8,960).
template <class F>
void run(const Job& J, int64_t n_begin, int64_t n_end) {
  switch (J.M) {
    case 1: return rows<F, 1, NR, true>(J, 0, n_begin, n_end);
    case 2: return rows<F, 2, NR, true>(J, 0, n_begin, n_end);
    case 3: return rows<F, 3, NR, true>(J, 0, n_begin, n_end);
    case MR: return rows<F, MR, NR, true>(J, 0, n_begin, n_end);
    default: break;
  }
  const int64_t S = panel_entry<F>(), E = IsSuper<F>::value ? J.K / F::CE : J.KP / (GPU * F::GS);
  if (J.M < kPanelRows || E * S > (int64_t{8} << 10)) {  // few rows, or long ones (decoded rows would crowd L2)
    return blocked_pass(J, n_begin, n_end, l2_block_rows(J), [&](auto mr, int64_t m0, int64_t b0, int64_t b1) {
      rows<F, decltype(mr)::value, NR, false>(J, m0, b0, b1);
    });
  }
  int64_t nb = (int64_t{256} << 10) / (E * S);
  panel_pass(
      J, n_begin, n_end, nb < 2 ? 2 : nb - nb % 2, E * S,
      [&](int64_t b0, int64_t b1, char* panel) { decode_rows<F>(J, b0, b1, E, panel); },
      [&](auto mr, auto nr, const char* panel, int64_t b0, int64_t r, int64_t m0) {
        panel_tile<F, decltype(mr)::value, decltype(nr)::value>(J, panel, E, b0, r, m0);
      });
}

void q4_0(const Job& J, int64_t n0, int64_t n1) { run<FQ4_0>(J, n0, n1); }
void q4_1(const Job& J, int64_t n0, int64_t n1) { run<FQ4_1>(J, n0, n1); }
void q5_0(const Job& J, int64_t n0, int64_t n1) { run<FQ5_0>(J, n0, n1); }
void q8_0(const Job& J, int64_t n0, int64_t n1) { run<FQ8_0>(J, n0, n1); }
void q4_k(const Job& J, int64_t n0, int64_t n1) { run<FQ4_K>(J, n0, n1); }
void q6_k(const Job& J, int64_t n0, int64_t n1) { run<FQ6_K>(J, n0, n1); }

#if PK_VNNI
// ---- K-quant super-blocks on 8-bit activations (VPDPBUSD: 64 byte products an instruction,
// twice VPDPWSSD's). Operand t (of 4) of a super-block holds in int32 lane l the 4 values
// 16 l + 4 t .. 16 l + 4 t + 3, so lane l sums group l of 16 over the 4 operands and one
// scale per lane follows: per output and super-block, isum_l = sum q * xq over group l
// exactly in int32 (unsigned q: Q4_K's 0..15, Q6_K's 0..63 less 32 * sum xq, subtracted
// exactly), then acc += float(isum) * ((d * sc_l) * dx) and for Q4_K acc += -(dmin * mn_l)
// * (dx * sum xq); lanes summed once at the end. Weight rows are decoded into this order
// once, into a panel, for any number of activation rows, so a row's result is the same bits
// batched or alone.

// operand t from the two register pairs holding groups 0..7 (a0, b0) and 8..15 (a1, b1)
inline iv gather_groups(iv a0, iv b0, iv a1, iv b1, iv idx) {
  return _mm512_mask_blend_epi32(0xFF00, _mm512_permutex2var_epi32(a0, idx, b0), _mm512_permutex2var_epi32(a1, idx, b1));
}

// where group l % 8 of a register pair starts (dword index of permutex2var), plus t
inline iv group_index(const int (&base)[8], int t) {
  alignas(64) int idx[16];
  for (int l = 0; l < 16; ++l) idx[l] = base[l % 8] + t;
  return _mm512_load_si512(idx);
}

struct A8Q4_K {
  static constexpr int64_t CB = 144;
  static constexpr bool OFF = true;
  // q bytes 0..63: low nibbles sub-blocks 0, 2 (groups 0, 1, 4, 5), high nibbles 1, 3 (2, 3, 6, 7)
  static inline void decode(const uint8_t* p, iv* W, fv* dsc, fv* mn) {
    static constexpr int base[8] = {0, 4, 16, 20, 8, 12, 24, 28};
    const iv m = _mm512_set1_epi8(0x0F), r0 = ldi(p + 16), r1 = ldi(p + 80);
    const iv lo0 = _mm512_and_si512(r0, m), hi0 = _mm512_and_si512(_mm512_srli_epi16(r0, 4), m);
    const iv lo1 = _mm512_and_si512(r1, m), hi1 = _mm512_and_si512(_mm512_srli_epi16(r1, 4), m);
    for (int t = 0; t < 4; ++t) W[t] = gather_groups(lo0, hi0, lo1, hi1, group_index(base, t));
    const __m128i b = q4k_scale_bytes(p);
    const __m128i sc = _mm_shuffle_epi8(b, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
    const __m128i mi = _mm_shuffle_epi8(b, _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15));
    *dsc = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)), _mm512_set1_ps(fp16(p)));
    *mn = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mi)), _mm512_set1_ps(-fp16(p + 2)));
  }
};

struct A8Q6_K {
  static constexpr int64_t CB = 210;
  static constexpr bool OFF = false;
  // half h: ql 64h..64h+63 and qh 32h..32h+31 give values 128h + 0..63 (groups 8h + 0..3) and
  // 128h + 64..127 (8h + 4..7)
  static inline void decode(const uint8_t* p, iv* W, fv* dsc, fv*) {
    static constexpr int base[8] = {0, 4, 8, 12, 16, 20, 24, 28};
    const iv m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(0x30);
    const iv up = _mm512_set_epi64(2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL,
                                   2 * 0x0001000100010001LL, 4 * 0x0001000100010001LL, 4 * 0x0001000100010001LL,
                                   4 * 0x0001000100010001LL, 4 * 0x0001000100010001LL);
    const iv dn = _mm512_set_epi64(2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL,
                                   2 * 0x0001000100010001LL, 0, 0, 0, 0);
    iv lo[2], hi[2];
    for (int h = 0; h < 2; ++h) {
      const iv L = ldi(p + 64 * h), H = _mm512_broadcast_i64x4(ldi2(p + 128 + 32 * h));
      // bits 4, 5 of each byte: qh bits 0, 1 (first 32 bytes) or 2, 3 (last 32); then 4, 5 or 6, 7
      lo[h] = _mm512_or_si512(_mm512_and_si512(L, m4), _mm512_and_si512(_mm512_sllv_epi16(H, up), m2));
      hi[h] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), m4), _mm512_and_si512(_mm512_srlv_epi16(H, dn), m2));
    }
    for (int t = 0; t < 4; ++t) W[t] = gather_groups(lo[0], hi[0], lo[1], hi[1], group_index(base, t));
    *dsc = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ldi1(p + 192))), _mm512_set1_ps(fp16(p + 208)));
  }
};

template <class F>
constexpr int64_t entry8() {  // bytes of one decoded super-block: 4 operands, d * sc (and the mins)
  return (4 + 1 + (F::OFF ? 1 : 0)) * static_cast<int64_t>(sizeof(iv));
}

template <class F>
void decode_rows8(const Job& J, int64_t n0, int64_t n1, int64_t E, char* panel) {
  const int64_t S = entry8<F>();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = J.w + n * J.wrow;
    for (int64_t c = 0; c < E; ++c) {
      const uint8_t* p = w + c * F::CB;
      for (int64_t o = 0; o < F::CB; o += 64)  // the file's bytes are read once: ask for them ahead
        _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch + o), _MM_HINT_T0);
      iv* o = reinterpret_cast<iv*>(panel + ((n - n0) * E + c) * S);
      iv W[4];
      fv dsc, mn = fzero();
      F::decode(p, W, &dsc, &mn);
      for (int t = 0; t < 4; ++t) _mm512_store_si512(o + t, W[t]);
      _mm512_store_ps(reinterpret_cast<float*>(o + 4), dsc);
      if constexpr (F::OFF) _mm512_store_ps(reinterpret_cast<float*>(o + 5), mn);
    }
  }
}

// Activation rows m0 .. m0 + mr of a call's 8-bit activations (see prep_row8).
template <int mr>
struct Acts8 {
  const int8_t* xp[mr];
  const float* xd[mr];
  const int32_t* xg[mr];
  const float* xs[mr];
  Acts8(const Job& J, int64_t m0) {
    for (int mm = 0; mm < mr; ++mm) {
      const int64_t m = m0 + mm;
      xp[mm] = J.xb + m * J.K, xd[mm] = J.xbd + m * (J.K / 256), xg[mm] = J.xbg + m * (J.K / 16);
      xs[mm] = J.xbs + m * (J.K / 16);
    }
  }
};

// Super-block e of an mr x nr tile, operand t of weight row nn from w(nn, t).
template <class F, int mr, int nr, class Get>
__attribute__((always_inline)) inline void sb_step8(fv (&acc)[mr][nr], Get w, const fv (&dsc)[nr], const fv (&mn)[nr],
                                                    const Acts8<mr>& xa, int64_t e) {
  for (int mm = 0; mm < mr; ++mm) {
    const int8_t* x = xa.xp[mm] + 256 * e;
    iv X[4];
    for (int t = 0; t < 4; ++t) X[t] = ldi(x + 64 * t);
    const fv dx = fset1(xa.xd[mm][e]);
    const fv sx = F::OFF ? ldf(xa.xs[mm] + 16 * e) : fzero();
    const iv g = F::OFF ? _mm512_setzero_si512() : ldi(xa.xg[mm] + 16 * e);
    for (int nn = 0; nn < nr; ++nn) {
      iv s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w(nn, 0), X[0]);
      for (int t = 1; t < 4; ++t) s = _mm512_dpbusd_epi32(s, w(nn, t), X[t]);
      if constexpr (!F::OFF) s = _mm512_sub_epi32(s, g);
      acc[mm][nn] = ffma(i2f(s), fmul(dsc[nn], dx), acc[mm][nn]);
      if constexpr (F::OFF) acc[mm][nn] = ffma(mn[nn], sx, acc[mm][nn]);
    }
  }
}

// Outputs y[m0 + i, n0 + r + j] for i < mr, j < nr from the panel of rows n0...
template <class F, int mr, int nr>
void panel_tile8(const Job& J, const char* panel, int64_t E, int64_t n0, int64_t r, int64_t m0) {
  const int64_t S = entry8<F>();
  const Acts8<mr> xa(J, m0);
  int64_t n[nr];
  const char* pp[nr];
  fv acc[mr][nr];
  panel_tile_start<mr, nr>(panel, E * S, n0, r, n, pp, acc);
  for (int64_t e = 0; e < E; ++e) {
    const iv* q[nr];
    fv dsc[nr], mn[nr];
    for (int nn = 0; nn < nr; ++nn) {
      q[nn] = reinterpret_cast<const iv*>(pp[nn] + e * S);
      dsc[nn] = _mm512_load_ps(reinterpret_cast<const float*>(q[nn] + 4));
      mn[nn] = F::OFF ? _mm512_load_ps(reinterpret_cast<const float*>(q[nn] + 5)) : fzero();
    }
    sb_step8<F, mr, nr>(acc, [&](int nn, int t) { return _mm512_load_si512(q[nn] + t); }, dsc, mn, xa, e);
  }
  store_tile<mr, nr>(J, acc, m0, n);
}

// Outputs y[m0 + i, n0 + j * ns] for i < mr, j < nr, decoding the weights from the rows
// themselves into registers: the same sequence per output as panel_tile8, so the same bits.
template <class F, int mr, int nr>
void tile8(const Job& J, int64_t m0, int64_t n0, int64_t ns) {
  const int64_t E = J.K / 256;
  const Acts8<mr> xa(J, m0);
  int64_t n[nr];
  const uint8_t* wp[nr];
  for (int nn = 0; nn < nr; ++nn) n[nn] = n0 + nn * ns, wp[nn] = J.w + n[nn] * J.wrow;
  fv acc[mr][nr];
  for (int mm = 0; mm < mr; ++mm)
    for (int nn = 0; nn < nr; ++nn) acc[mm][nn] = fzero();
  for (int64_t e = 0; e < E; ++e) {
    iv W[nr][4];
    fv dsc[nr], mn[nr];
    for (int nn = 0; nn < nr; ++nn) {
      const uint8_t* p = wp[nn] + e * F::CB;
      for (int64_t o = 0; o < F::CB; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch + o), _MM_HINT_T0);
      mn[nn] = fzero();
      F::decode(p, W[nn], &dsc[nn], &mn[nn]);
    }
    sb_step8<F, mr, nr>(acc, [&](int nn, int t) { return W[nn][t]; }, dsc, mn, xa, e);
  }
  store_tile<mr, nr>(J, acc, m0, n);
}

// Weight rows [n0, n1) against activation rows [m0, m0 + mr), decoded in registers; a tile's
// NR weight rows come from NR equal parts of the range (NR sequential streams).
template <class F, int mr>
void rows8(const Job& J, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t part = (n1 - n0) / NR;
  for (int64_t i = 0; i < part; ++i) tile8<F, mr, NR>(J, m0, n0 + i, part);
  for (int64_t r = n0 + NR * part; r < n1; ++r) tile8<F, mr, 1>(J, m0, r, 1);
}

// 8-bit activations' panels pay off sooner (the 1.5B's block matmuls at 16 rows: 92-94 ms
// with panels against 96-97 in registers; at 8 rows 59 against 50-52; at 4, 41-42 against 28).
constexpr int64_t kPanelRows8 = 16;

// Weight rows [n_begin, n_end), any number of activation rows, as run() for 16 bits: up to MR
// (decode), one pass over the weights from memory, decoded into registers; fewer than
// kPanelRows8, blocks of weight rows (~256 KiB, in L2) that every tile of MR activation rows
// decodes in registers; more, each block decoded once into a panel that every tile reads.
template <class F>
void run8(const Job& J, int64_t n_begin, int64_t n_end) {
  const int64_t E = J.K / 256;
  if (J.M < kPanelRows8) {  // up to MR rows: the whole range is one block (one pass from memory)
    const int64_t nb = J.M <= MR ? std::max<int64_t>(1, n_end - n_begin) : l2_block_rows(J);
    return blocked_pass(J, n_begin, n_end, nb, [&](auto mr, int64_t m0, int64_t b0, int64_t b1) {
      rows8<F, decltype(mr)::value>(J, m0, b0, b1);
    });
  }
  int64_t nb = (int64_t{256} << 10) / (E * entry8<F>());
  nb = nb < NR ? NR : nb - nb % NR;
  panel_pass(
      J, n_begin, n_end, nb, E * entry8<F>(),
      [&](int64_t b0, int64_t b1, char* panel) { decode_rows8<F>(J, b0, b1, E, panel); },
      [&](auto mr, auto nr, const char* panel, int64_t b0, int64_t r, int64_t m0) {
        panel_tile8<F, decltype(mr)::value, decltype(nr)::value>(J, panel, E, b0, r, m0);
      });
}

void q4_k8(const Job& J, int64_t n0, int64_t n1) { run8<A8Q4_K>(J, n0, n1); }
void q6_k8(const Job& J, int64_t n0, int64_t n1) { run8<A8Q6_K>(J, n0, n1); }
#endif  // PK_VNNI

}  // namespace PK_NS
}  // namespace

#endif  // PELLUCID_KERNEL_BODY
