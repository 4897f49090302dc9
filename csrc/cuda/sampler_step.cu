// CUDA backend of fastdiff::sampler_step, the general fused sampler step (docs/design.md §2; spec:
// run_reference in fastdiff/ops/sampler_step.py). The per-element math is blend / combine of
// fastdiff/sampler_step.h (shared with the CPU loops) and the noise is normal4 of fastdiff/philox.h
// (spec v1). The step's own arithmetic is the header's explicit fused multiply-adds (fmaf here,
// at::vec::fmadd / fmaf on the CPU), so CPU and CUDA agree bit for bit on everything except the noise,
// whose transcendental functions round as libm (CPU) or libdevice (CUDA) do.
//
// One thread per group of 4 consecutive elements of one sample: one Philox call per used draw yields
// exactly that group's 4 normals of that draw (element i of a sample is lane i & 3 of group i >> 2).
// The math runs on F4 (4 float lanes, elementwise operators), the CUDA counterpart of the CPU loops'
// at::vec::Vectorized<float>: every lane evaluates exactly the float expression of the header. When
// n % 4 == 0 and every pointer is aligned, a group is loaded and stored with one 16-byte access per
// float32 tensor (8 bytes per float16/bfloat16 prediction); otherwise a scalar path handles any n.
//
// Shapes, as the CPU loop (with_step_shape in csrc/dispatch.h): the common counts
// K1 in {1, 2} x H in {0, 1} x D in {0, 1} (CFG with the one- and two-stage methods) are
// FixedStepShape instantiations, whose branch, history, draw and coefficient arrays are sized by the
// constants and fully unrolled, so they live in registers; any other (K1, H, D) runs the StepShape
// kernel, whose arrays are sized to the limits and indexed at run time (local memory, L1: 400 bytes of
// stack, only the used entries touched), with all of a group's loads still in flight at once (unrolled
// to the limits with guards). The kernel is templated on the prediction type, the shape, whether there
// is a side output and the vectorized layout: 3 x 9 x 2 x 2 = 108 kernels. The finite flag, per-sample rows, the
// number of outputs and whether any noise is drawn are run-time values, uniform over the launch (a
// template flag each would double the kernels for a predicated load or branch in a memory-bound loop).
//
// Coefficients: each thread copies the used entries of the host values (the argument struct) once;
// where per-sample rows are given, it reloads them when its sample changes (grid-stride items of one
// thread rarely cross a sample boundary). For the fixed shapes the copy is a few registers.
//
// CUDA-graph safety: seeds and per-sample coefficients are read from device memory inside the kernel,
// host coefficients are kernel arguments, nothing is read back to the host, and the launch goes to the
// current stream.
//
// Aliasing: outs[0] may be x and side may be history[j] (any output may be exactly an input; the op
// refuses partial overlaps). Each thread reads all inputs of its elements before writing any output and
// no two threads touch the same element, so none of the pointers is declared __restrict__ (which would
// allow non-coherent loads or reordering). finite[b] only ever receives 0, so concurrent stores from
// the threads of one sample are benign.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "checks.h"
#include "dispatch.h"
#include "cuda/launch.h"
#include "cuda/vec4.h"
#include "fastdiff/philox.h"
#include "fastdiff/sampler_step.h"
#include "sampler_step_args.h"
#include "step_call.h"

namespace fastdiff {
namespace {

// Four float lanes with the broadcasting constructor, elementwise - * and fmadd that blend / combine need
// (T = F4): lane j computes exactly what T = float computes for element 4 g + j.
struct alignas(16) F4 {
  float v[4];
  F4() = default;
  __device__ __forceinline__ explicit F4(float s) : v{s, s, s, s} {}
};
__device__ __forceinline__ F4 operator-(const F4& a, const F4& b) {
  F4 r;
#pragma unroll
  for (int j = 0; j < 4; ++j) r.v[j] = a.v[j] - b.v[j];
  return r;
}
__device__ __forceinline__ F4 operator*(const F4& a, const F4& b) {
  F4 r;
#pragma unroll
  for (int j = 0; j < 4; ++j) r.v[j] = a.v[j] * b.v[j];
  return r;
}
// a * b + c with one rounding per lane (sampler_step.h's accumulation; found by argument-dependent lookup)
__device__ __forceinline__ F4 fmadd(const F4& a, const F4& b, const F4& c) {
  F4 r;
#pragma unroll
  for (int j = 0; j < 4; ++j) r.v[j] = fmaf(a.v[j], b.v[j], c.v[j]);
  return r;
}


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

template <typename Shape>
__device__ __forceinline__ Shape shape_of(const StepBuffers& p) {
  if constexpr (ShapeCaps<Shape>::kFixed) {
    return Shape{};
  } else {
    return p.shape;
  }
}

// Row r of a coefficient source into k's columns (SampleCoeffs: x, g, history, then draws at kDrawColumn):
// `at(column, j)` reads the entry of k's column `column`, compact index j (the op's rows). Loops to the shape's caps, so every column of k is a constant index and k's
// used entries are registers for every shape (the runtime-shape kernel too: no stack frame).
template <typename Shape, typename At>
__device__ __forceinline__ void load_row(const Shape& s, int r, SampleCoeffs& k, At at) {
  using Caps = ShapeCaps<Shape>;
  k.c[r][0] = at(0, 0);
  k.c[r][1] = at(1, 1);
#pragma unroll
  for (int j = 0; j < Caps::kHistory; ++j) {
    if (j < s.history) k.c[r][2 + j] = at(2 + j, 2 + j);
  }
#pragma unroll
  for (int d = 0; d < Caps::kDraws; ++d) {
    if (d < s.draws) k.c[r][kDrawColumn + d] = at(kDrawColumn + d, 2 + s.history + d);
  }
}

// The used entries of the host coefficients into k: the weights and the out row (and the side row
// when kSide).
template <bool kSide, typename Shape>
__device__ __forceinline__ void load_host_coeffs(const Shape& s, const SampleCoeffs& host, SampleCoeffs& k) {
  using Caps = ShapeCaps<Shape>;
#pragma unroll
  for (int i = 0; i < Caps::kBranches; ++i) {
    if (i < s.branches) k.w[i] = host.w[i];
  }
#pragma unroll
  for (int r = 0; r < (kSide ? 2 : 1); ++r) {
    load_row(s, r, k, [&](int column, int) { return host.c[r][column]; });  // host is in k's layout
  }
}

// Row b of the per-sample coefficient tensors into k, which keeps the host values of whichever of the
// two is not given. Layout as load_sample_coeffs: weights[b, i] = w_i, coeffs[b, r M + j] = c[r][j].
template <bool kSide, typename Shape>
__device__ __forceinline__ void load_sample_rows(const StepBuffers& p, const Shape& s, int64_t b, SampleCoeffs& k) {
  using Caps = ShapeCaps<Shape>;
  if (p.sample_weights != nullptr) {
    const float* w = p.sample_weights + b * s.branches;
#pragma unroll
    for (int i = 0; i < Caps::kBranches; ++i) {
      if (i < s.branches) k.w[i] = w[i];
    }
  }
  if (p.sample_coeffs != nullptr) {
    const int m = s.terms();
    const float* c = p.sample_coeffs + b * 2 * m;
#pragma unroll
    for (int r = 0; r < (kSide ? 2 : 1); ++r) {
      load_row(s, r, k, [&](int, int j) { return c[r * m + j]; });
    }
  }
}

// Group loads and stores. kVec: item idx is flattened group idx (one vector access). Otherwise the
// group starts at element `base` = b n + 4 g and has `valid` (1..4) elements; absent lanes read 0.
template <bool kVec, typename T>
__device__ __forceinline__ F4 load_group(const T* ptr, int64_t idx, int64_t base, int valid) {
  F4 r;
  if constexpr (kVec) {
    load4(ptr, idx, r.v);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) r.v[j] = j < valid ? static_cast<float>(ptr[base + j]) : 0.0f;
  }
  return r;
}

template <bool kVec>
__device__ __forceinline__ void store_group(float* ptr, int64_t idx, int64_t base, int valid, const F4& v) {
  if constexpr (kVec) {
    store4(ptr, idx, v.v);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < valid) ptr[base + j] = v.v[j];
    }
  }
}

__device__ __forceinline__ bool all_finite(const F4& a) {
  bool ok = true;
#pragma unroll
  for (int j = 0; j < 4; ++j) ok &= (__float_as_uint(a.v[j]) & 0x7F800000u) != 0x7F800000u;  // not inf / NaN
  return ok;
}

// kSide: the side row is computed (side given, or clip: StepBuffers::side_row). kVec: n % 4 == 0 and every
// pointer aligned for load4 / store4 (then groups ==
// n / 4). Shape: FixedStepShape<K1, H, D> (registers) or StepShape (runtime counts). Run-time flags,
// uniform over the launch: finite given, per-sample rows given, noise, the number of outputs.
template <typename pred_t, bool kSide, bool kVec, typename Shape>
__global__ void __launch_bounds__(kBlock) sampler_step_kernel(const StepBuffers p) {
  using Caps = ShapeCaps<Shape>;
  const Shape s = shape_of<Shape>(p);
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t groups = (p.n + 3) / 4, total = p.B * groups;  // work items: (sample, group of 4)
  const bool noise = p.any_draw();
  const bool check_finite = p.finite != nullptr;
  const bool per_sample = p.sample_weights != nullptr || p.sample_coeffs != nullptr;
  // kSide: the side row is computed, for the side output (store_side) and / or the clip
  const bool clip = p.clip, store_side = p.side != nullptr;
  // This thread's coefficients: the host values, and this sample's rows where per-sample rows are given
  // (reloaded when the sample changes).
  SampleCoeffs k;
  load_host_coeffs<kSide>(s, p.host, k);
  int64_t own_b = -1;
  // b is needed for the coefficient rows, finite, the noise key and the scalar path's addressing.
  const bool need_b = per_sample || check_finite || !kVec || noise;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    int64_t b = 0, g = idx;
    if (need_b) split_item(idx, groups, total, &b, &g);
    if (per_sample && b != own_b) {
      load_sample_rows<kSide>(p, s, b, k);
      own_b = b;
    }
    const int64_t base = b * p.n + 4 * g;  // scalar path only
    const int valid = kVec ? 4 : static_cast<int>(p.n - 4 * g < 4 ? p.n - 4 * g : 4);

    // Read every input of the group first (an output may be exactly an input).
    F4 pv[Caps::kBranches];
    bool finite = true;
#pragma unroll
    for (int i = 0; i < Caps::kBranches; ++i) {
      if (i < s.branches) {
        pv[i] = load_group<kVec>(static_cast<const pred_t*>(p.preds[i]), idx, base, valid);
        if (check_finite) finite &= all_finite(pv[i]);
      }
    }
    const F4 xv = load_group<kVec>(p.x, idx, base, valid);
    F4 hv[Caps::kHistory];
#pragma unroll
    for (int j = 0; j < Caps::kHistory; ++j) {
      if (j < s.history) hv[j] = load_group<kVec>(p.history[j], idx, base, valid);
    }
    F4 zv[Caps::kDraws];  // combine reads zv[d] only where the coefficient is non-zero, i.e. draw_used
    if (noise) {
      // Two's complement: seeds >= 2^63 are stored as negative int64.
      const uint64_t seed = static_cast<uint64_t>(p.seeds[b]);
      if constexpr (Caps::kFixed) {
#pragma unroll
        for (int d = 0; d < Caps::kDraws; ++d) {
          if (d < s.draws && draw_used(s, k, d, kSide))
            normal4<float>(seed, static_cast<uint64_t>(g), p.streams[d], zv[d].v);
        }
      } else {
        // One Philox + Box-Muller body (compute-bound: nothing to gain from copies of it) whose draw lands in
        // zv by constant indices, and draw_used read by constant indices too: a runtime index into zv or k
        // would put them in a stack frame (176 bytes and the local loads and stores with them, sm_90).
        unsigned used = 0;
#pragma unroll
        for (int d = 0; d < Caps::kDraws; ++d) {
          if (d < s.draws && draw_used(s, k, d, kSide)) used |= 1u << d;
        }
#pragma unroll 1
        for (int d = 0; d < s.draws; ++d) {
          if (!((used >> d) & 1u)) continue;
          float z[4];
          normal4<float>(seed, static_cast<uint64_t>(g), p.streams[d], z);
#pragma unroll
          for (int e = 0; e < Caps::kDraws; ++e) {
            if (e == d) {
#pragma unroll
              for (int j = 0; j < 4; ++j) zv[e].v[j] = z[j];
            }
          }
        }
      }
    }

    const F4 gv = blend<F4>(s, k, pv);
    F4 out = combine<F4>(s, k, 0, xv, gv, hv, zv);
    if (check_finite && !finite) p.finite[b] = 0;  // never 1: the caller initializes finite
    if constexpr (kSide) {
      F4 sv = combine<F4>(s, k, 1, xv, gv, hv, zv);
      if (clip) {  // clip_sample: s_c = clamp(s), out + d (s_c - s) with three roundings, side = s_c
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float sc = clip_clamp(sv.v[j], p.clip_c);
          out.v[j] = clip_update(out.v[j], sv.v[j], sc, p.clip_d);
          sv.v[j] = sc;
        }
      }
      if (store_side) store_group<kVec>(p.side, idx, base, valid, sv);
    }
#pragma unroll
    for (int i = 0; i < kMaxOuts; ++i) {
      if (i < p.n_outs) store_group<kVec>(p.outs[i], idx, base, valid, out);
    }
  }
}

template <typename pred_t, bool kSide, bool kVec, typename Shape>
void launch_shape(const StepBuffers& p) {
  auto kernel = sampler_step_kernel<pred_t, kSide, kVec, Shape>;
  kernel<<<grid_size(p.B * ((p.n + 3) / 4), kernel), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename pred_t>
void launch_sampler_step(const StepBuffers& p) {
  const bool vec = [&] {
    if (p.n % 4 != 0 || !aligned(p.x, 16) || (p.side != nullptr && !aligned(p.side, 16))) return false;
    for (int i = 0; i < p.shape.branches; ++i)
      if (!aligned(p.preds[i], 4 * sizeof(pred_t))) return false;
    for (int j = 0; j < p.shape.history; ++j)
      if (!aligned(p.history[j], 16)) return false;
    for (int i = 0; i < p.n_outs; ++i)
      if (!aligned(p.outs[i], 16)) return false;
    return true;
  }();
  with_bool(p.side_row(), [&](auto S) {  // the side row: for the side output or the clip (a run-time flag)
    with_bool(vec, [&](auto V) {
      // the common shapes with compile-time counts, the rest with runtime counts (dispatch.h)
      with_step_shape(p.shape, [&](auto shape) {
        launch_shape<pred_t, decltype(S)::value, decltype(V)::value, decltype(shape)>(p);
      });
    });
  });
}

void run_cuda(const StepBuffers& p, at::ScalarType pred_type, at::Device device) {
  c10::cuda::CUDAGuard guard(device);
  with_data_type(pred_type, [&](auto tag) { launch_sampler_step<decltype(tag)>(p); });
}

// the runner of fastdiff::PreparedStep (csrc/step_call.h) for this device
[[maybe_unused]] const bool registered = (register_step_runner(at::kCUDA, &run_cuda), true);

void sampler_step_cuda(const at::Tensor& x, at::TensorList preds, at::TensorList history, const at::Tensor& seeds_in,
                       at::IntArrayRef streams, at::ArrayRef<double> weights, at::ArrayRef<double> coeffs,
                       const std::optional<at::Tensor>& sample_weights, const std::optional<at::Tensor>& sample_coeffs,
                       at::TensorList outs, const std::optional<at::Tensor>& side,
                       const std::optional<at::Tensor>& finite, std::optional<at::ArrayRef<double>> clip,
                       std::optional<at::TensorList> stats, at::OptionalIntArrayRef stats_pick) {
  check_sampler_step_args(x, preds, history, seeds_in, streams, weights, coeffs, sample_weights, sample_coeffs, outs,
                          side, finite, clip);
  TORCH_CHECK(stats.has_value() == stats_pick.has_value(), "fastdiff::sampler_step: stats and stats_pick go together");
  const int64_t S = stats.has_value() ? check_step_stats(x, preds, history, outs, side, *stats, *stats_pick) : 0;
  TORCH_CHECK(x.is_cuda(), "fastdiff::sampler_step (CUDA): x must be a CUDA tensor, got ", x.device());
  if (x.numel() == 0) return;  // B = 0 or n = 0
  c10::cuda::CUDAGuard guard(x.device());  // for seeds' copy
  const at::Tensor seeds = seeds_in.contiguous();  // the kernel indexes seeds[b] directly
  const StepBuffers p = step_buffers(x, preds, history, seeds, streams, weights, coeffs, sample_weights, sample_coeffs,
                                     outs, side, finite, clip, stats.value_or(at::TensorList()),
                                     stats_pick.value_or(at::IntArrayRef()), S);
  run_cuda(p, preds[0].scalar_type(), x.device());
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("sampler_step", &fastdiff::sampler_step_cuda);
}
