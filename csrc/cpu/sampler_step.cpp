// CPU implementation of fastdiff::sampler_step (the general fused sampler step, docs/design.md §2). The
// loop lives in sampler_step_block.h; this file builds its portable copy, picks a SIMD copy
// (avx2/, avx512/sampler_step.cpp) by simd(), and registers the op.
#include <optional>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../dispatch.h"
#include "../sampler_step_args.h"
#include "../step_call.h"
#include "fastdiff/sampler_step.h"
#include "sampler_step_block.h"
#include "simd.h"

namespace fastdiff {
namespace cpu {

FASTDIFF_DEFINE_SAMPLER_STEP_LOOPS(portable)

namespace {

PredType pred_type_of(at::ScalarType t) {
  return t == at::kFloat ? PredType::kFloat : t == at::kHalf ? PredType::kHalf : PredType::kBFloat16;
}

void run_cpu(const StepBuffers& a, at::ScalarType pred_type, at::Device) {
  FASTDIFF_SIMD_CALL(sampler_step, a, pred_type_of(pred_type));
}

// the runner of fastdiff::PreparedStep (csrc/step_call.h) for this device
[[maybe_unused]] const bool registered = (register_step_runner(at::kCPU, &run_cpu), true);

void sampler_step_cpu(const at::Tensor& x, at::TensorList preds, at::TensorList history, const at::Tensor& seeds_in,
                      at::IntArrayRef streams, at::ArrayRef<double> weights, at::ArrayRef<double> coeffs,
                      const std::optional<at::Tensor>& sample_weights, const std::optional<at::Tensor>& sample_coeffs,
                      at::TensorList outs, const std::optional<at::Tensor>& side,
                      const std::optional<at::Tensor>& finite, std::optional<at::ArrayRef<double>> clip,
                      std::optional<at::TensorList> stats, at::OptionalIntArrayRef stats_pick) {
  check_sampler_step_args(x, preds, history, seeds_in, streams, weights, coeffs, sample_weights, sample_coeffs, outs,
                          side, finite, clip);
  TORCH_CHECK(stats.has_value() == stats_pick.has_value(), "fastdiff::sampler_step: stats and stats_pick go together");
  const int64_t S = stats.has_value() ? check_step_stats(x, preds, history, outs, side, *stats, *stats_pick) : 0;
  if (x.numel() == 0) return;
  const at::Tensor seeds = seeds_in.contiguous();
  const StepBuffers a = step_buffers(x, preds, history, seeds, streams, weights, coeffs, sample_weights, sample_coeffs,
                                     outs, side, finite, clip, stats.value_or(at::TensorList()),
                                     stats_pick.value_or(at::IntArrayRef()), S);
  run_cpu(a, preds[0].scalar_type(), x.device());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("sampler_step", &sampler_step_cpu);
}

}  // namespace cpu
}  // namespace fastdiff
