// fastlm's CPU GEMVs for the weight-only int8 / int4 formats (fastlm/kernels/quant.py), read as stored.
//
//   int8_gemv(x (M, K), q int8 (N, K), scale fp32 (N,), bias?)        y = (x . q[n]) * scale[n] + bias[n]
//   int4_gemv(x (M, K), q uint8 (N, Kp/2), scale, zero fp32 (N, Kp/G), bias?)
//       w = (nibble - 8) * scale + zero per group of G columns (low nibble = column 2j, high = 2j + 1), so
//       per group: scale * (x . nibbles) + (zero - 8 * scale) * sum(x over the group).
// x fp32 or bf16 (y in x's dtype), up to 8 rows per pass over the weights, fp32 sums. Why: a batch-1 decode
// reads every weight once, and on the development AMD EPYC PyTorch's packed int8/int4 CPU kernels read
// ~16-30 GB/s of the ~40-75 the memory gives; the int4 one also wants its own repacked copy of the weights
// beside fastlm's (twice the memory the format should take). Each weight row streams once, integers are
// widened in registers, and the next rows are prefetched. What bounds them is arithmetic, not memory, so:
//   - one x row keeps 4 independent fp32 sums (one chain waits on the FMA latency: 30 -> 45 GB/s of int8);
//   - bf16 x (AVX512-BF16): products through vdpbf16ps, 32 per instruction, exact (int8 values and
//     nibbles are exact in bf16, products of two bf16 exact in fp32). int8 widens 32 weights to bf16
//     through fp32 (the 2..8-row case: 2.5x the fp32 FMAs); int4 makes bf16 128 + nibble with one bit
//     operation (nibble | 0x4300) and takes 128 * sum(x over the group) off with the zero term.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FASTLM_AVX512 1
#include <immintrin.h>
#if defined(__AVX512BF16__)
#define FASTLM_BF16_DOT 1
#endif
#endif

namespace {

constexpr int kMaxRows = 8;
constexpr int64_t kPrefetchBytes = 4096;

// x rows widened to fp32, K padded with zeros to `width` (a multiple of 32).
std::vector<float> widen_rows(const at::Tensor& x, int64_t width) {
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<float> out(M * width, 0.f);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* p = xf.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) std::copy(p + m * K, p + (m + 1) * K, out.begin() + m * width);
  return out;
}

// Independent fp32 sums per x row: with one row a single chain would wait on each FMA's latency.
template <int M>
constexpr int chains() { return M == 1 ? 4 : M == 2 ? 2 : 1; }

template <int M>
void int8_rows(const float* x, int64_t Kw, const int8_t* q, int64_t K, float* sums) {
#ifdef FASTLM_AVX512
  constexpr int A = chains<M>();
  __m512 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * A <= K; k += 16 * A) {
    _mm_prefetch(reinterpret_cast<const char*>(q + k) + kPrefetchBytes, _MM_HINT_T0);
    for (int a = 0; a < A; ++a) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 16 * a));
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
      for (int m = 0; m < M; ++m) acc[m][a] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * Kw + k + 16 * a), w, acc[m][a]);
    }
  }
  for (; k < K; k += 16) {  // x is zero-padded to Kw: only the weights need a mask
    const __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
    const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, q + k)));
    for (int m = 0; m < M; ++m) acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * Kw + k), w, acc[m][0]);
  }
  for (int m = 0; m < M; ++m) {
    for (int a = 1; a < A; ++a) acc[m][0] = _mm512_add_ps(acc[m][0], acc[m][a]);
    sums[m] = _mm512_reduce_add_ps(acc[m][0]);
  }
#else
  for (int m = 0; m < M; ++m) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += x[m * Kw + k] * static_cast<float>(q[k]);
    sums[m] = s;
  }
#endif
}

#ifdef FASTLM_BF16_DOT
// 32 int8 weights (the first `left` of them; the rest read as 0) as bf16, exactly, through fp32.
inline __m512bh int8_as_bf16(const int8_t* q, int64_t left) {
  const __mmask16 m0 = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
  const __mmask16 m1 = left >= 32 ? (__mmask16)0xffff : left <= 16 ? (__mmask16)0 : (__mmask16)((1u << (left - 16)) - 1);
  const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m0, q)));
  const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m1, q + 16)));
  return _mm512_cvtne2ps_pbh(w1, w0);
}

// bf16 x rows (M, Kw) zero-padded: the 2..8-row case, where the FMAs of the fp32 path bound the speed.
template <int M>
void int8_rows_bf16(const at::BFloat16* x, int64_t Kw, const int8_t* q, int64_t K, float* sums) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(q + k) + kPrefetchBytes, _MM_HINT_T0);
    const __m512bh w = int8_as_bf16(q + k, K - k);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * Kw + k), w);
  }
  for (int m = 0; m < M; ++m) sums[m] = _mm512_reduce_add_ps(acc[m]);
}

// One output row of int4 for bf16 x: xe/xo (M, half) bf16, the even / odd columns of x. Per group: the dot
// with bf16 (128 + nibble), times the group's scale, summed in fp32 lanes; the caller adds the zero terms.
template <int M, int Bytes>  // Bytes: weight bytes per step, 32 (G a multiple of 64) or 16
void int4_rows_bf16(const at::BFloat16* xe, const at::BFloat16* xo, int64_t half, int64_t groups, int64_t G,
                    const uint8_t* q, const float* scale, float* sums) {
  using V = std::conditional_t<Bytes == 32, __m512, __m256>;
  V acc[M];
  for (int m = 0; m < M; ++m) acc[m] = V{};
  const int64_t bytes_per_group = G / 2;
  for (int64_t g = 0; g < groups; ++g) {
    V dot[M];
    for (int m = 0; m < M; ++m) dot[m] = V{};
    for (int64_t j = g * bytes_per_group; j < (g + 1) * bytes_per_group; j += Bytes) {
      _mm_prefetch(reinterpret_cast<const char*>(q + j) + kPrefetchBytes, _MM_HINT_T0);
      if constexpr (Bytes == 32) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j)));
        const __m512i magic = _mm512_set1_epi16(0x4300);  // bf16 bits of 128: | nibble gives 128 + nibble
        const __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(v, _mm512_set1_epi16(15), magic, 0xEA);  // (v & 15) | magic
        const __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 4), magic);
        for (int m = 0; m < M; ++m) {
          dot[m] = _mm512_dpbf16_ps(dot[m], (__m512bh)_mm512_loadu_si512(xe + m * half + j), lo);
          dot[m] = _mm512_dpbf16_ps(dot[m], (__m512bh)_mm512_loadu_si512(xo + m * half + j), hi);
        }
      } else {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
        const __m256i magic = _mm256_set1_epi16(0x4300);
        const __m256bh lo = (__m256bh)_mm256_ternarylogic_epi32(v, _mm256_set1_epi16(15), magic, 0xEA);
        const __m256bh hi = (__m256bh)_mm256_or_si256(_mm256_srli_epi16(v, 4), magic);
        for (int m = 0; m < M; ++m) {
          dot[m] = _mm256_dpbf16_ps(dot[m], (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xe + m * half + j)), lo);
          dot[m] = _mm256_dpbf16_ps(dot[m], (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xo + m * half + j)), hi);
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      if constexpr (Bytes == 32) acc[m] = _mm512_fmadd_ps(dot[m], _mm512_set1_ps(scale[g]), acc[m]);
      else acc[m] = _mm256_fmadd_ps(dot[m], _mm256_set1_ps(scale[g]), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    if constexpr (Bytes == 32) sums[m] = _mm512_reduce_add_ps(acc[m]);
    else sums[m] = _mm512_reduce_add_ps(_mm512_insertf32x8(_mm512_setzero_ps(), acc[m], 0));
  }
}
#endif

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

// fn(m0, std::integral_constant<int, R>) for each pass over the weights: x rows m0 .. m0 + R - 1, R <= kMaxRows.
template <typename Fn>
void over_passes(int64_t M, Fn fn) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) with_rows(std::min<int64_t>(kMaxRows, M - m0), [&](auto rows) { fn(m0, rows); });
}


void check_x(const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "fastlm_cpu quantized gemv: x (M, K) fp32 or bf16 on the CPU");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type()),
              "fastlm_cpu quantized gemv: bias (N,) in x's dtype");
}

// The int4 format's tensors (quant.py) for K input columns; op names the caller in the messages.
void check_int4(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero, int64_t K, const char* op) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.device().is_cpu(), op, ": q uint8 (N, Kp/2) on the CPU");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == q.size(0) && scale.scalar_type() == at::kFloat && scale.size(1) > 0 &&
              scale.device().is_cpu() && zero.sizes() == scale.sizes() && zero.scalar_type() == at::kFloat &&
              zero.device().is_cpu(), op, ": scale, zero fp32 (N, groups) on the CPU");
  const int64_t Kp = 2 * q.size(1), groups = scale.size(1);
  TORCH_CHECK(Kp % groups == 0 && (Kp / groups) % 32 == 0, op, ": group size a multiple of 32");
  TORCH_CHECK(K <= Kp && K > Kp - Kp / groups, op, ": K within the last group");
}

template <typename T>
void int8_typed(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), Kw = (K + 31) / 32 * 32;
  // bf16 x and more than one row: vdpbf16ps on x as it is (zero-padded); else fp32 FMAs on x widened once.
  bool bf16_dot = false;
#ifdef FASTLM_BF16_DOT
  bf16_dot = std::is_same_v<T, at::BFloat16> && M > 1;
#endif
  const std::vector<float> xf = bf16_dot ? std::vector<float>() : widen_rows(x, Kw);
  const at::Tensor xb = bf16_dot ? at::constant_pad_nd(x, {0, Kw - K}).contiguous() : at::Tensor();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
  over_passes(M, [&](int64_t m0, auto rows) {
    constexpr int R = decltype(rows)::value;
    T* ys = y.data_ptr<T>() + m0 * N;
    for_rows<T, R>(N, bp, ys, [&](int64_t n, float* sums) {
#ifdef FASTLM_BF16_DOT
      if (bf16_dot) int8_rows_bf16<R>(xb.data_ptr<at::BFloat16>() + m0 * Kw, Kw, qp + n * K, K, sums);
      else
#endif
        int8_rows<R>(xf.data() + m0 * Kw, Kw, qp + n * K, K, sums);
      for (int m = 0; m < R; ++m) sums[m] *= sp[n];
    });
  });
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
  over_passes(M, [&](int64_t m0, auto rows) {
    constexpr int R = decltype(rows)::value;
    T* ys = y.data_ptr<T>() + m0 * N;
    for_rows<T, R>(N, bp, ys, [&](int64_t n, float* sums) {
      int4_rows<R>(xe.data() + m0 * half, xo.data() + m0 * half, xg.data() + m0 * groups, half, groups, G,
                   qp + n * half, sp + n * groups, zp + n * groups, sums);
    });
  });
}

#ifdef FASTLM_BF16_DOT
void int4_bf16(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
               const at::Tensor& bias, at::Tensor& y) {
  using B = at::BFloat16;
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), half = q.size(1), groups = scale.size(1), G = 2 * half / groups;
  const at::Tensor xc = x.contiguous();
  const B* xp = xc.data_ptr<B>();
  std::vector<B> xe(M * half, B(0.f)), xo(M * half, B(0.f));  // zeros past K: the padding columns meet no input
  std::vector<float> xg(M * groups, 0.f);
  for (int64_t m = 0; m < M; ++m) {
    const B* row = xp + m * K;
    for (int64_t j = 0; j < K / 2; ++j) {
      xe[m * half + j] = row[2 * j];
      xo[m * half + j] = row[2 * j + 1];
    }
    if (K % 2) xe[m * half + K / 2] = row[K - 1];
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.f;
      for (int64_t c = g * G; c < std::min(K, (g + 1) * G); ++c) sum += static_cast<float>(row[c]);
      xg[m * groups + g] = sum;
    }
  }
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *sp = scale.data_ptr<float>(), *zp = zero.data_ptr<float>();
  const B* bp = bias.defined() ? bias.data_ptr<B>() : nullptr;
  over_passes(M, [&](int64_t m0, auto rows) {
    constexpr int R = decltype(rows)::value;
    B* ys = y.data_ptr<B>() + m0 * N;
    std::vector<float> group_sums(groups * R);  // this pass's rows' group sums, rows innermost
    for (int64_t g = 0; g < groups; ++g)
      for (int m = 0; m < R; ++m) group_sums[g * R + m] = xg[(m0 + m) * groups + g];
    for_rows<B, R>(N, bp, ys, [&](int64_t n, float* sums) {
      const float *s = sp + n * groups, *z = zp + n * groups;
      if (G % 64) int4_rows_bf16<R, 16>(xe.data() + m0 * half, xo.data() + m0 * half, half, groups, G, qp + n * half, s, sums);
      else int4_rows_bf16<R, 32>(xe.data() + m0 * half, xo.data() + m0 * half, half, groups, G, qp + n * half, s, sums);
      // w = (nibble - 8) s + z, and the dots took (128 + nibble): (z - 136 s) times each group's sum of x, for
      // all R rows at once (one vector operation per group; per row, this loop took half an 8-row pass)
      float offsets[R] = {};
      for (int64_t g = 0; g < groups; ++g) {
        const float c = z[g] - 136.f * s[g];
        for (int m = 0; m < R; ++m) offsets[m] += c * group_sums[g * R + m];
      }
      for (int m = 0; m < R; ++m) sums[m] += offsets[m];
    });
  });
}
#endif

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                     const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "fastlm_cpu::int4_gemv: x (M, K)");
  check_int4(q, scale, zero, x.size(1), "fastlm_cpu::int4_gemv");
  check_x(x, bias, q.size(0));
  at::Tensor y = at::empty({x.size(0), q.size(0)}, x.options());
  if (y.numel() == 0) return y;
  const at::Tensor qc = q.contiguous(), sc = scale.contiguous(), zc = zero.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (x.scalar_type() == at::kFloat) int4_typed<float>(x, qc, sc, zc, bc, y);
  else {
#ifdef FASTLM_BF16_DOT
    int4_bf16(x, qc, sc, zc, bc, y);
#else
    int4_typed<at::BFloat16>(x, qc, sc, zc, bc, y);
#endif
  }
  return y;
}

// int4_dequantize(q, scale, zero, K, dtype) -> w (N, K): (nibble - 8) * scale + zero in fp32 (a product and
// a sum, each rounded, as the PyTorch definition in quant.py computes it), then cast. Why: the dequantize +
// GEMM path for prefill-sized inputs spent ~5 ms of PyTorch ops on one 2304 x 768 weight; this takes
// ~0.1 ms and keeps no copy (PyTorch's packed int4 kernel, faster otherwise, wants a repacked copy).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")  // no fused multiply-add: the product rounds, as in PyTorch
template <typename T>
void dequantize_rows(const uint8_t* q, const float* scale, const float* zero, int64_t N, int64_t half, int64_t groups,
                     int64_t K, T* w) {
  const int64_t G = 2 * half / groups;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = q + n * half;
      T* out = w + n * K;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = scale[n * groups + g], z = zero[n * groups + g];
        const int64_t last = std::min((g + 1) * G, K) / 2;  // whole bytes of this group within K
        for (int64_t j = g * G / 2; j < last; ++j) {
          out[2 * j] = static_cast<T>(static_cast<float>((row[j] & 15) - 8) * s + z);
          out[2 * j + 1] = static_cast<T>(static_cast<float>((row[j] >> 4) - 8) * s + z);
        }
        if (K % 2 && (K - 1) / G == g) out[K - 1] = static_cast<T>(static_cast<float>((row[K / 2] & 15) - 8) * s + z);
      }
    }
  });
}
#pragma GCC pop_options

at::Tensor int4_dequantize(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero, int64_t K,
                           at::ScalarType dtype) {
  check_int4(q, scale, zero, K, "fastlm_cpu::int4_dequantize");
  const int64_t N = q.size(0), half = q.size(1), groups = scale.size(1);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "fastlm_cpu::int4_dequantize: dtype fp32/bf16/fp16");
  at::Tensor w = at::empty({N, K}, q.options().dtype(dtype));
  const at::Tensor qc = q.contiguous(), sc = scale.contiguous(), zc = zero.contiguous();
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const float *sp = sc.data_ptr<float>(), *zp = zc.data_ptr<float>();
  if (dtype == at::kFloat) dequantize_rows<float>(qp, sp, zp, N, half, groups, K, w.data_ptr<float>());
  else if (dtype == at::kBFloat16) dequantize_rows<at::BFloat16>(qp, sp, zp, N, half, groups, K, w.data_ptr<at::BFloat16>());
  else dequantize_rows<at::Half>(qp, sp, zp, N, half, groups, K, w.data_ptr<at::Half>());
  return w;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_cpu, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor q, Tensor scale, Tensor zero, Tensor? bias) -> Tensor");
  m.def("int4_dequantize(Tensor q, Tensor scale, Tensor zero, int K, ScalarType dtype) -> Tensor");
}
TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_dequantize", &int4_dequantize);
}
