// Noise stream spec v1 (docs/design.md §3): Philox4x32-10 (Random123) and the Box–Muller transform that
// turns its words into normals. Host-device; used by the CPU loops, the CUDA kernels and the C++ tests.
//
//   element e of sample b, stream k:  key = (s_b mod 2^32, s_b >> 32),
//                                     counter = (q mod 2^32, q >> 32, k, 0), q = e >> 2
//   lanes 0,1 use words (w0, w1); lanes 2,3 use (w2, w3); u(w) = ((w >> 8) + 0.5) * 2^-24
//   r = sqrt(-2 ln u(first)), theta = 2 pi u(second); lanes 0,2 -> r cos theta, lanes 1,3 -> r sin theta
#pragma once

#include <cstdint>
#include <math.h>
#include <type_traits>

#include "fastdiff/macros.h"

namespace fastdiff {

// Float and double overloads that resolve the same way on the host and in device code.
FASTDIFF_HD float fd_log(float x) { return logf(x); }
FASTDIFF_HD double fd_log(double x) { return log(x); }
FASTDIFF_HD float fd_sqrt(float x) { return sqrtf(x); }
FASTDIFF_HD double fd_sqrt(double x) { return sqrt(x); }
FASTDIFF_HD float fd_sin(float x) { return sinf(x); }
FASTDIFF_HD double fd_sin(double x) { return sin(x); }
FASTDIFF_HD float fd_cos(float x) { return cosf(x); }
FASTDIFF_HD double fd_cos(double x) { return cos(x); }

struct Philox4 {
  uint32_t w[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

FASTDIFF_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#ifdef __CUDA_ARCH__
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds. ctr = (c0, c1, c2, c3), key = (k0, k1).
FASTDIFF_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                  uint32_t k0, uint32_t k1) {
#ifdef __CUDA_ARCH__  // device pass only: the host compiler warns on an unknown pragma
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The words of group q (elements 4q .. 4q+3) of stream `stream` for the 64-bit seed `seed`.
FASTDIFF_HD Philox4 noise_words(uint64_t seed, uint64_t q, uint32_t stream) {
  return philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), stream, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// log1p(x) from one log: exact when 1 + x rounds to 1, else log(y) * x / (y - 1) with y = 1 + x,
// which cancels the rounding of y (Goldberg). The same form runs in the vectorized CPU loop and in
// Triton (which has no portable log1p), so every backend evaluates the same expression.
template <typename T>
FASTDIFF_HD T log1p_from_log(T x) {
  const T y = static_cast<T>(1) + x;
  const T d = y - static_cast<T>(1);
  return d == static_cast<T>(0) ? x : fd_log(y) * (x / d);
}

// ln u(w) for u(w) = ((w >> 8) + 0.5) 2^-24, accurate in float arithmetic.
//
// u itself needs 25 significant bits, so rounding it to float first moves ln u near u = 1 by up to
// 2^-25; the radius sqrt(-2 ln u) then errs by ~2^-25 / r, more than 1e-5 for one pair in ~2e5.
// Both arguments below are exact in float: (2m + 1) 2^-25 with m < 2^23.
template <typename T>
FASTDIFF_HD T log_uniform(uint32_t w) {
  const uint32_t m = w >> 8;  // 24 bits
  if (m < (1u << 23)) {
    return fd_log(static_cast<T>(2u * m + 1u) * static_cast<T>(2.98023223876953125e-08));  // 2^-25
  }
  // u >= 1/2: ln u = log1p(-(1 - u)), 1 - u = (2 (2^24 - 1 - m) + 1) 2^-25.
  const T x = -static_cast<T>(2u * ((1u << 24) - 1u - m) + 1u) * static_cast<T>(2.98023223876953125e-08);
#if defined(__CUDA_ARCH__)
  // the device's own log1pf: no second log and IEEE division beside the first branch's log in a diverged warp
  if constexpr (std::is_same_v<T, float>) return log1pf(x);
#endif
  return log1p_from_log<T>(x);
}

// u(w) - 1/2 = (2m + 1 - 2^24) 2^-25, exact in float (|2m + 1 - 2^24| < 2^24). With v = u - 1/2,
// cos(2 pi u) = -cos(2 pi v) and sin(2 pi u) = -sin(2 pi v), and 2 pi v lies in (-pi, pi).
template <typename T>
FASTDIFF_HD T centered_uniform(uint32_t w) {
  const int32_t m = static_cast<int32_t>(w >> 8);
  return static_cast<T>(2 * m + 1 - (1 << 24)) * static_cast<T>(2.98023223876953125e-08);
}

// sin and cos of 2 pi v, v = u - 1/2 in (-1/2, 1/2).
template <typename T>
FASTDIFF_HD void sin_cos_two_pi(T v, T* s, T* c) {
#if defined(__CUDA_ARCH__)
  // sincospif(2 v): 2 v is exact and needs no general argument reduction, where accurate sinf / cosf of
  // theta = 2 pi v take their slow path with a stack frame (sm_90 SASS of the aligned fp32 randn kernel: 1000
  // instructions with sinf / cosf and the log1p below; .ci/cuda_guards.py holds it under its budget)
  if constexpr (std::is_same_v<T, float>) {
    sincospif(2.0f * v, s, c);
    return;
  }
#endif
  const T theta = static_cast<T>(6.283185307179586476925286766559) * v;
  *s = fd_sin(theta);
  *c = fd_cos(theta);
}

// One Box–Muller pair from words (a, b): (r cos theta, r sin theta).
template <typename T>
FASTDIFF_HD void box_muller(uint32_t a, uint32_t b, T* x, T* y) {
  const T r = fd_sqrt(static_cast<T>(-2) * log_uniform<T>(a));
  T s, c;
  sin_cos_two_pi<T>(centered_uniform<T>(b), &s, &c);
  *x = -r * c;
  *y = -r * s;
}

// The four normals of group q: out[0..3] are elements 4q .. 4q+3.
template <typename T>
FASTDIFF_HD void normal4(uint64_t seed, uint64_t q, uint32_t stream, T out[4]) {
  const Philox4 p = noise_words(seed, q, stream);
  box_muller<T>(p.w[0], p.w[1], &out[0], &out[1]);
  box_muller<T>(p.w[2], p.w[3], &out[2], &out[3]);
}

}  // namespace fastdiff
