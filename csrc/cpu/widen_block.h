// Widening of float16 / bfloat16 inputs to float, one block (kBlockElems) at a time, for the CPU loops
// (sampler_step_block.h, loss_block.h), compiled once per instruction set (simd.h).
//
// The SIMD builds widen with their own integer/float intrinsics on the raw 16-bit words, never with
// c10::Half or c10::BFloat16 functions: those are inline functions outside at::vec's per-capability
// namespace, so an AVX2-compiled copy could be merged by the linker with the portable one and then run
// on a CPU without AVX2. The SIMD builds therefore instantiate nothing but float math and bit operations.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "noise_block.h"

namespace fastdiff {
namespace cpu {
namespace {  // one copy per translation unit: the AVX2 and portable builds must not merge

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// 8 IEEE half words -> float, exactly (the branch-free algorithm of c10's fp16_ieee_to_fp32_value,
// Maratyszcza's FP16 library): normals by rebiasing the exponent, subnormals by a magic subtraction,
// inf / NaN kept by the 2^-112 scaling of the rebiased exponent 0xFF.
inline __m256 half8_to_float(__m128i h) {
  const __m256i w = _mm256_cvtepu16_epi32(h);
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x8000)), 16);
  const __m256i two_w = _mm256_slli_epi32(w, 17);  // exponent and mantissa at the top, sign dropped
  const __m256 normalized =
      _mm256_mul_ps(_mm256_castsi256_ps(_mm256_add_epi32(_mm256_srli_epi32(two_w, 4), _mm256_set1_epi32(0xE0 << 23))),
                    _mm256_set1_ps(0x1.0p-112f));
  const __m256 denormalized = _mm256_sub_ps(
      _mm256_castsi256_ps(_mm256_or_si256(_mm256_srli_epi32(two_w, 17), _mm256_set1_epi32(126 << 23))),
      _mm256_set1_ps(0.5f));
  const __m256i is_denormal = _mm256_cmpeq_epi32(_mm256_srli_epi32(two_w, 27), _mm256_setzero_si256());
  const __m256 magnitude = _mm256_blendv_ps(normalized, denormalized, _mm256_castsi256_ps(is_denormal));
  return _mm256_or_ps(magnitude, _mm256_castsi256_ps(sign));
}

// 8 bfloat16 words -> float: the upper half of the float's bits.
inline __m256 bf16x8_to_float(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

// src[0 .. count) as float into dst[0 .. kBlockElems), zero-padded past count (count <= kBlockElems).
template <typename pred_t>
inline void to_float_block(const pred_t* src, int count, float* dst) {
  if constexpr (std::is_same_v<pred_t, float>) {
    std::memcpy(dst, src, sizeof(float) * count);
    for (int j = count; j < kBlockElems; ++j) dst[j] = 0.0f;
  } else {
    static_assert(sizeof(pred_t) == 2, "pred is float, c10::Half or c10::BFloat16");
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    alignas(32) uint16_t tmp[kBlockElems];
    const void* words = src;
    if (count < kBlockElems) {
      std::memset(tmp, 0, sizeof tmp);
      std::memcpy(tmp, src, sizeof(uint16_t) * count);
      words = tmp;
    }
    for (int j = 0; j < kBlockElems; j += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(words) + j));
      if constexpr (std::is_same_v<pred_t, c10::Half>) {
        _mm256_store_ps(dst + j, half8_to_float(h));
      } else {
        _mm256_store_ps(dst + j, bf16x8_to_float(h));
      }
    }
#else
    for (int j = 0; j < count; ++j) dst[j] = static_cast<float>(src[j]);
    for (int j = count; j < kBlockElems; ++j) dst[j] = 0.0f;
#endif
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff
