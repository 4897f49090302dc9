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

#include <algorithm>
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
// non-zero coefficient; kOneOut: n_outs is 1; kUnitW0: w0 is 1 (each decided per run, see sampler_step_run).
template <bool kSide, bool kCheck, bool kDrawsNonZero, bool kOneOut, bool kUnitW0, typename Shape>
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
  const Vec g = blend<Vec, kUnitW0>(s, k, pv);
  const Vec o = combine<Vec, kDrawsNonZero>(s, k, 0, xv, g, hv, zv);
  if constexpr (kSide) combine<Vec>(s, k, 1, xv, g, hv, zv).store(side + j);
  if constexpr (kOneOut) {
    o.store(outs[0] + j);
  } else {
    for (int i = 0; i < n_outs; ++i) o.store(outs[i] + j);
  }
}

// The vector loop of one block. kCheck: accumulate the finiteness check; kDrawsNonZero: every draw of the
// out row has a non-zero coefficient. Caps: the shape whose capacities size the per-vector locals.
template <bool kSide, bool kCheck, bool kDrawsNonZero, bool kOneOut, bool kUnitW0, typename Caps, typename Shape>
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
    if constexpr (kOneOut) {
      ol[0] = outs[0];
    } else {
      for (int i = 0; i < n_outs; ++i) ol[i] = outs[i];
    }
#pragma GCC unroll 8
    for (int j = 0; j < kBlockElems; j += V) {  // locals written before they are read: no zeroing survives
      Vec pv[Caps::kBranches], hv[Caps::kHistory], zv[Caps::kDraws];
      sampler_step_vectors<kSide, kCheck, kDrawsNonZero, kOneOut, kUnitW0>(s, k, x, pl, hl, zl, ol, n_outs, side, bad, pv,
                                                                         hv, zv, j);
    }
  } else {
    for (int j = 0; j < kBlockElems; j += V)
      sampler_step_vectors<kSide, kCheck, kDrawsNonZero, false, false>(s, k, x, p, h, z, outs, n_outs, side, bad, lanes.p,
                                                                       lanes.h, lanes.z, j);
  }
}

// A run of blocks of one sample. `blocks(vector_loop)` walks the run and calls vector_loop(x, p, h, z, outs,
// n_outs, side) once per block of kBlockElems elements; every vector's inputs are loaded before its
// outputs are stored, so an output may be an input. `bad` accumulates p - p over the predictions: 0 for
// finite values, NaN for inf and NaN (the finiteness check rides on the loads the step makes anyway).
//
// The run's constant choices are made once, not per block or per vector: the finiteness check; for the
// fixed shapes one output or several and whether w0 is 1 (blend then skips its multiply); for the one-draw
// shapes without a side row whether the draw's coefficient is zero (its term is then left out at compile
// time, as combine would skip it). Measured against the former guided_step loop (cfg 4, 2^22, 1 thread):
// with these tests per vector, 10-17 % more CPU time (AVX-512); hoisted per block, 2 % (fp32) and 7-12 %
// (bf16); per run, with the Philox keys made once per sample (noise_block.h), within 1 % of its
// instructions (cachegrind, AVX2, 2^20) and within the run-to-run spread of its time.
template <bool kSide, typename Shape, typename Blocks>
inline void sampler_step_run(const Shape& s, bool check_finite, int n_outs, const SampleCoeffs& k,
                             at::vec::Vectorized<float>& bad, StepLanes& lanes, const Blocks& blocks) {
  using Vec = at::vec::Vectorized<float>;
  using Caps = ShapeCaps<Shape>;
  // Local copies: the stores through `outs` (float*) cannot alias them, so the coefficients and the check
  // stay in registers instead of being reloaded after every store.
  const SampleCoeffs coeffs = k;
  Vec acc = bad;
  auto run = [&](auto check, auto draws_nonzero, auto one_out, auto unit_w0, const auto& shape) {
    constexpr bool kCheck = decltype(check)::value;
    constexpr bool kDrawsNonZero = decltype(draws_nonzero)::value;
    constexpr bool kOneOut = decltype(one_out)::value;
    constexpr bool kUnitW0 = decltype(unit_w0)::value;
    blocks([&](const float* x, const float* const* p, const float* const* h, const float* const* z,
               float* const* outs, int n_outs, float* side) {
      sampler_step_vector_loop<kSide, kCheck, kDrawsNonZero, kOneOut, kUnitW0, Caps>(shape, coeffs, x, p, h, z, outs,
                                                                                    n_outs, side, acc, lanes);
    });
  };
  with_bool(check_finite, [&](auto check) {
    if constexpr (Caps::kFixed) {
      with_bool(n_outs == 1, [&](auto one_out) {
        with_bool(coeffs.w[0] == 1.0f, [&](auto unit_w0) {
          if constexpr (Shape::draws == 1 && !kSide) {
            if (coeffs.c[0][2 + Shape::history] != 0.0f) {
              run(check, std::true_type{}, one_out, unit_w0, s);
            } else {
              run(check, std::false_type{}, one_out, unit_w0, FixedStepShape<Shape::branches, Shape::history, 0>{});
            }
          } else {
            run(check, std::false_type{}, one_out, unit_w0, s);
          }
        });
      });
    } else {
      run(check, std::false_type{}, std::false_type{}, std::false_type{}, s);
    }
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
    bool used[kMaxDraws];
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
    for (int64_t job = begin; job < end;) {
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
      for (int d = 0; d < s.draws; ++d) {
        used[d] = a.sample_coeffs != nullptr ? draw_used(s, k, d, kSide) : a.draws_used[d];
        // An unused draw reads zeros (combine adds a draw only where its coefficient is non-zero).
        z[d] = used[d] ? zbuf[d] : kZeroBlock;
      }
      const int64_t stop = std::min(blocks, blk + (end - job));  // this task's blocks of sample b: [blk, stop)
      const PhiloxKeys keys = philox_keys(static_cast<uint64_t>(a.seeds[b]));
      sampler_step_run<kSide>(s, check_finite, a.n_outs, k, bad, lanes, [&](const auto& vector_loop) {
        const int64_t full_stop = std::min(stop, n / kBlockElems);  // the whole blocks among them
        for (int64_t i = blk; i < stop; ++i) {
          const int64_t e0 = i * kBlockElems;  // first element of the block within sample b
          const int64_t base = b * n + e0;
          for (int d = 0; d < s.draws; ++d)
            if (used[d]) normal_block(keys, static_cast<uint64_t>(e0 >> 2), a.streams[d], zbuf[d]);
          if (i < full_stop) {
            for (int r = 0; r < s.branches; ++r) {
              if constexpr (kFloatPred) {
                p[r] = static_cast<const float*>(a.preds[r]) + base;
              } else {
                to_float_block(static_cast<const pred_t*>(a.preds[r]) + base, kBlockElems, pbuf[r]);
                p[r] = pbuf[r];
              }
            }
            for (int r = 0; r < s.history; ++r) h[r] = a.history[r] + base;
            if (a.n_outs == 1) {
              o[0] = a.outs[0] + base;
            } else {
              for (int r = 0; r < a.n_outs; ++r) o[r] = a.outs[r] + base;
            }
            vector_loop(a.x + base, p, h, z, o, a.n_outs, kSide ? a.side + base : nullptr);
          } else {
            // Partial last block: every input is copied before anything is written (an output may be an input).
            const int count = static_cast<int>(n - e0);
            to_float_block(a.x + base, count, xbuf);
            for (int r = 0; r < s.branches; ++r) {
              to_float_block(static_cast<const pred_t*>(a.preds[r]) + base, count, pbuf[r]);
              p[r] = pbuf[r];
            }
            for (int r = 0; r < s.history; ++r) {
              to_float_block(a.history[r] + base, count, hbuf[r]);
              h[r] = hbuf[r];
            }
            float* local_out = obuf;
            vector_loop(xbuf, p, h, z, &local_out, 1, sbuf);
            for (int r = 0; r < a.n_outs; ++r) std::memcpy(a.outs[r] + base, obuf, sizeof(float) * count);
            if constexpr (kSide) std::memcpy(a.side + base, sbuf, sizeof(float) * count);
          }
        }
      });
      job += stop - blk;
      blk = stop;
      if (blk == blocks) {
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
