// A prepared fastdiff::sampler_step call (docs/design.md §2, "One kernel call"): the op's arguments but the
// predictions bound and checked once, so that a sampling loop's run of a stage passes only its predictions and
// reaches the kernel without the dispatcher (the op re-checks and re-parses twelve arguments on every call:
// ~4 us of a 5 us step at batch 1 on the CPU). A plan holds one per stage (fastdiff.ops.sampler_step.StepCall;
// Python binding in csrc/python/module.cpp). The bound tensors are kept alive and read in place: refilling
// them (seeds, rows, buffers) between runs is how a plan is reused.
#pragma once

#include <optional>
#include <vector>

#include <ATen/ATen.h>

#include "fastdiff/sampler_step.h"

namespace fastdiff {

// Runs the step on buffers already checked, on one device type. The CPU and CUDA implementations register
// theirs when the library loads (csrc/cpu/sampler_step.cpp, csrc/cuda/sampler_step.cu).
using StepRunner = void (*)(const StepBuffers& buffers, at::ScalarType pred_type, at::Device device);
void register_step_runner(at::DeviceType type, StepRunner run);

class PreparedStep {
 public:
  // The op's arguments (csrc/ops.cpp), checked as the op checks them; `preds` only stand in for the shape and
  // count of a run's predictions. `parts`: for a run on one batched model output, the part that is
  // prediction i (empty: part i). seeds must be contiguous (read in place: a plan refills them). clip: the op's
  // clip = [c, d] (clip_sample fused; none by default), after parts so that existing callers keep their order;
  // stats / stats_pick: the op's step statistics (none when empty).
  PreparedStep(const at::Tensor& x, at::TensorList preds, at::TensorList history, const at::Tensor& seeds,
               at::IntArrayRef streams, at::ArrayRef<double> weights, at::ArrayRef<double> coeffs,
               const std::optional<at::Tensor>& sample_weights, const std::optional<at::Tensor>& sample_coeffs,
               at::TensorList outs, const std::optional<at::Tensor>& side, const std::optional<at::Tensor>& finite,
               std::vector<int64_t> parts = {}, std::optional<std::vector<double>> clip = std::nullopt,
               std::vector<at::Tensor> stats = {}, std::vector<int64_t> stats_pick = {});

  int branches() const { return buffers_.shape.branches; }
  int64_t numel() const { return buffers_.B * buffers_.n; }

  // One run with K1 predictions, each shaped like x, one dtype (float32, float16 or bfloat16), on x's device.
  void run(at::TensorList preds) const;
  // One run on a batched model output [P B, ...] (P parts of B samples, each shaped like x): prediction i is
  // part parts[i] — a guided call's output (conditions first, the null branch last) read without splitting it.
  void run_batched(const at::Tensor& out) const;

 private:
  void check_pred(const at::Tensor& p, const at::Tensor& first, int i) const;
  void check_apart(const void* pred, size_t bytes, int i) const;
  void launch(StepBuffers& a, at::ScalarType pred_type) const;

  std::vector<at::Tensor> bound_;  // every tensor the buffers point into, kept alive
  StepBuffers buffers_;            // the call, but its preds
  std::vector<int64_t> parts_;
  std::vector<int64_t> sizes_;     // x's shape
  at::Device device_;
  StepRunner runner_;
};

}  // namespace fastdiff
