// Vectorized spec-v1 normals for the CPU backend, compiled once per instruction set (simd.h): by
// randn.cpp (portable), avx2/randn.cpp and avx512/randn.cpp; at::vec picks its implementation from
// CPU_CAPABILITY.
//
// Philox runs as two chains of 8 (AVX2) or 16 (AVX-512) lanes, scalar in the portable build; the
// log/sqrt/sin/cos of Box–Muller are written out for 8 and 16 lanes (the same operations in the same
// order, so AVX2 and AVX-512 give bitwise equal normals) and use at::vec's Sleef in the portable build.
// Measured single-threaded per 2^22 normals on the dev machine (Xeon, Sapphire Rapids class): a
// scalar loop 23–34 ms, Sleef in at::vec 10–12 ms, the AVX2 code below 9.3 ms, AVX-512 6.3 ms.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "fastdiff/philox.h"

namespace fastdiff {
namespace cpu {
namespace {  // one copy per translation unit: the per-ISA builds must not merge

// Groups of 4 elements per block: two independent Philox chains of 8 (AVX2, portable) or 16 (AVX-512)
// lanes. One chain is latency-bound (~50 ns per 8 groups single-threaded); two interleaved ones fill
// the multiplier's pipeline.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kBlockGroups = 32;
#else
constexpr int kBlockGroups = 16;
#endif
constexpr int kBlockElems = 4 * kBlockGroups;   // 64 (128) normals per block
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

#if defined(CPU_CAPABILITY_AVX512)
// hi:lo = a * m for 16 uint32 lanes; m_odd holds m in the low half of each 64-bit lane.
inline void mulhilo16(__m512i a, __m512i m, __m512i m_odd, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                          // lanes 0, 2, ..., 14
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m_odd);  // lanes 1, 3, ..., 15
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// x[0] y[0] x[1] y[1] ... x[15] y[15] into dst[0 .. 32).
inline void interleave16(__m512i x, __m512i y, uint32_t* dst) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  _mm512_store_si512(dst, _mm512_permutex2var_epi32(x, lo, y));
  _mm512_store_si512(dst + 16, _mm512_permutex2var_epi32(x, hi, y));
}
#endif

// The Philox key schedule of one seed (its 10 round keys), made once per sample by the loops rather than per
// block: recomputing and broadcasting the keys took ~60 of the ~1000 instructions of an AVX2 block
// (cachegrind, sampler_step at 2^20 elements).
struct PhiloxKeys {
  uint64_t seed;
  uint32_t k0[10], k1[10];
};

inline PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys keys;
  keys.seed = seed;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    keys.k0[round] = k0;
    keys.k1[round] = k1;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return keys;
}

// Philox words of groups q0 .. q0 + 15 in pair order (see normal_block). The scalar loop does not
// auto-vectorize (32x32->64 multiplies); under AVX2 the groups run as 2 x 8 lanes.
inline void philox_block(const PhiloxKeys& keys, uint64_t q0, uint32_t stream, uint32_t* wa, uint32_t* wb) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(kBlockGroups == 32, "two chains of 16 lanes");
  const __m512i q_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(q0 >> 32)));
  const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(q0)));
  __m512i c0[2], c1[2], c2[2], c3[2];
  for (int h = 0; h < 2; ++h) {
    const __m512i lane = _mm512_add_epi32(_mm512_set1_epi32(16 * h),
                                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    c0[h] = _mm512_add_epi32(base_lo, lane);
    // carry into the high word where the low word wrapped (unsigned c0 < lane index)
    const __mmask16 wrapped = _mm512_cmplt_epu32_mask(c0[h], lane);
    c1[h] = _mm512_mask_add_epi32(q_hi, wrapped, q_hi, _mm512_set1_epi32(1));
    c2[h] = _mm512_set1_epi32(static_cast<int>(stream));
    c3[h] = _mm512_setzero_si512();
  }
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i m0_odd = _mm512_srli_epi64(m0, 32), m1_odd = _mm512_srli_epi64(m1, 32);
  for (int round = 0; round < 10; ++round) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(keys.k0[round]));
    const __m512i key1 = _mm512_set1_epi32(static_cast<int>(keys.k1[round]));
    for (int h = 0; h < 2; ++h) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0[h], m0, m0_odd, &hi0, &lo0);
      mulhilo16(c2[h], m1, m1_odd, &hi1, &lo1);
      c0[h] = _mm512_ternarylogic_epi32(hi1, c1[h], key0, 0x96);  // hi1 ^ c1 ^ key0
      c1[h] = lo1;
      c2[h] = _mm512_ternarylogic_epi32(hi0, c3[h], key1, 0x96);
      c3[h] = lo0;
    }
  }
  for (int h = 0; h < 2; ++h) {
    interleave16(c0[h], c2[h], wa + 32 * h);
    interleave16(c1[h], c3[h], wb + 32 * h);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  static_assert(kBlockGroups == 16, "two chains of 8 lanes");
  const __m256i bias = _mm256_set1_epi32(INT32_MIN);
  const __m256i q_hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q0 >> 32)));
  const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(q0)));
  __m256i c0[2], c1[2], c2[2], c3[2];
  for (int h = 0; h < 2; ++h) {
    const __m256i lane = _mm256_setr_epi32(8 * h, 8 * h + 1, 8 * h + 2, 8 * h + 3, 8 * h + 4, 8 * h + 5, 8 * h + 6,
                                           8 * h + 7);
    c0[h] = _mm256_add_epi32(base_lo, lane);
    // carry into the high word where the low word wrapped (unsigned c0 < lane index)
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(lane, bias), _mm256_xor_si256(c0[h], bias));
    c1[h] = _mm256_sub_epi32(q_hi, wrapped);
    c2[h] = _mm256_set1_epi32(static_cast<int>(stream));
    c3[h] = _mm256_setzero_si256();
  }
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i m0_odd = _mm256_srli_epi64(m0, 32), m1_odd = _mm256_srli_epi64(m1, 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(keys.k0[round]));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(keys.k1[round]));
    for (int h = 0; h < 2; ++h) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0[h], m0, m0_odd, &hi0, &lo0);
      mulhilo8(c2[h], m1, m1_odd, &hi1, &lo1);
      c0[h] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[h]), key0);
      c1[h] = lo1;
      c2[h] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[h]), key1);
      c3[h] = lo0;
    }
  }
  for (int h = 0; h < 2; ++h) {
    interleave8(c0[h], c2[h], wa + 16 * h);
    interleave8(c1[h], c3[h], wb + 16 * h);
  }
#else
  for (int j = 0; j < kBlockGroups; ++j) {
    const Philox4 w = noise_words(keys.seed, q0 + j, stream);
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
#if !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
inline void prepare_pairs(const uint32_t* wa, const uint32_t* wb, at::vec::Vectorized<float>* a,
                          at::vec::Vectorized<float>* x, at::vec::Vectorized<float>* v) {
  using Vec = at::vec::Vectorized<float>;
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
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// ln u(w) for 8 lanes from exact arguments (see log_uniform in philox.h): for u < 1/2,
// a = (2m + 1) 2^-25 = 2^e (1 + f) with 1 + f in [sqrt(1/2), sqrt(2)); for u >= 1/2, e = 0 and
// f = -(1 - u), exact. Then ln u = e ln 2 + log1p(f), log1p(f) = 2 atanh(f / (2 + f)) by its series
// (|s| <= 1/3, 7 terms: truncation < 2e-8 relative). Written out instead of Sleef's log: the three
// Sleef calls per pair cost ~3/4 of the noise time (measured: 19 ms of ~21 per 2^22 normals).
inline __m256 log_uniform8(__m256i w) {
  const __m256i m = _mm256_srli_epi32(w, 8);
  const __m256 scale = _mm256_set1_ps(2.98023223876953125e-08f);  // 2^-25
  const __m256i upper = _mm256_cmpgt_epi32(m, _mm256_set1_epi32((1 << 23) - 1));
  const __m256i two_m1 = _mm256_add_epi32(_mm256_slli_epi32(m, 1), _mm256_set1_epi32(1));
  // lower half: split a's bits around sqrt(1/2) (0x3f3504f3) so the mantissa lands in [sqrt(1/2), sqrt(2))
  const __m256i a_bits = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(two_m1), scale));
  const __m256i shifted = _mm256_sub_epi32(a_bits, _mm256_set1_epi32(0x3f3504f3));
  const __m256i e = _mm256_srai_epi32(shifted, 23);
  const __m256 mant = _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_and_si256(shifted, _mm256_set1_epi32(0x7fffff)), _mm256_set1_epi32(0x3f3504f3)));
  const __m256 f_lower = _mm256_sub_ps(mant, _mm256_set1_ps(1.0f));  // exact (Sterbenz)
  // upper half: f = -(2^25 - (2m + 1)) 2^-25
  const __m256 f_upper = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(two_m1, _mm256_set1_epi32(1 << 25))), scale);
  const __m256 up = _mm256_castsi256_ps(upper);
  const __m256 f = _mm256_blendv_ps(f_lower, f_upper, up);
  const __m256 ef = _mm256_andnot_ps(up, _mm256_cvtepi32_ps(e));
  const __m256 s = _mm256_div_ps(f, _mm256_add_ps(_mm256_set1_ps(2.0f), f));
  const __m256 z = _mm256_mul_ps(s, s);
  // 1/3 + z/5 + … + z^5/13 in Estrin's form: half the dependent latency of Horner's
  const __m256 z2 = _mm256_mul_ps(z, z);
  const __m256 pa = _mm256_fmadd_ps(z, _mm256_set1_ps(1.0f / 5.0f), _mm256_set1_ps(1.0f / 3.0f));
  const __m256 pb = _mm256_fmadd_ps(z, _mm256_set1_ps(1.0f / 9.0f), _mm256_set1_ps(1.0f / 7.0f));
  const __m256 pc = _mm256_fmadd_ps(z, _mm256_set1_ps(1.0f / 13.0f), _mm256_set1_ps(1.0f / 11.0f));
  const __m256 p = _mm256_fmadd_ps(_mm256_mul_ps(z2, z2), pc, _mm256_fmadd_ps(z2, pb, pa));
  const __m256 two_s = _mm256_add_ps(s, s);
  const __m256 log1p = _mm256_fmadd_ps(_mm256_mul_ps(two_s, z), p, two_s);
  return _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693147180559945309f), log1p);
}

// (cos, sin) of 2 pi u(w) for 8 lanes. c = 2m + 1 - 2^24 = (u - 1/2) 2^25 is an exact odd integer;
// with k = round(c / 2^23) the remainder c - k 2^23 in [-2^22, 2^22] is exact and
// 2 pi u = phi + (k + 2) pi / 2 with phi in [-pi/4, pi/4], where Taylor polynomials of degree 9
// (sin) and 8 (cos) are accurate to 2e-9 and 3e-8; the quadrant swaps and negates.
inline void cos_sin_uniform8(__m256i w, __m256* c_out, __m256* s_out) {
  const __m256i m = _mm256_srli_epi32(w, 8);
  const __m256i c = _mm256_sub_epi32(_mm256_add_epi32(_mm256_slli_epi32(m, 1), _mm256_set1_epi32(1)),
                                     _mm256_set1_epi32(1 << 24));
  const __m256i k = _mm256_srai_epi32(_mm256_add_epi32(c, _mm256_set1_epi32(1 << 22)), 23);
  const __m256i rem = _mm256_sub_epi32(c, _mm256_slli_epi32(k, 23));
  const __m256 phi = _mm256_mul_ps(_mm256_cvtepi32_ps(rem), _mm256_set1_ps(1.8725351414619535e-07f));  // 2 pi 2^-25
  const __m256 p2 = _mm256_mul_ps(phi, phi);
  const __m256 p4 = _mm256_mul_ps(p2, p2);
  const __m256 sp = _mm256_fmadd_ps(p4, _mm256_fmadd_ps(p2, _mm256_set1_ps(1.0f / 362880.0f), _mm256_set1_ps(-1.0f / 5040.0f)),
                                    _mm256_fmadd_ps(p2, _mm256_set1_ps(1.0f / 120.0f), _mm256_set1_ps(-1.0f / 6.0f)));
  const __m256 sin_phi = _mm256_fmadd_ps(_mm256_mul_ps(phi, p2), sp, phi);
  const __m256 cp = _mm256_fmadd_ps(p4, _mm256_fmadd_ps(p2, _mm256_set1_ps(1.0f / 40320.0f), _mm256_set1_ps(-1.0f / 720.0f)),
                                    _mm256_fmadd_ps(p2, _mm256_set1_ps(1.0f / 24.0f), _mm256_set1_ps(-0.5f)));
  const __m256 cos_phi = _mm256_fmadd_ps(cp, p2, _mm256_set1_ps(1.0f));
  // quadrant q = k + 2: (cos, sin)(phi + q pi/2) = q odd ? (-sin, cos) : (cos, sin), then signs
  const __m256i q = _mm256_add_epi32(k, _mm256_set1_epi32(2));
  const __m256 odd = _mm256_castsi256_ps(_mm256_slli_epi32(q, 31));  // sign bit set where q is odd
  const __m256 cs = _mm256_blendv_ps(cos_phi, sin_phi, odd);
  const __m256 sn = _mm256_blendv_ps(sin_phi, cos_phi, odd);
  const __m256i sign_mask = _mm256_set1_epi32(2);
  const __m256 neg_c = _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_and_si256(_mm256_add_epi32(q, _mm256_set1_epi32(1)), sign_mask), 30));
  const __m256 neg_s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(q, sign_mask), 30));
  *c_out = _mm256_xor_ps(cs, neg_c);
  *s_out = _mm256_xor_ps(sn, neg_s);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// log_uniform8 and cos_sin_uniform8 (below) on 16 lanes: the same operations in the same order.
inline __m512 log_uniform16(__m512i w) {
  const __m512i m = _mm512_srli_epi32(w, 8);
  const __m512 scale = _mm512_set1_ps(2.98023223876953125e-08f);  // 2^-25
  const __mmask16 upper = _mm512_cmpgt_epi32_mask(m, _mm512_set1_epi32((1 << 23) - 1));
  const __m512i two_m1 = _mm512_add_epi32(_mm512_slli_epi32(m, 1), _mm512_set1_epi32(1));
  const __m512i a_bits = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(two_m1), scale));
  const __m512i shifted = _mm512_sub_epi32(a_bits, _mm512_set1_epi32(0x3f3504f3));
  const __m512i e = _mm512_srai_epi32(shifted, 23);
  const __m512 mant = _mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_and_si512(shifted, _mm512_set1_epi32(0x7fffff)), _mm512_set1_epi32(0x3f3504f3)));
  const __m512 f_lower = _mm512_sub_ps(mant, _mm512_set1_ps(1.0f));
  const __m512 f_upper = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(two_m1, _mm512_set1_epi32(1 << 25))), scale);
  const __m512 f = _mm512_mask_blend_ps(upper, f_lower, f_upper);
  const __m512 ef = _mm512_maskz_mov_ps(static_cast<__mmask16>(~upper), _mm512_cvtepi32_ps(e));
  const __m512 s = _mm512_div_ps(f, _mm512_add_ps(_mm512_set1_ps(2.0f), f));
  const __m512 z = _mm512_mul_ps(s, s);
  const __m512 z2 = _mm512_mul_ps(z, z);
  const __m512 pa = _mm512_fmadd_ps(z, _mm512_set1_ps(1.0f / 5.0f), _mm512_set1_ps(1.0f / 3.0f));
  const __m512 pb = _mm512_fmadd_ps(z, _mm512_set1_ps(1.0f / 9.0f), _mm512_set1_ps(1.0f / 7.0f));
  const __m512 pc = _mm512_fmadd_ps(z, _mm512_set1_ps(1.0f / 13.0f), _mm512_set1_ps(1.0f / 11.0f));
  const __m512 p = _mm512_fmadd_ps(_mm512_mul_ps(z2, z2), pc, _mm512_fmadd_ps(z2, pb, pa));
  const __m512 two_s = _mm512_add_ps(s, s);
  const __m512 log1p = _mm512_fmadd_ps(_mm512_mul_ps(two_s, z), p, two_s);
  return _mm512_fmadd_ps(ef, _mm512_set1_ps(0.693147180559945309f), log1p);
}

inline void cos_sin_uniform16(__m512i w, __m512* c_out, __m512* s_out) {
  const __m512i m = _mm512_srli_epi32(w, 8);
  const __m512i c = _mm512_sub_epi32(_mm512_add_epi32(_mm512_slli_epi32(m, 1), _mm512_set1_epi32(1)),
                                     _mm512_set1_epi32(1 << 24));
  const __m512i k = _mm512_srai_epi32(_mm512_add_epi32(c, _mm512_set1_epi32(1 << 22)), 23);
  const __m512i rem = _mm512_sub_epi32(c, _mm512_slli_epi32(k, 23));
  const __m512 phi = _mm512_mul_ps(_mm512_cvtepi32_ps(rem), _mm512_set1_ps(1.8725351414619535e-07f));  // 2 pi 2^-25
  const __m512 p2 = _mm512_mul_ps(phi, phi);
  const __m512 p4 = _mm512_mul_ps(p2, p2);
  const __m512 sp = _mm512_fmadd_ps(p4, _mm512_fmadd_ps(p2, _mm512_set1_ps(1.0f / 362880.0f), _mm512_set1_ps(-1.0f / 5040.0f)),
                                    _mm512_fmadd_ps(p2, _mm512_set1_ps(1.0f / 120.0f), _mm512_set1_ps(-1.0f / 6.0f)));
  const __m512 sin_phi = _mm512_fmadd_ps(_mm512_mul_ps(phi, p2), sp, phi);
  const __m512 cp = _mm512_fmadd_ps(p4, _mm512_fmadd_ps(p2, _mm512_set1_ps(1.0f / 40320.0f), _mm512_set1_ps(-1.0f / 720.0f)),
                                    _mm512_fmadd_ps(p2, _mm512_set1_ps(1.0f / 24.0f), _mm512_set1_ps(-0.5f)));
  const __m512 cos_phi = _mm512_fmadd_ps(cp, p2, _mm512_set1_ps(1.0f));
  const __m512i q = _mm512_add_epi32(k, _mm512_set1_epi32(2));
  const __mmask16 odd = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  const __m512 cs = _mm512_mask_blend_ps(odd, cos_phi, sin_phi);
  const __m512 sn = _mm512_mask_blend_ps(odd, sin_phi, cos_phi);
  const __m512i sign_mask = _mm512_set1_epi32(2);
  const __m512i neg_c = _mm512_slli_epi32(_mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(1)), sign_mask), 30);
  const __m512i neg_s = _mm512_slli_epi32(_mm512_and_si512(q, sign_mask), 30);
  *c_out = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(cs), neg_c));
  *s_out = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sn), neg_s));
}
#endif

// Normals of groups q0 .. q0 + 15 (elements 4 q0 .. 4 q0 + 63) into dst[0..63].
inline void normal_block(const PhiloxKeys& keys, uint64_t q0, uint32_t stream, float* dst) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int V = Vec::size();
  static_assert(kBlockPairs % V == 0, "block must hold whole vectors");

  // Words of the block in pair order: pair p = 2 j + h of group j uses (wa[p], wb[p]) =
  // (w[2h], w[2h + 1]) of that group's Philox output.
  alignas(64) uint32_t wa[kBlockPairs];
  alignas(64) uint32_t wb[kBlockPairs];
  philox_block(keys, q0, stream, wa, wb);

#if defined(CPU_CAPABILITY_AVX512)
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int p = 0; p < kBlockPairs; p += 16) {
    const __m512 L = log_uniform16(_mm512_load_si512(wa + p));
    const __m512 r = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), L));
    __m512 c, s;
    cos_sin_uniform16(_mm512_load_si512(wb + p), &c, &s);
    const __m512 xs = _mm512_mul_ps(r, c), ys = _mm512_mul_ps(r, s);
    _mm512_storeu_ps(dst + 2 * p, _mm512_permutex2var_ps(xs, lo_idx, ys));
    _mm512_storeu_ps(dst + 2 * p + 16, _mm512_permutex2var_ps(xs, hi_idx, ys));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  for (int p = 0; p < kBlockPairs; p += 8) {
    const __m256 L = log_uniform8(_mm256_load_si256(reinterpret_cast<const __m256i*>(wa + p)));
    const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), L));
    __m256 c, s;
    cos_sin_uniform8(_mm256_load_si256(reinterpret_cast<const __m256i*>(wb + p)), &c, &s);
    const __m256 xs = _mm256_mul_ps(r, c), ys = _mm256_mul_ps(r, s);
    const __m256 lo = _mm256_unpacklo_ps(xs, ys), hi = _mm256_unpackhi_ps(xs, ys);
    _mm256_storeu_ps(dst + 2 * p, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(dst + 2 * p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
#else
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
#endif
}

// The same from the seed, the keys made for this one block (for loops that have not hoisted them).
inline void normal_block(uint64_t seed, uint64_t q0, uint32_t stream, float* dst) {
  normal_block(philox_keys(seed), q0, stream, dst);
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
    int64_t keyed = -1;  // the sample whose keys are in `keys`
    PhiloxKeys keys;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / blocks;
      if (b != keyed) {
        keys = philox_keys(static_cast<uint64_t>(seeds[b]));
        keyed = b;
      }
      const int64_t q0 = q_begin + (job % blocks) * kBlockGroups;
      const int64_t e0 = 4 * q0;  // first element of the block
      const int64_t lo = std::max<int64_t>(e0, offset);
      const int64_t hi = std::min<int64_t>(e0 + kBlockElems, offset + n);
      scalar_t* row = out + b * n - offset;  // row[e] is element e of sample b
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (lo == e0 && hi == e0 + kBlockElems) {
          normal_block(keys, static_cast<uint64_t>(q0), stream, row + e0);
          continue;
        }
      }
      normal_block(keys, static_cast<uint64_t>(q0), stream, buf);
      for (int64_t e = lo; e < hi; ++e) row[e] = static_cast<scalar_t>(buf[e - e0]);
    }
  });
}

}  // namespace

// randn_<isa> (declared in simd.h) over randn_blocks, instantiated for float32; the portable build
// adds float16 / bfloat16 (the SIMD builds must not instantiate c10::Half / BFloat16 code).
#define FASTDIFF_DEFINE_RANDN(isa)                                                                  \
  template <typename scalar_t>                                                                    \
  void randn_##isa(const int64_t* seeds, int64_t B, uint32_t stream, int64_t n, int64_t offset,   \
                   scalar_t* out) {                                                               \
    randn_blocks(seeds, B, stream, n, offset, out);                                               \
  }                                                                                               \
  template void randn_##isa<float>(const int64_t*, int64_t, uint32_t, int64_t, int64_t, float*);

}  // namespace cpu
}  // namespace fastdiff
