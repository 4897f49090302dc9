// Vectorized spec-v1 normals for the CPU backend. Included by randn.cpp (portable build) and by
// avx2/randn.cpp (compiled with -mavx2 -mfma -DCPU_CAPABILITY=AVX2), so the same source becomes a
// baseline and an AVX2 kernel; at::vec picks its implementation from CPU_CAPABILITY.
//
// Philox runs per group in scalar code (GCC vectorizes the 32x32->64 multiplies under AVX2); the
// log/sqrt/sin/cos of Box–Muller, which dominate, run in at::vec::Vectorized<float> (Sleef under
// AVX2). Measured on the 2-core dev machine (N = 2^22): a scalar loop takes 23–34 ms, the
// vectorized one 10–12 ms (DESIGN.md §7).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "fastdiff/philox.h"

namespace fastdiff {
namespace cpu {
namespace {  // one copy per translation unit: the AVX2 and portable builds must not merge

constexpr int kBlockGroups = 8;                 // groups of 4 elements per block
constexpr int kBlockElems = 4 * kBlockGroups;   // 32 normals per block
constexpr int kBlockPairs = 2 * kBlockGroups;   // Box–Muller pairs per block

// Normals of groups q0 .. q0 + 7 (elements 4 q0 .. 4 q0 + 31) into dst[0..31].
inline void normal_block(uint64_t seed, uint64_t q0, uint32_t stream, float* dst) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int V = Vec::size();
  static_assert(kBlockPairs % V == 0, "block must hold whole vectors");

  // Per pair p: the argument whose log is ln u(first) (see log_uniform in philox.h), whether the
  // log1p form applies, and v = u(second) - 1/2.
  alignas(64) float arg[kBlockPairs];
  alignas(64) float x1p[kBlockPairs];
  alignas(64) float v[kBlockPairs];
  for (int j = 0; j < kBlockGroups; ++j) {
    const Philox4 w = noise_words(seed, q0 + j, stream);
    for (int h = 0; h < 2; ++h) {
      const int p = 2 * j + h;
      const uint32_t m = w.w[2 * h] >> 8;
      const bool upper = m >= (1u << 23);
      const float lower_arg = static_cast<float>(2u * m + 1u) * 2.98023223876953125e-08f;
      const float x = -static_cast<float>(2u * ((1u << 24) - 1u - m) + 1u) * 2.98023223876953125e-08f;
      arg[p] = upper ? 1.0f + x : lower_arg;
      x1p[p] = upper ? x : 0.0f;  // 0 marks the plain-log lanes
      v[p] = centered_uniform<float>(w.w[2 * h + 1]);
    }
  }
  const Vec zero(0.0f), one(1.0f), minus_two(-2.0f), two_pi(6.283185307179586f);
  for (int p = 0; p < kBlockPairs; p += V) {
    const Vec a = Vec::loadu(arg + p);
    const Vec x = Vec::loadu(x1p + p);
    const Vec log_a = a.log();
    // log1p_from_log: x where 1 + x rounded to 1, else log(y) * x / (y - 1); plain log where x == 0.
    const Vec d = a - one;
    const Vec corrected = Vec::blendv(log_a * (x / d), x, d == zero);
    const Vec L = Vec::blendv(corrected, log_a, x == zero);
    const Vec r = (minus_two * L).sqrt();
    const Vec theta = two_pi * Vec::loadu(v + p);
    const Vec xs = zero - r * theta.cos();
    const Vec ys = zero - r * theta.sin();
    const auto xy = at::vec::interleave2<float>(xs, ys);
    xy.first.store(dst + 2 * p);
    xy.second.store(dst + 2 * p + V);
  }
}

// out[b, i] = element offset + i of seed seeds[b]'s stream; converts from float on store.
template <typename scalar_t>
void randn_blocks(const int64_t* seeds,  // [B]
                  int64_t B, uint32_t stream, int64_t n, int64_t offset,
                  scalar_t* out) {  // [B, n]
  if (B == 0 || n == 0) return;
  const int64_t q_begin = offset >> 2;
  const int64_t q_end = (offset + n + 3) >> 2;
  const int64_t blocks = (q_end - q_begin + kBlockGroups - 1) / kBlockGroups;
  // ~4096 normals per task: large enough to amortize scheduling, small enough to balance 2+ threads.
  at::parallel_for(0, B * blocks, 128, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kBlockElems];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / blocks;
      const int64_t q0 = q_begin + (job % blocks) * kBlockGroups;
      const int64_t e0 = 4 * q0;  // first element of the block
      const int64_t lo = std::max<int64_t>(e0, offset);
      const int64_t hi = std::min<int64_t>(e0 + kBlockElems, offset + n);
      scalar_t* row = out + b * n - offset;  // row[e] is element e of sample b
      const uint64_t seed = static_cast<uint64_t>(seeds[b]);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (lo == e0 && hi == e0 + kBlockElems) {
          normal_block(seed, static_cast<uint64_t>(q0), stream, row + e0);
          continue;
        }
      }
      normal_block(seed, static_cast<uint64_t>(q0), stream, buf);
      for (int64_t e = lo; e < hi; ++e) row[e] = static_cast<scalar_t>(buf[e - e0]);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff
