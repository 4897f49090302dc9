// CPU implementation of fastdiff::sample_gram (the per-sample reduction pass, docs/design.md §2). The chunk
// loop lives in sample_gram_block.h; this file builds its portable copy, picks a SIMD copy (avx2/, avx512/)
// by simd(), adds each sample's chunks in index order and registers the op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../dispatch.h"
#include "fastdiff/sample_gram.h"
#include "sample_gram_block.h"
#include "simd.h"

namespace fastdiff {
namespace cpu {

FASTDIFF_DEFINE_SAMPLE_GRAM_LOOPS(portable)

namespace {

at::Tensor sample_gram_cpu(at::TensorList terms, const at::Tensor& seeds_in, at::IntArrayRef streams) {
  check_sample_gram_args(terms, seeds_in, streams);
  const int K = static_cast<int>(terms.size()), D = static_cast<int>(streams.size());
  const int P = gram_packed_size(K + D);
  const int64_t B = terms[0].size(0);
  const int64_t n = B == 0 ? 0 : terms[0].numel() / B;
  at::Tensor out = at::zeros({B, P}, terms[0].options().dtype(at::kDouble));
  if (B == 0 || n == 0) return out;
  const at::Tensor seeds = seeds_in.contiguous();
  const int64_t chunks = gram_chunks(n);
  at::Tensor partial = at::empty({B, chunks, P}, out.options());
  GramBuffers a{};
  for (int i = 0; i < K; ++i) a.terms[i] = terms[i].const_data_ptr();
  for (int d = 0; d < D; ++d) a.streams[d] = static_cast<uint32_t>(streams[d]);
  a.seeds = seeds.const_data_ptr<int64_t>();
  a.K = K;
  a.D = D;
  a.B = B;
  a.n = n;
  a.partial = partial.mutable_data_ptr<double>();
  with_data_type(terms[0].scalar_type(), [&](auto tag) { FASTDIFF_SIMD_CALL(sample_gram, a, tag); });
  // The chunks of each sample in index order (the sum does not depend on how the chunks were scheduled).
  const double* src = partial.const_data_ptr<double>();
  double* dst = out.mutable_data_ptr<double>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int p = 0; p < P; ++p) {
        double s = src[(b * chunks) * P + p];
        for (int64_t c = 1; c < chunks; ++c) s += src[(b * chunks + c) * P + p];
        dst[b * P + p] = s;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("sample_gram", &sample_gram_cpu);
}

}  // namespace cpu
}  // namespace fastdiff
