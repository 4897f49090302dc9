// Host-side helpers that turn runtime choices into compile-time template arguments.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "fastdiff/sampler_step.h"

namespace fastdiff {

// f(std::true_type{}) or f(std::false_type{}).
template <typename F>
void with_bool(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// f(T{}) with T the C++ type of a float32 / float16 / bfloat16 tensor (checked before).
template <typename F>
void with_data_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK(false, "unreachable");
  }
}

// f(FixedStepShape<K1, H, D>{}) for the common sampler-step shapes (K1 <= 2, H <= 1, D <= 1: their loops
// unroll; FixedStepShape in fastdiff/sampler_step.h), else f(s) with the runtime counts: 9 instantiations.
template <typename F>
void with_step_shape(const StepShape& s, F&& f) {
  if (s.branches > 2 || s.history > 1 || s.draws > 1) return f(s);
  with_bool(s.branches == 2, [&](auto two) {
    with_bool(s.history == 1, [&](auto one_history) {
      with_bool(s.draws == 1, [&](auto one_draw) {
        f(FixedStepShape<decltype(two)::value ? 2 : 1, decltype(one_history)::value ? 1 : 0,
                         decltype(one_draw)::value ? 1 : 0>{});
      });
    });
  });
}

inline bool aligned(const void* ptr, std::size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace fastdiff
