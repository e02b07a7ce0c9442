// pellucid's fused CPU ops for the forward pass (float32 activations, AVX2 + FMA).
//
// Each op is the fused form of a reference composition in pellucid.models (layers.py,
// gemma3.py) and engine/kv_cache.py, used on the hot path when no hook is attached:
//
//   pellucid::rms_norm(x (..., E), w (E,), eps, offset) -> (..., E)
//       y = x * rsqrt(mean(x^2) + eps) * (offset + w)       offset 0: Llama, 1: Gemma
//   pellucid::add_rms_norm(residual (..., E) f32, x (..., E), w, eps, offset) -> (..., E)
//       residual += x (in place), then rms_norm(residual)
//   pellucid::glu(gu (..., 2F), act) -> (..., F)
//       act(gate) * up with gu = [gate | up]; act 0: SiLU, 1: GELU (tanh approximation)
//   pellucid::apply_bitmask(logits (B, V) f32, bits (B, W) int32, fill) -> (masked, alive (B,) bool)
//       a grammar's bitmask applied in one pass: token v kept where bit v % 32 of word v / 32
//       is set, else fill; alive: the row kept a value above fill
//   pellucid::attention(qkv (B, T, (H + 2K) D), k_cache, v_cache (S, K, Lmax, D) f32/bf16/f16,
//                       slots (B,), pos (B, T), cos, sin (P, D/2), H, K, scale, window,
//                       q_norm?, k_norm? (D,), norm_eps, norm_offset) -> (B, T, H D)
//       per token: optional per-head RMSNorm of q and k, rotary (rotate-half layout), k and
//       v written at cache[slots[b], :, pos[b, t]]; then per query head, softmax attention
//       over cache positions j <= pos (and pos - j < window when window > 0), GQA.
//
// Row invariance: every output row (a token's norm, a (b, t, h) attention head) is computed
// by one code path with one summation order that depends only on that row's own sizes and
// positions, never on B, T, the thread or the other rows, so batching, chunked prefill and
// decode give the same bits. Threads split whole rows; no reduction is split across them.
// The file is built with -ffp-contract=off: FMAs are written out where they are wanted.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kMaxHeadDim = 1024;
// Work below which an op runs on the calling thread (elements, or multiply-adds for attention):
// a parallel region costs 5-7 us (measured, 2 threads), more than a decode step's norm or its
// attention over a few hundred positions.
constexpr int64_t kRowsParallel = 1 << 16;
constexpr int64_t kAttnParallel = 1 << 15;  // decode past ~60 positions: in a real step the cache comes from memory, not L1 (43 us one-threaded at 151)
constexpr int64_t kWriteParallel = 1 << 15;
constexpr int64_t kMaxThreads = 256;

// ---------------------------------------------------------------- vector helpers

alignas(32) const int32_t kMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

inline __m256i tail_mask(int64_t n) {  // first n (1..7) lanes set
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskTable + 8 - n));
}

// ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)): the one tree every 8-lane sum uses.
inline float hsum8(__m256 a) {
  __m256 t = _mm256_hadd_ps(a, a);
  t = _mm256_hadd_ps(t, t);
  return _mm_cvtss_f32(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}

// Lane i = hsum8(v_i), the same tree, eight sums at once.
inline __m256 hsum8x8(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5, __m256 v6, __m256 v7) {
  __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));
  return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

// exp(x), about 1 ulp (Cephes' polynomial); 0 below -87.3 (no denormals), capped at e^88.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
}

// Cache element types: 8 elements widened to float32; a row of D (a multiple of 8) floats
// rounded to the type in place (round_row) or stored as the type (store_row), both rounding
// to nearest even as torch's .to(dtype) does.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
  static void round_row(float*, int64_t) {}
  static void store_row(const float* x, float* dst, int64_t D) { std::memcpy(dst, x, D * sizeof(float)); }
};
template <>
struct Elem<c10::BFloat16> {
  static __m256 load8(const c10::BFloat16* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // c10::BFloat16's rounding: the bfloat16 in the high half of each lane; NaN -> 0x7fc0.
  static __m256i rne(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                    _mm256_set1_epi32(0x7fff));
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(_mm256_add_epi32(u, bias)),
                                                _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), nan));
  }
  static void round_row(float* x, int64_t D) {
    const __m256i hi = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
    for (int64_t i = 0; i < D; i += 8)
      _mm256_storeu_ps(x + i, _mm256_castsi256_ps(_mm256_and_si256(rne(_mm256_loadu_ps(x + i)), hi)));
  }
  static void store_row(const float* x, c10::BFloat16* dst, int64_t D) {
    for (int64_t i = 0; i < D; i += 8) {
      __m256i r = _mm256_srli_epi32(rne(_mm256_loadu_ps(x + i)), 16);
      __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
    }
  }
};
template <>
struct Elem<c10::Half> {
  static constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  static __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void round_row(float* x, int64_t D) {
    for (int64_t i = 0; i < D; i += 8) _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), kRound)));
  }
  static void store_row(const float* x, c10::Half* dst, int64_t D) {
    for (int64_t i = 0; i < D; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), kRound));
  }
};

// Read-only inputs as contiguous float32 (no copy when they already are).
inline at::Tensor f32c(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
  return t.to(at::kFloat).contiguous();
}

inline void check_act(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "pellucid::", op, ": ", name, " must be float32 activations, got ",
              t.scalar_type());
}

// ---------------------------------------------------------------- RMSNorm

// Sum of squares of x[0, E): four vector sums over blocks of 32, then 8, then a masked tail.
inline float sum_squares(const float* x, int64_t E) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= E; i += 32) {
    __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    __m256 v2 = _mm256_loadu_ps(x + i + 16), v3 = _mm256_loadu_ps(x + i + 24);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
    a2 = _mm256_fmadd_ps(v2, v2, a2);
    a3 = _mm256_fmadd_ps(v3, v3, a3);
  }
  for (; i + 8 <= E; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    a0 = _mm256_fmadd_ps(v, v, a0);
  }
  if (i < E) {
    __m256 v = _mm256_maskload_ps(x + i, tail_mask(E - i));
    a1 = _mm256_fmadd_ps(v, v, a1);
  }
  return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

inline float rms_scale(float ss, int64_t E, float eps) {
  return 1.0f / std::sqrt(ss / static_cast<float>(E) + eps);
}

// y = (x * r) * (offset + w), the reference's order of roundings.
inline void scale_row(const float* x, const float* w, float* y, int64_t E, float r, float offset) {
  const __m256 rv = _mm256_set1_ps(r), ov = _mm256_set1_ps(offset);
  int64_t i = 0;
  for (; i + 8 <= E; i += 8) {
    __m256 g = _mm256_add_ps(ov, _mm256_loadu_ps(w + i));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), g));
  }
  if (i < E) {
    __m256i m = tail_mask(E - i);
    __m256 g = _mm256_add_ps(ov, _mm256_maskload_ps(w + i, m));
    _mm256_maskstore_ps(y + i, m, _mm256_mul_ps(_mm256_mul_ps(_mm256_maskload_ps(x + i, m), rv), g));
  }
}

inline void rms_row(const float* x, const float* w, float* y, int64_t E, float eps, float offset) {
  scale_row(x, w, y, E, rms_scale(sum_squares(x, E), E, eps), offset);
}

// residual += x, then y = rms_norm(residual).
inline void add_rms_row(float* res, const float* x, const float* w, float* y, int64_t E, float eps, float offset) {
  int64_t i = 0;
  for (; i + 8 <= E; i += 8) _mm256_storeu_ps(res + i, _mm256_add_ps(_mm256_loadu_ps(res + i), _mm256_loadu_ps(x + i)));
  if (i < E) {
    __m256i m = tail_mask(E - i);
    _mm256_maskstore_ps(res + i, m, _mm256_add_ps(_mm256_maskload_ps(res + i, m), _mm256_maskload_ps(x + i, m)));
  }
  rms_row(res, w, y, E, eps, offset);
}

template <typename F>
void for_rows(int64_t M, int64_t E, const F& f) {
  if (M * E < kRowsParallel || M == 1) {
    for (int64_t m = 0; m < M; ++m) f(m);
  } else {
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) f(m);
    });
  }
}

at::Tensor norm_weight(const at::Tensor& w, int64_t E, const char* op, const char* name) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == E, "pellucid::", op, ": ", name, " must be (", E, ",), got ", w.sizes());
  return f32c(w);
}

at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps, double offset) {
  check_act(x_, "rms_norm", "x");
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) > 0, "pellucid::rms_norm: x must be (..., E) with E > 0, got ", x_.sizes());
  const int64_t E = x_.size(-1), M = x_.numel() / E;
  auto w = norm_weight(w_, E, "rms_norm", "w");
  auto x = x_.contiguous();
  auto y = at::empty(x.sizes(), x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float fe = static_cast<float>(eps), fo = static_cast<float>(offset);
  for_rows(M, E, [&](int64_t m) { rms_row(X + m * E, W, Y + m * E, E, fe, fo); });
  return y;
}

at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& x_, const at::Tensor& w_, double eps, double offset) {
  TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous(),
              "pellucid::add_rms_norm: residual must be a contiguous float32 tensor (it is updated in place), got ",
              residual.scalar_type(), residual.is_contiguous() ? "" : " (not contiguous)");
  check_act(x_, "add_rms_norm", "x");
  TORCH_CHECK(residual.dim() >= 1 && residual.size(-1) > 0, "pellucid::add_rms_norm: residual must be (..., E), got ",
              residual.sizes());
  TORCH_CHECK(x_.sizes() == residual.sizes(), "pellucid::add_rms_norm: x must have residual's shape ", residual.sizes(),
              ", got ", x_.sizes());
  const int64_t E = residual.size(-1), M = residual.numel() / E;
  auto w = norm_weight(w_, E, "add_rms_norm", "w");
  auto x = x_.contiguous();
  auto y = at::empty(residual.sizes(), residual.options());
  float* R = residual.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float fe = static_cast<float>(eps), fo = static_cast<float>(offset);
  for_rows(M, E, [&](int64_t m) { add_rms_row(R + m * E, X + m * E, W, Y + m * E, E, fe, fo); });
  return y;
}

// ---------------------------------------------------------------- gated MLP activation

// SiLU: g / (1 + e^-g), as torch computes it. GELU-tanh: 0.5 g (1 + tanh(u)) written as
// g / (1 + e^-2u), the same function without 1 + tanh's cancellation for negative g.
template <int ACT>
inline __m256 act8(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.0f);
  if (ACT == 0) return _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  const __m256 beta = _mm256_set1_ps(0.7978845608028654f), kappa = _mm256_set1_ps(0.044715f);
  __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
  __m256 u = _mm256_mul_ps(beta, _mm256_add_ps(g, _mm256_mul_ps(kappa, g3)));
  return _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u))));
}

template <int ACT>
void glu_row(const float* gu, float* y, int64_t F) {
  int64_t i = 0;
  for (; i + 8 <= F; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(act8<ACT>(_mm256_loadu_ps(gu + i)), _mm256_loadu_ps(gu + F + i)));
  if (i < F) {
    __m256i m = tail_mask(F - i);
    _mm256_maskstore_ps(y + i, m, _mm256_mul_ps(act8<ACT>(_mm256_maskload_ps(gu + i, m)), _mm256_maskload_ps(gu + F + i, m)));
  }
}

at::Tensor glu(const at::Tensor& gu_, int64_t act) {
  check_act(gu_, "glu", "gu");
  TORCH_CHECK(act == 0 || act == 1, "pellucid::glu: act must be 0 (SiLU) or 1 (GELU tanh), got ", act);
  TORCH_CHECK(gu_.dim() >= 1 && gu_.size(-1) > 0 && gu_.size(-1) % 2 == 0,
              "pellucid::glu: gu must be (..., 2F) = [gate | up], got ", gu_.sizes());
  auto gu = gu_.contiguous();
  const int64_t F = gu.size(-1) / 2, M = gu.numel() / (2 * F);
  auto shape = gu.sizes().vec();
  shape.back() = F;
  auto y = at::empty(shape, gu.options());
  const float* G = gu.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  if (act == 0)
    for_rows(M, F, [&](int64_t m) { glu_row<0>(G + m * 2 * F, Y + m * F, F); });
  else
    for_rows(M, F, [&](int64_t m) { glu_row<1>(G + m * 2 * F, Y + m * F, F); });
  return y;
}

// ---------------------------------------------------------------- grammar masks

// One row: y = x where the token's bit is set in w (W words), else fill; returns whether a
// kept value is above fill.
bool mask_row(const float* x, const uint32_t* w, int64_t W, int64_t V, float fill, float* y) {
  const __m256 f = _mm256_set1_ps(fill);
  const __m256i one = _mm256_set1_epi32(1);
  __m256i any = _mm256_setzero_si256();
  bool alive = false;
  int64_t j = 0;
  for (; j + 32 <= V; j += 32) {
    const uint32_t m = j / 32 < W ? w[j / 32] : 0u;
    if (m == 0) {
      for (int k = 0; k < 32; k += 8) _mm256_storeu_ps(y + j + k, f);
      continue;
    }
    const __m256i mv = _mm256_set1_epi32(static_cast<int>(m));
    for (int k = 0; k < 32; k += 8) {
      const __m256i sh = _mm256_setr_epi32(k, k + 1, k + 2, k + 3, k + 4, k + 5, k + 6, k + 7);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srlv_epi32(mv, sh), one), one));
      const __m256 v = _mm256_loadu_ps(x + j + k);
      _mm256_storeu_ps(y + j + k, _mm256_blendv_ps(f, v, keep));
      any = _mm256_or_si256(any, _mm256_castps_si256(_mm256_and_ps(keep, _mm256_cmp_ps(v, f, _CMP_GT_OQ))));
    }
  }
  for (; j < V; ++j) {  // the vocabulary's last part-word
    const bool keep = j / 32 < W && ((w[j / 32] >> (j % 32)) & 1u);
    y[j] = keep ? x[j] : fill;
    alive |= keep && x[j] > fill;
  }
  return alive || !_mm256_testz_si256(any, any);
}

// pellucid::apply_bitmask(logits (B, V) float32, bits (B, W) int32, fill) -> (masked, alive (B,) bool)
std::tuple<at::Tensor, at::Tensor> apply_bitmask(const at::Tensor& logits_, const at::Tensor& bits_, double fill) {
  TORCH_CHECK(logits_.dim() == 2 && logits_.scalar_type() == at::kFloat,
              "pellucid::apply_bitmask: logits must be (B, V) float32, got ", logits_.scalar_type(), " of shape ", logits_.sizes());
  TORCH_CHECK(bits_.dim() == 2 && bits_.scalar_type() == at::kInt && bits_.size(0) == logits_.size(0),
              "pellucid::apply_bitmask: bits must be (B, W) int32 with B = ", logits_.size(0), ", got ",
              bits_.scalar_type(), " of shape ", bits_.sizes());
  auto x = logits_.contiguous();
  auto bits = bits_.contiguous();
  const int64_t B = x.size(0), V = x.size(1), W = bits.size(1);
  auto y = at::empty_like(x);
  auto alive = at::empty({B}, x.options().dtype(at::kBool));
  const float* X = x.data_ptr<float>();
  const uint32_t* M = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  float* Y = y.data_ptr<float>();
  bool* A = alive.data_ptr<bool>();
  for_rows(B, V, [&](int64_t b) { A[b] = mask_row(X + b * V, M + b * W, W, V, static_cast<float>(fill), Y + b * V); });
  return {y, alive};
}

// ---------------------------------------------------------------- attention

struct AttnShape {
  int64_t B, T, H, K, D, S, Lmax, rep, window;
  float scale;
};

// Rotate-half rotary of x (D) at one position into out, exactly the reference's
// x * cos + rotate_half(x) * sin (two products, one sum, no FMA); c and s hold the D/2
// angles that both halves share.
inline void rope(const float* x, const float* c, const float* s, float* out, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) out[i] = x[i] * c[i] + (-x[i + h]) * s[i];
  for (int64_t i = h; i < D; ++i) out[i] = x[i] * c[i - h] + x[i - h] * s[i - h];
}

// One token: norm + rotate its query heads into z (rounded to the cache type) and its key
// heads into the cache; copy its value heads into the cache.
template <typename T>
void write_token(const AttnShape& a, int64_t bt, const float* qkv, float* z, T* kc, T* vc, const int64_t* slots,
                 const int64_t* pos, const float* cos, const float* sin, const float* qn, const float* kn, float eps,
                 float off) {
  const int64_t D = a.D, b = bt / a.T, p = pos[bt], slot = slots[b];
  const float* row = qkv + bt * (a.H + 2 * a.K) * D;
  const float* c = cos + p * (D / 2);
  const float* s = sin + p * (D / 2);
  alignas(32) float tmp[kMaxHeadDim];
  alignas(32) float rot[kMaxHeadDim];
  for (int64_t h = 0; h < a.H; ++h) {
    const float* x = row + h * D;
    if (qn) {
      rms_row(x, qn, tmp, D, eps, off);
      x = tmp;
    }
    float* out = z + (bt * a.H + h) * D;
    rope(x, c, s, out, D);
    Elem<T>::round_row(out, D);
  }
  for (int64_t kh = 0; kh < a.K; ++kh) {
    const float* x = row + (a.H + kh) * D;
    if (kn) {
      rms_row(x, kn, tmp, D, eps, off);
      x = tmp;
    }
    rope(x, c, s, rot, D);
    const int64_t at = ((slot * a.K + kh) * a.Lmax + p) * D;
    Elem<T>::store_row(rot, kc + at, D);
    Elem<T>::store_row(row + (a.H + a.K + kh) * D, vc + at, D);
  }
}

// J sums of eight lanes each, the hsum8 tree for every one: out[i] = hsum8(a[i]) * scale.
template <int J>
inline void reduce_scaled(const __m256* a, float scale, float* out) {
  if constexpr (J == 8) {
    _mm256_storeu_ps(out, _mm256_mul_ps(hsum8x8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]), _mm256_set1_ps(scale)));
  } else if constexpr (J == 4) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    _mm_storeu_ps(out, _mm_mul_ps(s, _mm_set1_ps(scale)));
  } else if constexpr (J == 2) {
    __m256 t = _mm256_hadd_ps(a[0], a[1]);
    t = _mm256_hadd_ps(t, t);
    __m128 s = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), _mm_set1_ps(scale));
    _mm_storel_pi(reinterpret_cast<__m64*>(out), s);
  } else {
    static_assert(J == 1);
    out[0] = hsum8(a[0]) * scale;
  }
}

// Scores of R query heads against n consecutive cache rows: sc[r * stride + j] = (q_r . k_j) * scale.
// Every dot is one FMA chain over D in blocks of 8, then the hsum8 tree; J rows at a time
// share each load of a key row among the R heads (then one row at a time for the tail).
template <typename T, int R>
void scores(const float* const* q, const T* k, int64_t n, int64_t D, float scale, float* sc, int64_t stride) {
  constexpr int J = R == 1 ? 8 : (R <= 3 ? 4 : 2);
  int64_t j = 0;
  for (; j + J <= n; j += J) {
    const T* kj = k + j * D;
    __m256 acc[R][J];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < J; ++i) acc[r][i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      for (int i = 0; i < J; ++i) {
        __m256 kv = Elem<T>::load8(kj + i * D + d);
        for (int r = 0; r < R; ++r) acc[r][i] = _mm256_fmadd_ps(_mm256_loadu_ps(q[r] + d), kv, acc[r][i]);
      }
    }
    for (int r = 0; r < R; ++r) reduce_scaled<J>(acc[r], scale, sc + r * stride + j);
  }
  for (; j < n; ++j) {
    const T* kj = k + j * D;
    __m256 acc[R][1];
    for (int r = 0; r < R; ++r) acc[r][0] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      __m256 kv = Elem<T>::load8(kj + d);
      for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q[r] + d), kv, acc[r][0]);
    }
    for (int r = 0; r < R; ++r) reduce_scaled<1>(acc[r], scale, sc + r * stride + j);
  }
}

// sc[0, n) -> e^(sc - max) in place; returns their sum (one vector sum over blocks of 8).
inline float softmax_exp(float* sc, int64_t n) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sc + j));
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  float m = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
  for (; j < n; ++j) m = std::max(m, sc[j]);
  const __m256 mb = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), mb));
    _mm256_storeu_ps(sc + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  if (j < n) {
    __m256i msk = tail_mask(n - j);
    __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(sc + j, msk), mb)), _mm256_castsi256_ps(msk));
    _mm256_maskstore_ps(sc + j, msk, e);
    acc = _mm256_add_ps(acc, e);
  }
  return hsum8(acc);
}

// out_r[d0, d0 + 8 NV) = inv_r * sum_j p_r[j] v_j[d0, ...) for R heads: one FMA chain over j
// per element, each load of a value row shared by the R heads.
template <typename T, int R, int NV>
inline void pv_tile(const float* p, int64_t stride, const T* v, int64_t n, int64_t D, int64_t d0, const float* inv,
                    float* const* out) {
  __m256 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) acc[r][u] = _mm256_setzero_ps();
  const T* vr = v + d0;
  for (int64_t j = 0; j < n; ++j, vr += D) {  // R NV sums + R broadcasts + one value vector: 16 registers at most
    __m256 pj[R];
    for (int r = 0; r < R; ++r) pj[r] = _mm256_broadcast_ss(p + r * stride + j);
    for (int u = 0; u < NV; ++u) {
      __m256 vv = Elem<T>::load8(vr + 8 * u);
      for (int r = 0; r < R; ++r) acc[r][u] = _mm256_fmadd_ps(pj[r], vv, acc[r][u]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 iv = _mm256_set1_ps(inv[r]);
    for (int u = 0; u < NV; ++u) _mm256_storeu_ps(out[r] + d0 + 8 * u, _mm256_mul_ps(acc[r][u], iv));
  }
}

template <typename T, int R, int NV>
inline void pv(const float* p, int64_t stride, const T* v, int64_t n, int64_t D, const float* inv, float* const* out) {
  int64_t d0 = 0;
  for (; d0 + 8 * NV <= D; d0 += 8 * NV) pv_tile<T, R, NV>(p, stride, v, n, D, d0, inv, out);
  if constexpr (NV > 1) {  // D is a multiple of 8: halve the tile for the rest
    if (d0 < D) {
      const int64_t rest = D - d0;
      for (int64_t e = 0; e < rest;) {
        const int64_t left = rest - e;
        if (left >= 32 && NV > 4) pv_tile<T, R, (NV > 4 ? 4 : 1)>(p, stride, v, n, D, d0 + e, inv, out), e += 32;
        else if (left >= 16 && NV > 2) pv_tile<T, R, (NV > 2 ? 2 : 1)>(p, stride, v, n, D, d0 + e, inv, out), e += 16;
        else pv_tile<T, R, 1>(p, stride, v, n, D, d0 + e, inv, out), e += 8;
      }
    }
  }
}

thread_local std::vector<float> tl_scores;

// R query heads h0 .. h0 + R - 1 of one token, all of kv head h0 / rep: their queries (rotated
// and rounded) are read from z and replaced by their outputs.
template <typename T, int R>
void attend(const AttnShape& a, int64_t bt, int64_t h0, float* z, const T* kc, const T* vc, const int64_t* slots,
            const int64_t* pos) {
  constexpr int NV = R == 1 ? 8 : (R <= 3 ? 4 : 2);
  const int64_t D = a.D, b = bt / a.T, kh = h0 / a.rep, p = pos[bt];
  const int64_t lo = a.window > 0 ? std::max<int64_t>(0, p - a.window + 1) : 0, n = p - lo + 1;
  const int64_t base = ((slots[b] * a.K + kh) * a.Lmax + lo) * D;
  const int64_t stride = (n + 15) / 8 * 8;
  if (static_cast<int64_t>(tl_scores.size()) < R * stride) tl_scores.resize(R * stride);
  float* sc = tl_scores.data();
  float* q[R];
  float inv[R];
  for (int r = 0; r < R; ++r) q[r] = z + (bt * a.H + h0 + r) * D;
  scores<T, R>(q, kc + base, n, D, a.scale, sc, stride);
  for (int r = 0; r < R; ++r) inv[r] = 1.0f / softmax_exp(sc + r * stride, n);
  pv<T, R, NV>(sc, stride, vc + base, n, D, inv, q);
}

// Query heads [g0, g1) of the flattened (b, t, h) order, in runs of consecutive heads that
// share a token and a kv head (up to four; a group of 5..8 in two near-equal runs). A head's
// arithmetic is the same whichever run or thread it falls in.
template <typename T>
void attend_range(const AttnShape& a, int64_t g0, int64_t g1, float* z, const T* kc, const T* vc,
                  const int64_t* slots, const int64_t* pos) {
  for (int64_t g = g0; g < g1;) {
    const int64_t bt = g / a.H, h = g % a.H;
    const int64_t left = std::min((h / a.rep + 1) * a.rep - h, g1 - g);  // heads left in this kv group
    const int64_t r = left <= 4 ? left : (left <= 8 ? (left + 1) / 2 : 4);
    switch (r) {
      case 1: attend<T, 1>(a, bt, h, z, kc, vc, slots, pos); break;
      case 2: attend<T, 2>(a, bt, h, z, kc, vc, slots, pos); break;
      case 3: attend<T, 3>(a, bt, h, z, kc, vc, slots, pos); break;
      default: attend<T, 4>(a, bt, h, z, kc, vc, slots, pos); break;
    }
    g += r;
  }
}

inline int64_t n_keys(const AttnShape& a, int64_t p) { return a.window > 0 ? std::min(p + 1, a.window) : p + 1; }

// ---- a prompt chunk's tokens together
//
// Consecutive tokens of one sequence (a prompt chunk) attend to the same keys. One token at a
// time, each query head run reads all its keys and values from memory: deep in a long prompt
// that traffic, not arithmetic, sets the speed. A tile takes up to kTileTokens such tokens
// and all query heads of one kv head, and walks the keys in blocks of kTileKeys, each block
// used by every token of the tile while it is in cache. Every number is computed as in
// attend(): each score by the same dot product, each row's softmax over its whole row, each
// output element by the same chain of FMAs over the keys in order (its running sum is kept
// in memory between blocks, which changes no bit), so a token's result is the same whether
// it comes alone or in a tile.

constexpr int64_t kTileTokens = 16;
constexpr int64_t kTileKeys = 128;  // 64 KiB of float32 keys at D = 128

// pv_tile with its running sums read from and written back to acc (no scaling).
template <typename T, int R, int NV>
inline void pv_tile_acc(const float* p, int64_t stride, const T* v, int64_t n, int64_t D, int64_t d0, float* const* acc) {
  __m256 s[R][NV];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) s[r][u] = _mm256_loadu_ps(acc[r] + d0 + 8 * u);
  const T* vr = v + d0;
  for (int64_t j = 0; j < n; ++j, vr += D) {
    __m256 pj[R];
    for (int r = 0; r < R; ++r) pj[r] = _mm256_broadcast_ss(p + r * stride + j);
    for (int u = 0; u < NV; ++u) {
      __m256 vv = Elem<T>::load8(vr + 8 * u);
      for (int r = 0; r < R; ++r) s[r][u] = _mm256_fmadd_ps(pj[r], vv, s[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) _mm256_storeu_ps(acc[r] + d0 + 8 * u, s[r][u]);
}

template <typename T, int R>
void tile_heads(const float* const* q, const T* k, const T* v, int64_t n, int64_t D, float scale, float* sc,
                int64_t stride, float* const* acc, bool values) {
  constexpr int NV = R == 1 ? 8 : (R <= 3 ? 4 : 2);
  if (!values) {
    scores<T, R>(q, k, n, D, scale, sc, stride);
    return;
  }
  int64_t d0 = 0;
  for (; d0 + 8 * NV <= D; d0 += 8 * NV) pv_tile_acc<T, R, NV>(sc, stride, v, n, D, d0, acc);
  for (; d0 < D; d0 += 8) pv_tile_acc<T, R, 1>(sc, stride, v, n, D, d0, acc);
}

thread_local std::vector<float> tl_tile;

// Tokens [t0, t1) of the flattened (b, t) order, all of one slot, and the query heads of kv head kh.
template <typename T>
void attend_tile(const AttnShape& a, int64_t t0, int64_t t1, int64_t kh, float* z, const T* kc, const T* vc,
                 const int64_t* slots, const int64_t* pos) {
  const int64_t D = a.D, G = t1 - t0, rep = a.rep;
  const T* k = kc + (slots[t0 / a.T] * a.K + kh) * a.Lmax * D;
  const T* v = vc + (slots[t0 / a.T] * a.K + kh) * a.Lmax * D;
  int64_t lo[kTileTokens], n[kTileTokens], stride[kTileTokens], off[kTileTokens];
  int64_t total = 0, jlo = INT64_MAX, jhi = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t p = pos[t0 + g];
    n[g] = n_keys(a, p);
    lo[g] = p + 1 - n[g];
    stride[g] = (n[g] + 15) / 8 * 8;
    off[g] = total;
    total += rep * stride[g];
    jlo = std::min(jlo, lo[g]);
    jhi = std::max(jhi, p + 1);
  }
  if (static_cast<int64_t>(tl_tile.size()) < total + G * rep * (D + 1)) tl_tile.resize(total + G * rep * (D + 1));
  float* sc = tl_tile.data();
  float* acc = sc + total;
  float* inv = acc + G * rep * D;
  std::fill(acc, acc + G * rep * D, 0.0f);
  for (int pass = 0; pass < 2; ++pass) {  // 0: every score; (softmax); 1: the values
    if (pass == 1) {
      for (int64_t g = 0; g < G; ++g)
        for (int64_t h = 0; h < rep; ++h) inv[g * rep + h] = 1.0f / softmax_exp(sc + off[g] + h * stride[g], n[g]);
    }
    for (int64_t j0 = jlo; j0 < jhi; j0 += kTileKeys) {
      const int64_t j1 = std::min(j0 + kTileKeys, jhi);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t s = std::max(j0, lo[g]), e = std::min(j1, lo[g] + n[g]);
        if (s >= e) continue;
        for (int64_t h = 0; h < rep;) {
          const int64_t left = rep - h;
          const int64_t r = left <= 4 ? left : (left <= 8 ? (left + 1) / 2 : 4);
          float* q[4];
          float* out[4];
          for (int64_t i = 0; i < r; ++i) {
            q[i] = z + ((t0 + g) * a.H + kh * rep + h + i) * D;
            out[i] = acc + (g * rep + h + i) * D;
          }
          float* row = sc + off[g] + h * stride[g] + (s - lo[g]);
          const bool values = pass == 1;
          switch (r) {
            case 1: tile_heads<T, 1>(q, k + s * D, v + s * D, e - s, D, a.scale, row, stride[g], out, values); break;
            case 2: tile_heads<T, 2>(q, k + s * D, v + s * D, e - s, D, a.scale, row, stride[g], out, values); break;
            case 3: tile_heads<T, 3>(q, k + s * D, v + s * D, e - s, D, a.scale, row, stride[g], out, values); break;
            default: tile_heads<T, 4>(q, k + s * D, v + s * D, e - s, D, a.scale, row, stride[g], out, values); break;
          }
          h += r;
        }
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)  // out = sums x 1/total, into the queries' places
    for (int64_t h = 0; h < rep; ++h) {
      float* o = z + ((t0 + g) * a.H + kh * rep + h) * D;
      const float* sum = acc + (g * rep + h) * D;
      const __m256 iv = _mm256_set1_ps(inv[g * rep + h]);
      for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(sum + d), iv));
    }
}

// The attention of a step with prompt chunks: work items of a tile (a chunk's tokens, one kv
// head) or one token's heads of one kv head, split among threads by keys read.
template <typename T>
void attend_tiled(const AttnShape& a, int64_t nt, float* z, const T* kc, const T* vc, const int64_t* slots,
                  const int64_t* pos) {
  struct Item {
    int64_t t0, t1, kh, cost;
  };
  std::vector<Item> items;
  const int64_t BT = a.B * a.T;
  int64_t total = 0;
  for (int64_t t = 0; t < BT;) {
    int64_t e = t + 1;  // a run of one slot's consecutive positions, at most kTileTokens
    while (e < BT && e - t < kTileTokens && slots[e / a.T] == slots[t / a.T] && pos[e] == pos[e - 1] + 1) ++e;
    int64_t cost = 0;
    for (int64_t i = t; i < e; ++i) cost += n_keys(a, pos[i]);
    for (int64_t kh = 0; kh < a.K; ++kh) items.push_back({t, e, kh, cost});
    total += cost * a.K;
    t = e;
  }
  auto run = [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      if (it.t1 - it.t0 == 1)
        attend_range<T>(a, it.t0 * a.H + it.kh * a.rep, it.t0 * a.H + (it.kh + 1) * a.rep, z, kc, vc, slots, pos);
      else
        attend_tile<T>(a, it.t0, it.t1, it.kh, z, kc, vc, slots, pos);
    }
  };
  const int64_t m = static_cast<int64_t>(items.size());
  if (nt <= 1 || m == 1) {
    run(0, m);
    return;
  }
  std::vector<int64_t> cut(nt + 1, m);
  cut[0] = 0;
  int64_t tid = 1, done = 0;
  for (int64_t i = 0; i < m && tid < nt; ++i) {
    while (tid < nt && done * nt >= tid * total) cut[tid++] = i;
    done += items[i].cost;
  }
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) run(cut[t], cut[t + 1]);
  });
}

template <typename T>
void attention_impl(const AttnShape& a, const float* qkv, float* z, T* kc, T* vc, const int64_t* slots,
                    const int64_t* pos, const float* cos, const float* sin, const float* qn, const float* kn, float eps,
                    float off) {
  const int64_t BT = a.B * a.T;
  auto write = [&](int64_t bt) { write_token<T>(a, bt, qkv, z, kc, vc, slots, pos, cos, sin, qn, kn, eps, off); };
  if (BT * (a.H + 2 * a.K) * a.D < kWriteParallel || BT == 1) {
    for (int64_t bt = 0; bt < BT; ++bt) write(bt);
  } else {
    at::parallel_for(0, BT, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) write(i);
    });
  }
  // Every write is done: now attention, each thread a contiguous range of query heads of about
  // equal work (keys attended to), cut anywhere, even inside a kv group.
  int64_t keys = 0;
  bool chunk = false;  // two consecutive positions of one slot: a prompt chunk, attended in tiles
  for (int64_t bt = 0; bt < BT; ++bt) {
    keys += n_keys(a, pos[bt]);
    chunk = chunk || (bt > 0 && slots[bt / a.T] == slots[(bt - 1) / a.T] && pos[bt] == pos[bt - 1] + 1);
  }
  const int64_t heads = BT * a.H, nt = std::min<int64_t>(at::get_num_threads(), kMaxThreads);
  const bool one_thread = keys * a.H * a.D < kAttnParallel || heads == 1 || nt == 1 || at::in_parallel_region();
  if (chunk && keys >= kTileKeys * 2) {
    attend_tiled<T>(a, one_thread ? 1 : nt, z, kc, vc, slots, pos);
    return;
  }
  if (one_thread) {
    attend_range<T>(a, 0, heads, z, kc, vc, slots, pos);
    return;
  }
  int64_t cut[kMaxThreads + 1];
  cut[0] = 0;
  int64_t tid = 1, done = 0;
  for (int64_t bt = 0; bt < BT && tid < nt; ++bt) {
    const int64_t n = n_keys(a, pos[bt]);
    for (int64_t h = 0; h < a.H && tid < nt; ++h) {
      while (tid < nt && done * nt >= tid * a.H * keys) cut[tid++] = bt * a.H + h;
      done += n;
    }
  }
  while (tid <= nt) cut[tid++] = heads;
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) attend_range<T>(a, cut[t], cut[t + 1], z, kc, vc, slots, pos);
  });
}

at::Tensor attention(const at::Tensor& qkv_, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots_,
                     const at::Tensor& pos_, const at::Tensor& cos_, const at::Tensor& sin_, int64_t n_heads,
                     int64_t n_kv_heads, double scale, int64_t window, const std::optional<at::Tensor>& q_norm,
                     const std::optional<at::Tensor>& k_norm, double norm_eps, double norm_offset) {
  const int64_t H = n_heads, K = n_kv_heads;
  TORCH_CHECK(H > 0 && K > 0 && H % K == 0, "pellucid::attention: n_heads (", H, ") must be a positive multiple of n_kv_heads (",
              K, ")");
  TORCH_CHECK(k_cache.dim() == 4, "pellucid::attention: k_cache must be (S, K, Lmax, D), got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "pellucid::attention: v_cache must match k_cache: ", k_cache.sizes(), " ", k_cache.scalar_type(), ", got ",
              v_cache.sizes(), " ", v_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "pellucid::attention: k_cache and v_cache must be contiguous (they are written in place)");
  const auto ct = k_cache.scalar_type();
  TORCH_CHECK(ct == at::kFloat || ct == at::kBFloat16 || ct == at::kHalf,
              "pellucid::attention: k_cache must be float32, bfloat16 or float16, got ", ct);
  const int64_t S = k_cache.size(0), Lmax = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k_cache.size(1) == K, "pellucid::attention: k_cache must be (S, n_kv_heads=", K, ", Lmax, D), got ",
              k_cache.sizes());
  TORCH_CHECK(D > 0 && D % 8 == 0 && D <= kMaxHeadDim, "pellucid::attention: head dim D (k_cache.size(3)) must be a multiple of 8 up to ",
              kMaxHeadDim, ", got ", D);
  check_act(qkv_, "attention", "qkv");
  TORCH_CHECK(qkv_.dim() == 3 && qkv_.size(2) == (H + 2 * K) * D, "pellucid::attention: qkv must be (B, T, (n_heads + 2 * n_kv_heads) * D) = (B, T, ",
              (H + 2 * K) * D, "), got ", qkv_.sizes());
  const int64_t B = qkv_.size(0), T = qkv_.size(1);
  TORCH_CHECK(slots_.scalar_type() == at::kLong && slots_.dim() == 1 && slots_.size(0) == B,
              "pellucid::attention: slots must be (B,) = (", B, ",) int64, got ", slots_.sizes(), " ", slots_.scalar_type());
  TORCH_CHECK(pos_.scalar_type() == at::kLong && pos_.dim() == 2 && pos_.size(0) == B && pos_.size(1) == T,
              "pellucid::attention: pos must be (B, T) = (", B, ", ", T, ") int64, got ", pos_.sizes(), " ", pos_.scalar_type());
  TORCH_CHECK(cos_.dim() == 2 && cos_.size(1) == D / 2 && sin_.sizes() == cos_.sizes(),
              "pellucid::attention: cos and sin must be (P, D/2=", D / 2, "), got ", cos_.sizes(), " and ", sin_.sizes());
  auto slots = slots_.contiguous();
  auto pos = pos_.contiguous();
  const int64_t* SL = slots.data_ptr<int64_t>();
  const int64_t* PO = pos.data_ptr<int64_t>();
  const int64_t P = cos_.size(0);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(SL[b] >= 0 && SL[b] < S, "pellucid::attention: slots[", b, "] = ", SL[b], " is outside the cache's ", S,
                " slots");
  for (int64_t i = 0; i < B * T; ++i) {
    TORCH_CHECK(PO[i] >= 0 && PO[i] < Lmax, "pellucid::attention: pos[", i / T, ", ", i % T, "] = ", PO[i],
                " is outside the cache's Lmax = ", Lmax, " positions");
    TORCH_CHECK(PO[i] < P, "pellucid::attention: pos[", i / T, ", ", i % T, "] = ", PO[i], " is beyond cos/sin's ", P,
                " rows");
  }
  at::Tensor qn, kn;
  if (q_norm.has_value()) qn = norm_weight(*q_norm, D, "attention", "q_norm");
  if (k_norm.has_value()) kn = norm_weight(*k_norm, D, "attention", "k_norm");
  auto qkv = qkv_.contiguous();
  auto cos = f32c(cos_);
  auto sin = f32c(sin_);
  auto z = at::empty({B, T, H * D}, qkv.options());
  const AttnShape a{B, T, H, K, D, S, Lmax, H / K, window, static_cast<float>(scale)};
  const float* QN = qn.defined() ? qn.data_ptr<float>() : nullptr;
  const float* KN = kn.defined() ? kn.data_ptr<float>() : nullptr;
  const float eps = static_cast<float>(norm_eps), off = static_cast<float>(norm_offset);
  if (B * T == 0) return z;
  if (ct == at::kFloat)
    attention_impl<float>(a, qkv.data_ptr<float>(), z.data_ptr<float>(), k_cache.data_ptr<float>(),
                          v_cache.data_ptr<float>(), SL, PO, cos.data_ptr<float>(), sin.data_ptr<float>(), QN, KN, eps, off);
  else if (ct == at::kBFloat16)
    attention_impl<c10::BFloat16>(a, qkv.data_ptr<float>(), z.data_ptr<float>(), k_cache.data_ptr<c10::BFloat16>(),
                                  v_cache.data_ptr<c10::BFloat16>(), SL, PO, cos.data_ptr<float>(), sin.data_ptr<float>(),
                                  QN, KN, eps, off);
  else
    attention_impl<c10::Half>(a, qkv.data_ptr<float>(), z.data_ptr<float>(), k_cache.data_ptr<c10::Half>(),
                              v_cache.data_ptr<c10::Half>(), SL, PO, cos.data_ptr<float>(), sin.data_ptr<float>(), QN,
                              KN, eps, off);
  return z;
}

// ---------------------------------------------------------------- the block stack

// One fused block's weights and settings, as models/decoder.py Block.fused reads them.
struct StackLayer {
  at::Tensor attn_w, post_attn_w, mlp_w, post_mlp_w, cos, sin;
  std::optional<at::Tensor> qn, kn;
  std::vector<at::Tensor> ws[4];  // q/k/v, o, gate/up, down: each projection's block tensors
  std::vector<int64_t> types[4];
  std::optional<at::Tensor> bias[4], index[4];
  int64_t H = 0, K = 0, window = 0, act = 0;
  bool post = false;
  double attn_eps = 0, attn_off = 0, scale = 0, qk_eps = 0, qk_off = 0, post_attn_eps = 0, post_attn_off = 0, mlp_eps = 0,
         mlp_off = 0, post_mlp_eps = 0, post_mlp_off = 0;
};

// pellucid.Stack: blocks [first, last) of a packed model in one call. The same ops in the same
// order on the same tensors as Block.fused, so the same bits; what it saves is the Python
// call per op (about 2.5 us each, nine a block). Built once from flat lists (layout in
// models/decoder.py `build_stack`); an empty tensor stands for "none".
struct Stack : torch::CustomClassHolder {
  std::vector<StackLayer> layers;

  Stack(std::vector<at::Tensor> T, std::vector<int64_t> I, std::vector<double> F) {
    size_t t = 0, i = 0, f = 0;
    auto opt = [](const at::Tensor& x) -> std::optional<at::Tensor> {
      if (x.numel() == 0) return std::nullopt;
      return x;
    };
    auto next_i = [&]() {
      TORCH_CHECK(i < I.size(), "pellucid.Stack: the int list ends early");
      return I[i++];
    };
    auto next_t = [&]() {
      TORCH_CHECK(t < T.size(), "pellucid.Stack: the tensor list ends early");
      return T[t++];
    };
    auto next_f = [&]() {
      TORCH_CHECK(f < F.size(), "pellucid.Stack: the float list ends early");
      return F[f++];
    };
    const int64_t n = next_i();
    for (int64_t l = 0; l < n; ++l) {
      StackLayer L;
      int64_t parts[4];
      for (auto& p : parts) p = next_i();
      L.H = next_i(), L.K = next_i(), L.window = next_i(), L.act = next_i(), L.post = next_i() != 0;
      for (int j = 0; j < 4; ++j)
        for (int64_t k = 0; k < parts[j]; ++k) L.types[j].push_back(next_i());
      L.attn_w = next_t(), L.qn = opt(next_t()), L.kn = opt(next_t()), L.post_attn_w = next_t(), L.mlp_w = next_t();
      L.post_mlp_w = next_t(), L.cos = next_t(), L.sin = next_t();
      for (int j = 0; j < 4; ++j) L.bias[j] = opt(next_t()), L.index[j] = opt(next_t());
      for (int j = 0; j < 4; ++j)
        for (int64_t k = 0; k < parts[j]; ++k) L.ws[j].push_back(next_t());
      L.attn_eps = next_f(), L.attn_off = next_f(), L.scale = next_f(), L.qk_eps = next_f(), L.qk_off = next_f();
      L.post_attn_eps = next_f(), L.post_attn_off = next_f(), L.mlp_eps = next_f(), L.mlp_off = next_f();
      L.post_mlp_eps = next_f(), L.post_mlp_off = next_f();
      layers.push_back(std::move(L));
    }
    TORCH_CHECK(t == T.size() && i == I.size() && f == F.size(), "pellucid.Stack: lists longer than their layout");
  }

  // x (B, T, E) float32 contiguous, updated in place and returned; k_all, v_all (layers, S, K, Lmax, D).
  at::Tensor run(at::Tensor x, at::Tensor k_all, at::Tensor v_all, at::Tensor slots, at::Tensor pos, int64_t first,
                 int64_t last) {
    static auto mm = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("pellucid::block_mm", "")
                         .typed<at::Tensor(const at::Tensor&, at::TensorList, at::IntArrayRef,
                                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
    TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous(),
                "pellucid.Stack.run: x must be (B, T, E) contiguous float32, got ", x.sizes());
    TORCH_CHECK(0 <= first && first <= last && last <= static_cast<int64_t>(layers.size()),
                "pellucid.Stack.run: layers [", first, ", ", last, ") outside 0..", layers.size());
    const int64_t B = x.size(0), T = x.size(1), E = x.size(2);
    for (int64_t l = first; l < last; ++l) {
      const StackLayer& L = layers[l];
      auto kc = k_all.select(0, l), vc = v_all.select(0, l);
      auto h = ::rms_norm(x, L.attn_w, L.attn_eps, L.attn_off);
      auto qkv = mm.call(h.view({B * T, E}), L.ws[0], L.types[0], L.bias[0], L.index[0]).view({B, T, -1});
      auto z = ::attention(qkv, kc, vc, slots, pos, L.cos, L.sin, L.H, L.K, L.scale, L.window, L.qn, L.kn, L.qk_eps, L.qk_off);
      auto a = mm.call(z.view({B * T, -1}), L.ws[1], L.types[1], L.bias[1], L.index[1]).view({B, T, E});
      if (L.post) a = ::rms_norm(a, L.post_attn_w, L.post_attn_eps, L.post_attn_off);
      auto h2 = ::add_rms_norm(x, a, L.mlp_w, L.mlp_eps, L.mlp_off);
      auto gu = mm.call(h2.view({-1, E}), L.ws[2], L.types[2], L.bias[2], L.index[2]);
      auto m = mm.call(::glu(gu, L.act), L.ws[3], L.types[3], L.bias[3], L.index[3]).view({B, T, E});
      if (L.post) m = ::rms_norm(m, L.post_mlp_w, L.post_mlp_eps, L.post_mlp_off);
      x.add_(m);
    }
    return x;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(pellucid, m) {
  m.class_<Stack>("Stack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("run", &Stack::run);
  m.def("rms_norm(Tensor x, Tensor w, float eps, float offset) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) residual, Tensor x, Tensor w, float eps, float offset) -> Tensor");
  m.def("glu(Tensor gu, int act) -> Tensor");
  m.def("apply_bitmask(Tensor logits, Tensor bits, float fill) -> (Tensor, Tensor)");
  m.def(
      "attention(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor pos, Tensor cos, "
      "Tensor sin, int n_heads, int n_kv_heads, float scale, int window, Tensor? q_norm, Tensor? k_norm, "
      "float norm_eps, float norm_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(pellucid, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("glu", &glu);
  m.impl("apply_bitmask", &apply_bitmask);
  m.impl("attention", &attention);
}
