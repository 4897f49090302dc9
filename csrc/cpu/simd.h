// The CPU instruction-set levels. Each loop header (noise_block.h, sampler_step_block.h, loss_block.h) is
// compiled once per level: by the portable files in csrc/cpu/, by csrc/cpu/avx2/ (-mavx2 -mfma
// -DCPU_CAPABILITY=AVX2) and by csrc/cpu/avx512/ (-mavx512f/dq/bw/vl -DCPU_CAPABILITY=AVX512); every
// op picks one at run time with FASTDIFF_SIMD_CALL. The levels compute the same float32 operations in
// the same order; the portable level on x86-64 has no FMA, so where a loop fuses a multiply-add (the
// sampler step) it rounds twice there (tests compare the levels).
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastdiff {
namespace cpu {

enum class Simd { kPortable, kAvx2, kAvx512 };

// The best level this build has and the CPU runs, capped by FASTDIFF_CPU_SIMD=portable|avx2|avx512
// (tests compare the levels). Read on every call, so tests can switch it. Defined in randn.cpp.
Simd simd();
const char* simd_level();  // "portable", "avx2" or "avx512"

// fn_avx512(args...), fn_avx2(args...) or fn_portable(args...) by simd(). A build has the levels that
// FASTDIFF_CPU_ISAS chose (fastdiff/_build.py): FASTDIFF_HAVE_AVX2 / FASTDIFF_HAVE_AVX512 say which.
#if defined(FASTDIFF_HAVE_AVX512)
#define FASTDIFF_SIMD_CASE_AVX512(fn, ...) \
  case ::fastdiff::cpu::Simd::kAvx512: fn##_avx512(__VA_ARGS__); break;
#else
#define FASTDIFF_SIMD_CASE_AVX512(fn, ...)
#endif
#if defined(FASTDIFF_HAVE_AVX2)
#define FASTDIFF_SIMD_CASE_AVX2(fn, ...) \
  case ::fastdiff::cpu::Simd::kAvx2: fn##_avx2(__VA_ARGS__); break;
#else
#define FASTDIFF_SIMD_CASE_AVX2(fn, ...)
#endif
#define FASTDIFF_SIMD_CALL(fn, ...)                    \
  do {                                                 \
    switch (::fastdiff::cpu::simd()) {                 \
      FASTDIFF_SIMD_CASE_AVX512(fn, __VA_ARGS__)       \
      FASTDIFF_SIMD_CASE_AVX2(fn, __VA_ARGS__)         \
      default: fn##_portable(__VA_ARGS__); break;      \
    }                                                  \
  } while (0)

// out[b, i] = element offset + i of the stream of seed seeds[b]; scalar_t is float, Half or BFloat16
// (portable), float (avx2, avx512).
#define FASTDIFF_DECLARE_RANDN(isa)                                                                        \
  template <typename scalar_t>                                                                             \
  void randn_##isa(const int64_t* seeds, /* [B] */ int64_t B, uint32_t stream, int64_t n, int64_t offset, \
                   scalar_t* out /* [B, n] */);
FASTDIFF_DECLARE_RANDN(portable)
FASTDIFF_DECLARE_RANDN(avx2)
FASTDIFF_DECLARE_RANDN(avx512)
#undef FASTDIFF_DECLARE_RANDN

}  // namespace cpu
}  // namespace fastdiff
