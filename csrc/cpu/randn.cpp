// CPU implementations of fastdiff::randn and fastdiff::philox4x32_10.
#include <cstdlib>
#include <cstring>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../dispatch.h"
#include "fastdiff/philox.h"
#include "noise_block.h"
#include "simd.h"

namespace fastdiff {
namespace cpu {

FASTDIFF_DEFINE_RANDN(portable)
template void randn_portable<c10::Half>(const int64_t*, int64_t, uint32_t, int64_t, int64_t, c10::Half*);
template void randn_portable<c10::BFloat16>(const int64_t*, int64_t, uint32_t, int64_t, int64_t, c10::BFloat16*);

Simd simd() {
  // The levels this build has (FASTDIFF_CPU_ISAS, fastdiff/_build.py) and this CPU runs.
#if defined(FASTDIFF_HAVE_AVX2)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  static const bool avx2 = false;
#endif
#if defined(FASTDIFF_HAVE_AVX512)
  // the AVX-512 subsets ATen's AVX512 kernels need (and the flags in _build.py)
  static const bool avx512 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                             __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  static const bool avx512 = false;
#endif
  const char* env = std::getenv("FASTDIFF_CPU_SIMD");
  if (env != nullptr && std::strcmp(env, "portable") == 0) return Simd::kPortable;
  const bool cap_avx2 = env != nullptr && std::strcmp(env, "avx2") == 0;
  if (avx512 && !cap_avx2) return Simd::kAvx512;
  if (avx2) return Simd::kAvx2;
  return Simd::kPortable;
}

const char* simd_level() {
  switch (simd()) {
    case Simd::kAvx512: return "avx512";
    case Simd::kAvx2: return "avx2";
    default: return "portable";
  }
}

namespace {

template <typename scalar_t>
void randn_dispatch(const int64_t* seeds, int64_t B, uint32_t stream, int64_t n, int64_t offset, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    FASTDIFF_SIMD_CALL(randn, seeds, B, stream, n, offset, out);
  } else {
    randn_portable(seeds, B, stream, n, offset, out);  // the SIMD builds are float32 only
  }
}

// float64 output: the spec evaluated in double, one group at a time.
void randn_double(const int64_t* seeds, int64_t B, uint32_t stream, int64_t n, int64_t offset, double* out) {
  if (B == 0 || n == 0) return;
  const int64_t q_begin = offset >> 2;
  const int64_t groups = ((offset + n + 3) >> 2) - q_begin;
  at::parallel_for(0, B * groups, 1024, [&](int64_t begin, int64_t end) {
    double g[4];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / groups;
      const int64_t q = q_begin + job % groups;
      normal4<double>(static_cast<uint64_t>(seeds[b]), static_cast<uint64_t>(q), stream, g);
      double* row = out + b * n - offset;
      for (int64_t e = std::max<int64_t>(4 * q, offset); e < std::min<int64_t>(4 * q + 4, offset + n); ++e) {
        row[e] = g[e - 4 * q];
      }
    }
  });
}

at::Tensor randn_cpu(const at::Tensor& seeds_in, int64_t stream, at::IntArrayRef shape, int64_t offset,
                     at::ScalarType dtype) {
  check_randn_args(seeds_in, stream, shape, offset, dtype);
  const at::Tensor seeds = seeds_in.contiguous();
  at::Tensor out = randn_output(seeds, shape, dtype);
  const int64_t B = seeds.size(0);
  const int64_t n = B == 0 ? 0 : out.numel() / B;
  const int64_t* s = seeds.data_ptr<int64_t>();
  const auto k = static_cast<uint32_t>(stream);
  if (dtype == at::kDouble) {  // float64 normals by float64 Box-Muller (the SIMD blocks are float32)
    randn_double(s, B, k, n, offset, out.data_ptr<double>());
  } else {
    with_data_type(dtype, [&](auto tag) { randn_dispatch(s, B, k, n, offset, out.data_ptr<decltype(tag)>()); });
  }
  return out;
}

at::Tensor philox_cpu(const at::Tensor& counter_in, const at::Tensor& key_in) {
  check_philox_args(counter_in, key_in);
  const at::Tensor counter = counter_in.contiguous();
  const at::Tensor key = key_in.contiguous();
  at::Tensor out = at::empty_like(counter);
  const int64_t* c = counter.data_ptr<int64_t>();  // [N, 4]
  const int64_t* k = key.data_ptr<int64_t>();      // [N, 2]
  int64_t* o = out.data_ptr<int64_t>();            // [N, 4]
  at::parallel_for(0, counter.size(0), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Philox4 w = philox4x32_10(static_cast<uint32_t>(c[4 * i]), static_cast<uint32_t>(c[4 * i + 1]),
                                      static_cast<uint32_t>(c[4 * i + 2]), static_cast<uint32_t>(c[4 * i + 3]),
                                      static_cast<uint32_t>(k[2 * i]), static_cast<uint32_t>(k[2 * i + 1]));
      for (int j = 0; j < 4; ++j) o[4 * i + j] = static_cast<int64_t>(w.w[j]);
    }
  });
  return out;
}

std::string cpu_simd() { return simd_level(); }

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("randn", &randn_cpu);
  m.impl("philox4x32_10", &philox_cpu);
}

// Device-independent query (no tensor arguments): registered as a catch-all.
TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  m.def("cpu_simd() -> str", &cpu_simd);
}

}  // namespace cpu
}  // namespace fastdiff
