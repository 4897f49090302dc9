// AVX2 + FMA build of the add_noise / diffusion_loss / diffusion_loss_backward loops (loss_block.h),
// compiled with -mavx2 -mfma -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 and called by loss.cpp only
// after the runtime check simd_level() == "avx2". All math is float32 (sums float64); float16 /
// bfloat16 inputs are widened with AVX2 intrinsics on their raw 16-bit words (step_block.h,
// to_float_block) and float16 / bfloat16 gradients are narrowed by narrow_block, defined in the
// portable loss.cpp, so this file instantiates no c10::Half / c10::BFloat16 function whose AVX2 copy
// the linker could share with the portable build.
#include "../loss_block.h"
#include "../randn_isa.h"

namespace fastdiff {
namespace cpu {

template <typename z_t>
void add_noise_avx2(const AddNoiseArgs<z_t>& a) {
  add_noise_rows(a);
}
template <typename pred_t, typename z_t>
void diffusion_loss_avx2(const LossArgs<pred_t, z_t>& a) {
  loss_rows(a);
}
template <typename pred_t, typename z_t>
void diffusion_loss_backward_avx2(const LossArgs<pred_t, z_t>& a) {
  loss_backward_rows(a);
}

template void add_noise_avx2<float>(const AddNoiseArgs<float>&);
template void add_noise_avx2<c10::Half>(const AddNoiseArgs<c10::Half>&);
template void add_noise_avx2<c10::BFloat16>(const AddNoiseArgs<c10::BFloat16>&);
#define FASTDIFF_LOSS_INSTANTIATE(P, Z)                                      \
  template void diffusion_loss_avx2<P, Z>(const LossArgs<P, Z>&);          \
  template void diffusion_loss_backward_avx2<P, Z>(const LossArgs<P, Z>&);
#define FASTDIFF_LOSS_INSTANTIATE_Z(P)        \
  FASTDIFF_LOSS_INSTANTIATE(P, float)         \
  FASTDIFF_LOSS_INSTANTIATE(P, c10::Half)     \
  FASTDIFF_LOSS_INSTANTIATE(P, c10::BFloat16)
FASTDIFF_LOSS_INSTANTIATE_Z(float)
FASTDIFF_LOSS_INSTANTIATE_Z(c10::Half)
FASTDIFF_LOSS_INSTANTIATE_Z(c10::BFloat16)
#undef FASTDIFF_LOSS_INSTANTIATE_Z
#undef FASTDIFF_LOSS_INSTANTIATE

}  // namespace cpu
}  // namespace fastdiff
