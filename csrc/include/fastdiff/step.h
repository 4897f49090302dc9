// The per-element math of the fused sampler step fastdiff::guided_step (docs/design.md §2), written once
// and used by the CPU loops (with T = at::vec::Vectorized<float>), the CUDA kernel (T = float) and
// the C++ tests (T = float). The specification is guided_step_reference in
// fastdiff/ops/guided_step.py:
//
//   g    = pred_uncond is None ? pred : pred_uncond + cfg * (pred - pred_uncond)
//   out  = c_x * x + c_pred * g + c_extra * extra + c_noise * z      (terms of absent inputs omitted)
//   side = s_x * x + s_pred * g + s_extra * extra
//
// with every operation in float32, in the reference's order: (c_x x + c_pred g), then + c_extra e,
// then + c_noise z. (nvcc and compilers with -ffp-contract=fast may fuse a multiply-add; the
// difference is within an ulp of each term.)
#pragma once

#include "fastdiff/macros.h"

namespace fastdiff {

// The scalars of one step, converted from the op's float64 arguments once per call.
struct StepCoeffs {
  float cfg;                             // guidance scale w
  float c_x, c_pred, c_extra, c_noise;   // out
  float s_x, s_pred, s_extra;            // side
};

FASTDIFF_HD StepCoeffs make_step_coeffs(double cfg, double c_x, double c_pred, double c_extra, double c_noise,
                                        double s_x, double s_pred, double s_extra) {
  return StepCoeffs{static_cast<float>(cfg),     static_cast<float>(c_x),   static_cast<float>(c_pred),
                    static_cast<float>(c_extra), static_cast<float>(c_noise), static_cast<float>(s_x),
                    static_cast<float>(s_pred),  static_cast<float>(s_extra)};
}

template <typename T>
struct StepResult {
  T out;
  T side;  // meaningful only when kSide
};

// One element (or one vector of elements) of the step. T is float or a SIMD type with a broadcasting
// constructor T(float) and operators + - * (at::vec::Vectorized<float>); taken by reference, which
// keeps GCC from noting the 32-byte-aligned by-value ABI of the portable Vectorized<float>.
//   kUncond: pred_uncond given (classifier-free guidance); `uncond` is ignored otherwise
//   kExtra:  extra given; `extra` is ignored otherwise
//   kNoise:  c_noise != 0; `z` (the spec-v1 normal of the element) is ignored otherwise
//   kSide:   side requested; r.side is left as 0 otherwise
template <bool kUncond, bool kExtra, bool kNoise, bool kSide, typename T>
FASTDIFF_HD StepResult<T> step_element(const StepCoeffs& k, const T& x, const T& pred, const T& uncond, const T& extra,
                                        const T& z) {
  T g = pred;
  if constexpr (kUncond) g = uncond + T(k.cfg) * (pred - uncond);
  StepResult<T> r{T(k.c_x) * x + T(k.c_pred) * g, T(0.0f)};
  if constexpr (kSide) r.side = T(k.s_x) * x + T(k.s_pred) * g;
  if constexpr (kExtra) {
    r.out = r.out + T(k.c_extra) * extra;
    if constexpr (kSide) r.side = r.side + T(k.s_extra) * extra;
  }
  if constexpr (kNoise) r.out = r.out + T(k.c_noise) * z;
  return r;
}

}  // namespace fastdiff
