// Launch geometry shared by the CUDA kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace fastdiff {

constexpr int kBlock = 256;  // threads per block

// Blocks for `work` items with one item per thread per grid-stride step, capped at enough blocks to
// fill every SM (2048 resident threads / kBlock), so huge inputs loop instead of launching millions
// of blocks.
inline int64_t grid_size(int64_t work) {
  const int64_t needed = (work + kBlock - 1) / kBlock;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t cap = sms * (2048 / kBlock);
  return std::max<int64_t>(1, std::min(needed, cap));
}

}  // namespace fastdiff
