// Four consecutive elements (group g4 = elements 4 g4 .. 4 g4 + 3 of a flattened buffer) with one
// vector load or store: 16 bytes for float, 8 for float16/bfloat16. Callers check alignment.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace fastdiff {

__device__ __forceinline__ void load4(const float* p, int64_t g4, float v[4]) {
  const float4 t = reinterpret_cast<const float4*>(p)[g4];
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}
template <typename half_t>  // c10::Half or c10::BFloat16: 4 x 16 bits = one 8-byte load
__device__ __forceinline__ void load4_16(const half_t* p, int64_t g4, float v[4]) {
  const uint2 t = reinterpret_cast<const uint2*>(p)[g4];
  v[0] = static_cast<float>(half_t(static_cast<uint16_t>(t.x & 0xFFFFu), half_t::from_bits()));
  v[1] = static_cast<float>(half_t(static_cast<uint16_t>(t.x >> 16), half_t::from_bits()));
  v[2] = static_cast<float>(half_t(static_cast<uint16_t>(t.y & 0xFFFFu), half_t::from_bits()));
  v[3] = static_cast<float>(half_t(static_cast<uint16_t>(t.y >> 16), half_t::from_bits()));
}
__device__ __forceinline__ void load4(const c10::Half* p, int64_t g4, float v[4]) { load4_16(p, g4, v); }
__device__ __forceinline__ void load4(const c10::BFloat16* p, int64_t g4, float v[4]) { load4_16(p, g4, v); }

__device__ __forceinline__ void store4(float* p, int64_t g4, const float v[4]) {
  reinterpret_cast<float4*>(p)[g4] = make_float4(v[0], v[1], v[2], v[3]);
}
template <typename half_t>
__device__ __forceinline__ void store4_16(half_t* p, int64_t g4, const float v[4]) {
  const uint32_t h0 = half_t(v[0]).x, h1 = half_t(v[1]).x, h2 = half_t(v[2]).x, h3 = half_t(v[3]).x;
  reinterpret_cast<uint2*>(p)[g4] = make_uint2(h0 | (h1 << 16), h2 | (h3 << 16));
}
__device__ __forceinline__ void store4(c10::Half* p, int64_t g4, const float v[4]) { store4_16(p, g4, v); }
__device__ __forceinline__ void store4(c10::BFloat16* p, int64_t g4, const float v[4]) { store4_16(p, g4, v); }

}  // namespace fastdiff
