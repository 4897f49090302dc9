// The CPU noise loop, built once per instruction set (noise_block.h). randn.cpp picks one at run time.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastdiff {
namespace cpu {

// "avx2" when this build has the AVX2 loops and the CPU runs them, else "portable" (also under
// FASTDIFF_CPU_SIMD=portable). Defined in randn.cpp; every CPU op dispatches on it.
const char* simd_level();

// out[b, i] = element offset + i of the stream of seed seeds[b]; scalar_t is float, Half or BFloat16.
template <typename scalar_t>
void randn_portable(const int64_t* seeds,  // [B]
                    int64_t B, uint32_t stream, int64_t n, int64_t offset,
                    scalar_t* out);  // [B, n]

#if defined(FASTDIFF_HAVE_AVX2)
template <typename scalar_t>  // float only
void randn_avx2(const int64_t* seeds,  // [B]
                int64_t B, uint32_t stream, int64_t n, int64_t offset,
                scalar_t* out);  // [B, n]
#endif

}  // namespace cpu
}  // namespace fastdiff
