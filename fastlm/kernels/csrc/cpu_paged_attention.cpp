// fastlm's CPU paged decode attention: one new query token per row over a paged KV pool, fp32 math.
//
// Why in C++: the PyTorch path (fastlm/kernels/paged_attention.py, _decode_rows_cpu) issues ~10 small aten
// calls per row and layer (gather or view, casts, torch's flash kernel); on the development AMD EPYC a
// batch-1 GPT-2 step spent ~1.5 ms of ~8.5 in them, mostly call and thread start-up overhead. Here one
// parallel loop over (row, KV head) reads each used K/V token once for the G query heads that share it:
// scores for all tokens, softmax, then the V-weighted sum (exact softmax, no online rescaling needed).
// Used for Sq == 1 on CPU where it builds (fastlm/kernels/_cpu_ext.py); the public function validates.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += q[d] * static_cast<float>(k[d]);
  return s;
}

template <typename T>
void attend_group(const T* q, const T* k_cache, const T* v_cache, const int32_t* table, int64_t length,
                  int64_t block_size, int64_t Hkv, int64_t h, int64_t G, int64_t D, float scale, T* out) {
  std::vector<float> qf(G * D), scores(G * length), acc(G * D, 0.f), v_row(D);
  for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(q[i]);
  auto token = [&](const T* cache, int64_t t) {
    return cache + ((static_cast<int64_t>(table[t / block_size]) * block_size + t % block_size) * Hkv + h) * D;
  };
  for (int64_t t = 0; t < length; ++t) {
    const T* k = token(k_cache, t);
    for (int64_t g = 0; g < G; ++g) scores[g * length + t] = dot(qf.data() + g * D, k, D) * scale;
  }
  std::vector<float> total(G);
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores.data() + g * length;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < length; ++t) top = std::max(top, s[t]);
    float sum = 0.f;
    for (int64_t t = 0; t < length; ++t) sum += (s[t] = std::exp(s[t] - top));
    total[g] = sum;
  }
  for (int64_t t = 0; t < length; ++t) {
    const T* v = token(v_cache, t);
    for (int64_t d = 0; d < D; ++d) v_row[d] = static_cast<float>(v[d]);
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * length + t];
      float* a = acc.data() + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * v_row[d];
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(total[g] > 0.f ? acc[g * D + d] / total[g] : 0.f);
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& tables,
            const at::Tensor& lengths, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t block_size = k_cache.size(1), Hkv = k_cache.size(2), G = Hq / Hkv, width = tables.size(1);
  const T *qp = q.data_ptr<T>(), *kp = k_cache.data_ptr<T>(), *vp = v_cache.data_ptr<T>();
  const int32_t *tp = tables.data_ptr<int32_t>(), *lp = lengths.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      attend_group<T>(qp + (b * Hq + h * G) * D, kp, vp, tp + b * width, lp[b], block_size, Hkv, h, G, D,
                      static_cast<float>(scale), op + (b * Hq + h * G) * D);
    }
  });
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
  for (int64_t b = 0; b < q.size(0); ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= width * block_size, "fastlm_cpu::paged_decode: seqlens[", b, "] = ", lp[b],
                " outside [1, ", width * block_size, "]");
    for (int64_t i = 0; i < (lp[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tp[b * width + i] >= 0 && tp[b * width + i] < blocks, "fastlm_cpu::paged_decode: block_tables[",
                  b, ", ", i, "] = ", tp[b * width + i], " outside the pool of ", blocks, " blocks");
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.scalar_type() == at::kFloat) decode<float>(qc, k_cache, v_cache, tables, lengths, scale, out);
  else decode<at::BFloat16>(qc, k_cache, v_cache, tables, lengths, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seqlens, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) { m.impl("paged_decode", &paged_decode); }
