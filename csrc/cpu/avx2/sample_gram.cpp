// AVX2 + FMA build of the sample_gram loop (sample_gram_block.h; see simd.h). Only float / double
// math and bit operations are instantiated (16-bit terms are widened with intrinsics, widen_block.h).
#include "../simd.h"
#include "../sample_gram_block.h"

namespace fastdiff {
namespace cpu {

FASTDIFF_DEFINE_SAMPLE_GRAM_LOOPS(avx2)

}  // namespace cpu
}  // namespace fastdiff
