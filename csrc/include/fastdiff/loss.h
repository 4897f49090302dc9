// The per-element math of fastdiff::add_noise, fastdiff::diffusion_loss and
// fastdiff::diffusion_loss_backward (docs/design.md §4), written once and used by the CPU loops (with
// T = at::vec::Vectorized<float>), the CUDA kernels (T = float) and the C++ tests (T = float). The
// specification is fastdiff/ops/diffusion_loss.py (add_noise_reference, diffusion_loss_reference,
// diffusion_loss_backward_reference); eps is the spec-v1 normal of (seeds[b], stream, element i):
//
//   add_noise:      x_t[b, i]  = alpha[b] z[b, i] + beta[b] eps[b, i]
//   diffusion_loss: loss[b]    = weight[b] / n * sum_i r[b, i]^2
//                   r[b, i]    = pred[b, i] - (coef_z[b] z[b, i] + coef_eps[b] eps[b, i])
//   backward:       grad[b, i] = (grad_loss[b] weight[b] (2 / n)) r[b, i]
//
// Every operation in float32, in the reference's order (nvcc and -ffp-contract=fast may fuse a
// multiply-add; the difference is within an ulp of each term), r^2 included. The per-sample sum of
// r^2 is float32 only over short fixed runs of at most 16 squares, and float64 beyond:
//   CPU:    a vector lane's squares within one noise block (kBlockElems / Vectorized<float>::size()
//           = 8 squares) in float32; the lanes and blocks of a chunk in float64 (loss_block.h);
//   CUDA:   a thread's squares within a chunk (kLossChunk / 4 / kBlock groups = 16 squares; a warp's lane
//           for samples of at most 512 elements, also 16) in float32; the threads (fixed shuffle tree)
//           in float64 (cuda/loss.cu);
//   Triton: a group's 4 squares in float32; the groups, blocks and partials in float64 (kernels/loss.py).
// The order is fixed: each sample is cut into chunks of kLossChunk elements (Triton: blocks), each
// chunk's partial sum is formed by one thread (CPU) or one block (CUDA) in an order fixed by the
// element indices, and the chunks are then added in index order; loss_from_sum rounds once. The loss
// is thus bitwise reproducible on one backend and build, whatever the thread count. (The reference,
// diffusion_loss_reference, takes a float32 mean: the same value up to float32 summation rounding.)
#pragma once

#include <cstdint>

#include "fastdiff/macros.h"

namespace fastdiff {

// Elements per partial sum of the loss (a multiple of the CPU noise blocks, 64 and 128, and of the CUDA group, 4).
constexpr int64_t kLossChunk = 4096;

FASTDIFF_HD int64_t loss_chunks(int64_t n) { return (n + kLossChunk - 1) / kLossChunk; }

// add_noise: alpha z + beta eps.
template <typename T>
FASTDIFF_HD T noised_element(const T& alpha, const T& beta, const T& z, const T& eps) {
  return alpha * z + beta * eps;
}

// The residual pred - target, target = coef_z z + coef_eps eps. T is float or a SIMD type with
// operators + - * (taken by reference, as in step.h).
template <typename T>
FASTDIFF_HD T loss_residual(const T& pred, const T& coef_z, const T& coef_eps, const T& z, const T& eps) {
  return pred - (coef_z * z + coef_eps * eps);
}

// The per-sample factor of the backward: (grad_loss weight) (2 / n), with 2 / n rounded to float as
// the reference's `* (2.0 / n)` on a float32 tensor does.
FASTDIFF_HD float loss_grad_scale(float grad_loss, float weight, int64_t n) {
  return grad_loss * weight * static_cast<float>(2.0 / static_cast<double>(n));
}

// backward: scale r.
template <typename T>
FASTDIFF_HD T loss_grad_element(const T& scale, const T& pred, const T& coef_z, const T& coef_eps, const T& z,
                                const T& eps) {
  return scale * loss_residual(pred, coef_z, coef_eps, z, eps);
}

// The loss of one sample from its float64 sum of squared residuals: weight * (sum / n), in float64,
// rounded once. n == 0 gives NaN, as the reference's mean over no elements.
FASTDIFF_HD float loss_from_sum(double sum_sq, float weight, int64_t n) {
  return static_cast<float>(static_cast<double>(weight) * (sum_sq / static_cast<double>(n)));
}

}  // namespace fastdiff
