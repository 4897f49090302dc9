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
// sample, adds the chunks the same fixed way and writes loss[b]. Samples of at most 512 elements take a warp
// each instead (loss_warp_kernel), one launch. Same inputs, same bits, every run.
//
// The coefficients come per sample as float32 arrays: given (add_noise, diffusion_loss*: any path, computed by
// the caller), or in the *_at ops computed on the device from t and a built-in path by path_pairs_kernel
// (fastdiff/gaussian_path.h, float64, a thread per sample) before the streaming kernel: no host work and no
// ATen op per coefficient, and a t outside [0, 1] gives NaN for its sample.
//
// CUDA-graph safety: seeds, times and every coefficient are read from device memory inside the kernels,
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
#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "dispatch.h"
#include "cuda/launch.h"
#include "cuda/vec4.h"
#include "fastdiff/gaussian_path.h"
#include "fastdiff/loss.h"
#include "fastdiff/philox.h"

namespace fastdiff {
namespace {

constexpr int kWarps = kBlock / 32;
constexpr int64_t kChunkGroups = kLossChunk / 4;  // groups of 4 elements per loss chunk
constexpr int64_t kWarpLossElems = 512;           // a warp per sample up to here (4 groups per lane)
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

// Per-sample coefficient pairs and weights (weight null: 1), float32 arrays [B] in device memory.
struct Pairs {
  const float* c0;
  const float* c1;
  const float* weight;
  __device__ __forceinline__ float weight_at(int64_t b) const { return weight != nullptr ? weight[b] : 1.0f; }
};

// The ops at times: every sample's pair from its t and the path (fastdiff/gaussian_path.h, float64), one thread
// per sample, into c0 = pairs[0:B], c1 = pairs[B:2B]. A kernel of its own so that the streaming kernels keep
// their registers: the path maths inlined into them raised add_noise from 23-28 to 40, the backward from 28-30
// to 54 and the loss pass from 31-32 to 42-54 (sm_90; 8 -> 4 resident blocks per SM).
__global__ void __launch_bounds__(kBlock)
path_pairs_kernel(const float* t32, const double* t64, PathSpec spec, float* pairs, int64_t B) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < B) pair_at(spec, t64 != nullptr ? t64[b] : static_cast<double>(t32[b]), &pairs[b], &pairs[B + b]);
}

// kVec: n % 4 == 0 and the pointers aligned for load4/store4; then item idx is flattened group idx.
template <typename z_t, bool kVec>
__global__ void __launch_bounds__(kBlock)
add_noise_kernel(const z_t* z, Pairs pairs, const int64_t* seeds, float* out, int64_t n, int64_t groups,
                 int64_t total, uint32_t stream) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    int64_t b, g;
    split_item(idx, groups, total, &b, &g);
    const float a = pairs.c0[b], s = pairs.c1[b];
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

// grad_loss is read with its stride (the expanded gradient of a mean has stride 0).
template <typename pred_t, typename z_t, bool kVec>
__global__ void __launch_bounds__(kBlock)
loss_backward_kernel(const float* grad_loss, int64_t grad_stride, const pred_t* pred, const z_t* z, Pairs pairs,
                     const int64_t* seeds, pred_t* grad, int64_t n, int64_t groups, int64_t total, uint32_t stream) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    int64_t b, g;
    split_item(idx, groups, total, &b, &g);
    const float scale = loss_grad_scale(grad_loss[b * grad_stride], pairs.weight_at(b), n);
    const float cz = pairs.c0[b], ce = pairs.c1[b];
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

// The float32 sum of squared residuals of groups g0, g0 + stride, ... < g_end of sample b (one thread's share).
template <typename pred_t, typename z_t, bool kVec>
__device__ __forceinline__ float squared_residuals(const pred_t* pred, const z_t* z, float cz, float ce,
                                                   const int64_t* seeds, int64_t b, int64_t g0, int64_t g_end,
                                                   int stride, int64_t n, int64_t groups, uint32_t stream) {
  float sum = 0.0f;
  for (int64_t g = g0; g < g_end; g += stride) {
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
  return sum;
}

// partial[b, c] = sum of squared residuals of chunk c of sample b; one block per chunk (grid-stride).
template <typename pred_t, typename z_t, bool kVec>
__global__ void __launch_bounds__(kBlock)
loss_partial_kernel(const pred_t* pred, const z_t* z, Pairs pairs, const int64_t* seeds, double* partial,
                    int64_t n, int64_t groups, int64_t chunks, int64_t items, uint32_t stream) {
  __shared__ double shared[kWarps];
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // uniform across the block
    const int64_t b = item / chunks;
    const int64_t c = item - b * chunks;
    const float cz = pairs.c0[b], ce = pairs.c1[b];
    const int64_t g_end = std::min<int64_t>(groups, (c + 1) * kChunkGroups);
    const float sum = squared_residuals<pred_t, z_t, kVec>(pred, z, cz, ce, seeds, b, c * kChunkGroups + threadIdx.x,
                                                           g_end, kBlock, n, groups, stream);
    const double total = block_sum(static_cast<double>(sum), shared);
    if (threadIdx.x == 0) partial[item] = total;
  }
}

// Small samples (n <= kWarpLossElems: Langevin chains of dimension 2, toy data): a warp per sample instead of a
// block per chunk, which would keep one thread of 256 busy and pay two barriers and a float64 tree per sample.
// Lane l takes groups l, l + 32, ... (at most 4: the same 16-square float runs as a block's thread), the warp
// adds the lanes in a fixed shuffle tree, and lane 0 writes loss[b] itself: one launch, no partial array, no
// barrier. The kernel is chosen by n alone, so the bits still do not depend on B.
template <typename pred_t, typename z_t, bool kVec>
__global__ void __launch_bounds__(kBlock)
loss_warp_kernel(const pred_t* pred, const z_t* z, Pairs pairs, const int64_t* seeds, float* loss, int64_t B,
                 int64_t n, int64_t groups, uint32_t stream) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); b < B; b += warps) {
    const float cz = pairs.c0[b], ce = pairs.c1[b];  // b is uniform across the warp
    double v = squared_residuals<pred_t, z_t, kVec>(pred, z, cz, ce, seeds, b, lane, groups, 32, n, groups, stream);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
    if (lane == 0) loss[b] = loss_from_sum(v, pairs.weight_at(b), n);
  }
}

// loss[b] = weight[b] / n * sum_c partial[b, c] (weight null: 1); one block per sample (grid-stride).
__global__ void __launch_bounds__(kBlock)
loss_finish_kernel(const double* partial, const float* weight, float* loss, int64_t B, int64_t n, int64_t chunks) {
  __shared__ double shared[kWarps];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    double sum = 0.0;
    for (int64_t c = threadIdx.x; c < chunks; c += kBlock) sum += partial[b * chunks + c];
    const double total = block_sum(sum, shared);
    if (threadIdx.x == 0) loss[b] = loss_from_sum(total, weight != nullptr ? weight[b] : 1.0f, n);
  }
}

// Blocks of `kernel` for `items` block-sized work items, capped as grid_size caps threads.
template <typename Kernel>
int64_t item_blocks(int64_t items, Kernel kernel) { return grid_size(items * kBlock, kernel); }

// Per-sample pairs from float32 arrays [B] (made contiguous; kept alive by `keep`).
Pairs array_pairs(const at::Tensor& c0, const at::Tensor& c1, const at::Tensor* weight, std::vector<at::Tensor>* keep) {
  Pairs pairs{nullptr, nullptr, nullptr};
  keep->push_back(c0.contiguous());
  pairs.c0 = keep->back().const_data_ptr<float>();
  keep->push_back(c1.contiguous());
  pairs.c1 = keep->back().const_data_ptr<float>();
  if (weight != nullptr) {
    keep->push_back(weight->contiguous());
    pairs.weight = keep->back().const_data_ptr<float>();
  }
  return pairs;
}

// Per-sample pairs computed on the device from t and the path (path_pairs_kernel, on the current stream).
Pairs time_pairs(const at::Tensor& t_in, const std::optional<at::Tensor>& weight, const PathSpec& spec,
                 std::vector<at::Tensor>* keep) {
  c10::cuda::CUDAGuard guard(t_in.device());
  const int64_t B = t_in.size(0);
  keep->push_back(t_in.contiguous());
  const at::Tensor& t = keep->back();
  const bool t64 = t.scalar_type() == at::kDouble;
  const float* t32_ptr = t64 ? nullptr : t.const_data_ptr<float>();
  const double* t64_ptr = t64 ? t.const_data_ptr<double>() : nullptr;
  keep->push_back(at::empty({2, B}, t.options().dtype(at::kFloat)));
  float* out = keep->back().mutable_data_ptr<float>();
  Pairs pairs{out, out + B, nullptr};
  if (B > 0) {
    path_pairs_kernel<<<(B + kBlock - 1) / kBlock, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(t32_ptr, t64_ptr,
                                                                                                    spec, out, B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (weight.has_value()) {
    keep->push_back(weight->contiguous());
    pairs.weight = keep->back().const_data_ptr<float>();
  }
  return pairs;
}

at::Tensor launch_add_noise(const at::Tensor& z, const Pairs& pairs, const at::Tensor& seeds_in,
                            int64_t stream) {
  c10::cuda::CUDAGuard guard(z.device());
  at::Tensor out = at::empty(z.sizes(), z.options().dtype(at::kFloat));
  if (z.numel() == 0) return out;
  const at::Tensor seeds = seeds_in.contiguous();
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
      kernel<<<grid_size(total, kernel), kBlock, 0, cuda_stream>>>(zp, pairs, seeds.const_data_ptr<int64_t>(), op, n,
                                                                    groups, total, static_cast<uint32_t>(stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor launch_loss(const at::Tensor& pred, const at::Tensor& z, const Pairs& pairs,
                       const at::Tensor& seeds_in, int64_t stream) {
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t B = pred.size(0);
  at::Tensor loss = at::empty({B}, pred.options().dtype(at::kFloat));
  if (B == 0) return loss;
  const at::Tensor seeds = seeds_in.contiguous();
  const int64_t n = pred.numel() / B;
  const int64_t groups = (n + 3) / 4, chunks = loss_chunks(n), items = B * chunks;
  cudaStream_t cuda_stream = at::cuda::getCurrentCUDAStream();
  const bool per_warp = n <= kWarpLossElems;  // n = 0 included: NaN, the mean over nothing
  at::Tensor partial = per_warp ? at::Tensor() : at::empty({B, chunks}, pred.options().dtype(at::kDouble));
  with_data_type(pred.scalar_type(), [&](auto pt) {
    with_data_type(z.scalar_type(), [&](auto zt) {
      using pred_t = decltype(pt);
      using z_t = decltype(zt);
      const pred_t* pp = pred.const_data_ptr<pred_t>();
      const z_t* zp = z.const_data_ptr<z_t>();
      const int64_t* sp = seeds.const_data_ptr<int64_t>();
      const bool vec = n % 4 == 0 && aligned(pp, 4 * sizeof(pred_t)) && aligned(zp, 4 * sizeof(z_t));
      with_bool(vec, [&](auto V) {
        constexpr bool kVec = decltype(V)::value;
        if (per_warp) {
          auto kernel = loss_warp_kernel<pred_t, z_t, kVec>;
          kernel<<<grid_size(B * 32, kernel), kBlock, 0, cuda_stream>>>(
              pp, zp, pairs, sp, loss.mutable_data_ptr<float>(), B, n, groups, static_cast<uint32_t>(stream));
        } else {
          auto kernel = loss_partial_kernel<pred_t, z_t, kVec>;
          kernel<<<item_blocks(items, kernel), kBlock, 0, cuda_stream>>>(
              pp, zp, pairs, sp, partial.mutable_data_ptr<double>(), n, groups, chunks, items,
              static_cast<uint32_t>(stream));
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  if (!per_warp) {
    loss_finish_kernel<<<item_blocks(B, loss_finish_kernel), kBlock, 0, cuda_stream>>>(
        partial.const_data_ptr<double>(), pairs.weight, loss.mutable_data_ptr<float>(), B, n, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return loss;
}

at::Tensor launch_loss_backward(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& z,
                                const Pairs& pairs, const at::Tensor& seeds_in, int64_t stream) {
  c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor grad = at::empty(pred.sizes(), pred.options());
  if (pred.numel() == 0) return grad;
  const at::Tensor seeds = seeds_in.contiguous();
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
            grad_loss.const_data_ptr<float>(), grad_loss.stride(0), pp, zp, pairs, seeds.const_data_ptr<int64_t>(), gp,
            n, groups, total, static_cast<uint32_t>(stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return grad;
}

void check_on_cuda(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor, got ", t.device());
}

at::Tensor add_noise_cuda(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                          const at::Tensor& seeds, int64_t stream) {
  check_add_noise_args(z, alpha, beta, seeds, stream);
  check_on_cuda("fastdiff::add_noise (CUDA): ", z, "z");
  std::vector<at::Tensor> keep;
  return launch_add_noise(z, array_pairs(alpha, beta, nullptr, &keep), seeds, stream);
}

at::Tensor diffusion_loss_cuda(const at::Tensor& pred, const at::Tensor& z, const at::Tensor& coef_z,
                               const at::Tensor& coef_eps, const at::Tensor& weight, const at::Tensor& seeds,
                               int64_t stream) {
  check_diffusion_loss_args("fastdiff::diffusion_loss: ", nullptr, pred, z, coef_z, coef_eps, weight, seeds, stream);
  check_on_cuda("fastdiff::diffusion_loss (CUDA): ", pred, "pred");
  std::vector<at::Tensor> keep;
  return launch_loss(pred, z, array_pairs(coef_z, coef_eps, &weight, &keep), seeds, stream);
}

at::Tensor diffusion_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& z,
                                        const at::Tensor& coef_z, const at::Tensor& coef_eps,
                                        const at::Tensor& weight, const at::Tensor& seeds, int64_t stream) {
  check_diffusion_loss_args("fastdiff::diffusion_loss_backward: ", &grad_loss, pred, z, coef_z, coef_eps, weight,
                            seeds, stream);
  check_on_cuda("fastdiff::diffusion_loss_backward (CUDA): ", pred, "pred");
  std::vector<at::Tensor> keep;
  return launch_loss_backward(grad_loss, pred, z, array_pairs(coef_z, coef_eps, &weight, &keep), seeds, stream);
}

// ---- at flow times: the coefficients computed on the device (path_pairs_kernel); a bad t gives NaN there ------

at::Tensor add_noise_at_cuda(const at::Tensor& z, const at::Tensor& t, const at::Tensor& seeds, int64_t stream,
                             int64_t path, at::ArrayRef<double> path_params) {
  constexpr const char* op = "fastdiff::add_noise_at: ";
  check_loss_data(op, z, "z");
  const PathSpec spec = check_path_args(op, t, z.size(0), z, "z", path, path_params, kPairNoising);
  check_loss_seeds(op, seeds, stream, z.size(0), z, "z");
  check_on_cuda("fastdiff::add_noise_at (CUDA): ", z, "z");
  std::vector<at::Tensor> keep;
  return launch_add_noise(z, time_pairs(t, std::nullopt, spec, &keep), seeds, stream);
}

PathSpec check_loss_at_args(const char* op, const at::Tensor* grad_loss, const at::Tensor& pred, const at::Tensor& z,
                            const at::Tensor& t, const std::optional<at::Tensor>& weight, const at::Tensor& seeds,
                            int64_t stream, int64_t path, at::ArrayRef<double> path_params, int64_t prediction) {
  check_loss_data(op, pred, "pred");
  TORCH_CHECK(z.sizes() == pred.sizes(), op, "z must have pred's shape ", pred.sizes(), ", got ", z.sizes());
  TORCH_CHECK(z.device() == pred.device(), op, "z is on ", z.device(), " but pred is on ", pred.device());
  check_loss_data(op, z, "z");
  TORCH_CHECK(prediction >= kPairVelocity && prediction < kPairKinds, op,
              "prediction must be a target code in [1, 6), got ", prediction);
  const int64_t B = pred.size(0);
  if (grad_loss != nullptr) check_per_sample(op, *grad_loss, "grad_loss", B, pred, "pred");
  check_optional_weight(op, weight, B, pred);
  check_loss_seeds(op, seeds, stream, B, pred, "pred");
  check_on_cuda(op, pred, "pred");
  return check_path_args(op, t, B, pred, "pred", path, path_params, prediction);
}

at::Tensor diffusion_loss_at_cuda(const at::Tensor& pred, const at::Tensor& z, const at::Tensor& t,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& seeds, int64_t stream,
                                  int64_t path, at::ArrayRef<double> path_params, int64_t prediction) {
  const PathSpec spec = check_loss_at_args("fastdiff::diffusion_loss_at: ", nullptr, pred, z, t, weight, seeds, stream,
                                           path, path_params, prediction);
  std::vector<at::Tensor> keep;
  return launch_loss(pred, z, time_pairs(t, weight, spec, &keep), seeds, stream);
}

at::Tensor diffusion_loss_at_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& z,
                                           const at::Tensor& t, const std::optional<at::Tensor>& weight,
                                           const at::Tensor& seeds, int64_t stream, int64_t path,
                                           at::ArrayRef<double> path_params, int64_t prediction) {
  const PathSpec spec = check_loss_at_args("fastdiff::diffusion_loss_at_backward: ", &grad_loss, pred, z, t, weight,
                                           seeds, stream, path, path_params, prediction);
  std::vector<at::Tensor> keep;
  return launch_loss_backward(grad_loss, pred, z, time_pairs(t, weight, spec, &keep), seeds, stream);
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("add_noise", &fastdiff::add_noise_cuda);
  m.impl("diffusion_loss", &fastdiff::diffusion_loss_cuda);
  m.impl("diffusion_loss_backward", &fastdiff::diffusion_loss_backward_cuda);
  m.impl("add_noise_at", &fastdiff::add_noise_at_cuda);
  m.impl("diffusion_loss_at", &fastdiff::diffusion_loss_at_cuda);
  m.impl("diffusion_loss_at_backward", &fastdiff::diffusion_loss_at_backward_cuda);
}
