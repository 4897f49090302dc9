// Host-side helpers that turn runtime choices into compile-time template arguments.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

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

inline bool aligned(const void* ptr, std::size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace fastdiff
