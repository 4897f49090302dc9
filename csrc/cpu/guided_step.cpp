// CPU implementation of fastdiff::guided_step (the fused sampler step, docs/design.md §2). The loop lives
// in step_block.h; this file builds its portable copy, picks a SIMD copy (avx2/, avx512/guided_step.cpp)
// by simd(), and registers the op.
#include <cstring>
#include <optional>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "fastdiff/step.h"
#include "simd.h"
#include "step_block.h"

namespace fastdiff {
namespace cpu {

FASTDIFF_DEFINE_STEP_LOOPS(portable)

namespace {

template <typename pred_t>
void guided_step_run(const StepArgs<pred_t>& a) {
  FASTDIFF_SIMD_CALL(guided_step, a);
}

template <typename pred_t>
StepArgs<pred_t> step_args(const at::Tensor& x, const at::Tensor& pred, const std::optional<at::Tensor>& pred_uncond,
                           const std::optional<at::Tensor>& extra, const at::Tensor& seeds, int64_t stream,
                           bool noise, const StepCoeffs& k, const at::Tensor& out,
                           const std::optional<at::Tensor>& side) {
  StepArgs<pred_t> a;
  a.x = x.const_data_ptr<float>();
  a.pred = pred.const_data_ptr<pred_t>();
  a.uncond = pred_uncond ? pred_uncond->const_data_ptr<pred_t>() : nullptr;
  a.extra = extra ? extra->const_data_ptr<float>() : nullptr;
  a.seeds = seeds.const_data_ptr<int64_t>();
  a.out = out.mutable_data_ptr<float>();
  a.side = side ? side->mutable_data_ptr<float>() : nullptr;
  a.B = x.size(0);
  a.n = a.B == 0 ? 0 : x.numel() / a.B;
  a.stream = static_cast<uint32_t>(stream);
  a.noise = noise;
  a.k = k;
  return a;
}

void guided_step_cpu(const at::Tensor& x, const at::Tensor& pred, const std::optional<at::Tensor>& pred_uncond,
                     const std::optional<at::Tensor>& extra, const at::Tensor& seeds_in, int64_t stream, double cfg,
                     double c_x, double c_pred, double c_extra, double c_noise, double s_x, double s_pred,
                     double s_extra, const at::Tensor& out, const std::optional<at::Tensor>& side) {
  check_guided_step_args(x, pred, pred_uncond, extra, seeds_in, stream, out, side);
  if (x.numel() == 0) return;
  const at::Tensor seeds = seeds_in.contiguous();
  const StepCoeffs k = make_step_coeffs(cfg, c_x, c_pred, c_extra, c_noise, s_x, s_pred, s_extra);
  const bool noise = c_noise != 0.0;  // decided in float64, as the reference does
  switch (pred.scalar_type()) {
    case at::kFloat:
      guided_step_run(step_args<float>(x, pred, pred_uncond, extra, seeds, stream, noise, k, out, side));
      break;
    case at::kHalf:
      guided_step_run(step_args<c10::Half>(x, pred, pred_uncond, extra, seeds, stream, noise, k, out, side));
      break;
    case at::kBFloat16:
      guided_step_run(step_args<c10::BFloat16>(x, pred, pred_uncond, extra, seeds, stream, noise, k, out, side));
      break;
    default:
      TORCH_CHECK(false, "unreachable");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("guided_step", &guided_step_cpu);
}

}  // namespace cpu
}  // namespace fastdiff
