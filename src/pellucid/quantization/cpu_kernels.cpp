// pellucid's weight-only matmul kernels for x86 CPUs with AVX2 + FMA.
//
// Both read the quantized weights once per call and widen them to float32 in registers
// (nothing the size of the matrix is ever dequantized); activations and sums are float32.
// Rows of the output are split across torch's intra-op threads; up to four input rows
// share each widened weight vector, so prefill reads the weights once per four tokens.
//
//   pellucid::int8_mm(x (M, K) f32, w (N, K) int8, scale (N,) f32) -> (M, N) f32
//       y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]
//   pellucid::int4_mm(x (M, K) f32, qs (N, K/2) uint8, d (N, G) f32, mn (N, G) f32, group) -> (M, N) f32
//       w[n, k] = d[n, g] * q + mn[n, g], g = k / group, q the k-th nibble of row n in
//       blocks of 32: byte j of a block holds element j (low nibble) and j + 16 (high),
//       GGUF's Q4_0/Q4_1 order, so those files' nibbles are used as stored.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

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

TORCH_LIBRARY(pellucid, m) {
  m.def("int8_mm(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor qs, Tensor d, Tensor mn, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(pellucid, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
}
