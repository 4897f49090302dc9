// CUDA backend of fastdiff::add_noise, fastdiff::diffusion_loss and fastdiff::diffusion_loss_backward
// (docs/design.md §4; spec: fastdiff/ops/diffusion_loss.py). The per-element math is fastdiff/loss.h
// (shared with the CPU loops) and the noise is normal4 of fastdiff/philox.h (spec v1), so the results
// match the CPU backend up to libm/libdevice rounding, FMA contraction and the order of the float64
// loss sums.
//
// add_noise and the backward: one thread per group of 4 consecutive elements of one sample (one
// Philox call gives exactly that group's 4 normals), as sampler_step.cu. When n % 4 == 0 and every
// pointer is aligned, the group is loaded and stored with one 16-byte access per float32 tensor (8
// bytes per float16/bfloat16 tensor); otherwise a scalar path handles any n. A sample whose noise
// coefficient (beta, coef_eps) is 0 draws no noise (eps = 0 gives the same numbers).
//
// diffusion_loss is deterministic, without atomics: each sample is cut into chunks of kLossChunk
// elements; one block of kBlock threads owns a chunk (thread t takes groups t, t + kBlock, ... of it),
// sums its squared residuals in float, and the block adds the threads' sums in float64 in a fixed
// tree (warp shuffles, then the warps in order) into partial[b, chunk]. A second kernel, one block per
// sample, adds the chunks the same fixed way and writes loss[b]. Same inputs, same bits, every run.
//
// CUDA-graph safety: seeds and every coefficient are read from device memory inside the kernels,
// nothing is read back to the host, and the launches go to the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "dispatch.h"
#include "cuda/launch.h"
#include "cuda/vec4.h"
#include "fastdiff/loss.h"
#include "fastdiff/philox.h"

namespace fastdiff {
namespace {

constexpr int kWarps = kBlock / 32;
constexpr int64_t kChunkGroups = kLossChunk / 4;  // groups of 4 elements per loss chunk
static_assert(kLossChunk % 4 == 0, "a loss chunk holds whole groups");

// (sample b, group g) of work item idx, g fastest; 32-bit division where every index fits.
__device__ __forceinline__ void split_item(int64_t idx, int64_t groups, int64_t total, int64_t* b, int64_t* g) {
  if (total <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max())) {  // uniform branch
    const uint32_t b32 = static_cast<uint32_t>(idx) / static_cast<uint32_t>(groups);
    *b = b32;
    *g = static_cast<uint32_t>(idx) - b32 * static_cast<uint32_t>(groups);
  } else {
    *b = idx / groups;
    *g = idx - *b * groups;
  }
}

// The noise of group g of sample b, or zeros when the sample's coefficient is 0.
__device__ __forceinline__ void group_noise(float coef, const int64_t* seeds, int64_t b, int64_t g, uint32_t stream,
                                            float eps[4]) {
  eps[0] = eps[1] = eps[2] = eps[3] = 0.0f;
  // Two's complement: seeds >= 2^63 are stored as negative int64.
  if (coef != 0.0f) normal4<float>(static_cast<uint64_t>(seeds[b]), static_cast<uint64_t>(g), stream, eps);
}

// kVec: n % 4 == 0 and the pointers aligned for load4/store4; then item idx is flattened group idx.
template <typename z_t, bool kVec>
__global__ void __launch_bounds__(kBlock)
add_noise_kernel(const z_t* z, const float* alpha, const float* beta, const int64_t* seeds, float* out, int64_t n,
                 int64_t groups, int64_t total, uint32_t stream) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    int64_t b, g;
    split_item(idx, groups, total, &b, &g);
    const float a = alpha[b], s = beta[b];
    float eps[4];
    group_noise(s, seeds, b, g, stream, eps);
    if constexpr (kVec) {
      float zv[4], ov[4];
      load4(z, idx, zv);
#pragma unroll
      for (int j = 0; j < 4; ++j) ov[j] = noised_element(a, s, zv[j], eps[j]);
      store4(out, idx, ov);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t e = 4 * g + j;
        if (e < n) {
          const int64_t i = b * n + e;
          out[i] = noised_element(a, s, static_cast<float>(z[i]), eps[j]);
        }
      }
    }
  }
}

template <typename pred_t, typename z_t, bool kVec>
__global__ void __launch_bounds__(kBlock)
loss_backward_kernel(const float* grad_loss, const pred_t* pred, const z_t* z, const float* coef_z,
                     const float* coef_eps, const float* weight, const int64_t* seeds, pred_t* grad, int64_t n,
                     int64_t groups, int64_t total, uint32_t stream) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    int64_t b, g;
    split_item(idx, groups, total, &b, &g);
    const float scale = loss_grad_scale(grad_loss[b], weight[b], n);
    const float cz = coef_z[b], ce = coef_eps[b];
    float eps[4];
    group_noise(ce, seeds, b, g, stream, eps);
    if constexpr (kVec) {
      float pv[4], zv[4], ov[4];
      load4(pred, idx, pv);
      load4(z, idx, zv);
#pragma unroll
      for (int j = 0; j < 4; ++j) ov[j] = loss_grad_element(scale, pv[j], cz, ce, zv[j], eps[j]);
      store4(grad, idx, ov);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t e = 4 * g + j;
        if (e < n) {
          const int64_t i = b * n + e;
          const float r =
              loss_grad_element(scale, static_cast<float>(pred[i]), cz, ce, static_cast<float>(z[i]), eps[j]);
          grad[i] = static_cast<pred_t>(r);
        }
      }
    }
  }
}

// The block's float64 sum of v (one value per thread) in a fixed order; valid in thread 0. `shared`
// holds kWarps doubles; the trailing barrier lets the caller reuse it.
__device__ __forceinline__ double block_sum(double v, double* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += shared[w];
  }
  __syncthreads();
  return total;
}

// partial[b, c] = sum of squared residuals of chunk c of sample b; one block per chunk (grid-stride).
template <typename pred_t, typename z_t, bool kVec>
__global__ void __launch_bounds__(kBlock)
loss_partial_kernel(const pred_t* pred, const z_t* z, const float* coef_z, const float* coef_eps,
                    const int64_t* seeds, double* partial, int64_t n, int64_t groups, int64_t chunks, int64_t items,
                    uint32_t stream) {
  __shared__ double shared[kWarps];
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // uniform across the block
    const int64_t b = item / chunks;
    const int64_t c = item - b * chunks;
    const float cz = coef_z[b], ce = coef_eps[b];
    const int64_t g_end = std::min<int64_t>(groups, (c + 1) * kChunkGroups);
    float sum = 0.0f;
    for (int64_t g = c * kChunkGroups + threadIdx.x; g < g_end; g += kBlock) {
      float eps[4];
      group_noise(ce, seeds, b, g, stream, eps);
      if constexpr (kVec) {
        float pv[4], zv[4];
        load4(pred, b * groups + g, pv);
        load4(z, b * groups + g, zv);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float r = loss_residual(pv[j], cz, ce, zv[j], eps[j]);
          sum += r * r;
        }
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t e = 4 * g + j;
          if (e < n) {
            const int64_t i = b * n + e;
            const float r = loss_residual(static_cast<float>(pred[i]), cz, ce, static_cast<float>(z[i]), eps[j]);
            sum += r * r;
          }
        }
      }
    }
    const double total = block_sum(static_cast<double>(sum), shared);
    if (threadIdx.x == 0) partial[item] = total;
  }
}

// loss[b] = weight[b] / n * sum_c partial[b, c]; one block per sample (grid-stride).
__global__ void __launch_bounds__(kBlock)
loss_finish_kernel(const double* partial, const float* weight, float* loss, int64_t B, int64_t n, int64_t chunks) {
  __shared__ double shared[kWarps];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    double sum = 0.0;
    for (int64_t c = threadIdx.x; c < chunks; c += kBlock) sum += partial[b * chunks + c];
    const double total = block_sum(sum, shared);
    if (threadIdx.x == 0) loss[b] = loss_from_sum(total, weight[b], n);
  }
}

// Blocks of `kernel` for `items` block-sized work items, capped as grid_size caps threads.
template <typename Kernel>
int64_t item_blocks(int64_t items, Kernel kernel) { return grid_size(items * kBlock, kernel); }

at::Tensor add_noise_cuda(const at::Tensor& z, const at::Tensor& alpha_in, const at::Tensor& beta_in,
                          const at::Tensor& seeds_in, int64_t stream) {
  check_add_noise_args(z, alpha_in, beta_in, seeds_in, stream);
  TORCH_CHECK(z.is_cuda(), "fastdiff::add_noise (CUDA): z must be a CUDA tensor, got ", z.device());
  c10::cuda::CUDAGuard guard(z.device());
  at::Tensor out = at::empty(z.sizes(), z.options().dtype(at::kFloat));
  if (z.numel() == 0) return out;
  const at::Tensor alpha = alpha_in.contiguous(), beta = beta_in.contiguous(), seeds = seeds_in.contiguous();
  const int64_t B = z.size(0), n = z.numel() / B;
  const int64_t groups = (n + 3) / 4, total = B * groups;
  cudaStream_t cuda_stream = at::cuda::getCurrentCUDAStream();
  with_data_type(z.scalar_type(), [&](auto zt) {
    using z_t = decltype(zt);
    const z_t* zp = z.const_data_ptr<z_t>();
    float* op = out.mutable_data_ptr<float>();
    const bool vec = n % 4 == 0 && aligned(zp, 4 * sizeof(z_t)) && aligned(op, 16);
    with_bool(vec, [&](auto V) {
      auto kernel = add_noise_kernel<z_t, decltype(V)::value>;
      kernel<<<grid_size(total, kernel), kBlock, 0, cuda_stream>>>(
          zp, alpha.const_data_ptr<float>(), beta.const_data_ptr<float>(), seeds.const_data_ptr<int64_t>(), op, n,
          groups, total, static_cast<uint32_t>(stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor diffusion_loss_cuda(const at::Tensor& pred, const at::Tensor& z, const at::Tensor& coef_z_in,
                               const at::Tensor& coef_eps_in, const at::Tensor& weight_in, const at::Tensor& seeds_in,
                               int64_t stream) {
  check_diffusion_loss_args("fastdiff::diffusion_loss: ", nullptr, pred, z, coef_z_in, coef_eps_in, weight_in,
                            seeds_in, stream);
  TORCH_CHECK(pred.is_cuda(), "fastdiff::diffusion_loss (CUDA): pred must be a CUDA tensor, got ", pred.device());
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t B = pred.size(0);
  at::Tensor loss = at::empty({B}, pred.options().dtype(at::kFloat));
  if (B == 0) return loss;
  const at::Tensor coef_z = coef_z_in.contiguous(), coef_eps = coef_eps_in.contiguous();
  const at::Tensor weight = weight_in.contiguous(), seeds = seeds_in.contiguous();
  const int64_t n = pred.numel() / B;
  const int64_t groups = (n + 3) / 4, chunks = loss_chunks(n), items = B * chunks;
  at::Tensor partial = at::empty({B, chunks}, pred.options().dtype(at::kDouble));
  cudaStream_t cuda_stream = at::cuda::getCurrentCUDAStream();
  if (items > 0) {
    with_data_type(pred.scalar_type(), [&](auto pt) {
      with_data_type(z.scalar_type(), [&](auto zt) {
        using pred_t = decltype(pt);
        using z_t = decltype(zt);
        const pred_t* pp = pred.const_data_ptr<pred_t>();
        const z_t* zp = z.const_data_ptr<z_t>();
        const bool vec = n % 4 == 0 && aligned(pp, 4 * sizeof(pred_t)) && aligned(zp, 4 * sizeof(z_t));
        with_bool(vec, [&](auto V) {
          auto kernel = loss_partial_kernel<pred_t, z_t, decltype(V)::value>;
          kernel<<<item_blocks(items, kernel), kBlock, 0, cuda_stream>>>(
              pp, zp, coef_z.const_data_ptr<float>(), coef_eps.const_data_ptr<float>(),
              seeds.const_data_ptr<int64_t>(), partial.mutable_data_ptr<double>(), n, groups, chunks, items,
              static_cast<uint32_t>(stream));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
  loss_finish_kernel<<<item_blocks(B, loss_finish_kernel), kBlock, 0, cuda_stream>>>(
      partial.const_data_ptr<double>(), weight.const_data_ptr<float>(), loss.mutable_data_ptr<float>(), B, n, chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

at::Tensor diffusion_loss_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& pred, const at::Tensor& z,
                                        const at::Tensor& coef_z_in, const at::Tensor& coef_eps_in,
                                        const at::Tensor& weight_in, const at::Tensor& seeds_in, int64_t stream) {
  check_diffusion_loss_args("fastdiff::diffusion_loss_backward: ", &grad_loss_in, pred, z, coef_z_in, coef_eps_in,
                            weight_in, seeds_in, stream);
  TORCH_CHECK(pred.is_cuda(), "fastdiff::diffusion_loss_backward (CUDA): pred must be a CUDA tensor, got ",
              pred.device());
  c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor grad = at::empty(pred.sizes(), pred.options());
  if (pred.numel() == 0) return grad;
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor coef_z = coef_z_in.contiguous(), coef_eps = coef_eps_in.contiguous();
  const at::Tensor weight = weight_in.contiguous(), seeds = seeds_in.contiguous();
  const int64_t B = pred.size(0), n = pred.numel() / B;
  const int64_t groups = (n + 3) / 4, total = B * groups;
  cudaStream_t cuda_stream = at::cuda::getCurrentCUDAStream();
  with_data_type(pred.scalar_type(), [&](auto pt) {
    with_data_type(z.scalar_type(), [&](auto zt) {
      using pred_t = decltype(pt);
      using z_t = decltype(zt);
      const pred_t* pp = pred.const_data_ptr<pred_t>();
      const z_t* zp = z.const_data_ptr<z_t>();
      pred_t* gp = grad.mutable_data_ptr<pred_t>();
      const bool vec = n % 4 == 0 && aligned(pp, 4 * sizeof(pred_t)) && aligned(zp, 4 * sizeof(z_t)) &&
                       aligned(gp, 4 * sizeof(pred_t));
      with_bool(vec, [&](auto V) {
        auto kernel = loss_backward_kernel<pred_t, z_t, decltype(V)::value>;
        kernel<<<grid_size(total, kernel), kBlock, 0, cuda_stream>>>(
            grad_loss.const_data_ptr<float>(), pp, zp, coef_z.const_data_ptr<float>(), coef_eps.const_data_ptr<float>(),
            weight.const_data_ptr<float>(), seeds.const_data_ptr<int64_t>(), gp, n, groups, total,
            static_cast<uint32_t>(stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return grad;
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("add_noise", &fastdiff::add_noise_cuda);
  m.impl("diffusion_loss", &fastdiff::diffusion_loss_cuda);
  m.impl("diffusion_loss_backward", &fastdiff::diffusion_loss_backward_cuda);
}
