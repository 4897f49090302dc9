// AVX2 + FMA build of the add_noise / diffusion_loss / diffusion_loss_backward loops (loss_block.h; see
// simd.h). All math is float32 (sums float64); float16 / bfloat16 inputs are widened with intrinsics
// on their raw 16-bit words (to_float_block) and float16 / bfloat16 gradients are narrowed by
// narrow_block, defined in the portable loss.cpp, so this file instantiates no c10::Half /
// c10::BFloat16 function whose AVX2 copy the linker could share with the portable build.
#include "../loss_block.h"
#include "../simd.h"

namespace fastdiff {
namespace cpu {

FASTDIFF_DEFINE_LOSS_LOOPS(avx2)

}  // namespace cpu
}  // namespace fastdiff
