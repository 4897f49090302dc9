// AVX-512 build of the vectorized noise loop (noise_block.h); see simd.h. Only float32 is built
// here: inline helpers this file shares with the portable build (e.g. c10::Half conversions) could be
// merged by the linker into their AVX-512 copies, so the code it instantiates stays minimal.
#include "../noise_block.h"
#include "../simd.h"

namespace fastdiff {
namespace cpu {

FASTDIFF_DEFINE_RANDN(avx512)

}  // namespace cpu
}  // namespace fastdiff
