// fastlm's CPU GEMVs for the weight-only int8 / int4 formats (fastlm/kernels/quant.py), read as stored.
//
//   int8_gemv(x (M, K), q int8 (N, K), scale fp32 (N,), bias?)        y = (x . q[n]) * scale[n] + bias[n]
//   int4_gemv(x (M, K), q uint8 (N, Kp/2), scale, zero fp32 (N, Kp/G), bias?)
//       w = (nibble - 8) * scale + zero per group of G columns (low nibble = column 2j, high = 2j + 1), so
//       per group: scale * (x . nibbles) + (zero - 8 * scale) * sum(x over the group).
// x fp32 or bf16 (y in x's dtype), up to 8 rows per pass over the weights, fp32 sums. Why: a batch-1 decode
// reads every weight once, and on the development AMD EPYC PyTorch's packed int8/int4 CPU kernels read
// ~16 GB/s of the ~40-75 the memory gives; the int4 one also wants its own repacked copy of the weights
// beside fastlm's (twice the memory the format should take). Here x is widened to fp32 once per call (for
// int4 split into even and odd columns, with per-group sums), each weight row streams once, integers are
// widened in registers, and the next rows are prefetched.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FASTLM_AVX512 1
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxRows = 8;
constexpr int64_t kPrefetchBytes = 2048;

// x rows widened to fp32, K padded with zeros to `width` (a multiple of 32).
std::vector<float> widen_rows(const at::Tensor& x, int64_t width) {
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<float> out(M * width, 0.f);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* p = xf.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) std::copy(p + m * K, p + (m + 1) * K, out.begin() + m * width);
  return out;
}

template <int M>
void int8_rows(const float* x, int64_t Kw, const int8_t* q, int64_t K, float* sums) {
#ifdef FASTLM_AVX512
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
    _mm_prefetch(reinterpret_cast<const char*>(q + k) + kPrefetchBytes, _MM_HINT_T0);
    const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, q + k)));
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * Kw + k), w, acc[m]);
  }
  for (int m = 0; m < M; ++m) sums[m] = _mm512_reduce_add_ps(acc[m]);
#else
  for (int m = 0; m < M; ++m) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += x[m * Kw + k] * static_cast<float>(q[k]);
    sums[m] = s;
  }
#endif
}

// One output row of int4: xe/xo (M, Kp/2) the even / odd columns of x, xg (M, groups) their group sums.
template <int M>
void int4_rows(const float* xe, const float* xo, const float* xg, int64_t half, int64_t groups, int64_t G,
               const uint8_t* q, const float* scale, const float* zero, float* sums) {
  for (int m = 0; m < M; ++m) sums[m] = 0.f;
  const int64_t bytes_per_group = G / 2;  // a multiple of 16 (G in 32, 64, 128)
  for (int64_t g = 0; g < groups; ++g) {
    float dots[M];
#ifdef FASTLM_AVX512
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t j = g * bytes_per_group; j < (g + 1) * bytes_per_group; j += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(q + j) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xe + m * half + j), lo, acc[m]);
        acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xo + m * half + j), hi, acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) dots[m] = _mm512_reduce_add_ps(acc[m]);
#else
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t j = g * bytes_per_group; j < (g + 1) * bytes_per_group; ++j)
        s += xe[m * half + j] * static_cast<float>(q[j] & 15) + xo[m * half + j] * static_cast<float>(q[j] >> 4);
      dots[m] = s;
    }
#endif
    const float s = scale[g], offset = zero[g] - 8.f * s;
    for (int m = 0; m < M; ++m) sums[m] += s * dots[m] + offset * xg[m * groups + g];
  }
}

template <typename T, int M, typename RowFn>
void for_rows(int64_t N, const T* bias, T* y, RowFn row) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    float sums[M];
    for (int64_t n = begin; n < end; ++n) {
      row(n, sums);
      const float b = bias ? static_cast<float>(bias[n]) : 0.f;
      for (int m = 0; m < M; ++m) y[m * N + n] = static_cast<T>(sums[m] + b);
    }
  });
}

// fn(std::integral_constant<int, R>) for R = rows (1..kMaxRows): the row count as a compile-time constant.
template <typename Fn>
void with_rows(int64_t rows, Fn fn) {
  switch (rows) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, kMaxRows>{}); break;
  }
}

void check_x(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "fastlm_cpu quantized gemv: x (M, K) fp32 or bf16 on the CPU");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type()),
              "fastlm_cpu quantized gemv: bias (N,) in x's dtype");
}

template <typename T>
void int8_typed(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), Kw = (K + 31) / 32 * 32;
  const std::vector<float> xf = widen_rows(x, Kw);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const float* xs = xf.data() + m0 * Kw;
    T* ys = y.data_ptr<T>() + m0 * N;
    with_rows(std::min<int64_t>(kMaxRows, M - m0), [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      for_rows<T, R>(N, bp, ys, [&](int64_t n, float* sums) {
        int8_rows<R>(xs, Kw, qp + n * K, K, sums);
        for (int m = 0; m < R; ++m) sums[m] *= sp[n];
      });
    });
  }
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.size(1) == x.size(-1) && q.device().is_cpu(),
              "fastlm_cpu::int8_gemv: q int8 (N, K)");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == q.size(0) && scale.scalar_type() == at::kFloat,
              "fastlm_cpu::int8_gemv: scale fp32 (N,)");
  check_x(x, bias, q.size(0));
  at::Tensor y = at::empty({x.size(0), q.size(0)}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor qc = q.contiguous(), sc = scale.contiguous(), bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (x.scalar_type() == at::kFloat) int8_typed<float>(x, qc, sc, bc, y);
  else int8_typed<at::BFloat16>(x, qc, sc, bc, y);
  return y;
}

template <typename T>
void int4_typed(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                const at::Tensor& bias, at::Tensor& y) {
  const int64_t M = x.size(0), N = q.size(0), half = q.size(1), Kp = 2 * half, groups = scale.size(1), G = Kp / groups;
  const std::vector<float> xf = widen_rows(x, Kp);  // zeros past K: the padding columns meet no input
  std::vector<float> xe(M * half), xo(M * half), xg(M * groups, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < half; ++j) {
      xe[m * half + j] = xf[m * Kp + 2 * j];
      xo[m * half + j] = xf[m * Kp + 2 * j + 1];
      xg[m * groups + 2 * j / G] += xf[m * Kp + 2 * j] + xf[m * Kp + 2 * j + 1];
    }
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *zp = zero.data_ptr<float>();
  const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    T* ys = y.data_ptr<T>() + m0 * N;
    with_rows(std::min<int64_t>(kMaxRows, M - m0), [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      for_rows<T, R>(N, bp, ys, [&](int64_t n, float* sums) {
        int4_rows<R>(xe.data() + m0 * half, xo.data() + m0 * half, xg.data() + m0 * groups, half, groups, G,
                     qp + n * half, sp + n * groups, zp + n * groups, sums);
      });
    });
  }
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.device().is_cpu(), "fastlm_cpu::int4_gemv: q uint8 (N, Kp/2)");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == q.size(0) && scale.scalar_type() == at::kFloat && scale.size(1) > 0 &&
              zero.sizes() == scale.sizes() && zero.scalar_type() == at::kFloat, "fastlm_cpu::int4_gemv: scale, zero fp32 (N, groups)");
  const int64_t Kp = 2 * q.size(1), groups = scale.size(1);
  TORCH_CHECK(Kp % groups == 0 && (Kp / groups) % 32 == 0, "fastlm_cpu::int4_gemv: group size a multiple of 32");
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= Kp && x.size(1) > Kp - Kp / groups, "fastlm_cpu::int4_gemv: x (M, K) within the last group");
  check_x(x, bias, q.size(0));
  at::Tensor y = at::empty({x.size(0), q.size(0)}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor qc = q.contiguous(), sc = scale.contiguous(), zc = zero.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (x.scalar_type() == at::kFloat) int4_typed<float>(x, qc, sc, zc, bc, y);
  else int4_typed<at::BFloat16>(x, qc, sc, zc, bc, y);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_cpu, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor q, Tensor scale, Tensor zero, Tensor? bias) -> Tensor");
}
TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
}
