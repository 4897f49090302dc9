// The host side of fastdiff::sampler_step shared by the CPU and CUDA implementations: the op's
// arguments (checked by check_sampler_step_args) as one StepBuffers (fastdiff/sampler_step.h).
#pragma once

#include <optional>

#include <ATen/ATen.h>

#include "fastdiff/sampler_step.h"

namespace fastdiff {

// `seeds` must be contiguous and outlive the call.
inline StepBuffers step_buffers(const at::Tensor& x, at::TensorList preds, at::TensorList history,
                                const at::Tensor& seeds, at::IntArrayRef streams, at::ArrayRef<double> weights,
                                at::ArrayRef<double> coeffs, const std::optional<at::Tensor>& sample_weights,
                                const std::optional<at::Tensor>& sample_coeffs, at::TensorList outs,
                                const std::optional<at::Tensor>& side, const std::optional<at::Tensor>& finite,
                                std::optional<at::ArrayRef<double>> clip = std::nullopt,
                                at::TensorList stats = {}, at::IntArrayRef stats_pick = {}, int64_t stats_size = 0) {
  StepBuffers a{};
  // clip = [c, d] (checked: c finite and > 0 in float32), rounded once to float32 like the coefficients
  a.clip = clip.has_value();
  a.clip_c = a.clip ? static_cast<float>((*clip)[0]) : 0.0f;
  a.clip_d = a.clip ? static_cast<float>((*clip)[1]) : 0.0f;
  a.shape = StepShape{static_cast<int>(preds.size()), static_cast<int>(history.size()),
                      static_cast<int>(streams.size())};
  a.x = x.const_data_ptr<float>();
  for (int i = 0; i < a.shape.branches; ++i) a.preds[i] = preds[i].const_data_ptr();
  for (int i = 0; i < a.shape.history; ++i) a.history[i] = history[i].const_data_ptr<float>();
  for (int d = 0; d < a.shape.draws; ++d) a.streams[d] = static_cast<uint32_t>(streams[d]);
  a.seeds = seeds.const_data_ptr<int64_t>();
  // Host numbers rounded once to float32, as a Python float against a float32 tensor in the reference.
  float w[kMaxBranches] = {}, c[2 * kMaxTerms] = {};
  for (int i = 0; i < a.shape.branches; ++i) w[i] = static_cast<float>(weights[i]);
  for (int j = 0; j < 2 * a.shape.terms(); ++j) c[j] = static_cast<float>(coeffs[j]);
  load_sample_coeffs(a.shape, w, c, a.host);
  for (int d = 0; d < a.shape.draws; ++d) a.draws_used[d] = draw_used(a.shape, a.host, d, side.has_value() || a.clip);
  a.sample_weights = sample_weights ? sample_weights->const_data_ptr<float>() : nullptr;
  a.sample_coeffs = sample_coeffs ? sample_coeffs->const_data_ptr<float>() : nullptr;
  a.n_outs = static_cast<int>(outs.size());
  for (int i = 0; i < a.n_outs; ++i) a.outs[i] = outs[i].mutable_data_ptr<float>();
  a.side = side ? side->mutable_data_ptr<float>() : nullptr;
  a.finite = finite ? finite->mutable_data_ptr<int32_t>() : nullptr;
  a.B = x.size(0);
  a.n = a.B == 0 ? 0 : x.numel() / a.B;
  if (!stats.empty()) {  // checked by check_step_stats, which gave stats_size (S)
    auto read = [&](int i) { return stats[i].numel() ? stats[i].const_data_ptr<float>() : nullptr; };
    auto write = [&](int i) { return stats[i].numel() ? stats[i].mutable_data_ptr<float>() : nullptr; };
    a.stats.sums = stats[0].mutable_data_ptr<double>();
    a.stats.x_ref = read(1);
    a.stats.x_keep = write(2);
    a.stats.q_ref = read(3);
    a.stats.q_keep = write(4);
    a.stats.m = stats_pick[0];
    a.stats.H = stats_pick[1];
    a.stats.W = stats_pick[2];
    a.stats.f = stats_pick[3];
    a.stats.branch = static_cast<int>(stats_pick[4]);
    a.stats.S = stats_size;
  }
  return a;
}

}  // namespace fastdiff
