// fastlm's CPU GEMV: y (M, N) = x (M, K) . w (N, K)^T (+ bias) for decode-sized M, fp32 or bf16, fp32 sums.
//
// Why hand-written: a batch-1 decode step is bound by reading the weights, and on the development AMD EPYC
// (torch 2.13) aten's F.linear read them at ~0.25 and oneDNN's prepacked kernels at ~0.5-0.75 of the
// memory's read bandwidth, bf16 worst. What reaches it here: one weight row at a time (one sequential
// stream per thread), every x row (<= 8) against the row it has loaded, software prefetch 4 KB ahead
// (without it, bf16 read 30 GB/s of 43), bf16 products through AVX512-BF16's vdpbf16ps.
// Built at first use by fastlm/kernels/gemv.py with -march=native; machines without AVX-512 take the
// portable loops (the timed choice in fastlm.runtime.cpu_linear decides whether it is used at all).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPrefetchBytes = 4096;
constexpr int kMaxRows = 8;  // x rows per pass over w: 8 fp32 accumulators of 16 lanes stay in registers

template <int M>
void dot_f32(const float* x, int64_t K, const float* w, float* sums) {
#if defined(__AVX512F__)
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetchBytes, _MM_HINT_T0);
    const __m512 wv = _mm512_maskz_loadu_ps(mask, w + k);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + m * K + k), wv, acc[m]);
  }
  for (int m = 0; m < M; ++m) sums[m] = _mm512_reduce_add_ps(acc[m]);
#else
  for (int m = 0; m < M; ++m) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * w[k];
    sums[m] = s;
  }
#endif
}

template <int M>
void dot_bf16(const at::BFloat16* x, int64_t K, const at::BFloat16* w, float* sums) {
#if defined(__AVX512BF16__)
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1);
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetchBytes, _MM_HINT_T0);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + k);
    for (int m = 0; m < M; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k), wv);
  }
  for (int m = 0; m < M; ++m) sums[m] = _mm512_reduce_add_ps(acc[m]);
#else
  for (int m = 0; m < M; ++m) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += static_cast<float>(x[m * K + k]) * static_cast<float>(w[k]);
    sums[m] = s;
  }
#endif
}

template <typename T, int M>
void gemv_pass(const T* x, int64_t K, const T* w, const T* bias, T* y, int64_t N) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    float sums[M];
    for (int64_t n = begin; n < end; ++n) {
      if constexpr (std::is_same_v<T, float>) dot_f32<M>(x, K, w + n * K, sums);
      else dot_bf16<M>(x, K, w + n * K, sums);
      const float b = bias ? static_cast<float>(bias[n]) : 0.f;
      for (int m = 0; m < M; ++m) y[m * N + n] = static_cast<T>(sums[m] + b);
    }
  });
}

template <typename T>
void gemv_rows(const T* x, int64_t M, int64_t K, const T* w, const T* bias, T* y, int64_t N) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {  // more than kMaxRows rows: one pass over w per kMaxRows
    const T* xs = x + m0 * K;
    T* ys = y + m0 * N;
    switch (std::min<int64_t>(kMaxRows, M - m0)) {
      case 1: gemv_pass<T, 1>(xs, K, w, bias, ys, N); break;
      case 2: gemv_pass<T, 2>(xs, K, w, bias, ys, N); break;
      case 3: gemv_pass<T, 3>(xs, K, w, bias, ys, N); break;
      case 4: gemv_pass<T, 4>(xs, K, w, bias, ys, N); break;
      case 5: gemv_pass<T, 5>(xs, K, w, bias, ys, N); break;
      case 6: gemv_pass<T, 6>(xs, K, w, bias, ys, N); break;
      case 7: gemv_pass<T, 7>(xs, K, w, bias, ys, N); break;
      default: gemv_pass<T, 8>(xs, K, w, bias, ys, N); break;
    }
  }
}

// Arguments are validated in Python (fastlm.kernels.gemv); these checks only guard the memory accesses.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "fastlm_cpu::gemv: x (M, K), w (N, K)");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "fastlm_cpu::gemv: CPU tensors");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "fastlm_cpu::gemv: x and w both fp32 or both bf16");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == w.size(0) && bias->scalar_type() == x.scalar_type()
                                    && bias->device().is_cpu()), "fastlm_cpu::gemv: bias (N,) in x's dtype");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (x.scalar_type() == at::kFloat) {
    gemv_rows<float>(xc.data_ptr<float>(), M, K, wc.data_ptr<float>(), bc.defined() ? bc.data_ptr<float>() : nullptr,
                     y.data_ptr<float>(), N);
  } else {
    using B = at::BFloat16;
    gemv_rows<B>(xc.data_ptr<B>(), M, K, wc.data_ptr<B>(), bc.defined() ? bc.data_ptr<B>() : nullptr, y.data_ptr<B>(), N);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(fastlm_cpu, m) { m.def("gemv(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) { m.impl("gemv", &gemv); }
