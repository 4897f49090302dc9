// Launch geometry shared by the CUDA kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

namespace fastdiff {

constexpr int kBlock = 256;  // threads per block

// Blocks of kBlock threads of `kernel` that fit on one SM of the current device, asked of the runtime once per
// (kernel, device). Registers decide: the step kernels use 31-128, gram 86-150, so 2-7 blocks fit, not the 8
// that 2048 resident threads / 256 would give.
inline int64_t blocks_per_sm(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> known;
  const int device = at::cuda::current_device();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find({kernel, device});
  if (it == known.end()) {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kBlock, 0));
    it = known.emplace(std::make_pair(kernel, device), std::max(n, 1)).first;
  }
  return it->second;
}

// Blocks for `work` items with one item per thread per grid-stride step, capped at one full wave of `kernel`
// (the SMs times its resident blocks), so huge inputs loop instead of launching millions of blocks, and the
// last wave is never a partial one (the fixed 8 blocks per SM overshot the kernels' occupancy: a full wave and
// a partial one).
template <typename Kernel>
int64_t grid_size(int64_t work, Kernel kernel) {
  const int64_t needed = (work + kBlock - 1) / kBlock;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t cap = sms * blocks_per_sm(reinterpret_cast<const void*>(kernel));
  return std::max<int64_t>(1, std::min(needed, cap));
}

}  // namespace fastdiff
