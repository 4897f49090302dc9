// The CPU loop of fastdiff::guided_step, built once per instruction set like noise_block.h (simd.h):
// by guided_step.cpp (portable), avx2/guided_step.cpp and avx512/guided_step.cpp.
//
// Work is split into blocks of kBlockElems (64; 128 under AVX-512) elements of one sample (one normal_block of noise) and spread over
// threads with at::parallel_for. A block's math runs in at::vec::Vectorized<float> through
// step_element (fastdiff/step.h), the same per-element definition the CUDA kernel uses. A partial
// last block of a sample goes through zero-padded local buffers.
//
// float16 / bfloat16 predictions are widened to float per block (to_float_block). The SIMD builds do
// that with its own integer/float intrinsics on the raw 16-bit words, never with c10::Half or
// c10::BFloat16 functions: those are inline functions outside at::vec's per-capability namespace,
// so an AVX2-compiled copy could be merged by the linker with the portable one and then run on a CPU
// without AVX2. The SIMD builds therefore instantiate nothing but float math and bit operations.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "fastdiff/step.h"
#include "noise_block.h"

namespace fastdiff {
namespace cpu {

// One guided_step call on contiguous [B, n] buffers. pred_t is float, c10::Half or c10::BFloat16.
template <typename pred_t>
struct StepArgs {
  const float* x;        // [B, n]
  const pred_t* pred;    // [B, n]
  const pred_t* uncond;  // [B, n] or nullptr (no guidance)
  const float* extra;    // [B, n] or nullptr
  const int64_t* seeds;  // [B]
  float* out;            // [B, n]; may equal x
  float* side;           // [B, n] or nullptr; may equal extra
  int64_t B, n;
  uint32_t stream;
  bool noise;            // c_noise != 0 (else no normals are generated)
  StepCoeffs k;
};

// guided_step_<isa> for pred_t float, c10::Half, c10::BFloat16 (the SIMD builds widen with intrinsics,
// see above); defined by FASTDIFF_DEFINE_STEP_LOOPS in guided_step.cpp, avx2/ and avx512/.
#define FASTDIFF_DECLARE_STEP_LOOPS(isa) \
  template <typename pred_t>             \
  void guided_step_##isa(const StepArgs<pred_t>& a);
FASTDIFF_DECLARE_STEP_LOOPS(portable)
#if defined(FASTDIFF_HAVE_AVX2)
FASTDIFF_DECLARE_STEP_LOOPS(avx2)
FASTDIFF_DECLARE_STEP_LOOPS(avx512)
#endif
#undef FASTDIFF_DECLARE_STEP_LOOPS

#define FASTDIFF_DEFINE_STEP_LOOPS(isa)                                                 \
  template <typename pred_t>                                                            \
  void guided_step_##isa(const StepArgs<pred_t>& a) {                                   \
    step_dispatch(a);                                                                   \
  }                                                                                     \
  template void guided_step_##isa<float>(const StepArgs<float>&);                       \
  template void guided_step_##isa<c10::Half>(const StepArgs<c10::Half>&);               \
  template void guided_step_##isa<c10::BFloat16>(const StepArgs<c10::BFloat16>&);

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

// One block of kBlockElems elements. Every vector's inputs are loaded before its outputs are stored, so out may
// be x (or pred) and side may be extra. Pointers of absent inputs (kUncond / kExtra / kNoise false)
// are not read.
template <bool kUncond, bool kExtra, bool kNoise, bool kSide>
inline void step_block(const StepCoeffs& k, const float* x, const float* p, const float* u, const float* e,
                         const float* z, float* out, float* side) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int V = Vec::size();
  static_assert(kBlockElems % V == 0, "block must hold whole vectors");
  for (int j = 0; j < kBlockElems; j += V) {
    const Vec xv = Vec::loadu(x + j);
    const Vec pv = Vec::loadu(p + j);
    Vec uv(0.0f), ev(0.0f), zv(0.0f);
    if constexpr (kUncond) uv = Vec::loadu(u + j);
    if constexpr (kExtra) ev = Vec::loadu(e + j);
    if constexpr (kNoise) zv = Vec::loadu(z + j);
    const StepResult<Vec> r = step_element<kUncond, kExtra, kNoise, kSide>(k, xv, pv, uv, ev, zv);
    r.out.store(out + j);
    if constexpr (kSide) r.side.store(side + j);
  }
}

template <bool kUncond, bool kExtra, bool kNoise, bool kSide, typename pred_t>
void step_rows(const StepArgs<pred_t>& a) {
  constexpr bool kFloatPred = std::is_same_v<pred_t, float>;
  const int64_t n = a.n;
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;  // per sample
  // Blocks per task: with noise ~4096 elements (as randn: the normals dominate); without, the step
  // is memory-bound and ~32768 elements (ATen's GRAIN_SIZE) amortize the scheduling.
  const int64_t grain = kNoise ? 128 : 1024;
  at::parallel_for(0, a.B * blocks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float z[kBlockElems];     // normals of the block
    alignas(64) float pbuf[kBlockElems];  // pred as float (float16 / bfloat16, or a partial block)
    alignas(64) float ubuf[kBlockElems];  // pred_uncond likewise
    alignas(64) float xbuf[kBlockElems], ebuf[kBlockElems], obuf[kBlockElems], sbuf[kBlockElems];
    int64_t b = begin / blocks;
    int64_t blk = begin - b * blocks;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t e0 = blk * kBlockElems;  // first element of the block within sample b
      const int count = n - e0 < kBlockElems ? static_cast<int>(n - e0) : kBlockElems;
      const int64_t base = b * n + e0;
      if constexpr (kNoise) {
        normal_block(static_cast<uint64_t>(a.seeds[b]), static_cast<uint64_t>(e0 >> 2), a.stream, z);
      }
      if (count == kBlockElems) {
        const float* p = pbuf;
        const float* u = ubuf;
        if constexpr (kFloatPred) {
          p = a.pred + base;
          if constexpr (kUncond) u = a.uncond + base;
        } else {
          to_float_block(a.pred + base, kBlockElems, pbuf);
          if constexpr (kUncond) to_float_block(a.uncond + base, kBlockElems, ubuf);
        }
        step_block<kUncond, kExtra, kNoise, kSide>(a.k, a.x + base, p, u, kExtra ? a.extra + base : nullptr, z,
                                                     a.out + base, kSide ? a.side + base : nullptr);
      } else {
        // Partial last block: every input is copied before anything is written (out may be x).
        to_float_block(a.x + base, count, xbuf);
        to_float_block(a.pred + base, count, pbuf);
        if constexpr (kUncond) to_float_block(a.uncond + base, count, ubuf);
        if constexpr (kExtra) to_float_block(a.extra + base, count, ebuf);
        step_block<kUncond, kExtra, kNoise, kSide>(a.k, xbuf, pbuf, ubuf, ebuf, z, obuf, sbuf);
        std::memcpy(a.out + base, obuf, sizeof(float) * count);
        if constexpr (kSide) std::memcpy(a.side + base, sbuf, sizeof(float) * count);
      }
      if (++blk == blocks) {
        blk = 0;
        ++b;
      }
    }
  });
}

template <typename F>
inline void with_bool(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// One specialization per combination of optional inputs, so the hot loop carries no branches.
template <typename pred_t>
void step_dispatch(const StepArgs<pred_t>& a) {
  if (a.B == 0 || a.n == 0) return;
  with_bool(a.uncond != nullptr, [&](auto U) {
    with_bool(a.extra != nullptr, [&](auto E) {
      with_bool(a.noise, [&](auto N) {
        with_bool(a.side != nullptr, [&](auto S) {
          step_rows<decltype(U)::value, decltype(E)::value, decltype(N)::value, decltype(S)::value>(a);
        });
      });
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff
