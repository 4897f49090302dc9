// CPU implementation of fastdiff::add_noise, fastdiff::diffusion_loss and
// fastdiff::diffusion_loss_backward (docs/design.md §4; spec: fastdiff/ops/diffusion_loss.py). The loops
// live in loss_block.h; this file builds their portable copies, picks SIMD copies (avx2/, avx512/loss.cpp)
// by simd(), adds the loss's chunk sums in order and registers the ops.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../dispatch.h"
#include "fastdiff/gaussian_path.h"
#include "fastdiff/loss.h"
#include "loss_block.h"
#include "simd.h"

namespace fastdiff {
namespace cpu {

void narrow_block(const float* src, int count, c10::Half* dst) {
  for (int j = 0; j < count; ++j) dst[j] = static_cast<c10::Half>(src[j]);
}
void narrow_block(const float* src, int count, c10::BFloat16* dst) {
  for (int j = 0; j < count; ++j) dst[j] = static_cast<c10::BFloat16>(src[j]);
}

FASTDIFF_DEFINE_LOSS_LOOPS(portable)

namespace {


at::Tensor add_noise_cpu(const at::Tensor& z, const at::Tensor& alpha_in, const at::Tensor& beta_in,
                         const at::Tensor& seeds_in, int64_t stream) {
  check_add_noise_args(z, alpha_in, beta_in, seeds_in, stream);
  at::Tensor out = at::empty(z.sizes(), z.options().dtype(at::kFloat));
  if (z.numel() == 0) return out;
  const at::Tensor alpha = alpha_in.contiguous(), beta = beta_in.contiguous(), seeds = seeds_in.contiguous();
  with_data_type(z.scalar_type(), [&](auto zt) {
    using z_t = decltype(zt);
    AddNoiseArgs<z_t> a;
    a.z = z.const_data_ptr<z_t>();
    a.alpha = alpha.const_data_ptr<float>();
    a.beta = beta.const_data_ptr<float>();
    a.seeds = seeds.const_data_ptr<int64_t>();
    a.out = out.mutable_data_ptr<float>();
    a.B = z.size(0);
    a.n = z.numel() / a.B;
    a.stream = static_cast<uint32_t>(stream);
    FASTDIFF_SIMD_CALL(add_noise, a);
  });
  return out;
}

// Runs f(LossArgs<pred_t, z_t>&) with the pointers of the (checked) arguments filled in.
template <typename F>
void with_loss_args(const at::Tensor* grad_loss, const at::Tensor& pred, const at::Tensor& z, const at::Tensor& coef_z,
                    const at::Tensor& coef_eps, const at::Tensor& weight, const at::Tensor& seeds, int64_t stream,
                    F&& f) {
  with_data_type(pred.scalar_type(), [&](auto pt) {
    with_data_type(z.scalar_type(), [&](auto zt) {
      using pred_t = decltype(pt);
      using z_t = decltype(zt);
      LossArgs<pred_t, z_t> a;
      a.pred = pred.const_data_ptr<pred_t>();
      a.z = z.const_data_ptr<z_t>();
      a.coef_z = coef_z.const_data_ptr<float>();
      a.coef_eps = coef_eps.const_data_ptr<float>();
      a.weight = weight.const_data_ptr<float>();
      a.seeds = seeds.const_data_ptr<int64_t>();
      a.grad_loss = grad_loss ? grad_loss->const_data_ptr<float>() : nullptr;
      a.partial = nullptr;
      a.residual = nullptr;
      a.grad = nullptr;
      a.B = pred.size(0);
      a.n = a.B == 0 ? 0 : pred.numel() / a.B;
      a.stream = static_cast<uint32_t>(stream);
      f(a);
    });
  });
}

// diffusion_loss, and with `residual` also pred - target (float32, pred's shape) for the backward.
at::Tensor loss_forward(const char* op, const at::Tensor& pred, const at::Tensor& z, const at::Tensor& coef_z_in,
                        const at::Tensor& coef_eps_in, const at::Tensor& weight_in, const at::Tensor& seeds_in,
                        int64_t stream, at::Tensor* residual) {
  check_diffusion_loss_args(op, nullptr, pred, z, coef_z_in, coef_eps_in, weight_in, seeds_in, stream);
  const int64_t B = pred.size(0);
  at::Tensor loss = at::empty({B}, pred.options().dtype(at::kFloat));
  if (residual != nullptr) *residual = at::empty(pred.sizes(), pred.options().dtype(at::kFloat));
  if (B == 0) return loss;
  const at::Tensor coef_z = coef_z_in.contiguous(), coef_eps = coef_eps_in.contiguous();
  const at::Tensor weight = weight_in.contiguous(), seeds = seeds_in.contiguous();
  const int64_t n = pred.numel() / B;
  const int64_t chunks = loss_chunks(n);
  at::Tensor partial = at::empty({B, chunks}, pred.options().dtype(at::kDouble));
  double* part = partial.mutable_data_ptr<double>();
  with_loss_args(nullptr, pred, z, coef_z, coef_eps, weight, seeds, stream, [&](auto& a) {
    a.partial = part;
    if (residual != nullptr && n > 0) a.residual = residual->mutable_data_ptr<float>();
    FASTDIFF_SIMD_CALL(diffusion_loss, a);
  });
  // The chunks of each sample in index order: the same sums whatever the thread count.
  const float* w = weight.const_data_ptr<float>();
  float* out = loss.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0.0;
    for (int64_t c = 0; c < chunks; ++c) sum += part[b * chunks + c];
    out[b] = loss_from_sum(sum, w[b], n);
  }
  return loss;
}

at::Tensor diffusion_loss_cpu(const at::Tensor& pred, const at::Tensor& z, const at::Tensor& coef_z,
                              const at::Tensor& coef_eps, const at::Tensor& weight, const at::Tensor& seeds,
                              int64_t stream) {
  return loss_forward("fastdiff::diffusion_loss: ", pred, z, coef_z, coef_eps, weight, seeds, stream, nullptr);
}

std::tuple<at::Tensor, at::Tensor> diffusion_loss_residual_cpu(const at::Tensor& pred, const at::Tensor& z,
                                                               const at::Tensor& coef_z, const at::Tensor& coef_eps,
                                                               const at::Tensor& weight, const at::Tensor& seeds,
                                                               int64_t stream) {
  at::Tensor residual;
  at::Tensor loss = loss_forward("fastdiff::diffusion_loss_residual: ", pred, z, coef_z, coef_eps, weight, seeds,
                                 stream, &residual);
  return {loss, residual};
}

at::Tensor diffusion_loss_backward_cpu(const at::Tensor& grad_loss_in, const at::Tensor& pred, const at::Tensor& z,
                                       const at::Tensor& coef_z_in, const at::Tensor& coef_eps_in,
                                       const at::Tensor& weight_in, const at::Tensor& seeds_in, int64_t stream) {
  check_diffusion_loss_args("fastdiff::diffusion_loss_backward: ", &grad_loss_in, pred, z, coef_z_in, coef_eps_in,
                            weight_in, seeds_in, stream);
  at::Tensor grad = at::empty(pred.sizes(), pred.options());
  if (pred.numel() == 0) return grad;
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor coef_z = coef_z_in.contiguous(), coef_eps = coef_eps_in.contiguous();
  const at::Tensor weight = weight_in.contiguous(), seeds = seeds_in.contiguous();
  with_loss_args(&grad_loss, pred, z, coef_z, coef_eps, weight, seeds, stream, [&](auto& a) {
    using pred_t = std::remove_const_t<std::remove_pointer_t<decltype(a.pred)>>;
    a.grad = grad.mutable_data_ptr<pred_t>();
    FASTDIFF_SIMD_CALL(diffusion_loss_backward, a);
  });
  return grad;
}

// ---- the ops at flow times: coefficients from t on the host, checked before any work ----------------

// x as Python's repr of a float writes it (the shortest digits that read back; fixed notation for exponents in
// [-4, 16), else d.ddde+XX; ".0" on an integer), so that the messages read as the Python layer's.
std::string python_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[48];
  int digits = 1;
  for (; digits < 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*e", digits - 1, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::snprintf(buf, sizeof buf, "%.*e", digits - 1, x);
  const int exponent = std::atoi(std::strchr(buf, 'e') + 1);
  if (exponent < -4 || exponent >= 16) {
    std::string s(buf);  // "1.5e+20": Python drops a ".0" mantissa ("1e+20") as %e with fewer digits does
    return s;
  }
  std::snprintf(buf, sizeof buf, "%.*f", std::max(digits - 1 - exponent, 1), x);
  return buf;
}

std::string path_repr(const PathSpec& s) {
  switch (s.kind) {
    case kPathCondOT: return "CondOT()";
    case kPathVP: return "VP(beta_min=" + python_float(s.param[0]) + ", beta_max=" + python_float(s.param[1]) + ")";
    case kPathVPCosine: return "VPCosine(s=" + python_float(s.param[0]) + ")";
    default: return "VE(sigma_max=" + python_float(s.param[0]) + ")";
  }
}

const char* prediction_name(int32_t pair) {
  static const char* const names[kPairKinds] = {"noising", "velocity", "eps", "x0", "score", "v"};
  return names[pair];
}

double time_of(const at::Tensor& t, int64_t b) {
  return t.scalar_type() == at::kDouble ? t.const_data_ptr<double>()[b]
                                        : static_cast<double>(t.const_data_ptr<float>()[b]);
}

// float32 [B] coefficient pairs of every sample at its time. A time outside [0, 1] and a target that is not
// finite at its time (the score where beta_t = 0) are refused with the Python layer's ValueError.
std::pair<at::Tensor, at::Tensor> host_pairs(const at::Tensor& t_in, const PathSpec& spec) {
  const at::Tensor t = t_in.contiguous();
  const int64_t B = t.size(0);
  at::Tensor c0 = at::empty({B}, t.options().dtype(at::kFloat)), c1 = at::empty({B}, t.options().dtype(at::kFloat));
  float* p0 = c0.mutable_data_ptr<float>();
  float* p1 = c1.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const double tb = time_of(t, b);
    TORCH_CHECK_VALUE(tb >= 0.0 && tb <= 1.0, "t must hold flow times in [0, 1] (finite), got t[", b, "] = ",
                      python_float(tb));
    pair_at(spec, tb, &p0[b], &p1[b]);
    TORCH_CHECK_VALUE(std::isfinite(p0[b]) && std::isfinite(p1[b]), "the '", prediction_name(spec.pair),
                      "' target is singular at t = ", python_float(tb), " (t[", b, "]) on path ", path_repr(spec),
                      " (not finite there: e.g. the score -eps/beta_t where beta_t = 0); train prediction='",
                      prediction_name(spec.pair), "' at times where the path has noise");
  }
  return {c0, c1};
}

at::Tensor weight_or_ones(const std::optional<at::Tensor>& weight, const at::Tensor& like) {
  return weight.has_value() ? *weight : at::ones({like.size(0)}, like.options().dtype(at::kFloat));
}

at::Tensor add_noise_at_cpu(const at::Tensor& z, const at::Tensor& t, const at::Tensor& seeds, int64_t stream,
                            int64_t path, at::ArrayRef<double> path_params) {
  constexpr const char* op = "fastdiff::add_noise_at: ";
  check_loss_data(op, z, "z");
  const PathSpec spec = check_path_args(op, t, z.size(0), z, "z", path, path_params, kPairNoising);
  auto [alpha, beta] = host_pairs(t, spec);
  return add_noise_cpu(z, alpha, beta, seeds, stream);
}

// The target's (coef_z, coef_eps, weight) of the loss ops at times, their arguments checked.
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_at_pairs(const char* op, const at::Tensor& pred, const at::Tensor& t,
                                                             const std::optional<at::Tensor>& weight, int64_t path,
                                                             at::ArrayRef<double> path_params, int64_t prediction) {
  check_loss_data(op, pred, "pred");
  TORCH_CHECK(prediction >= kPairVelocity && prediction < kPairKinds, op,
              "prediction must be a target code in [1, 6), got ", prediction);
  const PathSpec spec = check_path_args(op, t, pred.size(0), pred, "pred", path, path_params, prediction);
  check_optional_weight(op, weight, pred.size(0), pred);
  auto [coef_z, coef_eps] = host_pairs(t, spec);
  return {coef_z, coef_eps, weight_or_ones(weight, pred)};
}

at::Tensor loss_at_forward(const char* op, const at::Tensor& pred, const at::Tensor& z, const at::Tensor& t,
                           const std::optional<at::Tensor>& weight, const at::Tensor& seeds, int64_t stream,
                           int64_t path, at::ArrayRef<double> path_params, int64_t prediction, at::Tensor* residual) {
  auto [coef_z, coef_eps, w] = loss_at_pairs(op, pred, t, weight, path, path_params, prediction);
  return loss_forward(op, pred, z, coef_z, coef_eps, w, seeds, stream, residual);
}

at::Tensor diffusion_loss_at_cpu(const at::Tensor& pred, const at::Tensor& z, const at::Tensor& t,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& seeds, int64_t stream,
                                 int64_t path, at::ArrayRef<double> path_params, int64_t prediction) {
  return loss_at_forward("fastdiff::diffusion_loss_at: ", pred, z, t, weight, seeds, stream, path, path_params,
                         prediction, nullptr);
}

std::tuple<at::Tensor, at::Tensor> diffusion_loss_at_residual_cpu(
    const at::Tensor& pred, const at::Tensor& z, const at::Tensor& t, const std::optional<at::Tensor>& weight,
    const at::Tensor& seeds, int64_t stream, int64_t path, at::ArrayRef<double> path_params, int64_t prediction) {
  at::Tensor residual;
  at::Tensor loss = loss_at_forward("fastdiff::diffusion_loss_at_residual: ", pred, z, t, weight, seeds, stream, path,
                                    path_params, prediction, &residual);
  return {loss, residual};
}

at::Tensor diffusion_loss_at_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& z,
                                          const at::Tensor& t, const std::optional<at::Tensor>& weight,
                                          const at::Tensor& seeds, int64_t stream, int64_t path,
                                          at::ArrayRef<double> path_params, int64_t prediction) {
  auto [coef_z, coef_eps, w] = loss_at_pairs("fastdiff::diffusion_loss_at_backward: ", pred, t, weight, path,
                                             path_params, prediction);
  return diffusion_loss_backward_cpu(grad_loss, pred, z, coef_z, coef_eps, w, seeds, stream);
}

template <typename out_t>
void scale_residual(const float* grad_loss, int64_t grad_stride, const float* weight, const float* residual,
                    out_t* out, int64_t B, int64_t n) {
  at::parallel_for(0, B * n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / n, stop = std::min(end, (b + 1) * n);
      const float scale = loss_grad_scale(grad_loss[b * grad_stride], weight != nullptr ? weight[b] : 1.0f, n);
      for (; i < stop; ++i) out[i] = static_cast<out_t>(scale * residual[i]);
    }
  });
}

at::Tensor diffusion_loss_residual_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& residual_in,
                                                const std::optional<at::Tensor>& weight_in, at::ScalarType dtype) {
  constexpr const char* op = "fastdiff::diffusion_loss_residual_backward: ";
  TORCH_CHECK(residual_in.dim() >= 1 && residual_in.scalar_type() == at::kFloat, op,
              "residual must be float32 [B, ...], got ", residual_in.scalar_type(), " ", residual_in.sizes());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              "dtype must be float32, float16 or bfloat16, got ", dtype);
  const int64_t B = residual_in.size(0);
  check_per_sample(op, grad_loss, "grad_loss", B, residual_in, "residual");
  if (weight_in.has_value()) check_per_sample(op, *weight_in, "weight", B, residual_in, "residual");
  at::Tensor out = at::empty(residual_in.sizes(), residual_in.options().dtype(dtype));
  if (residual_in.numel() == 0) return out.zero_();  // nothing to differentiate (2 / n undefined for n = 0)
  const at::Tensor residual = residual_in.contiguous();
  const at::Tensor weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();
  const float* w = weight.defined() ? weight.const_data_ptr<float>() : nullptr;
  const float* g = grad_loss.const_data_ptr<float>();
  const int64_t n = residual.numel() / B;
  with_data_type(dtype, [&](auto ot) {
    using out_t = decltype(ot);
    scale_residual(g, grad_loss.stride(0), w, residual.const_data_ptr<float>(), out.mutable_data_ptr<out_t>(), B, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("add_noise", &add_noise_cpu);
  m.impl("diffusion_loss", &diffusion_loss_cpu);
  m.impl("diffusion_loss_residual", &diffusion_loss_residual_cpu);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_cpu);
  m.impl("add_noise_at", &add_noise_at_cpu);
  m.impl("diffusion_loss_at", &diffusion_loss_at_cpu);
  m.impl("diffusion_loss_at_residual", &diffusion_loss_at_residual_cpu);
  m.impl("diffusion_loss_at_backward", &diffusion_loss_at_backward_cpu);
  m.impl("diffusion_loss_residual_backward", &diffusion_loss_residual_backward_cpu);
}

}  // namespace cpu
}  // namespace fastdiff
