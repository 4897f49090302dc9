// Argument checks shared by the CPU and CUDA implementations. The Python layer validates user input
// with friendlier messages; these guard direct torch.ops.fastdiff calls.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "fastdiff/gaussian_path.h"
#include "fastdiff/sample_gram.h"
#include "fastdiff/sampler_step.h"

namespace fastdiff {

inline void check_randn_args(const at::Tensor& seeds, int64_t stream, at::IntArrayRef shape,
                             int64_t offset, at::ScalarType dtype) {
  TORCH_CHECK(seeds.dim() == 1, "fastdiff::randn: seeds must be 1-D, got ", seeds.dim(), " dims");
  TORCH_CHECK(seeds.scalar_type() == at::kLong, "fastdiff::randn: seeds must be int64, got ",
              seeds.scalar_type());
  TORCH_CHECK(stream >= 0 && stream <= 0xFFFFFFFFLL, "fastdiff::randn: stream must be in [0, 2^32), got ",
              stream);
  TORCH_CHECK(offset >= 0, "fastdiff::randn: offset must be >= 0, got ", offset);
  for (auto s : shape) TORCH_CHECK(s >= 0, "fastdiff::randn: shape must be non-negative, got ", shape);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fastdiff::randn: dtype must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline void check_philox_args(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4, "fastdiff::philox4x32_10: counter must be [N, 4], got ",
              counter.sizes());
  TORCH_CHECK(key.dim() == 2 && key.size(1) == 2 && key.size(0) == counter.size(0),
              "fastdiff::philox4x32_10: key must be [N, 2] with N = counter.size(0), got ", key.sizes());
  TORCH_CHECK(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
              "fastdiff::philox4x32_10: counter and key must be int64");
  TORCH_CHECK(counter.device() == key.device(), "fastdiff::philox4x32_10: counter and key on different devices");
}

// fastdiff::sampler_step. x, history, outs, side: float32 [B, ...]; preds: the same shape, float32 /
// float16 / bfloat16 (one dtype); seeds: int64 [B]; finite: int32 [B]; weights / coeffs: K1 / 2M host
// numbers, or sample_weights [B, K1] / sample_coeffs [B, 2M] float32 rows; everything on x's device
// and contiguous. An output may be exactly an input (outs[0] = x, side = history[j]: each element is
// read before it is written) but may not overlap one partially, and outputs may not overlap each other.
inline void check_sampler_step_args(const at::Tensor& x, at::TensorList preds, at::TensorList history,
                                    const at::Tensor& seeds, at::IntArrayRef streams, at::ArrayRef<double> weights,
                                    at::ArrayRef<double> coeffs, const std::optional<at::Tensor>& sample_weights,
                                    const std::optional<at::Tensor>& sample_coeffs, at::TensorList outs,
                                    const std::optional<at::Tensor>& side, const std::optional<at::Tensor>& finite,
                                    std::optional<at::ArrayRef<double>> clip = std::nullopt) {
  constexpr const char* op = "fastdiff::sampler_step: ";
  if (clip.has_value()) {  // clip_sample: [c, d], the clamp bound and the coefficient of the clamp's change
    TORCH_CHECK(clip->size() == 2, op, "clip must hold 2 numbers [c, d] (clamp the side row to [-c, c], out += d "
                "(clamped - side row)), got ", clip->size());
    const float c = static_cast<float>((*clip)[0]), d = static_cast<float>((*clip)[1]);
    TORCH_CHECK(std::isfinite((*clip)[0]) && std::isfinite(c) && c > 0.0f, op, "clip[0] (the clamp bound c) must be "
                "a finite number > 0 in float32, got ", (*clip)[0]);
    TORCH_CHECK(std::isfinite((*clip)[1]) && std::isfinite(d), op, "clip[1] (the coefficient d) must be a finite "
                "number in float32's range, got ", (*clip)[1]);
    TORCH_CHECK(!sample_coeffs.has_value(), op, "clip is not supported with per-sample coefficient rows "
                "(sample_coeffs): pass host coeffs");
  }
  TORCH_CHECK(x.dim() >= 1, op, "x must have a batch dimension [B, ...], got a 0-d tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), op, "x must be contiguous");
  const int64_t B = x.size(0);
  TORCH_CHECK(!preds.empty() && preds.size() <= kMaxBranches, op, "preds must hold 1 to ", kMaxBranches,
              " tensors, got ", preds.size());
  TORCH_CHECK(history.size() <= kMaxHistory, op, "history holds at most ", kMaxHistory, " tensors, got ",
              history.size());
  TORCH_CHECK(streams.size() <= kMaxDraws, op, "streams holds at most ", kMaxDraws, " draws, got ", streams.size());
  TORCH_CHECK(!outs.empty() && outs.size() <= kMaxOuts, op, "outs must hold 1 to ", kMaxOuts, " tensors, got ",
              outs.size());
  auto check_like_x = [&](const at::Tensor& t, const std::string& name, bool pred_dtype) {
    TORCH_CHECK(t.sizes() == x.sizes(), op, name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.device() == x.device(), op, name, " is on ", t.device(), " but x is on ", x.device());
    if (pred_dtype) {
      TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                  op, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
      TORCH_CHECK(t.scalar_type() == preds[0].scalar_type(), op, name, " must have preds[0]'s dtype ",
                  preds[0].scalar_type(), ", got ", t.scalar_type());
    } else {
      TORCH_CHECK(t.scalar_type() == at::kFloat, op, name, " must be float32, got ", t.scalar_type());
    }
    TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous");
  };
  for (size_t i = 0; i < preds.size(); ++i) check_like_x(preds[i], "preds[" + std::to_string(i) + "]", true);
  for (size_t i = 0; i < history.size(); ++i) check_like_x(history[i], "history[" + std::to_string(i) + "]", false);
  for (size_t i = 0; i < outs.size(); ++i) check_like_x(outs[i], "outs[" + std::to_string(i) + "]", false);
  if (side.has_value()) check_like_x(*side, "side", false);
  const int64_t K1 = static_cast<int64_t>(preds.size());
  const int64_t M = 2 + static_cast<int64_t>(history.size() + streams.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == K1, op, "weights must hold ", K1, " numbers, got ",
              weights.size());
  TORCH_CHECK(static_cast<int64_t>(coeffs.size()) == 2 * M, op, "coeffs must hold 2 (2 + H + D) = ", 2 * M,
              " numbers, got ", coeffs.size());
  auto check_rows = [&](const std::optional<at::Tensor>& t, const char* name, int64_t count) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == count, op, name, " must be [B, ", count, "] = [",
                B, ", ", count, "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, name, " is on ", t->device(), " but x is on ", x.device());
    TORCH_CHECK(t->is_contiguous(), op, name, " must be contiguous");
  };
  check_rows(sample_weights, "sample_weights", K1);
  check_rows(sample_coeffs, "sample_coeffs", 2 * M);
  TORCH_CHECK(seeds.dim() == 1 && seeds.size(0) == B, op, "seeds must be [B] = [", B, "] (one seed per sample), got ",
              seeds.sizes());
  TORCH_CHECK(seeds.scalar_type() == at::kLong, op, "seeds must be int64, got ", seeds.scalar_type());
  TORCH_CHECK(seeds.device() == x.device(), op, "seeds is on ", seeds.device(), " but x is on ", x.device());
  for (auto s : streams) TORCH_CHECK(s >= 0 && s <= 0xFFFFFFFFLL, op, "streams must be in [0, 2^32), got ", s);
  if (finite.has_value()) {
    TORCH_CHECK(finite->dim() == 1 && finite->size(0) == B && finite->scalar_type() == at::kInt, op,
                "finite must be int32 [B] = [", B, "], got ", finite->scalar_type(), " ", finite->sizes());
    TORCH_CHECK(finite->device() == x.device(), op, "finite is on ", finite->device(), " but x is on ", x.device());
    TORCH_CHECK(finite->is_contiguous(), op, "finite must be contiguous");
  }

  // Aliasing: full overlap of an output with an input is fine (elementwise, read before write).
  std::vector<std::pair<const at::Tensor*, std::string>> written, read{{&x, "x"}};
  for (size_t i = 0; i < preds.size(); ++i) read.emplace_back(&preds[i], "preds[" + std::to_string(i) + "]");
  for (size_t i = 0; i < history.size(); ++i) read.emplace_back(&history[i], "history[" + std::to_string(i) + "]");
  for (size_t i = 0; i < outs.size(); ++i) written.emplace_back(&outs[i], "outs[" + std::to_string(i) + "]");
  if (side.has_value()) written.emplace_back(&*side, "side");
  if (x.numel() == 0) return;
  for (size_t i = 0; i < written.size(); ++i) {
    for (const auto& in : read) {
      TORCH_CHECK(at::get_overlap_status(*written[i].first, *in.first) != at::MemOverlapStatus::Partial, op,
                  written[i].second, " partially overlaps ", in.second, " (an output may be exactly an input, e.g. "
                  "outs[0] = x, but not a shifted view of one)");
    }
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK(at::get_overlap_status(*written[i].first, *written[j].first) == at::MemOverlapStatus::No, op,
                  written[i].second, " and ", written[j].second, " must not overlap");
    }
  }
}

// fastdiff::sampler_step's stats (fastdiff/ops/step_stats.py): tensors = [sums, x_ref, x_keep, q_ref, q_keep]
// (sums float64 [B, 3]; the others float32 [B, S] or empty: not given), pick = [m, H, W, f, branch]; a keep
// buffer overlaps no other argument. Returns S, the picked elements per sample.
inline int64_t check_step_stats(const at::Tensor& x, at::TensorList preds, at::TensorList history,
                                at::TensorList outs, const std::optional<at::Tensor>& side, at::TensorList tensors,
                                at::IntArrayRef pick) {
  constexpr const char* op = "fastdiff::sampler_step: ";
  TORCH_CHECK(tensors.size() == 5, op, "stats must hold 5 tensors [sums, x_ref, x_keep, q_ref, q_keep] (empty where "
              "not given), got ", tensors.size());
  TORCH_CHECK(pick.size() == 5, op, "stats_pick must hold 5 ints [m, H, W, f, branch], got ", pick.size());
  const int64_t B = x.size(0), n = B == 0 ? 0 : x.numel() / B;
  const int64_t m = pick[0], H = pick[1], W = pick[2], f = pick[3], branch = pick[4];
  TORCH_CHECK(H >= 1 && W >= 1 && f >= 1, op, "stats_pick's H, W and f must be >= 1, got ", pick);
  int64_t S = m;
  if (H * W == 1) {
    TORCH_CHECK(m >= 0 && m <= n, op, "stats_pick's m must be in [0, n = ", n, "], got ", m);
  } else {
    TORCH_CHECK(m == n && n % (H * W) == 0, op, "stats_pick with H x W = ", H, " x ", W, " picks from whole samples: "
                "m must be n = ", n, " and n a multiple of H W, got m = ", m);
    S = (n / (H * W)) * ((H + f - 1) / f) * ((W + f - 1) / f);
  }
  TORCH_CHECK(branch >= kStatsNoQ && branch < static_cast<int64_t>(preds.size()), op, "stats_pick's branch must be "
              "-2 (no q), -1 (the blend g) or a prediction's index < ", preds.size(), ", got ", branch);
  const at::Tensor& sums = tensors[0];
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == B && sums.size(1) == 3 && sums.scalar_type() == at::kDouble &&
              sums.device() == x.device() && sums.is_contiguous(), op, "stats' sums must be a contiguous float64 "
              "tensor [B, 3] = [", B, ", 3] on x's device, got ", sums.scalar_type(), " ", sums.sizes());
  const char* names[5] = {"sums", "x_ref", "x_keep", "q_ref", "q_keep"};
  for (int i = 1; i < 5; ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == S && t.scalar_type() == at::kFloat &&
                t.device() == x.device() && t.is_contiguous(), op, "stats' ", names[i], " must be a contiguous "
                "float32 tensor [B, S] = [", B, ", ", S, "] on x's device, got ", t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(i < 3 || branch != kStatsNoQ, op, "stats' ", names[i], " needs q: stats_pick's branch must be -1 "
                "(the blend g) or a prediction's index");
  }
  std::vector<const at::Tensor*> others{&x, &tensors[0], &tensors[1], &tensors[3]};
  for (const auto& t : preds) others.push_back(&t);
  for (const auto& t : history) others.push_back(&t);
  for (const auto& t : outs) others.push_back(&t);
  if (side.has_value()) others.push_back(&*side);
  for (int i : {2, 4}) {
    if (tensors[i].numel() == 0) continue;
    for (const at::Tensor* t : others) {
      TORCH_CHECK(t->numel() == 0 || at::get_overlap_status(tensors[i], *t) == at::MemOverlapStatus::No, op, "stats' ",
                  names[i], " must not share memory with another argument (it is written in full)");
    }
    others.push_back(&tensors[i]);
  }
  return S;
}

// fastdiff::add_noise, fastdiff::diffusion_loss and fastdiff::diffusion_loss_backward. `op` is the
// message prefix ("fastdiff::<op>: ").

// fastdiff::sample_gram (fastdiff/ops/sample_gram.py): terms [B, ...] of one dtype (float32/float16/bfloat16),
// contiguous, same shape and device; seeds int64 [B]; T = len(terms) + len(streams) <= kMaxGramTerms.
inline void check_sample_gram_args(at::TensorList terms, const at::Tensor& seeds, at::IntArrayRef streams) {
  constexpr const char* op = "fastdiff::sample_gram: ";
  TORCH_CHECK(!terms.empty(), op, "terms must hold at least one tensor");
  TORCH_CHECK(streams.size() <= kMaxGramDraws, op, "streams holds at most ", kMaxGramDraws, " draws, got ",
              streams.size());
  TORCH_CHECK(terms.size() + streams.size() <= kMaxGramTerms, op, "terms and streams hold at most ", kMaxGramTerms,
              " vectors, got ", terms.size() + streams.size());
  const at::Tensor& first = terms[0];
  TORCH_CHECK(first.dim() >= 1, op, "terms[0] must have a batch dimension [B, ...], got a 0-d tensor");
  for (size_t i = 0; i < terms.size(); ++i) {
    const at::Tensor& t = terms[i];
    const std::string name = "terms[" + std::to_string(i) + "]";
    TORCH_CHECK(t.sizes() == first.sizes(), op, name, " must have terms[0]'s shape ", first.sizes(), ", got ",
                t.sizes());
    TORCH_CHECK(t.device() == first.device(), op, name, " is on ", t.device(), " but terms[0] is on ", first.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op,
                name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, name, " must have terms[0]'s dtype ", first.scalar_type(),
                ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous");
  }
  const int64_t B = first.size(0);
  TORCH_CHECK(seeds.dim() == 1 && seeds.size(0) == B, op, "seeds must be [B] = [", B, "] (one seed per sample), got ",
              seeds.sizes());
  TORCH_CHECK(seeds.scalar_type() == at::kLong, op, "seeds must be int64, got ", seeds.scalar_type());
  TORCH_CHECK(seeds.device() == first.device(), op, "seeds is on ", seeds.device(), " but terms[0] is on ",
              first.device());
  for (auto s : streams) TORCH_CHECK(s >= 0 && s <= 0xFFFFFFFFLL, op, "streams must be in [0, 2^32), got ", s);
}

// A [B, ...] data tensor: float32 / float16 / bfloat16, contiguous, at least 1-D.
inline void check_loss_data(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 1, op, name, " must have a batch dimension [B, ...], got a 0-d tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op,
              name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, name, " must be contiguous");
}

// A per-sample float32 vector [B] on `like`'s device (its layout is made contiguous by the caller).
inline void check_per_sample(const char* op, const at::Tensor& v, const char* name, int64_t B, const at::Tensor& like,
                             const char* like_name) {
  TORCH_CHECK(v.dim() == 1 && v.size(0) == B, op, name, " must be [B] = [", B, "] (one value per sample), got ",
              v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kFloat, op, name, " must be float32, got ", v.scalar_type());
  TORCH_CHECK(v.device() == like.device(), op, name, " is on ", v.device(), " but ", like_name, " is on ",
              like.device());
}

inline void check_loss_seeds(const char* op, const at::Tensor& seeds, int64_t stream, int64_t B,
                             const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(seeds.dim() == 1 && seeds.size(0) == B, op, "seeds must be [B] = [", B, "] (one seed per sample), got ",
              seeds.sizes());
  TORCH_CHECK(seeds.scalar_type() == at::kLong, op, "seeds must be int64, got ", seeds.scalar_type());
  TORCH_CHECK(seeds.device() == like.device(), op, "seeds is on ", seeds.device(), " but ", like_name, " is on ",
              like.device());
  TORCH_CHECK(stream >= 0 && stream <= 0xFFFFFFFFLL, op, "stream must be in [0, 2^32), got ", stream);
}

// add_noise(z, alpha, beta, seeds, stream): z float32/float16/bfloat16 [B, ...] contiguous; alpha,
// beta float32 [B]; seeds int64 [B]; one device.
inline void check_add_noise_args(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                                 const at::Tensor& seeds, int64_t stream) {
  constexpr const char* op = "fastdiff::add_noise: ";
  check_loss_data(op, z, "z");
  const int64_t B = z.size(0);
  check_per_sample(op, alpha, "alpha", B, z, "z");
  check_per_sample(op, beta, "beta", B, z, "z");
  check_loss_seeds(op, seeds, stream, B, z, "z");
}

// diffusion_loss(pred, z, coef_z, coef_eps, weight, seeds, stream) and, with grad_loss,
// diffusion_loss_backward: pred, z float32/float16/bfloat16 (each its own dtype) of one shape
// [B, ...], contiguous; coef_z, coef_eps, weight (and grad_loss) float32 [B]; seeds int64 [B]; one
// device. `op` names the op in the messages.
inline void check_diffusion_loss_args(const char* op, const at::Tensor* grad_loss, const at::Tensor& pred,
                                      const at::Tensor& z, const at::Tensor& coef_z, const at::Tensor& coef_eps,
                                      const at::Tensor& weight, const at::Tensor& seeds, int64_t stream) {
  check_loss_data(op, pred, "pred");
  TORCH_CHECK(z.sizes() == pred.sizes(), op, "z must have pred's shape ", pred.sizes(), ", got ", z.sizes());
  TORCH_CHECK(z.device() == pred.device(), op, "z is on ", z.device(), " but pred is on ", pred.device());
  check_loss_data(op, z, "z");
  const int64_t B = pred.size(0);
  if (grad_loss != nullptr) check_per_sample(op, *grad_loss, "grad_loss", B, pred, "pred");
  check_per_sample(op, coef_z, "coef_z", B, pred, "pred");
  check_per_sample(op, coef_eps, "coef_eps", B, pred, "pred");
  check_per_sample(op, weight, "weight", B, pred, "pred");
  check_loss_seeds(op, seeds, stream, B, pred, "pred");
}

// The *_at ops' time and path (fastdiff/gaussian_path.h): t float32 or float64 [B] on `like`'s device; path a
// PathKind with its parameters (VP: beta_min, beta_max; VPCosine: s; VE: sigma_max); pair a PairKind.
inline PathSpec check_path_args(const char* op, const at::Tensor& t, int64_t B, const at::Tensor& like,
                                const char* like_name, int64_t path, at::ArrayRef<double> params, int64_t pair) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, "t must be [B] = [", B, "] (one time per sample), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              "t must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, "t is on ", t.device(), " but ", like_name, " is on ", like.device());
  TORCH_CHECK(path >= 0 && path < kPathKinds, op, "path must be a path code in [0, ", int64_t{kPathKinds}, "), got ",
              path);
  static constexpr size_t kParams[kPathKinds] = {0, 2, 1, 1};  // CondOT, VP, VPCosine, VE
  TORCH_CHECK(params.size() == kParams[path], op, "path ", path, " takes ", kParams[path],
              " parameters (path_params), got ", params.size());
  TORCH_CHECK(pair >= 0 && pair < kPairKinds, op, "the coefficient kind must be in [0, ", int64_t{kPairKinds},
              "), got ", pair);
  PathSpec spec{static_cast<int32_t>(path), static_cast<int32_t>(pair), {0.0, 0.0}};
  for (size_t i = 0; i < params.size(); ++i) spec.param[i] = params[i];
  return spec;
}

inline void check_optional_weight(const char* op, const std::optional<at::Tensor>& weight, int64_t B,
                                  const at::Tensor& like) {
  if (weight.has_value()) check_per_sample(op, *weight, "weight", B, like, "pred");
}

inline at::Tensor randn_output(const at::Tensor& seeds, at::IntArrayRef shape, at::ScalarType dtype) {
  std::vector<int64_t> sizes{seeds.size(0)};
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  return at::empty(sizes, seeds.options().dtype(dtype));
}

}  // namespace fastdiff
