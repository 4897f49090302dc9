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
// Statistics (StepBuffers::stats, spec: fastdiff/ops/step_stats.py): a template flag of the runtime-shape kernel alone
// (12 more kernels), so that the 108 kernels without them are compiled as before: code after the item loop, even a
// single atomic, changed ptxas's register allocation for 28 of them (fewer resident blocks per SM: 8 -> 6, 6 -> 5 or
// 5 -> 4; CUDA 13, sm_90). A launch with them has one item per thread (no wave cap), and they run on the thread's own
// item outside the item loop: stats_head before it (q read from the predictions ahead of the thread's own stores, as
// an output may be exactly a prediction and no other thread writes the item; g recomputed as blend computes it),
// stats_tail after it (out read back from outs[0], the thread's own stores). Per group its pick (a prefix: compares;
// a strided pick: 3-4 32-bit divisions, then increments), per picked element a few scalar loads of lines the step
// reads or writes anyway, and the sums: a float32 difference, float64 |.|, a float64 part per thread and column,
// summed over the warp by shuffles when its items are one sample's (else one atomic add per lane), then one
// atomicAdd(double) per warp and column (native on sm_60+). The cost against the fixed-shape kernel of a step is
// not measured yet (no GPU).
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

// ---- Step statistics (StepBuffers::stats, spec: fastdiff/ops/step_stats.py) ----

// The picked lanes of group g of a sample, elements i0 = 4 g .. i0 + valid - 1 (i0 < st.m): bit j for element i0 + j.
// k0: the picked elements before the group's first picked one, so its t-th picked lane is the subsample's element
// k0 + t (k(i) is i's rank among the picked elements). A strided pick divides once per group (32-bit where the
// sample's indices fit; H, W < 2^32: run_cuda checks) and steps the lanes by increments; a group inside a row that is
// not picked (most of them for f > 1) stops after three divisions.
__device__ __forceinline__ unsigned group_pick(const StepStats& st, int64_t n, int64_t g, int valid, int64_t& k0) {
  const int64_t i0 = 4 * g;
  unsigned mask = 0;
  if (st.H == 1 && st.W == 1) {  // a prefix: i < m, k = i
    k0 = i0;
    const int64_t left = st.m - i0;  // > 0
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < valid && j < left) mask |= 1u << j;
    }
    return mask;
  }
  // x[..., ::f, ::f] of whole samples (m = n): i = (blk H + h) W + w is picked iff h % f == 0 and w % f == 0. An f
  // beyond both H and W picks as max(H, W) does (w % f == 0 iff w == 0, ceil(W / f) = 1).
  const uint32_t W = static_cast<uint32_t>(st.W), H = static_cast<uint32_t>(st.H);
  const uint32_t f = static_cast<uint32_t>(st.f < (W > H ? W : H) ? st.f : (W > H ? W : H));
  uint64_t blk;
  uint32_t w, h;
  if (n <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max())) {
    const uint32_t r = static_cast<uint32_t>(i0) / W;
    w = static_cast<uint32_t>(i0) - r * W;
    blk = r / H;
    h = r - static_cast<uint32_t>(blk) * H;
  } else {
    const uint64_t r = static_cast<uint64_t>(i0) / W;
    w = static_cast<uint32_t>(static_cast<uint64_t>(i0) - r * W);
    blk = r / H;
    h = static_cast<uint32_t>(r - blk * H);
  }
  const uint32_t hq = h / f;
  uint32_t hr = h - hq * f;
  if (hr != 0 && W - w >= 4) return 0;  // the whole group in a row that is not picked
  const uint32_t wq = w / f;
  uint32_t wr = w - wq * f;
  // before i0: blk blocks of Hs Ws, the picked rows of this block before h (ceil(h / f)) and, in a picked row, its
  // picked columns before w (ceil(w / f))
  const uint64_t Ws = (W - 1) / f + 1, Hs = (H - 1) / f + 1;
  k0 = static_cast<int64_t>((blk * Hs + hq + (hr != 0)) * Ws + (hr == 0 ? wq + (wr != 0) : 0));
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (j < valid && hr == 0 && wr == 0) mask |= 1u << j;
    if (j < 3) {  // the next element: the next column, or the next row's first
      if (++wr == f) wr = 0;
      if (++w == W) {
        w = wr = 0;
        if (++hr == f) hr = 0;
        if (++h == H) h = hr = 0;
      }
    }
  }
  return mask;
}

// *a += v in float64: native on sm_60+, a compare-and-swap loop below (a TORCH_CUDA_ARCH_LIST may name older GPUs).
__device__ __forceinline__ void add_f64(double* a, double v) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 600
  atomicAdd(a, v);
#else
  auto* word = reinterpret_cast<unsigned long long*>(a);
  unsigned long long seen = *word, prev;
  do {
    prev = seen;
    seen = atomicCAS(word, prev, __double_as_longlong(__longlong_as_double(prev) + v));
  } while (seen != prev);
#endif
}

// *sum += this lane's part v. same (warp-uniform): all lanes with an item hold one sample's, so the parts are summed
// over the warp by shuffles (lanes without an item add 0) and lane 0 adds once; else each lane that picked an element
// adds its own (a warp across a sample boundary, or samples of fewer than 128 elements). The whole warp calls it.
__device__ __forceinline__ void add_stat(bool same, bool picked, double* sum, double v) {
  if (same) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, off);
    if ((threadIdx.x & 31) == 0) add_f64(sum, v);
  } else if (picked) {
    add_f64(sum, v);
  }
}

// This thread's item for the statistics: a launch with statistics has one item per thread (launch_shape), idx =
// the thread's index; item: idx < total; picked / k0: group_pick's (none without an item or past a prefix pick);
// any / same: the warp's votes (some lane picked an element; all lanes with an item are on b).
struct StatsItem {
  int64_t b, g, k0;
  unsigned picked;
  bool any, same;
};
__device__ __forceinline__ StatsItem stats_item(const StepBuffers& p) {
  const int64_t groups = (p.n + 3) / 4, total = p.B * groups;
  // read afresh (volatile): computed once for the kernel, the index would stay live across the item loop
  unsigned tid, cta;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(cta));
  const int64_t idx = static_cast<int64_t>(cta) * kBlock + tid;
  const bool item = idx < total;
  StatsItem t{0, 0, 0, 0u, false, false};
  if (item) {
    split_item(idx, groups, total, &t.b, &t.g);
    if (4 * t.g < p.stats.m) {  // groups past a prefix pick skip to the vote
      const int valid = p.n - 4 * t.g < 4 ? static_cast<int>(p.n - 4 * t.g) : 4;
      t.picked = group_pick(p.stats, p.n, t.g, valid, t.k0);
    }
  }
  // Every thread of the launch gets here (no early exit): the votes and shuffles take all 32 lanes.
  t.any = __any_sync(0xFFFFFFFFu, t.picked != 0);
  // lane 0 has the warp's first item (the lanes' items are consecutive): it has one where any lane picked
  if (t.any) t.same = __all_sync(0xFFFFFFFFu, !item || t.b == __shfl_sync(0xFFFFFFFFu, t.b, 0));
  return t;
}

// The q statistics of this thread's item, before the item loop: q of each picked element read from the predictions
// (prediction `branch` as float, or the blend g recomputed as blend computes it, lane for lane the same float
// operations), sums[b, 1] += |q - q_ref|, sums[b, 2] += |q| (float64), q into q_keep. Before the loop, so before any
// store of the item (an output may be exactly a prediction; no other thread writes the item's elements).
template <typename pred_t, typename Shape>
__device__ __forceinline__ void stats_head(const StepBuffers& p) {
  using Caps = ShapeCaps<Shape>;
  const StepStats& st = p.stats;
  const StatsItem t = stats_item(p);
  if (!t.any) return;  // warp-uniform
  const Shape s = shape_of<Shape>(p);
  const int64_t base = t.b * p.n + 4 * t.g, row = t.b * st.S + t.k0;
  double d = 0.0, a = 0.0;
#pragma unroll 1
  for (int j = 0; j < 4; ++j) {
    if (!((t.picked >> j) & 1u)) continue;
    float q = 0.0f;
    if (st.branch >= 0) {
      q = static_cast<float>(static_cast<const pred_t*>(p.preds[st.branch])[base + j]);
    } else {  // g = w0 p0, then fma(w_i, p_i - p0, g), with this sample's weights (its row where given)
      auto weight = [&](int i) {
        return p.sample_weights != nullptr ? p.sample_weights[t.b * s.branches + i] : p.host.w[i];
      };
      auto pred = [&](int i) { return static_cast<float>(static_cast<const pred_t*>(p.preds[i])[base + j]); };
      const float p0 = pred(0);
      q = weight(0) * p0;
#pragma unroll
      for (int i = 1; i < Caps::kBranches; ++i) {
        if (i < s.branches) q = fmaf(weight(i), pred(i) - p0, q);
      }
    }
    const int64_t e = row + __popc(t.picked & ((1u << j) - 1u));
    if (st.q_ref != nullptr) d += fabs(static_cast<double>(q - st.q_ref[e]));  // a float32 difference
    a += fabs(static_cast<double>(q));
    if (st.q_keep != nullptr) st.q_keep[e] = q;
  }
  double* sums = st.sums + 3 * t.b;
  if (st.q_ref != nullptr) add_stat(t.same, t.picked != 0, sums + 1, d);
  add_stat(t.same, t.picked != 0, sums + 2, a);
}

// The out statistics of this thread's item, after the item loop: out of each picked element read back from outs[0]
// (this thread's own store), sums[b, 0] += |out - x_ref| (float64 of a float32 difference), out into x_keep.
__device__ __forceinline__ void stats_tail(const StepBuffers& p) {
  const StepStats& st = p.stats;
  const StatsItem t = stats_item(p);
  if (!t.any) return;  // warp-uniform
  const int64_t base = t.b * p.n + 4 * t.g, row = t.b * st.S + t.k0;
  double d = 0.0;
#pragma unroll 1
  for (int j = 0; j < 4; ++j) {
    if (!((t.picked >> j) & 1u)) continue;
    const float o = p.outs[0][base + j];
    const int64_t e = row + __popc(t.picked & ((1u << j) - 1u));
    if (st.x_ref != nullptr) d += fabs(static_cast<double>(o - st.x_ref[e]));
    if (st.x_keep != nullptr) st.x_keep[e] = o;
  }
  if (st.x_ref != nullptr) add_stat(t.same, t.picked != 0, st.sums + 3 * t.b, d);
}

// kSide: the side row is computed (side given, or clip: StepBuffers::side_row). kVec: n % 4 == 0 and every
// pointer aligned for load4 / store4 (then groups ==
// n / 4). Shape: FixedStepShape<K1, H, D> (registers) or StepShape (runtime counts). Run-time flags,
// uniform over the launch: finite given, per-sample rows given, noise, the number of outputs.
template <typename pred_t, bool kSide, bool kVec, typename Shape, bool kStats = false>
__global__ void __launch_bounds__(kBlock) sampler_step_kernel(const StepBuffers p) {
  using Caps = ShapeCaps<Shape>;
  // The statistics (kStats: the runtime-shape kernel only; a launch with them has one item per thread): q of the
  // thread's item first, out after the item loop, where none of the loop's values are live (see the file's comment).
  if constexpr (kStats) {
    if (p.stats.branch != kStatsNoQ) stats_head<pred_t, Shape>(p);
  }
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
  if constexpr (kStats) {
    if (p.stats.x_ref != nullptr || p.stats.x_keep != nullptr) stats_tail(p);
  }
}

template <typename pred_t, bool kSide, bool kVec, typename Shape, bool kStats = false>
void launch_shape(const StepBuffers& p) {
  auto kernel = sampler_step_kernel<pred_t, kSide, kVec, Shape, kStats>;
  const int64_t items = p.B * ((p.n + 3) / 4);
  // With statistics one item per thread (stats_head and stats_tail work on the thread's own item), else at most one
  // wave of blocks that loop.
  const int64_t blocks = kStats ? (items + kBlock - 1) / kBlock : grid_size(items, kernel);
  kernel<<<blocks, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(p);
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
      if (p.stats.on()) {  // the statistics: in the runtime-shape kernel, whatever the counts (12 more kernels)
        launch_shape<pred_t, decltype(S)::value, decltype(V)::value, StepShape, true>(p);
        return;
      }
      // the common shapes with compile-time counts, the rest with runtime counts (dispatch.h)
      with_step_shape(p.shape, [&](auto shape) {
        launch_shape<pred_t, decltype(S)::value, decltype(V)::value, decltype(shape)>(p);
      });
    });
  });
}

void run_cuda(const StepBuffers& p, at::ScalarType pred_type, at::Device device) {
  // group_pick steps the columns and rows of a strided pick in 32 bits (a row of 2^32 floats is 16 GiB)
  constexpr int64_t kMax32 = std::numeric_limits<uint32_t>::max();
  TORCH_CHECK(!p.stats.on() || (p.stats.H <= kMax32 && p.stats.W <= kMax32), "fastdiff::sampler_step (CUDA): "
              "statistics need the pick's H and W below 2^32, got ", p.stats.H, " x ", p.stats.W);
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
