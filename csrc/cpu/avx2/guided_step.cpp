// AVX2 + FMA build of the guided_step loop (step_block.h), compiled with -mavx2 -mfma
// -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 and called by guided_step.cpp only after the runtime
// check simd_level() == "avx2". The state and all math are float32; float16 / bfloat16 predictions
// are widened with AVX2 intrinsics on their raw 16-bit words (step_block.h, to_float_block), so this
// file instantiates no c10::Half / c10::BFloat16 function whose AVX2 copy the linker could share
// with the portable build.
#include "../randn_isa.h"
#include "../step_block.h"

namespace fastdiff {
namespace cpu {

template <typename pred_t>
void guided_step_avx2(const StepArgs<pred_t>& a) {
  step_dispatch(a);
}

template void guided_step_avx2<float>(const StepArgs<float>&);
template void guided_step_avx2<c10::Half>(const StepArgs<c10::Half>&);
template void guided_step_avx2<c10::BFloat16>(const StepArgs<c10::BFloat16>&);

}  // namespace cpu
}  // namespace fastdiff
