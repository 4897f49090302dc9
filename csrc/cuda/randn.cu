// CUDA backend of the noise stream, spec v1 (docs/design.md §3): fastdiff::randn and
// fastdiff::philox4x32_10. The per-element math is the host-device code in fastdiff/philox.h, so
// these kernels produce the same words as the CPU backend and the same normals up to libm/libdevice
// rounding (well inside the spec's 1e-5).
//
// CUDA-graph safety: seeds are read from device memory inside the kernel, nothing is copied back to
// the host, and every launch goes to the current stream. A captured graph can therefore be replayed
// with new seeds written into the same seeds tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "cuda/launch.h"
#include "fastdiff/philox.h"

namespace fastdiff {
namespace {

// Four outputs stored with one vector instruction: 16 bytes for float32 (float4), 8 for
// float16/bfloat16. float64 (32 bytes) is capped at 16-byte alignment, i.e. two stores.
template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t) < 16 ? 4 * sizeof(scalar_t) : 16) Vec4 {
  scalar_t v[4];
};

// One thread per (sample b, group q): the group's four normals come from one Philox call.
// Work item idx enumerates (b, g) with g fastest; group g of a sample is stream group
// q = (offset >> 2) + g. `groups` is the number of groups touched per sample, so that a sample's
// first and last groups may be partial when offset or n is not a multiple of 4.
//
// index_t is uint32_t when every work index fits, to keep the (b, g) division 32-bit; the loop
// counter and all pointer offsets stay 64-bit.
//
// kAligned: offset % 4 == 0, n % 4 == 0 and out aligned for Vec4. Then groups == n / 4, every
// group is full, and work item idx writes out[4 idx .. 4 idx + 3] (= out[b n + 4 g ...]) with
// one vector store.
template <typename scalar_t, typename index_t, bool kAligned>
__global__ void __launch_bounds__(kBlock)
randn_kernel(const int64_t* __restrict__ seeds,  // [B]
             scalar_t* __restrict__ out,         // [B, n]
             int64_t n, int64_t offset, uint32_t stream,
             int64_t groups,  // groups per sample
             int64_t total) { // B * groups
  using acc_t = at::opmath_type<scalar_t>;  // double for float64, float otherwise
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const uint64_t q_first = static_cast<uint64_t>(offset) >> 2;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += step) {
    const index_t i = static_cast<index_t>(idx);
    const index_t b = i / static_cast<index_t>(groups);
    const index_t g = i - b * static_cast<index_t>(groups);
    // Two's complement: seeds >= 2^63 are stored as negative int64.
    const uint64_t seed = static_cast<uint64_t>(seeds[b]);
    const uint64_t q = q_first + static_cast<uint64_t>(g);

    acc_t v[4];
    normal4<acc_t>(seed, q, stream, v);

    if constexpr (kAligned) {
      Vec4<scalar_t> pack;
#pragma unroll
      for (int j = 0; j < 4; ++j) pack.v[j] = static_cast<scalar_t>(v[j]);
      reinterpret_cast<Vec4<scalar_t>*>(out)[idx] = pack;
    } else {
      // Sample-local index of lane 0; below 0 for a first group that starts before `offset`.
      // 4 q <= offset + n - 1, so this cannot overflow.
      const int64_t e0 = static_cast<int64_t>(q << 2) - offset;
      scalar_t* row = out + static_cast<int64_t>(b) * n;  // [n]
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t e = e0 + j;
        if (e >= 0 && e < n) row[e] = static_cast<scalar_t>(v[j]);
      }
    }
  }
}

template <typename scalar_t, bool kAligned>
void launch_randn(const at::Tensor& seeds, at::Tensor& out, int64_t n, int64_t offset,
                  uint32_t stream, int64_t groups, int64_t total) {
  cudaStream_t cuda_stream = at::cuda::getCurrentCUDAStream();
  const int64_t* seeds_ptr = seeds.const_data_ptr<int64_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  if (total <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max())) {
    auto kernel = randn_kernel<scalar_t, uint32_t, kAligned>;
    kernel<<<grid_size(total, kernel), kBlock, 0, cuda_stream>>>(seeds_ptr, out_ptr, n, offset, stream, groups, total);
  } else {
    auto kernel = randn_kernel<scalar_t, uint64_t, kAligned>;
    kernel<<<grid_size(total, kernel), kBlock, 0, cuda_stream>>>(seeds_ptr, out_ptr, n, offset, stream, groups, total);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor randn_cuda(const at::Tensor& seeds_in, int64_t stream, at::IntArrayRef shape,
                      int64_t offset, at::ScalarType dtype) {
  check_randn_args(seeds_in, stream, shape, offset, dtype);
  TORCH_CHECK(seeds_in.is_cuda(), "fastdiff::randn (CUDA): seeds must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(seeds_in.device());
  const at::Tensor seeds = seeds_in.contiguous();  // the kernel indexes seeds[b] directly

  at::Tensor out = randn_output(seeds, shape, dtype);  // [B, *shape]
  if (out.numel() == 0) return out;                    // B == 0 or n == 0: nothing to launch

  const int64_t B = seeds.size(0);
  const int64_t n = out.numel() / B;  // elements per sample; at::empty already rejected overflow
  TORCH_CHECK(offset <= std::numeric_limits<int64_t>::max() - n,
              "fastdiff::randn: offset + numel(shape) must fit in int64, got offset ", offset,
              " and ", n, " elements");
  const int64_t q_first = offset >> 2;
  const int64_t q_last = (offset + n - 1) >> 2;
  const int64_t groups = q_last - q_first + 1;  // <= n / 4 + 2
  const int64_t total = B * groups;              // <= 3 * numel, no overflow

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastdiff_randn_cuda", [&] {
    const bool aligned =
        offset % 4 == 0 && n % 4 == 0 &&
        reinterpret_cast<uintptr_t>(out.const_data_ptr()) % alignof(Vec4<scalar_t>) == 0;
    if (aligned) {
      launch_randn<scalar_t, true>(seeds, out, n, offset, static_cast<uint32_t>(stream), groups, total);
    } else {
      launch_randn<scalar_t, false>(seeds, out, n, offset, static_cast<uint32_t>(stream), groups, total);
    }
  });
  return out;
}

// Raw Philox4x32-10 words, one row per thread. Inputs hold uint32 values in int64; the cast to
// uint32 keeps the low 32 bits, as the CPU backend does.
__global__ void __launch_bounds__(kBlock)
philox_kernel(const int64_t* __restrict__ counter,  // [N, 4]
              const int64_t* __restrict__ key,      // [N, 2]
              int64_t* __restrict__ out,            // [N, 4]
              int64_t N) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < N; r += step) {
    const int64_t* c = counter + 4 * r;  // [4]
    const int64_t* k = key + 2 * r;      // [2]
    const Philox4 p = philox4x32_10(static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[1]),
                                    static_cast<uint32_t>(c[2]), static_cast<uint32_t>(c[3]),
                                    static_cast<uint32_t>(k[0]), static_cast<uint32_t>(k[1]));
    int64_t* o = out + 4 * r;  // [4]
#pragma unroll
    for (int j = 0; j < 4; ++j) o[j] = static_cast<int64_t>(p.w[j]);  // zero-extended, >= 0
  }
}

at::Tensor philox4x32_10_cuda(const at::Tensor& counter_in, const at::Tensor& key_in) {
  check_philox_args(counter_in, key_in);
  TORCH_CHECK(counter_in.is_cuda(), "fastdiff::philox4x32_10 (CUDA): counter and key must be CUDA tensors");
  c10::cuda::CUDAGuard guard(counter_in.device());
  const at::Tensor counter = counter_in.contiguous();  // [N, 4]
  const at::Tensor key = key_in.contiguous();          // [N, 2]
  const int64_t N = counter.size(0);
  at::Tensor out = at::empty({N, 4}, counter.options());  // [N, 4]
  if (N == 0) return out;

  philox_kernel<<<grid_size(N, philox_kernel), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      counter.const_data_ptr<int64_t>(), key.const_data_ptr<int64_t>(),
      out.mutable_data_ptr<int64_t>(), N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("randn", &fastdiff::randn_cuda);
  m.impl("philox4x32_10", &fastdiff::philox4x32_10_cuda);
}
