// CPU implementation of fastdiff::add_noise, fastdiff::diffusion_loss and
// fastdiff::diffusion_loss_backward (docs/design.md §4; spec: fastdiff/ops/diffusion_loss.py). The loops
// live in loss_block.h; this file builds their portable copies, picks SIMD copies (avx2/, avx512/loss.cpp)
// by simd(), adds the loss's chunk sums in order and registers the ops.
#include <cstring>
#include <type_traits>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../dispatch.h"
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

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("add_noise", &add_noise_cpu);
  m.impl("diffusion_loss", &diffusion_loss_cpu);
  m.impl("diffusion_loss_residual", &diffusion_loss_residual_cpu);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace fastdiff
