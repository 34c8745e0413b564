// SIMD helpers shared by fastlm's C++ CPU kernels: AVX-512 (F, BW and VL) where the machine that builds them
// has it (they are built with -march=native, see fastlm/kernels/_cpu_ext.py); FASTLM_AVX512 says so. The
// sources digest that keys the build and the timed kernel choices covers this header too.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FASTLM_AVX512 1
#include <immintrin.h>

namespace fastlm_simd {

// Lanes [0, left) of 16 (all when left >= 16).
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1); }

// 16 values as fp32 (masked lanes 0).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) {  // bf16 -> fp32: the bits shifted up
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// Lane i of the result holds the sum of v[i]'s 16 lanes: a transposing tree (15 adds, 30 shuffles) in place
// of 16 horizontal sums (64 adds, 64 shuffles).
inline __m512 reduce16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: partial sums of v[2i], v[2i+1], v[2i], v[2i+1]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: partial sums of v[4i] .. v[4i+3]
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: b[2i] (0+1), b[2i] (2+3), b[2i+1] (0+1), b[2i+1] (2+3)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

}  // namespace fastlm_simd
#endif
