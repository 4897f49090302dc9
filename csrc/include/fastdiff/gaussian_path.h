// The built-in Gaussian paths x_t = alpha_t z + beta_t eps at flow time t, and the per-sample coefficient
// pairs the noising and loss kernels need, written once for the CPU ops (host), the CUDA kernels (device) and
// the C++ tests. The specification is fastdiff/gaussian_paths.py (CondOT, VP, VPCosine, VE: the same float64
// formulas in the same order) and target_coefficients in fastdiff/ops/diffusion_loss.py:
//
//   noising  (alpha_t, beta_t)                 x_t = alpha z + beta eps
//   velocity (d alpha_t, d beta_t)              target = c_z z + c_eps eps
//   eps      (0, 1)    x0 (1, 0)    score (0, -1 / beta_t)
//
// Every value is computed in float64 and rounded once to float32, as the Python path's `.to(float32)` of
// its float64 coefficients. Products and sums are rounded one by one (no multiply-add contraction: the
// Python arithmetic is not contracted); exp, expm1, sqrt, sin and cos come from the C library on the host
// and libdevice on the GPU (VPCosine's sines there by sinpi, see sin_w), within an ulp of float64 of torch's,
// which rounds to the same float32 except in rare ties (tests/test_loss_at_times.py: equal on 4097 times).
// A t outside [0, 1] (or NaN) gives NaN for both coefficients: the GPU's answer to a bad time (docs/design.md
// §4); the CPU ops refuse such a t before any work.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastdiff/macros.h"

namespace fastdiff {

// The path codes of fastdiff/gaussian_paths.py GaussianPath.kernel_path (a change here is a change there).
enum PathKind : int64_t { kPathCondOT = 0, kPathVP = 1, kPathVPCosine = 2, kPathVE = 3, kPathKinds = 4 };
// What a coefficient pair is: the noising, or the target of a prediction type (fastdiff.paths).
enum PairKind : int64_t {
  kPairNoising = 0, kPairVelocity = 1, kPairEps = 2, kPairX0 = 3, kPairScore = 4, kPairV = 5, kPairKinds = 6
};
constexpr int kPathParams = 2;  // VP (beta_min, beta_max), VPCosine (s), VE (sigma_max)

// Passed by value to kernels.
struct PathSpec {
  int32_t kind;
  int32_t pair;
  double param[kPathParams];
};

// Uncontracted float64 arithmetic (nvcc fuses a * b + c by default; the host build does not contract).
FASTDIFF_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
FASTDIFF_HD double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// sin(w x) and cos(w x) for VPCosine's w = (0.5 pi) / (1 + s), x in [0, 2]. The host takes sin of the rounded
// product as Python does; the device takes sinpi(x v), v = 0.5 / (1 + s), which needs no argument reduction
// (libdevice's double sin keeps a Payne-Hanek stack frame in every kernel that calls it). Both are within an
// ulp of float64 of sin(w x), far below the float32 rounding of the result.
FASTDIFF_HD double sin_w(double w, double s, double x) {
#ifdef __CUDA_ARCH__
  (void)w;
  return sinpi(mul_rn(x, 0.5 / add_rn(1.0, s)));
#else
  (void)s;
  return sin(mul_rn(w, x));
#endif
}
FASTDIFF_HD double cos_w(double w, double s, double x) {
#ifdef __CUDA_ARCH__
  (void)w;
  return cospi(mul_rn(x, 0.5 / add_rn(1.0, s)));
#else
  (void)s;
  return cos(mul_rn(w, x));
#endif
}

// (alpha, beta, d alpha, d beta) of the path at t in [0, 1]; gaussian_paths.py's _coefficients, operation for
// operation.
FASTDIFF_HD void path_at(const PathSpec& s, double t, double* al, double* be, double* dal, double* dbe) {
  if (s.kind == kPathCondOT) {
    *al = t;
    *be = add_rn(1.0, -t);
    *dal = 1.0;
    *dbe = -1.0;
    return;
  }
  if (s.kind == kPathVE) {
    const double sigma_max = s.param[0];
    *al = 1.0;
    *be = mul_rn(sigma_max, add_rn(1.0, -t));
    *dal = 0.0;
    *dbe = -sigma_max;
    return;
  }
  double alpha, beta, d_alpha;
  if (s.kind == kPathVP) {
    const double beta_min = s.param[0], beta_max = s.param[1];
    const double u = add_rn(1.0, -t);
    const double slope = add_rn(beta_max, -beta_min);
    // beta_min s + 0.5 slope s s, left to right as Python evaluates it
    const double big_b = add_rn(mul_rn(beta_min, u), mul_rn(mul_rn(mul_rn(0.5, slope), u), u));
    const double d_big_b = add_rn(beta_min, mul_rn(slope, u));
    alpha = exp(mul_rn(-0.5, big_b));
    beta = sqrt(-expm1(-big_b));
    d_alpha = mul_rn(mul_rn(0.5, d_big_b), alpha);
  } else {  // kPathVPCosine
    const double w = 0.5 * 3.141592653589793 / add_rn(1.0, s.param[0]);  // (0.5 pi) / (1 + s): 0.5 pi is exact
    const double norm = sin_w(w, s.param[0], 1.0);
    alpha = sin_w(w, s.param[0], t) / norm;
    beta = sqrt(mul_rn(sin_w(w, s.param[0], add_rn(1.0, -t)), sin_w(w, s.param[0], add_rn(1.0, t)))) / norm;
    d_alpha = mul_rn(w, cos_w(w, s.param[0], t)) / norm;
  }
  *al = alpha;
  *be = beta;
  *dal = d_alpha;
  *dbe = mul_rn(-alpha, d_alpha) / beta;  // -alpha d_alpha / beta: -inf where beta = 0, as the tensor path
}

// The pair s.pair of the path at t, rounded to float32; NaN, NaN for t outside [0, 1] or NaN. `+ 0.0` turns a
// -0 into +0 as the Python path's `c + t * 0.0` does.
FASTDIFF_HD void pair_at(const PathSpec& s, double t, float* c0, float* c1) {
  if (!(t >= 0.0 && t <= 1.0)) {
    *c0 = *c1 = static_cast<float>(NAN);
    return;
  }
  double al, be, dal, dbe, a, b;
  path_at(s, t, &al, &be, &dal, &dbe);
  switch (s.pair) {
    case kPairNoising: a = al; b = be; break;
    case kPairVelocity: a = dal; b = dbe; break;
    case kPairEps: a = 0.0; b = 1.0; break;
    case kPairX0: a = 1.0; b = 0.0; break;
    case kPairV: a = -be; b = al; break;  // v = alpha eps - beta z
    default: a = 0.0; b = -1.0 / be; break;  // kPairScore: -eps / beta (-inf where beta = 0)
  }
  *c0 = static_cast<float>(add_rn(a, 0.0));
  *c1 = static_cast<float>(add_rn(b, 0.0));
}

}  // namespace fastdiff
