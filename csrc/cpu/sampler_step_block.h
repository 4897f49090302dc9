// The CPU loop of fastdiff::sampler_step (the general fused step, docs/design.md §2), built once per
// instruction set like noise_block.h (simd.h): by sampler_step.cpp (portable), avx2/sampler_step.cpp and
// avx512/sampler_step.cpp.
//
// Work is split into blocks of kBlockElems (64; 128 under AVX-512) elements of one sample (one
// normal_block of noise per draw) and spread over threads with at::parallel_for. A block's math runs
// in at::vec::Vectorized<float> through blend / combine (fastdiff/sampler_step.h), the per-element
// definition the CUDA kernel uses too. Partial last blocks go through zero-padded local buffers.
// The counts (branches, history, draws, outputs) are runtime loops: the step is memory-bound, and
// one instantiation per count would multiply the build for no measured gain.
//
// float16 / bfloat16 predictions are widened to float per block (to_float_block, widen_block.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "../dispatch.h"
#include "fastdiff/sampler_step.h"
#include "noise_block.h"
#include "widen_block.h"

namespace fastdiff {
namespace cpu {

// sampler_step_<isa>(a, pred_t tag) for pred_t float, c10::Half, c10::BFloat16 (the tag picks the type); defined by
// FASTDIFF_DEFINE_SAMPLER_STEP_LOOPS in sampler_step.cpp, avx2/ and avx512/.
#define FASTDIFF_DECLARE_SAMPLER_STEP_LOOPS(isa) \
  template <typename pred_t>                     \
  void sampler_step_##isa(const StepBuffers& a, pred_t tag);
FASTDIFF_DECLARE_SAMPLER_STEP_LOOPS(portable)
#if defined(FASTDIFF_HAVE_AVX2)
FASTDIFF_DECLARE_SAMPLER_STEP_LOOPS(avx2)
FASTDIFF_DECLARE_SAMPLER_STEP_LOOPS(avx512)
#endif
#undef FASTDIFF_DECLARE_SAMPLER_STEP_LOOPS

#define FASTDIFF_DEFINE_SAMPLER_STEP_LOOPS(isa)                                                          \
  template <typename pred_t>                                                                             \
  void sampler_step_##isa(const StepBuffers& a, pred_t) {                                                \
    sampler_step_dispatch<pred_t>(a);                                                                    \
  }                                                                                                      \
  template void sampler_step_##isa<float>(const StepBuffers&, float);                                    \
  template void sampler_step_##isa<c10::Half>(const StepBuffers&, c10::Half);                            \
  template void sampler_step_##isa<c10::BFloat16>(const StepBuffers&, c10::BFloat16);

namespace {  // one copy per translation unit: the AVX2 and portable builds must not merge

alignas(64) constexpr float kZeroBlock[kBlockElems] = {};

// The vectors of the runtime-count shape, made once per task: at::vec::Vectorized<float> zeroes itself on
// construction, and arrays of the limits' size zeroed per vector cost 5x the step itself (measured,
// AVX-512, 2^22 elements). The fixed shapes keep theirs in registers (ShapeCaps-sized locals).
struct StepLanes {
  at::vec::Vectorized<float> p[kMaxBranches], h[kMaxHistory], z[kMaxDraws];
};

// One vector. kCheck: accumulate the finiteness check; kDrawsNonZero: every draw of the out row has a
// non-zero coefficient (decided per block, see sampler_step_block).
template <bool kSide, bool kCheck, bool kDrawsNonZero, typename Shape>
inline void sampler_step_vectors(const Shape& s, const SampleCoeffs& k, const float* x, const float* const* p,
                                 const float* const* h, const float* const* z, float* const* outs, int n_outs,
                                 float* side, at::vec::Vectorized<float>& bad, at::vec::Vectorized<float>* pv,
                                 at::vec::Vectorized<float>* hv, at::vec::Vectorized<float>* zv, int j) {
  using Vec = at::vec::Vectorized<float>;
  for (int i = 0; i < s.branches; ++i) pv[i] = Vec::loadu(p[i] + j);
  for (int i = 0; i < s.history; ++i) hv[i] = Vec::loadu(h[i] + j);
  for (int d = 0; d < s.draws; ++d) zv[d] = Vec::loadu(z[d] + j);
  const Vec xv = Vec::loadu(x + j);
  if constexpr (kCheck) {
    for (int i = 0; i < s.branches; ++i) bad = bad + (pv[i] - pv[i]);
  }
  const Vec g = blend<Vec>(s, k, pv);
  const Vec o = combine<Vec, kDrawsNonZero>(s, k, 0, xv, g, hv, zv);
  if constexpr (kSide) combine<Vec>(s, k, 1, xv, g, hv, zv).store(side + j);
  for (int i = 0; i < n_outs; ++i) o.store(outs[i] + j);
}

// The vector loop of one block. kCheck: accumulate the finiteness check; kDrawsNonZero: every draw of the
// out row has a non-zero coefficient. Caps: the shape whose capacities size the per-vector locals.
template <bool kSide, bool kCheck, bool kDrawsNonZero, typename Caps, typename Shape>
inline void sampler_step_vector_loop(const Shape& s, const SampleCoeffs& k, const float* x, const float* const* p,
                                     const float* const* h, const float* const* z, float* const* outs, int n_outs,
                                     float* side, at::vec::Vectorized<float>& bad, StepLanes& lanes) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int V = Vec::size();
  static_assert(kBlockElems % V == 0, "block must hold whole vectors");
  if constexpr (Caps::kFixed) {
    // Local copies of the pointers: the stores (through may-alias vector types) would otherwise make the
    // compiler reload every pointer from the caller's arrays for every vector.
    const float* pl[Caps::kBranches];
    const float* hl[Caps::kHistory];
    const float* zl[Caps::kDraws];
    for (int i = 0; i < s.branches; ++i) pl[i] = p[i];
    for (int i = 0; i < s.history; ++i) hl[i] = h[i];
    for (int d = 0; d < s.draws; ++d) zl[d] = z[d];
    float* ol[kMaxOuts];
    for (int i = 0; i < n_outs; ++i) ol[i] = outs[i];
#pragma GCC unroll 8
    for (int j = 0; j < kBlockElems; j += V) {  // locals written before they are read: no zeroing survives
      Vec pv[Caps::kBranches], hv[Caps::kHistory], zv[Caps::kDraws];
      sampler_step_vectors<kSide, kCheck, kDrawsNonZero>(s, k, x, pl, hl, zl, ol, n_outs, side, bad, pv, hv, zv, j);
    }
  } else {
    for (int j = 0; j < kBlockElems; j += V)
      sampler_step_vectors<kSide, kCheck, kDrawsNonZero>(s, k, x, p, h, z, outs, n_outs, side, bad, lanes.p, lanes.h,
                                                         lanes.z, j);
  }
}

// One block of kBlockElems elements of one sample. Every vector's inputs are loaded before its outputs
// are stored, so an output may be an input. `bad` accumulates p - p over the predictions: 0 for finite
// values, NaN for inf and NaN (the finiteness check rides on the loads the step makes anyway).
template <bool kSide, typename Shape>
inline void sampler_step_block(const Shape& s, bool check_finite, const SampleCoeffs& k, const float* x,
                               const float* const* p, const float* const* h, const float* const* z,
                               float* const* outs, int n_outs, float* side, at::vec::Vectorized<float>& bad,
                               StepLanes& lanes) {
  using Vec = at::vec::Vectorized<float>;
  using Caps = ShapeCaps<Shape>;
  // A local copy: the stores through `outs` (float*) cannot alias it, so the coefficients stay in registers
  // instead of being reloaded after every store.
  const SampleCoeffs coeffs = k;
  Vec acc = bad;
  // The block's constant choices made once, not per vector: the finiteness check, and for the one-draw
  // shapes without a side row whether the draw's coefficient is zero (its term is then left out at
  // compile time, as combine would skip it). With the tests in the vector loop, a rolled loop and the
  // pointers reloaded per vector, the SDE step (cfg 4, 2^22, AVX-512, 1 thread) took 10-17 % more CPU
  // time than the former guided_step loop; hoisted, with local pointers and the loop unrolled, 2 %.
  with_bool(check_finite, [&](auto check) {
    constexpr bool kCheck = decltype(check)::value;
    if constexpr (Caps::kFixed) {
      if constexpr (Shape::draws == 1 && !kSide) {
        if (coeffs.c[0][2 + Shape::history] != 0.0f) {
          sampler_step_vector_loop<kSide, kCheck, true, Caps>(s, coeffs, x, p, h, z, outs, n_outs, side, acc, lanes);
        } else {
          sampler_step_vector_loop<kSide, kCheck, false, Caps>(FixedStepShape<Shape::branches, Shape::history, 0>{},
                                                               coeffs, x, p, h, z, outs, n_outs, side, acc, lanes);
        }
        return;
      }
    }
    sampler_step_vector_loop<kSide, kCheck, false, Caps>(s, coeffs, x, p, h, z, outs, n_outs, side, acc, lanes);
  });
  bad = acc;
}

template <typename pred_t, bool kSide, typename Shape>
void sampler_step_rows(const StepBuffers& a, const Shape s) {
  using Vec = at::vec::Vectorized<float>;
  constexpr bool kFloatPred = std::is_same_v<pred_t, float>;
  const bool check_finite = a.finite != nullptr;
  const int64_t n = a.n;
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;  // per sample
  const bool any_draw = a.any_draw();
  // Blocks per task: with noise ~4096 elements (as randn: the normals dominate); without, the step
  // is memory-bound and ~32768 elements (ATen's GRAIN_SIZE) amortize the scheduling.
  const int64_t grain = any_draw ? 128 : 1024;
  at::parallel_for(0, a.B * blocks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float zbuf[kMaxDraws][kBlockElems];     // normals of the block, per draw
    alignas(64) float pbuf[kMaxBranches][kBlockElems];  // predictions as float (16-bit, or a partial block)
    alignas(64) float hbuf[kMaxHistory][kBlockElems];   // history of a partial block
    alignas(64) float xbuf[kBlockElems], obuf[kBlockElems], sbuf[kBlockElems];
    const float* p[kMaxBranches];
    const float* h[kMaxHistory];
    const float* z[kMaxDraws];
    float* o[kMaxOuts];
    SampleCoeffs k = a.host;
    int64_t b = begin / blocks;
    int64_t blk = begin - b * blocks;
    int64_t loaded = -1;  // the sample whose per-sample coefficients are in k
    Vec bad(0.0f);
    StepLanes lanes;
    auto flush_finite = [&](int64_t sample) {
      if (check_finite) {
        alignas(64) float values[Vec::size()];
        bad.store(values);
        for (int i = 0; i < Vec::size(); ++i) {
          if (values[i] != values[i]) {  // NaN: some prediction of the sample was inf or NaN
            a.finite[sample] = 0;
            break;
          }
        }
        bad = Vec(0.0f);
      }
    };
    for (int64_t job = begin; job < end; ++job) {
      if (a.sample_weights != nullptr || a.sample_coeffs != nullptr) {
        if (loaded != b) {
          if (a.sample_weights != nullptr)
            for (int i = 0; i < s.branches; ++i) k.w[i] = a.sample_weights[b * s.branches + i];
          if (a.sample_coeffs != nullptr) {
            const int m = s.terms();
            for (int r = 0; r < 2; ++r)
              for (int j = 0; j < m; ++j) k.c[r][j] = a.sample_coeffs[b * 2 * m + r * m + j];
          }
          loaded = b;
        }
      }
      const int64_t e0 = blk * kBlockElems;  // first element of the block within sample b
      const int count = n - e0 < kBlockElems ? static_cast<int>(n - e0) : kBlockElems;
      const int64_t base = b * n + e0;
      for (int d = 0; d < s.draws; ++d) {
        const bool used = a.sample_coeffs != nullptr ? draw_used(s, k, d, kSide) : a.draws_used[d];
        // An unused draw reads zeros (combine adds a draw only where its coefficient is non-zero).
        z[d] = used ? zbuf[d] : kZeroBlock;
        if (used) normal_block(static_cast<uint64_t>(a.seeds[b]), static_cast<uint64_t>(e0 >> 2), a.streams[d], zbuf[d]);
      }
      if (count == kBlockElems) {
        for (int i = 0; i < s.branches; ++i) {
          if constexpr (kFloatPred) {
            p[i] = static_cast<const float*>(a.preds[i]) + base;
          } else {
            to_float_block(static_cast<const pred_t*>(a.preds[i]) + base, kBlockElems, pbuf[i]);
            p[i] = pbuf[i];
          }
        }
        for (int i = 0; i < s.history; ++i) h[i] = a.history[i] + base;
        for (int i = 0; i < a.n_outs; ++i) o[i] = a.outs[i] + base;
        sampler_step_block<kSide>(s, check_finite, k, a.x + base, p, h, z, o, a.n_outs, kSide ? a.side + base : nullptr,
                                           bad, lanes);
      } else {
        // Partial last block: every input is copied before anything is written (an output may be an input).
        to_float_block(a.x + base, count, xbuf);
        for (int i = 0; i < s.branches; ++i) {
          to_float_block(static_cast<const pred_t*>(a.preds[i]) + base, count, pbuf[i]);
          p[i] = pbuf[i];
        }
        for (int i = 0; i < s.history; ++i) {
          to_float_block(a.history[i] + base, count, hbuf[i]);
          h[i] = hbuf[i];
        }
        float* local_out = obuf;
        sampler_step_block<kSide>(s, check_finite, k, xbuf, p, h, z, &local_out, 1, sbuf, bad, lanes);
        for (int i = 0; i < a.n_outs; ++i) std::memcpy(a.outs[i] + base, obuf, sizeof(float) * count);
        if constexpr (kSide) std::memcpy(a.side + base, sbuf, sizeof(float) * count);
      }
      if (++blk == blocks) {
        flush_finite(b);
        blk = 0;
        ++b;
      }
    }
    if (blk != 0) flush_finite(b);  // the task ended inside sample b
  });
}

// Instantiations: side or not, times the common shapes with compile-time counts plus one with runtime
// counts (with_step_shape, dispatch.h).
template <typename pred_t>
void sampler_step_dispatch(const StepBuffers& a) {
  if (a.B == 0 || a.n == 0) return;
  with_bool(a.side != nullptr, [&](auto side) {
    with_step_shape(a.shape, [&](auto shape) { sampler_step_rows<pred_t, decltype(side)::value>(a, shape); });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff
