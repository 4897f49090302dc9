// Vectorized spec-v1 normals for the CPU backend. Included by randn.cpp (portable build) and by
// avx2/randn.cpp (compiled with -mavx2 -mfma -DCPU_CAPABILITY=AVX2), so the same source becomes a
// baseline and an AVX2 kernel; at::vec picks its implementation from CPU_CAPABILITY.
//
// Philox runs on 8 groups as 8 AVX2 lanes (scalar in the portable build); the log/sqrt/sin/cos of
// Box–Muller run in at::vec::Vectorized<float> (Sleef under AVX2). Measured on the 2-core dev machine (N = 2^22): a scalar loop takes 23–34 ms, the
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

#if defined(CPU_CAPABILITY_AVX2)
// hi:lo = a * m for 8 uint32 lanes; m_odd holds m in the low half of each 64-bit lane.
inline void mulhilo8(__m256i a, __m256i m, __m256i m_odd, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                          // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m_odd);  // lanes 1, 3, 5, 7
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// (x[0] y[0] x[1] y[1] | x[2] y[2] x[3] y[3]) and (x[4] y[4] ... ) for 8 uint32 lanes.
inline void interleave8(__m256i x, __m256i y, uint32_t* dst) {
  const __m256i lo = _mm256_unpacklo_epi32(x, y);
  const __m256i hi = _mm256_unpackhi_epi32(x, y);
  _mm256_store_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute2x128_si256(lo, hi, 0x20));
  _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
}
#endif

// Philox words of groups q0 .. q0 + 7 in pair order (see normal_block). The scalar loop does not
// auto-vectorize (32x32->64 multiplies); under AVX2 the 8 groups run as 8 lanes, ~3x faster.
inline void philox_block(uint64_t seed, uint64_t q0, uint32_t stream, uint32_t* wa, uint32_t* wb) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q0)));
  __m256i c0 = _mm256_add_epi32(base_lo, lane);
  // carry into the high word where the low word wrapped (unsigned c0 < lane index)
  const __m256i bias = _mm256_set1_epi32(INT32_MIN);
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(lane, bias), _mm256_xor_si256(c0, bias));
  __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q0 >> 32))), wrapped);
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(stream));
  __m256i c3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i m0_odd = _mm256_srli_epi64(m0, 32), m1_odd = _mm256_srli_epi64(m1, 32);
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(c0, m0, m0_odd, &hi0, &lo0);
    mulhilo8(c2, m1, m1_odd, &hi1, &lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  interleave8(c0, c2, wa);
  interleave8(c1, c3, wb);
#else
  for (int j = 0; j < kBlockGroups; ++j) {
    const Philox4 w = noise_words(seed, q0 + j, stream);
    wa[2 * j] = w.w[0];
    wb[2 * j] = w.w[1];
    wa[2 * j + 1] = w.w[2];
    wb[2 * j + 1] = w.w[3];
  }
#endif
}

// For V pairs: the argument whose log is ln u(first) (see log_uniform in philox.h), the log1p
// argument x (0 marks the plain-log lanes) and v = u(second) - 1/2. m < 2^24, so the int32
// conversions are exact. Branch-free: the choice is a coin flip per pair, and the scalar loop's
// mispredicted branches cost more than Philox itself (21 vs 6 ms per 2^22 normals, measured).
inline void prepare_pairs(const uint32_t* wa, const uint32_t* wb, at::vec::Vectorized<float>* a,
                          at::vec::Vectorized<float>* x, at::vec::Vectorized<float>* v) {
  using Vec = at::vec::Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX2)
  static_assert(Vec::size() == 8, "AVX2 lanes");
  const __m256 scale = _mm256_set1_ps(2.98023223876953125e-08f);  // 2^-25
  const __m256i m = _mm256_srli_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(wa)), 8);
  const __m256i upper = _mm256_cmpgt_epi32(m, _mm256_set1_epi32((1 << 23) - 1));
  const __m256i two_m1 = _mm256_add_epi32(_mm256_slli_epi32(m, 1), _mm256_set1_epi32(1));
  const __m256 lower_arg = _mm256_mul_ps(_mm256_cvtepi32_ps(two_m1), scale);
  // 2 (2^24 - 1 - m) + 1 = 2^25 - 1 - 2m = 2^25 - (2m + 1)
  const __m256 xu = _mm256_mul_ps(
      _mm256_cvtepi32_ps(_mm256_sub_epi32(two_m1, _mm256_set1_epi32(1 << 25))), scale);  // -(1 - u)
  const __m256 up = _mm256_castsi256_ps(upper);
  *a = Vec(_mm256_blendv_ps(lower_arg, _mm256_add_ps(_mm256_set1_ps(1.0f), xu), up));
  *x = Vec(_mm256_and_ps(xu, up));
  const __m256i mb = _mm256_srli_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(wb)), 8);
  const __m256i centered = _mm256_sub_epi32(_mm256_add_epi32(_mm256_slli_epi32(mb, 1), _mm256_set1_epi32(1)),
                                            _mm256_set1_epi32(1 << 24));
  *v = Vec(_mm256_mul_ps(_mm256_cvtepi32_ps(centered), scale));
#else
  constexpr int V = Vec::size();
  alignas(64) float av[V], xv[V], vv[V];
  for (int p = 0; p < V; ++p) {
    const int32_t m = static_cast<int32_t>(wa[p] >> 8);
    const bool upper = m >= (1 << 23);
    const float lower_arg = static_cast<float>(2 * m + 1) * 2.98023223876953125e-08f;
    const float xu = -static_cast<float>(2 * ((1 << 24) - 1 - m) + 1) * 2.98023223876953125e-08f;
    av[p] = upper ? 1.0f + xu : lower_arg;
    xv[p] = upper ? xu : 0.0f;
    vv[p] = static_cast<float>(2 * static_cast<int32_t>(wb[p] >> 8) + 1 - (1 << 24)) * 2.98023223876953125e-08f;
  }
  *a = Vec::loadu(av);
  *x = Vec::loadu(xv);
  *v = Vec::loadu(vv);
#endif
}

// Normals of groups q0 .. q0 + 7 (elements 4 q0 .. 4 q0 + 31) into dst[0..31].
inline void normal_block(uint64_t seed, uint64_t q0, uint32_t stream, float* dst) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int V = Vec::size();
  static_assert(kBlockPairs % V == 0, "block must hold whole vectors");

  // Words of the block in pair order: pair p = 2 j + h of group j uses (wa[p], wb[p]) =
  // (w[2h], w[2h + 1]) of that group's Philox output.
  alignas(64) uint32_t wa[kBlockPairs];
  alignas(64) uint32_t wb[kBlockPairs];
  philox_block(seed, q0, stream, wa, wb);

  const Vec zero(0.0f), one(1.0f), minus_two(-2.0f), two_pi(6.283185307179586f);
  for (int p = 0; p < kBlockPairs; p += V) {
    Vec a, x, v;
    prepare_pairs(wa + p, wb + p, &a, &x, &v);
    const Vec log_a = a.log();
    // log1p_from_log: x where 1 + x rounded to 1, else log(y) * x / (y - 1); plain log where x == 0.
    const Vec d = a - one;
    const Vec corrected = Vec::blendv(log_a * (x / d), x, d == zero);
    const Vec L = Vec::blendv(corrected, log_a, x == zero);
    const Vec r = (minus_two * L).sqrt();
    const Vec theta = two_pi * v;
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
