// The per-element math of the general fused sampler step fastdiff::sampler_step (docs/design.md §2),
// written once for the CPU loops (T = at::vec::Vectorized<float>), the CUDA kernel (T = float) and the
// C++ tests. The specification is sampler_step_reference in fastdiff/ops/sampler_step.py:
//
//   g    = w0 p0 + sum_{k>=1} wk (pk - p0)
//   out  = c_x x + c_g g + sum_j c_h[j] h_j + sum_d c_z[d] z_d     (noise terms only where c_z[d] != 0)
//   side = the same with the side row
//
// in float32, in the order written, each term after the first added with one fused multiply-add
// (acc = fma(c, v, acc)): explicit, so no compiler's contraction choices enter and the AVX2 and AVX-512
// levels and CUDA give the same bits; it is the arithmetic the kernels had before this op, so K1 = 2
// with w = (1, cfg) is the former CFG step bit for bit (1 * p_uncond is exact). The reference rounds
// the product and the sum separately (within an ulp of each term), and so does the portable CPU level
// where its instruction set has no FMA (the x86-64 baseline), as it did before.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastdiff/macros.h"

namespace fastdiff {

// a * b + c with one rounding. Vector types use their own fmadd, found by argument-dependent lookup
// (at::vec::fmadd for at::vec::Vectorized<float>).
FASTDIFF_HD float fmadd(float a, float b, float c) { return fmaf(a, b, c); }

// Limits of one call (the op checks them): branches K1, history buffers H, noise draws D, outputs.
constexpr int kMaxBranches = 8;
constexpr int kMaxHistory = 4;
constexpr int kMaxDraws = 4;
constexpr int kMaxOuts = 8;
constexpr int kMaxTerms = 2 + kMaxHistory + kMaxDraws;  // columns of a coefficient row: x, g, h..., z...

// The counts of one call, fixed for all samples.
struct StepShape {
  int branches;  // K1 >= 1
  int history;   // H
  int draws;     // D
  FASTDIFF_HD int terms() const { return 2 + history + draws; }  // M, the length of a coefficient row
};

// The same counts as compile-time constants, for the common shapes K1 <= 2, H <= 1, D <= 1 (CFG or one
// branch with the one- and two-stage methods: Euler, Heun, DDIM, DPM-Solver++(2M), ...), so the loops below
// unroll; blend and combine take either. Larger counts (lms and iPNDM's history up to H = 3, APG's momentum
// or negative conditions with K1 = 3) run the StepShape body with runtime loops.
template <int K1, int H, int D>
struct FixedStepShape {
  static constexpr int branches = K1;
  static constexpr int history = H;
  static constexpr int draws = D;
  FASTDIFF_HD static constexpr int terms() { return 2 + H + D; }
};

// Array capacities and loop bounds of a shape: the counts themselves for FixedStepShape (arrays in
// registers; a zero count keeps one unused slot), the limits for the runtime StepShape.
template <typename Shape>
struct ShapeCaps {
  static constexpr bool kFixed = false;
  static constexpr int kBranches = kMaxBranches, kHistory = kMaxHistory, kDraws = kMaxDraws, kTerms = kMaxTerms;
};
template <int K1, int H, int D>
struct ShapeCaps<FixedStepShape<K1, H, D>> {
  static constexpr bool kFixed = true;
  static constexpr int kBranches = K1, kHistory = H > 0 ? H : 1, kDraws = D > 0 ? D : 1, kTerms = 2 + H + D;
};

// Columns of SampleCoeffs::c: 0 x, 1 g, 2 + j h_j, kDrawColumn + d z_d: the same for every shape, so that a
// loop unrolled to the shape's caps indexes the coefficients at compile time (the runtime-shape CUDA kernel kept
// them in a 368-byte stack frame, with 151 local loads, while draws sat at the runtime column 2 + H + d).
constexpr int kDrawColumn = 2 + kMaxHistory;

// The column of compact index j of a coefficient row (x, g, H history terms, then the draws: the op's layout).
FASTDIFF_HD int coeff_column(int history, int j) { return j < 2 + history ? j : kDrawColumn + (j - 2 - history); }

// The coefficients of one sample: guidance weights and the out / side rows, float32.
struct SampleCoeffs {
  float w[kMaxBranches];
  float c[2][kMaxTerms];  // [row][column]: row 0 out, row 1 side; columns as kDrawColumn says
};

// The step statistics (the op's stats, spec: fastdiff/ops/step_stats.py): over the picked elements of each
// sample, sums[b, 0] += |out - x_ref|, sums[b, 1] += |q - q_ref|, sums[b, 2] += |q| (float64), out and q copied
// into x_keep / q_keep; q is prediction `branch` (-1: the blend g; -2: none). Absent buffers are nullptr;
// sums == nullptr: no statistics (the step as before).
constexpr int kStatsNoQ = -2, kStatsBlend = -1;
struct StepStats {
  double* sums;  // [B, 3]
  const float* x_ref;  // [B, S] each, or nullptr
  float* x_keep;
  const float* q_ref;
  float* q_keep;
  int64_t m, H, W, f, S;  // the pick: element i is picked iff i < m, (i % W) % f == 0, ((i / W) % H) % f == 0
  int branch;

  FASTDIFF_HD bool on() const { return sums != nullptr; }
  // Whether element i of a sample is picked, and then its index k in the subsample.
  FASTDIFF_HD bool pick(int64_t i, int64_t& k) const {
    if (i >= m) return false;
    const int64_t w = i % W, r = i / W, h = r % H;
    if (w % f != 0 || h % f != 0) return false;
    k = (r / H) * ((H + f - 1) / f) * ((W + f - 1) / f) + (h / f) * ((W + f - 1) / f) + w / f;
    return true;
  }
};

// The buffers and numbers of one call: filled on the host from the op's arguments (step_buffers in
// csrc/sampler_step_args.h), read by the CPU loops and passed by value to the CUDA kernel.
struct StepBuffers {
  StepShape shape;
  const float* x;                     // [B, n]; may be outs[0]
  const void* preds[kMaxBranches];    // K1 of [B, n]: float, c10::Half or c10::BFloat16 (one type)
  const float* history[kMaxHistory];  // H of [B, n]
  uint32_t streams[kMaxDraws];        // D stream ids
  const int64_t* seeds;               // [B] (two's complement for seeds >= 2^63)
  SampleCoeffs host;                  // every sample's coefficients, unless per-sample rows are given
  bool draws_used[kMaxDraws];         // host coefficients: draw d has a non-zero coefficient
  const float* sample_weights;        // [B, K1] or nullptr
  const float* sample_coeffs;         // [B, 2M] or nullptr
  float* outs[kMaxOuts];              // n_outs of [B, n]
  int n_outs;
  float* side;                        // [B, n] or nullptr; may be a history buffer
  int32_t* finite;                    // [B] or nullptr
  int64_t B, n;                       // samples, elements per sample
  // clip_sample (the op's clip = [c, d], float32): the side row s is computed (with or without `side`),
  // clamped (clip_clamp) and out += d (s_c - s) (clip_update); side, if given, receives s_c. A run-time flag,
  // uniform over the call (checked per block on the CPU, per thread on CUDA): no template dimension.
  bool clip;
  float clip_c, clip_d;
  StepStats stats;  // stats.sums == nullptr without statistics

  // Whether the side row is computed: for the side output or for the clip.
  FASTDIFF_HD bool side_row() const { return side != nullptr || clip; }

  // Whether any draw may be generated (per-sample rows decide per sample and draw).
  FASTDIFF_HD bool any_draw() const {
    bool any = sample_coeffs != nullptr && shape.draws > 0;
    for (int d = 0; d < shape.draws; ++d) any = any || draws_used[d];
    return any;
  }
};

// SampleCoeffs from a row of K1 weights and a row of 2M coefficients (host arrays or device rows).
FASTDIFF_HD void load_sample_coeffs(const StepShape& s, const float* weights, const float* coeffs,
                                           SampleCoeffs& k) {
  for (int i = 0; i < s.branches; ++i) k.w[i] = weights[i];
  const int m = s.terms();
  for (int r = 0; r < 2; ++r)
    for (int j = 0; j < m; ++j) k.c[r][coeff_column(s.history, j)] = coeffs[r * m + j];
}

// g of one element (or vector): p[0 .. K1) are the branch predictions as float.
// kUnitW0: the caller has checked that w0 is 1 (the CPU loops do per run of blocks), so p[0] is taken as it is
// (1 * p is p: the same bits without the multiply).
template <typename T, bool kUnitW0 = false, typename Shape>
FASTDIFF_HD T blend(const Shape& s, const SampleCoeffs& k, const T* p) {
  T g = kUnitW0 ? p[0] : T(k.w[0]) * p[0];  // exact for w0 = 1: a multiply is cheaper than a test in the vector loop
  FASTDIFF_UNROLL  // to the shape's caps: compile-time indices (registers, not a stack frame, on the GPU)
  for (int i = 1; i < ShapeCaps<Shape>::kBranches; ++i) {
    if (i < s.branches) g = fmadd(T(k.w[i]), p[i] - p[0], g);
  }
  return g;
}

// One output row (0 out, 1 side) of one element: h[0 .. H) history values, z[0 .. D) normals (read only
// where the coefficient is non-zero). kDrawsNonZero: the caller has checked that every draw's coefficient
// in this row is non-zero (the CPU loops do per block), so the vector loop tests nothing.
template <typename T, bool kDrawsNonZero = false, typename Shape>
FASTDIFF_HD T combine(const Shape& s, const SampleCoeffs& k, int row, const T& x, const T& g, const T* h,
                      const T* z) {
  const float* c = k.c[row];
  T v = fmadd(T(c[1]), g, T(c[0]) * x);
  FASTDIFF_UNROLL
  for (int j = 0; j < ShapeCaps<Shape>::kHistory; ++j) {
    if (j < s.history) v = fmadd(T(c[2 + j]), h[j], v);
  }
  FASTDIFF_UNROLL
  for (int d = 0; d < ShapeCaps<Shape>::kDraws; ++d) {
    if (d >= s.draws) continue;
    const float cz = c[kDrawColumn + d];
    if (kDrawsNonZero || cz != 0.0f) v = fmadd(T(cz), z[d], v);
  }
  return v;
}

// clip_sample's clamp of a side row value s to [-c, c] (c > 0): -c where s < -c, c where s > c, else s (a NaN
// stays NaN, as torch.clamp). Written as selects on comparisons (true for no NaN), the same on every backend.
FASTDIFF_HD float clip_clamp(float s, float c) { return s > c ? c : (s < -c ? -c : s); }

// out + d (s_c - s) with three float32 roundings in this order: t = s_c - s, u = d t, out + u. Never one fused
// multiply-add: the product is rounded on its own (__fmul_rn on CUDA, an optimization barrier on the CPU, where
// the compiler could otherwise contract d t + out), as the reference's separate tensor operations round it.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float clip_update(float out, float s, float s_c, float d) {
  return __fadd_rn(out, __fmul_rn(d, __fsub_rn(s_c, s)));
}
#else
inline float clip_update(float out, float s, float s_c, float d) {
  float u = d * (s_c - s);
  asm volatile("" : "+m"(u));  // u is rounded to float32 in memory: no contraction into a fused multiply-add
  return out + u;
}
#endif

// Whether draw d is needed by a sample: a non-zero coefficient in either row.
template <typename Shape>
FASTDIFF_HD bool draw_used(const Shape& s, const SampleCoeffs& k, int d, bool side) {
  const int j = kDrawColumn + d;
  return k.c[0][j] != 0.0f || (side && k.c[1][j] != 0.0f);
}

}  // namespace fastdiff
