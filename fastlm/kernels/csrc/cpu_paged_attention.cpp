// fastlm's CPU paged decode attention: one new query token per row over a paged KV pool, fp32 math.
//
// Why in C++: the PyTorch path (fastlm/kernels/paged_attention.py, _decode_rows_cpu) issues ~10 small aten
// calls per row and layer (gather or view, casts, torch's flash kernel); on the development AMD EPYC a
// batch-1 GPT-2 step spent ~1.5 ms of ~8.5 in them, mostly call and thread start-up overhead. Here one
// parallel loop over tasks of (row, group of KV heads) reads the row's tokens in order (a token's heads are
// adjacent in the pool; widened to fp32 once where G query heads share them), each K/V head once: scores
// for all tokens, an exact softmax (a vectorized exp), then the V-weighted sums. Measured
// against that path (2 threads, bf16 pool, 12/4 heads of 64): 1 row 0.04 vs 0.08 ms, 8 rows 0.18 vs 0.57 ms,
// 64 rows of 100-700 tokens 1.5 vs 5.1 ms, 64 rows sharing 256 tokens 1.25 vs 3.5 ms (the PyTorch cascade).
// Used for Sq == 1 on CPU where it builds (fastlm/kernels/_cpu_ext.py); the public function validates.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

#ifdef FASTLM_AVX512
using namespace fastlm_simd;  // load16, tail_mask, reduce16

// exp(x) for x <= 0 (softmax numerators), 16 at a time: x = n ln2 + r, |r| <= ln2/2, Cephes' expf
// polynomial for e^r (relative error ~1e-7), times 2^n by scalef. glibc's expf is not vectorized here
// (a call per score: ~20% of a 48-row decode attention).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // below: e^x < 2^-125, rounds to ~0 anyway
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// s[0..n) <- exp(s - max(s)); returns their sum.
inline float softmax_numerators(float* s, int64_t n) {
#ifdef FASTLM_AVX512
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < n; t += 16) top = _mm512_mask_max_ps(top, tail_mask(n - t), top, _mm512_maskz_loadu_ps(tail_mask(n - t), s + t));
  const __m512 top_all = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = tail_mask(n - t);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), top_all));
    _mm512_mask_storeu_ps(s + t, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
#else
  float top = -std::numeric_limits<float>::infinity(), sum = 0.f;
  for (int64_t t = 0; t < n; ++t) top = std::max(top, s[t]);
  for (int64_t t = 0; t < n; ++t) sum += (s[t] = std::exp(s[t] - top));
  return sum;
#endif
}

constexpr int64_t kChunk = 16;  // tokens per step: 16 scores reduced together, a V sum updated once

// dst[0..width) = src[0..width) as fp32: a token's K (or V) values of the heads a task handles, widened once
// for all the query heads that read them.
template <typename T>
inline void widen_row(const T* src, float* dst, int64_t width) {
#ifdef FASTLM_AVX512
  for (int64_t d = 0; d < width; d += 16) _mm512_mask_storeu_ps(dst + d, tail_mask(width - d), load16(src + d, tail_mask(width - d)));
#else
  for (int64_t d = 0; d < width; ++d) dst[d] = static_cast<float>(src[d]);
#endif
}

// A chunk's tokens as attend_in_chunks reads them: token j's first KV head at base + at[j], its other heads
// after it (D values each). S: float (the widened copy) or the pool's type (read in place).
template <typename S>
struct ChunkRows {
  const S* base;
  const int64_t* at;
};

#ifdef FASTLM_AVX512
// dst[j] = q . k_j for n <= 16 tokens (k_j: D values at k.base + k.at[j] + h_off); kFull: n == 16, so the
// 16 sums are registers (a constant trip count), not stack slots.
template <bool kFull, typename S>
inline void scores16(const float* q, int64_t D, ChunkRows<S> k, int64_t h_off, int64_t n, float* dst) {
  __m512 sums[kChunk];
  for (int64_t j = 0; j < kChunk; ++j) sums[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = tail_mask(D - d);
    const __m512 qv = _mm512_maskz_loadu_ps(m, q + d);
    for (int64_t j = 0; j < (kFull ? kChunk : n); ++j)
      sums[j] = _mm512_fmadd_ps(qv, load16(k.base + k.at[j] + h_off + d, m), sums[j]);
  }
  _mm512_mask_storeu_ps(dst, tail_mask(n), reduce16(sums));
}
#endif

// For each of `rows` query heads r (q_r: D values in qf; KV head r / G): scores[r, t0 + j] = q_r . k_j over
// the chunk's n tokens.
template <typename S>
inline void chunk_scores(const float* qf, int64_t rows, int64_t G, int64_t D, ChunkRows<S> k, int64_t n,
                         float* scores, int64_t length, int64_t t0) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* qr = qf + r * D;
    const int64_t h_off = (r / G) * D;
    float* dst = scores + r * length + t0;
#ifdef FASTLM_AVX512
    if (n == kChunk) scores16<true>(qr, D, k, h_off, n, dst);
    else scores16<false>(qr, D, k, h_off, n, dst);
#else
    for (int64_t j = 0; j < n; ++j) {
      const S* kt = k.base + k.at[j] + h_off;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < D; ++d) sum += qr[d] * static_cast<float>(kt[d]);
      dst[j] = sum;
    }
#endif
  }
}

// acc_r += sum_j p[r, t0 + j] * v_j over the chunk's n tokens (v as k in chunk_scores): acc_r is read and
// written once per chunk, not once per token.
template <typename S>
inline void chunk_values(const float* scores, int64_t length, int64_t t0, int64_t rows, int64_t G, int64_t D,
                         ChunkRows<S> v, int64_t n, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = scores + r * length + t0;
    const int64_t h_off = (r / G) * D;
    float* a = acc + r * D;
#ifdef FASTLM_AVX512
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = tail_mask(D - d);
      __m512 even = _mm512_maskz_loadu_ps(m, a + d), odd = _mm512_setzero_ps();  // two chains: FMA latency
      int64_t j = 0;
      for (; j + 2 <= n; j += 2) {
        even = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(v.base + v.at[j] + h_off + d, m), even);
        odd = _mm512_fmadd_ps(_mm512_set1_ps(p[j + 1]), load16(v.base + v.at[j + 1] + h_off + d, m), odd);
      }
      if (j < n) even = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(v.base + v.at[j] + h_off + d, m), even);
      _mm512_mask_storeu_ps(a + d, m, _mm512_add_ps(even, odd));
    }
#else
    for (int64_t j = 0; j < n; ++j) {
      const S* vt = v.base + v.at[j] + h_off;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p[j] * static_cast<float>(vt[d]);
    }
#endif
  }
}

// One row, KV heads [h0, h1): the G query heads of each (q rows h*G .. h*G+G-1, each (D,)) attend over the
// row's first `length` tokens, read through its block table in order (a token's heads are adjacent in the
// pool): scores of every token, an exact softmax, then the V-weighted sums; out like q. 16 tokens at a time:
// 16 scores per query head summed together by reduce16, each V sum updated once per chunk.
//   - G > 1 (GQA): each chunk's KV heads are widened to fp32 once for the G query heads that share them
//     (against a token-by-token pass, 2 threads, 12/4 heads of 64, bf16: 8 rows of 1000 tokens 0.40 -> 0.27
//     ms, 64 rows of 300 tokens 1.0 -> 0.66 ms).
//   - G == 1 (GPT-2): each value is used once, so it is read in place, not widened.
// kD: the head size as a constant (0: D at run time). With D known, the loops over it lose their masks and
// trip counts: GPT-2's shapes (8 rows of 160 tokens, 12 heads of 64, bf16, 2 threads, the pools out of
// cache) ran 0.42 -> 0.18 ms, 2x faster at 1 to 64 rows and in fp32 too (G == 1; the same for GQA).
template <typename T, int64_t kD>
void attend_in_chunks(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t length,
                      int64_t block_size, int64_t Hkv, int64_t h0, int64_t h1, int64_t G, int64_t D_, float scale,
                      T* out) {
  const int64_t D = kD ? kD : D_;
  const int64_t rows = (h1 - h0) * G, width = (h1 - h0) * D;  // query heads here: row r = (h - h0) * G + g
  const bool in_place = G == 1;
  std::vector<float> qf(rows * D), scores(rows * length), acc(rows * D, 0.f), total(rows);
  std::vector<float> wide(in_place ? 0 : kChunk * width);
  for (int64_t i = 0; i < rows * D; ++i) qf[i] = static_cast<float>(q[h0 * G * D + i]) * scale;
  std::vector<int64_t> offset(length), wide_at(kChunk);  // token t's head h0 in the pools; in `wide`
  for (int64_t i = 0, t = 0; t < length; ++i)
    for (int64_t j = 0; j < block_size && t < length; ++j, ++t)
      offset[t] = ((static_cast<int64_t>(table[i]) * block_size + j) * Hkv + h0) * D;
  for (int64_t j = 0; j < kChunk; ++j) wide_at[j] = j * width;
  auto widen_chunk = [&](const T* cache, int64_t t0, int64_t n) {
    for (int64_t j = 0; j < n; ++j) widen_row(cache + offset[t0 + j], wide.data() + j * width, width);
  };
  // The pools are cold in decode (a step streams the weights between two layers' attention): each chunk's
  // lines are requested one chunk ahead (2 or 4 measured the same). 8 rows of 1000 tokens with cold caches:
  // 0.46 -> 0.29 ms; without, a row's blocks were read at ~18 GB/s.
  auto prefetch_chunk = [&](const T* cache, int64_t t0) {
    for (int64_t t = t0; t < std::min(length, t0 + kChunk); ++t)
      for (int64_t b = 0; b < width * static_cast<int64_t>(sizeof(T)); b += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(cache + offset[t]) + b);
  };
  // The chunk at t0 of `cache`, widened first unless read in place.
  auto tokens = [&](const T* cache, int64_t t0, int64_t n, auto&& use) {
    if (in_place) return use(ChunkRows<T>{cache, offset.data() + t0});
    widen_chunk(cache, t0, n);
    use(ChunkRows<float>{wide.data(), wide_at.data()});
  };
  prefetch_chunk(k_cache, 0);
  for (int64_t t0 = 0; t0 < length; t0 += kChunk) {
    const int64_t n = std::min(kChunk, length - t0);
    prefetch_chunk(k_cache, t0 + kChunk);
    tokens(k_cache, t0, n, [&](auto k) { chunk_scores(qf.data(), rows, G, D, k, n, scores.data(), length, t0); });
  }
  prefetch_chunk(v_cache, 0);
  for (int64_t r = 0; r < rows; ++r) total[r] = softmax_numerators(scores.data() + r * length, length);
  for (int64_t t0 = 0; t0 < length; t0 += kChunk) {
    const int64_t n = std::min(kChunk, length - t0);
    prefetch_chunk(v_cache, t0 + kChunk);
    tokens(v_cache, t0, n, [&](auto v) { chunk_values(scores.data(), length, t0, rows, G, D, v, n, acc.data()); });
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d)
      out[h0 * G * D + r * D + d] = static_cast<T>(total[r] > 0.f ? acc[r * D + d] / total[r] : 0.f);
}

// attend_in_chunks with the common head sizes as constants.
template <typename T>
void attend_heads(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t length,
                  int64_t block_size, int64_t Hkv, int64_t h0, int64_t h1, int64_t G, int64_t D, float scale, T* out) {
  switch (D) {
    case 64: return attend_in_chunks<T, 64>(q, k_cache, v_cache, table, length, block_size, Hkv, h0, h1, G, D, scale, out);
    case 128: return attend_in_chunks<T, 128>(q, k_cache, v_cache, table, length, block_size, Hkv, h0, h1, G, D, scale, out);
    default: return attend_in_chunks<T, 0>(q, k_cache, v_cache, table, length, block_size, Hkv, h0, h1, G, D, scale, out);
  }
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& tables,
            const at::Tensor& lengths, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2), G = Hq / Hkv, width = tables.size(1);
  const T *qp = q.data_ptr<T>(), *kp = k_cache.data_ptr<T>(), *vp = v_cache.data_ptr<T>();
  const int32_t *tp = tables.data_ptr<int32_t>(), *lp = lengths.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  // Tasks: each row's KV heads in `splits` contiguous groups, enough tasks for every thread (a batch-1
  // step splits its heads; many rows keep a row's heads together: one sequential pass over its tokens).
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min<int64_t>(Hkv, std::max<int64_t>(1, (2 * threads + B - 1) / B));
  const int64_t per_split = (Hkv + splits - 1) / splits;
  at::parallel_for(0, B * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / splits, h0 = (task % splits) * per_split, h1 = std::min(Hkv, h0 + per_split);
      if (h0 >= h1) continue;
      attend_heads<T>(qp + b * Hq * D, kp, vp, tp + b * width, lp[b], block_size, Hkv, h0, h1, G, D,
                      static_cast<float>(scale), op + b * Hq * D);
    }
  });
}

// The first fault of decode tables (B rows of `width` int32 entries; lengths (B,)): a length outside
// [min_len, capacity] (row, col -1), or an entry a row uses (its first ceil(length / block_size)) outside
// [0, num_blocks) (row, col); row -1: none. capacity <= width * block_size, so used entries are in the table.
struct TableFault { int64_t row = -1, col = -1; };
TableFault find_table_fault(const int32_t* tp, const int32_t* lp, int64_t B, int64_t width, int64_t num_blocks,
                            int64_t block_size, int64_t min_len, int64_t capacity) {
  for (int64_t b = 0; b < B; ++b) {
    if (lp[b] < min_len || lp[b] > capacity) return {b, -1};
    for (int64_t i = 0; i < (lp[b] + block_size - 1) / block_size; ++i)
      if (tp[b * width + i] < 0 || tp[b * width + i] >= num_blocks) return {b, i};
  }
  return {};
}

// q (B, Hq, D); k_cache, v_cache (num_blocks, block_size, Hkv, D) contiguous, q's dtype (fp32 or bf16);
// block_tables int32 (B, max_blocks); seqlens int32 (B,) -> (B, Hq, D). The public Python function
// validates and names bad arguments; these checks keep every memory access inside the tensors.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& seqlens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "fastlm_cpu::paged_decode: shapes");
  TORCH_CHECK(q.size(2) == k_cache.size(3) && k_cache.size(2) > 0 && q.size(1) % k_cache.size(2) == 0,
              "fastlm_cpu::paged_decode: heads / head size");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16), "fastlm_cpu::paged_decode: dtypes");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "fastlm_cpu::paged_decode: contiguous pools");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && block_tables.scalar_type() == at::kInt &&
              seqlens.dim() == 1 && seqlens.size(0) == q.size(0) && seqlens.scalar_type() == at::kInt,
              "fastlm_cpu::paged_decode: block_tables (B, max_blocks) / seqlens (B,) int32");
  const at::Tensor qc = q.contiguous(), tables = block_tables.contiguous(), lengths = seqlens.contiguous();
  const int64_t block_size = k_cache.size(1), blocks = k_cache.size(0), width = tables.size(1);
  const int32_t *tp = tables.data_ptr<int32_t>(), *lp = lengths.data_ptr<int32_t>();
  const TableFault fault = find_table_fault(tp, lp, q.size(0), width, blocks, block_size, 1, width * block_size);
  TORCH_CHECK(fault.row < 0 || fault.col >= 0, "fastlm_cpu::paged_decode: seqlens[", fault.row, "] = ",
              fault.row < 0 ? 0 : lp[fault.row], " outside [1, ", width * block_size, "]");
  TORCH_CHECK(fault.row < 0, "fastlm_cpu::paged_decode: block_tables[", fault.row, ", ", fault.col, "] = ",
              fault.row < 0 ? 0 : tp[fault.row * width + fault.col], " outside the pool of ", blocks, " blocks");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.scalar_type() == at::kFloat) decode<float>(qc, k_cache, v_cache, tables, lengths, scale, out);
  else decode<at::BFloat16>(qc, k_cache, v_cache, tables, lengths, scale, out);
  return out;
}

// fastlm::paged_kv_write's CPU kernel (the op is defined, and its arguments validated, in
// fastlm/kernels/paged_attention.py): k, v (N, Hkv, D) rows to the flat slots of the pools. Inside a
// compiled decode step the op's Python implementation (two index_copy_) cost ~13 us per layer; this ~2 us.
void paged_kv_write(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& k,
                    const at::Tensor& v) {
  const int64_t N = k.size(0), row = k_cache.size(2) * k_cache.size(3), slots = k_cache.size(0) * k_cache.size(1);
  const bool direct = k_cache.is_contiguous() && v_cache.is_contiguous() && k.dim() == 3 && v.sizes() == k.sizes() &&
                      k.size(1) * k.size(2) == row && k.scalar_type() == k_cache.scalar_type() &&
                      v.scalar_type() == k_cache.scalar_type() && slot_mapping.scalar_type() == at::kLong &&
                      slot_mapping.dim() == 1 && slot_mapping.size(0) == N && k.stride(2) == 1 && v.stride(2) == 1 &&
                      k.stride(1) == k.size(2) && v.stride(1) == v.size(2);
  if (!direct) {  // other layouts: what the Python implementation does
    k_cache.view({-1, k_cache.size(2), k_cache.size(3)}).index_copy_(0, slot_mapping, k);
    v_cache.view({-1, v_cache.size(2), v_cache.size(3)}).index_copy_(0, slot_mapping, v);
    return;
  }
  const at::Tensor s = slot_mapping.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t bytes = row * static_cast<int64_t>(k.element_size());
  char *kc = static_cast<char*>(k_cache.data_ptr()), *vc = static_cast<char*>(v_cache.data_ptr());
  const char *kp = static_cast<const char*>(k.data_ptr()), *vp = static_cast<const char*>(v.data_ptr());
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(sp[i] >= 0 && sp[i] < slots, "fastlm::paged_kv_write: slot_mapping[", i, "] = ", sp[i],
                " outside the pool of ", slots, " slots");
    std::memcpy(kc + sp[i] * bytes, kp + i * k.stride(0) * k.element_size(), bytes);
    std::memcpy(vc + sp[i] * bytes, vp + i * v.stride(0) * v.element_size(), bytes);
  }
}

// The C++ pass of fastlm.kernels.paged_attention.check_decode_values (in place of ~10 small aten ops, ~0.1
// ms per step): true when the tables are unsafe to read (see find_table_fault); that function then names
// what is wrong.
bool decode_tables_bad(const at::Tensor& block_tables, const at::Tensor& seqlens, int64_t num_blocks,
                       int64_t block_size, int64_t min_len, int64_t capacity) {
  TORCH_CHECK(block_tables.dim() == 2 && seqlens.dim() == 1 && seqlens.size(0) == block_tables.size(0) &&
              block_tables.scalar_type() == at::kInt && seqlens.scalar_type() == at::kInt && block_size > 0 &&
              block_tables.device().is_cpu() && seqlens.device().is_cpu(),
              "fastlm_cpu::decode_tables_bad: block_tables (B, W) / seqlens (B,) int32 CPU tensors");
  TORCH_CHECK(capacity <= block_tables.size(1) * block_size, "fastlm_cpu::decode_tables_bad: capacity past the tables");
  const at::Tensor tables = block_tables.contiguous(), lengths = seqlens.contiguous();
  return find_table_fault(tables.data_ptr<int32_t>(), lengths.data_ptr<int32_t>(), tables.size(0), tables.size(1),
                          num_blocks, block_size, min_len, capacity).row >= 0;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seqlens, float scale) -> Tensor");
  m.def("decode_tables_bad(Tensor block_tables, Tensor seqlens, int num_blocks, int block_size, int min_len, int capacity) -> bool");
}
TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("decode_tables_bad", &decode_tables_bad);
}
TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("paged_kv_write", &paged_kv_write); }
