// AVX-512 build of the vectorized noise loop (noise_block.h); see simd.h. Only float32 is built
// here: inline helpers this file shares with the portable build (e.g. c10::Half conversions) could be
// merged by the linker into their AVX-512 copies, so the code it instantiates stays minimal.
#include "../noise_block.h"
#include "../simd.h"

namespace fastdiff {
namespace cpu {

template <typename scalar_t>
void randn_avx512(const int64_t* seeds, int64_t B, uint32_t stream, int64_t n, int64_t offset, scalar_t* out) {
  randn_blocks(seeds, B, stream, n, offset, out);
}

template void randn_avx512<float>(const int64_t*, int64_t, uint32_t, int64_t, int64_t, float*);

}  // namespace cpu
}  // namespace fastdiff
