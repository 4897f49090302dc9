// fastdiff::PreparedStep (csrc/step_call.h): the checks of the op once, at construction; per run, the
// predictions' checks (shape, dtype, device, contiguity, no partial overlap with an output) and the kernel.
#include "step_call.h"

#include <array>
#include <string>

#include "checks.h"
#include "sampler_step_args.h"

namespace fastdiff {

namespace {

constexpr const char* kOp = "fastdiff PreparedStep: ";

std::array<StepRunner, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>& runners() {
  static std::array<StepRunner, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> table{};
  return table;
}

bool pred_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

}  // namespace

void register_step_runner(at::DeviceType type, StepRunner run) { runners()[static_cast<size_t>(type)] = run; }

PreparedStep::PreparedStep(const at::Tensor& x, at::TensorList preds, at::TensorList history, const at::Tensor& seeds,
                           at::IntArrayRef streams, at::ArrayRef<double> weights, at::ArrayRef<double> coeffs,
                           const std::optional<at::Tensor>& sample_weights,
                           const std::optional<at::Tensor>& sample_coeffs, at::TensorList outs,
                           const std::optional<at::Tensor>& side, const std::optional<at::Tensor>& finite,
                           std::vector<int64_t> parts, std::optional<std::vector<double>> clip,
                           std::vector<at::Tensor> stats, std::vector<int64_t> stats_pick)
    : parts_(std::move(parts)), sizes_(x.sizes().vec()), device_(x.device()) {
  const std::optional<at::ArrayRef<double>> clip_ref =
      clip.has_value() ? std::optional<at::ArrayRef<double>>(at::ArrayRef<double>(*clip)) : std::nullopt;
  check_sampler_step_args(x, preds, history, seeds, streams, weights, coeffs, sample_weights, sample_coeffs, outs,
                          side, finite, clip_ref);
  TORCH_CHECK(seeds.is_contiguous(), kOp, "seeds must be contiguous (a prepared call reads them in place)");
  TORCH_CHECK(stats.empty() == stats_pick.empty(), kOp, "stats and stats_pick go together");
  const int64_t stats_size = stats.empty() ? 0 : check_step_stats(x, preds, history, outs, side, stats, stats_pick);
  runner_ = runners()[static_cast<size_t>(x.device().type())];
  TORCH_CHECK(runner_ != nullptr, kOp, "this build of fastdiff._C has no sampler_step for ", x.device().type(),
              " tensors");
  const int64_t K1 = static_cast<int64_t>(preds.size());
  if (parts_.empty()) {
    for (int64_t i = 0; i < K1; ++i) parts_.push_back(i);
  }
  TORCH_CHECK(static_cast<int64_t>(parts_.size()) == K1, kOp, "parts must name one part per prediction (", K1,
              "), got ", parts_.size());
  for (int64_t p : parts_) TORCH_CHECK(p >= 0 && p < kMaxBranches, kOp, "parts must be in [0, 8), got ", p);
  buffers_ = step_buffers(x, preds, history, seeds, streams, weights, coeffs, sample_weights, sample_coeffs, outs,
                          side, finite, clip_ref, stats, stats_pick, stats_size);
  for (int i = 0; i < kMaxBranches; ++i) buffers_.preds[i] = nullptr;
  bound_.insert(bound_.end(), stats.begin(), stats.end());
  bound_.push_back(x);
  bound_.insert(bound_.end(), history.begin(), history.end());
  bound_.push_back(seeds);
  bound_.insert(bound_.end(), outs.begin(), outs.end());
  for (const auto* t : {&sample_weights, &sample_coeffs, &side, &finite}) {
    if (t->has_value()) bound_.push_back(**t);
  }
}

void PreparedStep::check_pred(const at::Tensor& p, const at::Tensor& first, int i) const {
  TORCH_CHECK(p.sizes() == at::IntArrayRef(sizes_), kOp, "preds[", i, "] must have x's shape ",
              at::IntArrayRef(sizes_), ", got ", p.sizes());
  TORCH_CHECK(pred_dtype(p.scalar_type()), kOp, "preds[", i, "] must be float32, float16 or bfloat16, got ",
              p.scalar_type());
  TORCH_CHECK(p.scalar_type() == first.scalar_type(), kOp, "preds[", i, "] must have preds[0]'s dtype ",
              first.scalar_type(), ", got ", p.scalar_type());
  TORCH_CHECK(p.device() == device_, kOp, "preds[", i, "] is on ", p.device(), " but x is on ", device_);
  TORCH_CHECK(p.is_contiguous(), kOp, "preds[", i, "] must be contiguous");
}

// An output may be exactly a prediction (read before written, element by element), not a shifted part of one.
void PreparedStep::check_apart(const void* pred, size_t bytes, int i) const {
  const auto* a = static_cast<const char*>(pred);
  const size_t out_bytes = static_cast<size_t>(numel()) * sizeof(float);
  auto apart = [&](const void* out) {
    const auto* o = static_cast<const char*>(out);
    const bool exact = o == a && out_bytes == bytes;
    TORCH_CHECK(exact || o + out_bytes <= a || a + bytes <= o, kOp, "preds[", i, "] partially overlaps an output "
                "(an output may be exactly a prediction, not a shifted view of one)");
  };
  for (int j = 0; j < buffers_.n_outs; ++j) apart(buffers_.outs[j]);
  if (buffers_.side != nullptr) apart(buffers_.side);
}

void PreparedStep::launch(StepBuffers& a, at::ScalarType pred_type) const {
  if (numel() == 0) return;
  runner_(a, pred_type, device_);
}

void PreparedStep::run(at::TensorList preds) const {
  TORCH_CHECK(static_cast<int>(preds.size()) == branches(), kOp, "preds must hold ", branches(),
              " tensors (the prepared call's), got ", preds.size());
  StepBuffers a = buffers_;
  for (int i = 0; i < branches(); ++i) {
    check_pred(preds[i], preds[0], i);
    a.preds[i] = preds[i].const_data_ptr();
    check_apart(a.preds[i], static_cast<size_t>(numel()) * preds[i].element_size(), i);
  }
  launch(a, preds[0].scalar_type());
}

void PreparedStep::run_batched(const at::Tensor& out) const {
  const int64_t B = buffers_.B;
  TORCH_CHECK(out.dim() == static_cast<int64_t>(sizes_.size()) && (B == 0 ? out.size(0) == 0 : out.size(0) % B == 0),
              kOp, "a batched output must be [P B, ...] with x = [B, ...] = ", at::IntArrayRef(sizes_), ", got ",
              out.sizes());
  TORCH_CHECK(out.sizes().slice(1) == at::IntArrayRef(sizes_).slice(1), kOp, "a batched output's parts must have "
              "x's shape ", at::IntArrayRef(sizes_), ", got ", out.sizes());
  TORCH_CHECK(pred_dtype(out.scalar_type()), kOp, "the model output must be float32, float16 or bfloat16, got ",
              out.scalar_type());
  TORCH_CHECK(out.device() == device_, kOp, "the model output is on ", out.device(), " but x is on ", device_);
  TORCH_CHECK(out.is_contiguous(), kOp, "the model output must be contiguous");
  if (numel() == 0) return;
  const int64_t P = out.size(0) / B;
  const size_t part_bytes = static_cast<size_t>(numel()) * out.element_size();
  StepBuffers a = buffers_;
  const auto* base = static_cast<const char*>(out.const_data_ptr());
  for (int i = 0; i < branches(); ++i) {
    TORCH_CHECK(parts_[i] < P, kOp, "prediction ", i, " is part ", parts_[i], " of the model output, which has ",
                P, " parts of ", B, " samples");
    a.preds[i] = base + parts_[i] * part_bytes;
    check_apart(a.preds[i], part_bytes, i);
  }
  launch(a, out.scalar_type());
}

}  // namespace fastdiff
