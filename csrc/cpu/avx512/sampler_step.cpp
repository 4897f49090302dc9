// AVX-512 build of the sampler_step loop (sampler_step_block.h; see simd.h). The state and all math are
// float32; float16 / bfloat16 predictions are widened with intrinsics on their raw 16-bit words
// (to_float_block), so this file instantiates no c10::Half / c10::BFloat16 function whose AVX-512 copy
// the linker could share with the portable build.
#include "../simd.h"
#include "../sampler_step_block.h"

namespace fastdiff {
namespace cpu {

FASTDIFF_DEFINE_SAMPLER_STEP_LOOPS(avx512)

}  // namespace cpu
}  // namespace fastdiff
