// CUDA backend of fastdiff::guided_step, the fused sampler step (docs/design.md §2). The per-element math
// is step_element in fastdiff/step.h (shared with the CPU loops) and the noise is normal4 of
// fastdiff/philox.h (spec v1), so the results match the CPU backend up to libm/libdevice rounding and
// FMA contraction.
//
// One thread per group of 4 consecutive elements of one sample: one Philox call yields exactly that
// group's 4 normals (element i of a sample is lane i & 3 of group i >> 2). When n % 4 == 0 and every
// pointer is aligned, the group is loaded and stored with one 16-byte access per float32 tensor (8
// bytes per float16/bfloat16 prediction); otherwise a scalar path handles any n.
//
// CUDA-graph safety: seeds are read from device memory inside the kernel, nothing is read back to the
// host, and the launch goes to the current stream.
//
// Aliasing: out may be x and side may be extra (also out = pred for float32 predictions). Each thread
// reads all inputs of its elements before writing them and no two threads touch the same element, so
// none of the pointers is declared __restrict__ (which would allow non-coherent loads or reordering).
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

#include "checks.h"
#include "dispatch.h"
#include "cuda/launch.h"
#include "cuda/vec4.h"
#include "fastdiff/philox.h"
#include "fastdiff/step.h"

namespace fastdiff {
namespace {

template <typename pred_t>
struct StepPtrs {
  const float* x;        // [B, n]
  const pred_t* pred;    // [B, n]
  const pred_t* uncond;  // [B, n] or nullptr
  const float* extra;    // [B, n] or nullptr
  const int64_t* seeds;  // [B]
  float* out;            // [B, n]
  float* side;           // [B, n] or nullptr
};

// Work item idx = (sample b, group g), g fastest; groups = ceil(n / 4) per sample.
//
// kVec: n % 4 == 0 and all pointers aligned for load4/store4. Then groups == n / 4 and item idx covers
// elements 4 idx .. 4 idx + 3 of the flattened buffers, so without noise no (b, g) division is needed.
template <typename pred_t, bool kUncond, bool kExtra, bool kNoise, bool kSide, bool kVec>
__global__ void __launch_bounds__(kBlock)
guided_step_kernel(StepPtrs<pred_t> p, StepCoeffs k, int64_t n, int64_t groups, int64_t total, uint32_t stream) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const bool small = total <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max());
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    int64_t b = 0, g = idx;
    if (kNoise || !kVec) {
      if (small) {  // 32-bit division where every index fits (uniform branch)
        const uint32_t b32 = static_cast<uint32_t>(idx) / static_cast<uint32_t>(groups);
        b = b32;
        g = static_cast<uint32_t>(idx) - b32 * static_cast<uint32_t>(groups);
      } else {
        b = idx / groups;
        g = idx - b * groups;
      }
    }
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if constexpr (kNoise) {
      // Two's complement: seeds >= 2^63 are stored as negative int64.
      normal4<float>(static_cast<uint64_t>(p.seeds[b]), static_cast<uint64_t>(g), stream, z);
    }
    if constexpr (kVec) {
      float xv[4], pv[4], uv[4] = {0.0f, 0.0f, 0.0f, 0.0f}, ev[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      load4(p.x, idx, xv);
      load4(p.pred, idx, pv);
      if constexpr (kUncond) load4(p.uncond, idx, uv);
      if constexpr (kExtra) load4(p.extra, idx, ev);
      float ov[4], sv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const StepResult<float> r = step_element<kUncond, kExtra, kNoise, kSide>(k, xv[j], pv[j], uv[j], ev[j], z[j]);
        ov[j] = r.out;
        sv[j] = r.side;
      }
      store4(p.out, idx, ov);
      if constexpr (kSide) store4(p.side, idx, sv);
    } else {
      const int64_t row = b * n;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t e = 4 * g + j;
        if (e < n) {
          const int64_t i = row + e;
          const float pv = static_cast<float>(p.pred[i]);
          const float uv = kUncond ? static_cast<float>(p.uncond[i]) : 0.0f;
          const float ev = kExtra ? p.extra[i] : 0.0f;
          const StepResult<float> r = step_element<kUncond, kExtra, kNoise, kSide>(k, p.x[i], pv, uv, ev, z[j]);
          p.out[i] = r.out;
          if constexpr (kSide) p.side[i] = r.side;
        }
      }
    }
  }
}

template <typename pred_t>
void launch_guided_step(const StepPtrs<pred_t>& p, const StepCoeffs& k, bool noise, int64_t B, int64_t n,
                        uint32_t stream) {
  const int64_t groups = (n + 3) / 4;
  const int64_t total = B * groups;  // <= numel / 4 + B
  const bool vec = n % 4 == 0 && aligned(p.x, 16) && aligned(p.out, 16) && aligned(p.pred, 4 * sizeof(pred_t)) &&
                   (p.uncond == nullptr || aligned(p.uncond, 4 * sizeof(pred_t))) &&
                   (p.extra == nullptr || aligned(p.extra, 16)) && (p.side == nullptr || aligned(p.side, 16));
  const int64_t blocks = grid_size(total);
  cudaStream_t cuda_stream = at::cuda::getCurrentCUDAStream();
  with_bool(p.uncond != nullptr, [&](auto U) {
    with_bool(p.extra != nullptr, [&](auto E) {
      with_bool(noise, [&](auto N) {
        with_bool(p.side != nullptr, [&](auto S) {
          with_bool(vec, [&](auto V) {
            guided_step_kernel<pred_t, decltype(U)::value, decltype(E)::value, decltype(N)::value, decltype(S)::value,
                               decltype(V)::value><<<blocks, kBlock, 0, cuda_stream>>>(p, k, n, groups, total, stream);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
    });
  });
}

template <typename pred_t>
StepPtrs<pred_t> step_ptrs(const at::Tensor& x, const at::Tensor& pred, const std::optional<at::Tensor>& pred_uncond,
                           const std::optional<at::Tensor>& extra, const at::Tensor& seeds, const at::Tensor& out,
                           const std::optional<at::Tensor>& side) {
  StepPtrs<pred_t> p;
  p.x = x.const_data_ptr<float>();
  p.pred = pred.const_data_ptr<pred_t>();
  p.uncond = pred_uncond ? pred_uncond->const_data_ptr<pred_t>() : nullptr;
  p.extra = extra ? extra->const_data_ptr<float>() : nullptr;
  p.seeds = seeds.const_data_ptr<int64_t>();
  p.out = out.mutable_data_ptr<float>();
  p.side = side ? side->mutable_data_ptr<float>() : nullptr;
  return p;
}

void guided_step_cuda(const at::Tensor& x, const at::Tensor& pred, const std::optional<at::Tensor>& pred_uncond,
                      const std::optional<at::Tensor>& extra, const at::Tensor& seeds_in, int64_t stream, double cfg,
                      double c_x, double c_pred, double c_extra, double c_noise, double s_x, double s_pred,
                      double s_extra, const at::Tensor& out, const std::optional<at::Tensor>& side) {
  check_guided_step_args(x, pred, pred_uncond, extra, seeds_in, stream, out, side);
  TORCH_CHECK(x.is_cuda(), "fastdiff::guided_step (CUDA): x must be a CUDA tensor, got ", x.device());
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor seeds = seeds_in.contiguous();  // the kernel indexes seeds[b] directly
  const int64_t B = x.size(0);
  const int64_t n = x.numel() / B;
  const StepCoeffs k = make_step_coeffs(cfg, c_x, c_pred, c_extra, c_noise, s_x, s_pred, s_extra);
  const bool noise = c_noise != 0.0;  // decided in float64, as the reference does
  const auto s = static_cast<uint32_t>(stream);
  switch (pred.scalar_type()) {
    case at::kFloat:
      launch_guided_step(step_ptrs<float>(x, pred, pred_uncond, extra, seeds, out, side), k, noise, B, n, s);
      break;
    case at::kHalf:
      launch_guided_step(step_ptrs<c10::Half>(x, pred, pred_uncond, extra, seeds, out, side), k, noise, B, n, s);
      break;
    case at::kBFloat16:
      launch_guided_step(step_ptrs<c10::BFloat16>(x, pred, pred_uncond, extra, seeds, out, side), k, noise, B, n, s);
      break;
    default:
      TORCH_CHECK(false, "unreachable");
  }
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("guided_step", &fastdiff::guided_step_cuda);
}
