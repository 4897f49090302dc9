// The CPU loop of fastdiff::sampler_step (the general fused step, docs/design.md §2), built once per
// instruction set like noise_block.h (simd.h): by sampler_step.cpp (portable), avx2/sampler_step.cpp and
// avx512/sampler_step.cpp.
//
// Work is split into blocks of kBlockElems (64; 128 under AVX-512) elements of one sample (one
// normal_block of noise per draw) and spread over threads with at::parallel_for. A block's math runs
// in at::vec::Vectorized<float> through blend / combine (fastdiff/sampler_step.h), the per-element
// definition the CUDA kernel uses too. Partial last blocks go through zero-padded local buffers.
// The common counts of branches, history buffers and draws are compile-time shapes (FixedStepShape, 8 of
// them, so their loops unroll and their vectors stay in registers) and every other count runs one body
// with runtime loops; the number of outputs and the per-run choices are runtime values (sampler_step_block).
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

// The type of the predictions (one for all branches). The loop below is one body for all three: 16-bit
// predictions are widened per block (to_float_block), float ones are read in place, so the type is a
// runtime switch per block rather than a template argument (a third of the instantiations).
enum class PredType { kFloat, kHalf, kBFloat16 };

// sampler_step_<isa>(a, pred_type); defined by FASTDIFF_DEFINE_SAMPLER_STEP_LOOPS in sampler_step.cpp,
// avx2/ and avx512/.
#define FASTDIFF_DECLARE_SAMPLER_STEP_LOOPS(isa) void sampler_step_##isa(const StepBuffers& a, PredType pred_type);
FASTDIFF_DECLARE_SAMPLER_STEP_LOOPS(portable)
FASTDIFF_DECLARE_SAMPLER_STEP_LOOPS(avx2)
FASTDIFF_DECLARE_SAMPLER_STEP_LOOPS(avx512)
#undef FASTDIFF_DECLARE_SAMPLER_STEP_LOOPS

#define FASTDIFF_DEFINE_SAMPLER_STEP_LOOPS(isa) \
  void sampler_step_##isa(const StepBuffers& a, PredType pred_type) { sampler_step_dispatch(a, pred_type); }

namespace {  // one copy per translation unit: the AVX2 and portable builds must not merge

#if defined(_MSC_VER)
#define FASTDIFF_NOINLINE __declspec(noinline)
#else
#define FASTDIFF_NOINLINE __attribute__((noinline))
#endif

alignas(64) constexpr float kZeroBlock[kBlockElems] = {};

// src[0 .. count) of type t as float into dst (zero-padded to kBlockElems).
inline void widen_block(const void* src, PredType t, int count, float* dst) {
  switch (t) {
    case PredType::kFloat: return to_float_block(static_cast<const float*>(src), count, dst);
    case PredType::kHalf: return to_float_block(static_cast<const c10::Half*>(src), count, dst);
    default: return to_float_block(static_cast<const c10::BFloat16*>(src), count, dst);
  }
}

// The vectors of the runtime-count shape, made once per task: at::vec::Vectorized<float> zeroes itself on
// construction, and arrays of the limits' size zeroed per vector cost 5x the step itself (measured,
// AVX-512, 2^22 elements). The fixed shapes keep theirs in registers (ShapeCaps-sized locals).
struct StepLanes {
  at::vec::Vectorized<float> p[kMaxBranches], h[kMaxHistory], z[kMaxDraws];
};

// One vector at element j. Every input is loaded before an output is stored, so an output may be an input.
// kCheck: accumulate p - p into `bad` (0 for finite predictions, NaN for inf and NaN), the finiteness check
// riding on the loads the step makes anyway. kCommon: the run has one output, w0 = 1 (blend skips its
// multiply: the same bits) and a non-zero coefficient for every draw of the out row (combine tests none).
template <bool kSide, bool kCheck, bool kCommon, typename Shape>
inline void sampler_step_vector(const Shape& s, const SampleCoeffs& k, const float* x, const float* const* p,
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
  const Vec g = blend<Vec, kCommon>(s, k, pv);
  const Vec o = combine<Vec, kCommon>(s, k, 0, xv, g, hv, zv);
  if constexpr (kSide) combine<Vec>(s, k, 1, xv, g, hv, zv).store(side + j);
  o.store(outs[0] + j);
  if constexpr (!kCommon) {
    for (int i = 1; i < n_outs; ++i) o.store(outs[i] + j);
  }
}

// The vectors of one block of kBlockElems elements.
template <bool kSide, bool kCheck, bool kCommon, typename Shape>
inline void sampler_step_block(const Shape& s, const SampleCoeffs& k, const float* x, const float* const* p,
                               const float* const* h, const float* const* z, float* const* outs, int n_outs,
                               float* side, at::vec::Vectorized<float>& bad, StepLanes& lanes) {
  using Vec = at::vec::Vectorized<float>;
  using Caps = ShapeCaps<Shape>;
  constexpr int V = Vec::size();
  static_assert(kBlockElems % V == 0, "block must hold whole vectors");
  if constexpr (Caps::kFixed) {
    // Local copies of the pointers: the stores (through may-alias vector types) would otherwise make the
    // compiler reload every pointer from the caller's arrays for every vector.
    const float* pl[Caps::kBranches];
    const float* hl[Caps::kHistory];
    const float* zl[Caps::kDraws];
    float* ol[kMaxOuts];
    for (int i = 0; i < s.branches; ++i) pl[i] = p[i];
    for (int i = 0; i < s.history; ++i) hl[i] = h[i];
    for (int d = 0; d < s.draws; ++d) zl[d] = z[d];
    ol[0] = outs[0];
    if constexpr (!kCommon) {
      for (int i = 1; i < n_outs; ++i) ol[i] = outs[i];
    }
#pragma GCC unroll 8
    for (int j = 0; j < kBlockElems; j += V) {  // locals written before they are read: no zeroing survives
      Vec pv[Caps::kBranches], hv[Caps::kHistory], zv[Caps::kDraws];
      sampler_step_vector<kSide, kCheck, kCommon>(s, k, x, pl, hl, zl, ol, n_outs, side, bad, pv, hv, zv, j);
    }
  } else {
    for (int j = 0; j < kBlockElems; j += V)
      sampler_step_vector<kSide, kCheck, kCommon>(s, k, x, p, h, z, outs, n_outs, side, bad, lanes.p, lanes.h,
                                                  lanes.z, j);
  }
}

// One sample's run of blocks [begin, stop) of a task and where its rows are: filled once per run.
struct StepRun {
  const float* x;
  const char* preds[kMaxBranches];  // K1 rows of pred_bytes-sized elements
  const float* history[kMaxHistory];
  float* outs[kMaxOuts];
  float* side;
  int n_outs;
  int64_t n, begin, stop, full_stop;  // elements per sample; blocks [begin, stop), whole below full_stop
  PredType pred_type;
  int64_t pred_bytes;
  PhiloxKeys keys;
  uint32_t streams[kMaxDraws];
  bool used[kMaxDraws];
  bool clip;  // StepBuffers::clip (side is then nullptr when the side row is computed for the clip alone)
  float clip_c, clip_d;
  // The step statistics (StepBuffers::stats; stats == nullptr without): sample b's rows of its buffers and the
  // task's float64 sums for the sample.
  const StepStats* stats;
  const float* x_ref;
  float* x_keep;
  const float* q_ref;
  float* q_keep;
  double* sums;
};

// A task's block buffers: normals per draw, widened predictions, and the partial block's copies.
struct StepScratch {
  alignas(64) float z[kMaxDraws][kBlockElems];
  alignas(64) float p[kMaxBranches][kBlockElems];
  alignas(64) float h[kMaxHistory][kBlockElems];
  alignas(64) float x[kBlockElems], out[kBlockElems], side[kBlockElems];
};

// The noise of a block, and the widening of a partial block, out of line: one copy per translation unit
// instead of one per walk variant below (a call per block of 64 normals, ~1000 instructions of work).
FASTDIFF_NOINLINE void step_normals(const PhiloxKeys& keys, uint64_t q0, uint32_t stream, float* dst) {
  normal_block(keys, q0, stream, dst);
}
FASTDIFF_NOINLINE void step_widen(const char* src, PredType t, int count, float* dst) {
  widen_block(src, t, count, dst);
}

// clip_sample on one block (StepBuffers::clip), after the step has written it: s the side row's values (the side
// output's block, or scratch), outs[0 .. n_outs) the out copies. s_c = clip_clamp(s), outs = out + d (s_c - s)
// rounded as clip_update (fastdiff/sampler_step.h): the product kept apart by a register barrier (the compiler
// would contract d t + out into an fma at the FMA levels); s = s_c. Elementwise on outputs only (the inputs are
// read already: aliasing is safe); out of line, one copy per translation unit, reached only by clip calls.
FASTDIFF_NOINLINE void step_clip(float* s, float* const* outs, int n_outs, float c, float d) {
  using Vec = at::vec::Vectorized<float>;
  const Vec hi(c), lo(-c), dv(d);
  for (int j = 0; j < kBlockElems; j += Vec::size()) {
    const Vec sv = Vec::loadu(s + j);
    // -c where s < -c, c where s > c, else s (NaN compares false: it stays), as clip_clamp
    const Vec sc = Vec::blendv(Vec::blendv(sv, lo, sv < lo), hi, sv > hi);
    Vec u = dv * (sc - sv);
#if defined(CPU_CAPABILITY_AVX512)
    __m512 r = u;
    asm volatile("" : "+v"(r));
    u = r;
#elif defined(CPU_CAPABILITY_AVX2)
    __m256 r = u;
    asm volatile("" : "+x"(r));
    u = r;
#else
    asm volatile("" : "+m"(u));
#endif
    const Vec o = Vec::loadu(outs[0] + j) + u;
    for (int i = 0; i < n_outs; ++i) o.store(outs[i] + j);
    sc.store(s + j);
  }
}

// Calls fn(j, k) for each picked element e0 + j of [e0, e0 + count) of a sample (StepStats::pick), k its index
// in the subsample: a prefix directly, a strided pick row by row (one division per row of the block).
template <typename Fn>
inline void for_picked(const StepStats& st, int64_t e0, int count, Fn fn) {
  const int64_t end = std::min<int64_t>(e0 + count, st.m);
  if (st.H * st.W == 1) {
    for (int64_t i = e0; i < end; ++i) fn(static_cast<int>(i - e0), i);
    return;
  }
  const int64_t W = st.W, H = st.H, f = st.f, Ws = (W + f - 1) / f, Hs = (H + f - 1) / f;
  for (int64_t i = e0; i < end;) {
    const int64_t r = i / W, h = r % H, row_end = std::min(end, (r + 1) * W);
    if (h % f == 0) {
      const int64_t base = (r / H) * Hs * Ws + (h / f) * Ws;
      for (int64_t w = (i - r * W + f - 1) / f * f; r * W + w < row_end; w += f)
        fn(static_cast<int>(r * W + w - e0), base + w / f);
    }
    i = row_end;
  }
}

// The q statistics of one block, before the step writes it (an output may be exactly a prediction): q the
// prediction run.stats->branch of the block (p, float: the loads' own lines, now in L1), or the blend g for -1
// (recomputed per picked element as blend does: w0 p0, then fma(w_r, p_r - p0, .)). Out of line: one copy per
// translation unit, reached only by calls with statistics.
FASTDIFF_NOINLINE void step_stats_q(const StepRun& run, const SampleCoeffs& k, int branches, const float* const* p,
                                    int64_t e0, int count) {
  const StepStats& st = *run.stats;
  double diff = 0.0, norm = 0.0;
  const int branch = st.branch;
  for_picked(st, e0, count, [&](int j, int64_t idx) {
    float q;
    if (branch >= 0) {
      q = p[branch][j];
    } else {
      const float p0 = p[0][j];
      q = k.w[0] * p0;
      for (int r = 1; r < branches; ++r) q = std::fma(k.w[r], p[r][j] - p0, q);
    }
    if (run.q_ref != nullptr) diff += std::fabs(static_cast<double>(q - run.q_ref[idx]));
    norm += std::fabs(static_cast<double>(q));
    if (run.q_keep != nullptr) run.q_keep[idx] = q;
  });
  run.sums[1] += diff;
  run.sums[2] += norm;
}

// The out statistics of one block, after the step wrote it (out: the block's first output).
FASTDIFF_NOINLINE void step_stats_out(const StepRun& run, const float* out, int64_t e0, int count) {
  double diff = 0.0;
  for_picked(*run.stats, e0, count, [&](int j, int64_t idx) {
    const float o = out[j];
    if (run.x_ref != nullptr) diff += std::fabs(static_cast<double>(o - run.x_ref[idx]));
    if (run.x_keep != nullptr) run.x_keep[idx] = o;
  });
  run.sums[0] += diff;
}

// sums[i] += v[i] for the three columns: tasks that share a sample add their parts (the order varies with the
// thread schedule: the spec leaves it to the backend).
inline void add_stat_sums(double* sums, const double* v) {
  for (int c = 0; c < 3; ++c) {
    if (v[c] == 0.0) continue;
    auto* word = reinterpret_cast<uint64_t*>(sums + c);
    uint64_t seen = __atomic_load_n(word, __ATOMIC_RELAXED), next;
    do {
      double d;
      std::memcpy(&d, &seen, sizeof d);
      d += v[c];
      std::memcpy(&next, &d, sizeof d);
    } while (!__atomic_compare_exchange_n(word, &seen, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  }
}

// The walk over a run's blocks, in the variant the run needs: kCheck the finiteness check, kCommon one
// output, w0 = 1 and non-zero draw coefficients (fixed shapes only). These two are template arguments because
// they pay: with them as runtime tests the ODE step took 1.9x the instructions of 852978a's loop
// (cachegrind, AVX2, fp32, 2^20). The other run-level choices of 852978a (one output, unit w0 and a zero draw
// apart, and each as a template of the whole loop with its noise inlined) made 492 walks per translation
// unit (a 7-minute build); this makes 68 walks (4 per fixed shape and side, 2 for the runtime shape) around
// one noise routine.
template <bool kSide, bool kCheck, bool kCommon, typename Shape>
void sampler_step_walk(const Shape& s, const SampleCoeffs& k, const StepRun& run, StepScratch& buf,
                       at::vec::Vectorized<float>& bad, StepLanes& lanes) {
  using Vec = at::vec::Vectorized<float>;
  // Local copies: the vector stores may alias anything whose address escaped (run, k, bad), so values read
  // through them would be reloaded after every store.
  const SampleCoeffs coeffs = k;
  Vec acc = bad;
  const bool float_pred = run.pred_type == PredType::kFloat;
  const int64_t n = run.n, full_stop = run.full_stop;
  const int n_outs = kCommon ? 1 : run.n_outs;
  const float* x = run.x;
  float* side = run.side;
  const bool clip = run.clip;  // checked once per block
  const float clip_c = run.clip_c, clip_d = run.clip_d;
  const bool stats = run.stats != nullptr;  // checked once per block: blocks past the pick's m skip it
  const bool q_stats = stats && run.stats->branch != kStatsNoQ;
  const int64_t stats_m = stats ? run.stats->m : 0;
  const char* preds[kMaxBranches];
  const float* hist[kMaxHistory];
  float* outs[kMaxOuts];
  const float* p[kMaxBranches];
  const float* h[kMaxHistory];
  const float* z[kMaxDraws];
  float* o[kMaxOuts];
  for (int r = 0; r < s.branches; ++r) preds[r] = run.preds[r];
  for (int r = 0; r < s.history; ++r) hist[r] = run.history[r];
  for (int r = 0; r < run.n_outs; ++r) outs[r] = run.outs[r];
  // An unused draw reads zeros (combine adds a draw only where its coefficient is non-zero).
  for (int d = 0; d < s.draws; ++d) z[d] = run.used[d] ? buf.z[d] : kZeroBlock;
  if (!float_pred)
    for (int r = 0; r < s.branches; ++r) p[r] = buf.p[r];  // widened there block by block
  for (int64_t i = run.begin; i < run.stop; ++i) {
    const int64_t e0 = i * kBlockElems;  // first element of the block within the sample
    for (int d = 0; d < s.draws; ++d)
      if (run.used[d]) step_normals(run.keys, static_cast<uint64_t>(e0 >> 2), run.streams[d], buf.z[d]);
    if (i < full_stop) {  // a whole block, read and written in place
      // 16-bit predictions are widened inline, one type test per block (out of line, or tested per branch,
      // the bf16 ODE step took 1.4x the instructions).
      if (float_pred) {
        for (int r = 0; r < s.branches; ++r) p[r] = reinterpret_cast<const float*>(preds[r]) + e0;
      } else if (run.pred_type == PredType::kBFloat16) {
        for (int r = 0; r < s.branches; ++r)
          to_float_block(reinterpret_cast<const c10::BFloat16*>(preds[r]) + e0, kBlockElems, buf.p[r]);
      } else {
        for (int r = 0; r < s.branches; ++r)
          to_float_block(reinterpret_cast<const c10::Half*>(preds[r]) + e0, kBlockElems, buf.p[r]);
      }
      for (int r = 0; r < s.history; ++r) h[r] = hist[r] + e0;
      for (int r = 0; r < n_outs; ++r) o[r] = outs[r] + e0;
      // the side row's block: the side output's, or scratch for a clip without one (side_row)
      float* side_block = kSide ? (side != nullptr ? side + e0 : buf.side) : nullptr;
      const bool stats_here = stats && e0 < stats_m;
      if (stats_here && q_stats) step_stats_q(run, coeffs, s.branches, p, e0, kBlockElems);
      sampler_step_block<kSide, kCheck, kCommon>(s, coeffs, x + e0, p, h, z, o, n_outs, side_block, acc, lanes);
      if (kSide && clip) step_clip(side_block, o, n_outs, clip_c, clip_d);
      if (stats_here) step_stats_out(run, o[0], e0, kBlockElems);
    } else {
      // The partial last block: every input is copied before anything is written (an output may be an input).
      const int count = static_cast<int>(n - e0);
      for (int r = 0; r < s.branches; ++r) {
        step_widen(preds[r] + e0 * run.pred_bytes, run.pred_type, count, buf.p[r]);
        p[r] = buf.p[r];
      }
      to_float_block(x + e0, count, buf.x);
      for (int r = 0; r < s.history; ++r) {
        to_float_block(hist[r] + e0, count, buf.h[r]);
        h[r] = buf.h[r];
      }
      float* local_out = buf.out;
      const bool stats_here = stats && e0 < stats_m;
      if (stats_here && q_stats) step_stats_q(run, coeffs, s.branches, p, e0, count);
      sampler_step_block<kSide, kCheck, kCommon>(s, coeffs, buf.x, p, h, z, &local_out, 1, buf.side, acc, lanes);
      if (kSide && clip) step_clip(buf.side, &local_out, 1, clip_c, clip_d);
      if (stats_here) step_stats_out(run, buf.out, e0, count);
      for (int r = 0; r < run.n_outs; ++r) std::memcpy(run.outs[r] + e0, buf.out, sizeof(float) * count);
      if (kSide && side != nullptr) std::memcpy(side + e0, buf.side, sizeof(float) * count);
    }
  }
  bad = acc;
}

// Blocks of kBlockElems elements of one sample each (one normal_block of noise per draw), spread over threads.
template <bool kSide, typename Shape>
void sampler_step_rows(const StepBuffers& a, const Shape s, const PredType pred_type) {
  using Vec = at::vec::Vectorized<float>;
  const int64_t blocks = (a.n + kBlockElems - 1) / kBlockElems;  // per sample
  // Blocks per task: with noise ~4096 elements (as randn: the normals dominate); without, the step
  // is memory-bound and ~32768 elements (ATen's GRAIN_SIZE) amortize the scheduling.
  const int64_t grain = a.any_draw() ? 128 : 1024;
  at::parallel_for(0, a.B * blocks, grain, [&](int64_t begin, int64_t end) {
    const bool check_finite = a.finite != nullptr;
    StepScratch buf;
    StepRun run;
    run.n = a.n;
    run.n_outs = a.n_outs;
    run.pred_type = pred_type;
    run.pred_bytes = pred_type == PredType::kFloat ? 4 : 2;
    run.clip = a.clip;
    run.clip_c = a.clip_c;
    run.clip_d = a.clip_d;
    for (int d = 0; d < s.draws; ++d) run.streams[d] = a.streams[d];
    SampleCoeffs k = a.host;
    int64_t b = begin / blocks;
    int64_t blk = begin - b * blocks;
    int64_t loaded = -1;  // the sample whose per-sample coefficients are in k
    Vec bad(0.0f);
    StepLanes lanes;
    const StepStats* stats = a.stats.on() ? &a.stats : nullptr;
    double stat_sums[3] = {0.0, 0.0, 0.0};
    run.stats = stats;
    run.sums = stat_sums;
    auto flush_stats = [&](int64_t sample) {
      if (stats != nullptr) {
        add_stat_sums(stats->sums + 3 * sample, stat_sums);
        stat_sums[0] = stat_sums[1] = stat_sums[2] = 0.0;
      }
    };
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
              for (int j = 0; j < m; ++j) k.c[r][coeff_column(s.history, j)] = a.sample_coeffs[b * 2 * m + r * m + j];
          }
          loaded = b;
        }
      }
      for (int d = 0; d < s.draws; ++d)
        run.used[d] = a.sample_coeffs != nullptr ? draw_used(s, k, d, kSide) : a.draws_used[d];
      const int64_t row = b * a.n;
      run.begin = blk;
      run.stop = std::min(blocks, blk + (end - job));     // this task's blocks of sample b
      run.full_stop = std::min(run.stop, a.n / kBlockElems);  // the whole blocks among them
      run.keys = philox_keys(static_cast<uint64_t>(a.seeds[b]));
      run.x = a.x + row;
      run.side = kSide && a.side != nullptr ? a.side + row : nullptr;
      for (int r = 0; r < s.branches; ++r) run.preds[r] = static_cast<const char*>(a.preds[r]) + row * run.pred_bytes;
      for (int r = 0; r < s.history; ++r) run.history[r] = a.history[r] + row;
      for (int r = 0; r < a.n_outs; ++r) run.outs[r] = a.outs[r] + row;
      if (stats != nullptr) {
        const int64_t srow = b * stats->S;
        run.x_ref = stats->x_ref != nullptr ? stats->x_ref + srow : nullptr;
        run.x_keep = stats->x_keep != nullptr ? stats->x_keep + srow : nullptr;
        run.q_ref = stats->q_ref != nullptr ? stats->q_ref + srow : nullptr;
        run.q_keep = stats->q_keep != nullptr ? stats->q_keep + srow : nullptr;
      }
      bool common = ShapeCaps<Shape>::kFixed && a.n_outs == 1 && k.w[0] == 1.0f;
      for (int d = 0; d < s.draws; ++d) common = common && k.c[0][kDrawColumn + d] != 0.0f;
      with_bool(check_finite, [&](auto check) {
        if constexpr (ShapeCaps<Shape>::kFixed) {
          if (common) {
            sampler_step_walk<kSide, decltype(check)::value, true>(s, k, run, buf, bad, lanes);
            return;
          }
        }
        sampler_step_walk<kSide, decltype(check)::value, false>(s, k, run, buf, bad, lanes);
      });
      job += run.stop - blk;
      blk = run.stop;
      if (blk == blocks) {
        flush_finite(b);
        flush_stats(b);
        blk = 0;
        ++b;
      }
    }
    if (blk != 0) {  // the task ended inside sample b
      flush_finite(b);
      flush_stats(b);
    }
  });
}

// Instantiations: side or not, times the common shapes with compile-time counts (8) plus one with runtime
// counts (with_step_shape, dispatch.h): 18 bodies per translation unit.
inline void sampler_step_dispatch(const StepBuffers& a, PredType pred_type) {
  if (a.B == 0 || a.n == 0) return;
  with_bool(a.side_row(), [&](auto side) {  // the side row: for the side output, or for the clip
    with_step_shape(a.shape, [&](auto shape) { sampler_step_rows<decltype(side)::value>(a, shape, pred_type); });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff
