// Argument checks shared by the CPU and CUDA implementations. The Python layer validates user input
// with friendlier messages; these guard direct torch.ops.fastdiff calls.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

namespace fastdiff {

inline void check_randn_args(const at::Tensor& seeds, int64_t stream, at::IntArrayRef shape,
                             int64_t offset, at::ScalarType dtype) {
  TORCH_CHECK(seeds.dim() == 1, "fastdiff::randn: seeds must be 1-D, got ", seeds.dim(), " dims");
  TORCH_CHECK(seeds.scalar_type() == at::kLong, "fastdiff::randn: seeds must be int64, got ",
              seeds.scalar_type());
  TORCH_CHECK(stream >= 0 && stream <= 0xFFFFFFFFLL, "fastdiff::randn: stream must be in [0, 2^32), got ",
              stream);
  TORCH_CHECK(offset >= 0, "fastdiff::randn: offset must be >= 0, got ", offset);
  for (auto s : shape) TORCH_CHECK(s >= 0, "fastdiff::randn: shape must be non-negative, got ", shape);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fastdiff::randn: dtype must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline void check_philox_args(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4, "fastdiff::philox4x32_10: counter must be [N, 4], got ",
              counter.sizes());
  TORCH_CHECK(key.dim() == 2 && key.size(1) == 2 && key.size(0) == counter.size(0),
              "fastdiff::philox4x32_10: key must be [N, 2] with N = counter.size(0), got ", key.sizes());
  TORCH_CHECK(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
              "fastdiff::philox4x32_10: counter and key must be int64");
  TORCH_CHECK(counter.device() == key.device(), "fastdiff::philox4x32_10: counter and key on different devices");
}

inline at::Tensor randn_output(const at::Tensor& seeds, at::IntArrayRef shape, at::ScalarType dtype) {
  std::vector<int64_t> sizes{seeds.size(0)};
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  return at::empty(sizes, seeds.options().dtype(dtype));
}

}  // namespace fastdiff
