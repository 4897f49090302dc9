// CUDA backend of fastdiff::sample_gram, the per-sample reduction pass (docs/design.md §2; spec:
// run_reference in fastdiff/ops/sample_gram.py). The packed layout and the per-element accumulation are
// gram_accumulate of fastdiff/sample_gram.h (shared with the CPU loop) and the draws are normal4 of
// fastdiff/philox.h (spec v1), so the results match the CPU backend up to libm/libdevice rounding of the
// noise and the order of the float64 sums.
//
// Deterministic, without atomics: each sample is cut into chunks of kGramChunk elements and one block of
// kBlock threads owns a chunk (thread t takes groups t, t + kBlock, ... of it, the 4 elements of a group
// in order). Each product of two floats is exact in float64, so every thread accumulates all P sums in
// float64; the block then adds the threads' sums in a fixed tree (warp shuffles, then the warps in order)
// into partial[b, chunk, :]. A second kernel, one thread per (b, p), adds the chunks in index order, as
// the specification does. Samples of at most 512 elements take a warp each instead (sample_gram_warp_kernel),
// one launch. Same inputs, same bits, whatever the batch size or the grid.
//
// Registers: the kernel is templated on T = K + D (1..8), so the P = T + T (T + 1) / 2 float64
// accumulators and the group's T x 4 values are register arrays with compile-time indices; whether vector
// i is a term or a draw (i < K) is a run-time value, uniform over the launch, and normal4 is emitted only
// for the at most kMaxGramDraws positions a draw can take. The term pointers and the stream ids are
// passed by value, indexed by vector position, so no kernel-parameter array is indexed at run time. A
// group is loaded with one vector access per term when n % 4 == 0 and the pointers are aligned (a
// run-time flag: a template flag would double the 24 kernels for one predicated load), else lane by lane.
//
// CUDA-graph safety: seeds are read from device memory inside the kernel, nothing is read back to the
// host, and the launches go to the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "dispatch.h"
#include "cuda/launch.h"
#include "cuda/vec4.h"
#include "fastdiff/philox.h"
#include "fastdiff/sample_gram.h"

namespace fastdiff {
namespace {

constexpr int kWarps = kBlock / 32;
constexpr int64_t kChunkGroups = kGramChunk / 4;  // groups of 4 elements per chunk
static_assert(kGramChunk % 4 == 0, "a chunk holds whole groups");
static_assert(gram_packed_size(kMaxGramTerms) <= kBlock, "thread p writes sum p of the block");

// Vector i of u: terms[i] for i < K, else the draw of stream streams[i] (entries i >= K).
template <typename term_t>
struct GramInputs {
  const term_t* terms[kMaxGramTerms];
  uint32_t streams[kMaxGramTerms];
};

// Adds groups g0, g0 + stride, ... < g_end of sample b into the thread's P float64 sums.
// vec (uniform): n % 4 == 0 and every term aligned for load4, so group g of sample b is flat group b groups + g.
template <typename term_t, int T>
__device__ __forceinline__ void accumulate_groups(const GramInputs<term_t>& in, uint64_t seed, int64_t b, int64_t g0,
                                                  int64_t g_end, int stride, int64_t n, int64_t groups, int K,
                                                  bool vec, double* acc) {
  constexpr int kFirstDraw = T - kMaxGramDraws > 1 ? T - kMaxGramDraws : 1;  // D <= 4 and K >= 1
  for (int64_t g = g0; g < g_end; g += stride) {
    const int64_t base = b * n + 4 * g;  // scalar path
    const int valid = n - 4 * g < 4 ? static_cast<int>(n - 4 * g) : 4;
    float v[T][4];
#pragma unroll
    for (int i = 0; i < T; ++i) {
      if (i < K) {
        if (vec) {
          load4(in.terms[i], b * groups + g, v[i]);
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) v[i][j] = j < valid ? static_cast<float>(in.terms[i][base + j]) : 0.0f;
        }
      } else if (i >= kFirstDraw) {  // folded away where no draw can sit
        normal4<float>(seed, static_cast<uint64_t>(g), in.streams[i], v[i]);
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < valid) {  // elements past n contribute nothing
        double u[T];
#pragma unroll
        for (int i = 0; i < T; ++i) u[i] = static_cast<double>(v[i][j]);
        gram_accumulate<T, double>(acc, u);
      }
    }
  }
}

// partial[b, c, :] = the packed sums of chunk c of sample b; one block per chunk (grid-stride).
template <typename term_t, int T>
__global__ void __launch_bounds__(kBlock)
sample_gram_partial_kernel(const GramInputs<term_t> in, const int64_t* seeds, double* partial, int64_t n,
                           int64_t groups, int64_t chunks, int64_t items, int K, bool vec) {
  constexpr int P = gram_packed_size(T);
  __shared__ double shared[kWarps][P];
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // uniform across the block
    const int64_t b = item / chunks;
    const int64_t c = item - b * chunks;
    // Two's complement: seeds >= 2^63 are stored as negative int64.
    const uint64_t seed = K < T ? static_cast<uint64_t>(seeds[b]) : 0u;
    const int64_t g_end = std::min<int64_t>(groups, (c + 1) * kChunkGroups);
    double acc[P];
#pragma unroll
    for (int p = 0; p < P; ++p) acc[p] = 0.0;
    accumulate_groups<term_t, T>(in, seed, b, c * kChunkGroups + threadIdx.x, g_end, kBlock, n, groups, K, vec, acc);
    // Fixed tree: a shuffle tree within each warp, then the warps in order (thread p adds sum p).
#pragma unroll
    for (int p = 0; p < P; ++p) {
      double s = acc[p];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xFFFFFFFFu, s, offset);
      if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5][p] = s;
    }
    __syncthreads();
    if (threadIdx.x < P) {
      double total = shared[0][threadIdx.x];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) total += shared[w][threadIdx.x];
      partial[item * P + threadIdx.x] = total;
    }
    __syncthreads();  // shared is reused by the next item
  }
}

// Small samples (n <= kWarpGramElems: Langevin chains of dimension 2, toy data): a warp per sample instead of a
// block per chunk, which would keep one thread of 256 busy and pay two barriers and P float64 trees per sample.
// Lane l takes groups l, l + 32, ..., the warp adds the lanes by an xor butterfly (every lane ends with the same
// bits: each level adds the same two values, x + y = y + x exactly), and lane p % 32 writes out[b, p]: one
// launch, no partial array, no barrier. Chosen by n alone, so the bits still do not depend on B.
constexpr int64_t kWarpGramElems = 512;

template <typename term_t, int T>
__global__ void __launch_bounds__(kBlock)
sample_gram_warp_kernel(const GramInputs<term_t> in, const int64_t* seeds, double* out, int64_t B, int64_t n,
                        int64_t groups, int K, bool vec) {
  constexpr int P = gram_packed_size(T);
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); b < B; b += warps) {
    const uint64_t seed = K < T ? static_cast<uint64_t>(seeds[b]) : 0u;  // b is uniform across the warp
    double acc[P];
#pragma unroll
    for (int p = 0; p < P; ++p) acc[p] = 0.0;
    accumulate_groups<term_t, T>(in, seed, b, lane, groups, 32, n, groups, K, vec, acc);
#pragma unroll
    for (int p = 0; p < P; ++p) {
      double s = acc[p];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, offset);
      if (lane == (p & 31)) out[b * P + p] = s;
    }
  }
}

// The finish adds a sample's chunk sums in an order fixed by `chunks` alone (never by B): up to kSerialChunks in
// index order, by one thread per (b, p); beyond, by a block per (b, p) (tree_finish: thread t adds chunks
// t, t + kBlock, ... in order, then a fixed tree over the threads). One thread adding them all was ~1000
// dependent L2 round trips at B = 1, n = 2^24 (0.1-0.2 ms, against a 0.035 ms read pass).
constexpr int64_t kSerialChunks = 64;

// out[b, p] = sum over c in index order of partial[b, c, p]; one thread per (b, p) (grid-stride).
__global__ void __launch_bounds__(kBlock)
sample_gram_finish_kernel(const double* partial, double* out, int64_t B, int64_t chunks, int P) {
  const int64_t total = B * P;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t b = idx / P;
    const int64_t p = idx - b * P;
    const double* row = partial + b * chunks * P + p;
    double sum = row[0];
    for (int64_t c = 1; c < chunks; ++c) sum += row[c * P];
    out[idx] = sum;
  }
}

// out[b, p] for chunks > kSerialChunks: one block per (b, p) (grid-stride over the B P items).
__global__ void __launch_bounds__(kBlock)
sample_gram_tree_finish_kernel(const double* partial, double* out, int64_t B, int64_t chunks, int P) {
  __shared__ double sums[kBlock];
  const int64_t total = B * P;
  for (int64_t idx = blockIdx.x; idx < total; idx += gridDim.x) {
    const int64_t b = idx / P;
    const int64_t p = idx - b * P;
    const double* row = partial + b * chunks * P + p;
    double sum = 0.0;  // 0 + x = x (a zero total may lose its sign: -0 + 0 = +0)
    for (int64_t c = threadIdx.x; c < chunks; c += kBlock) sum += row[c * P];
    sums[threadIdx.x] = sum;
    __syncthreads();
#pragma unroll
    for (int half = kBlock / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
      __syncthreads();
    }
    if (threadIdx.x == 0) out[idx] = sums[0];
    __syncthreads();  // sums is reused by the next item
  }
}

// The partial sums, or for small samples (partial null) the whole answer into out.
template <typename term_t, int T>
void launch_partial(const GramInputs<term_t>& in, const int64_t* seeds, double* partial, double* out, int64_t B,
                    int64_t n, int64_t groups, int64_t chunks, int64_t items, int K, bool vec, cudaStream_t stream) {
  if (partial == nullptr) {
    auto kernel = sample_gram_warp_kernel<term_t, T>;
    kernel<<<grid_size(B * 32, kernel), kBlock, 0, stream>>>(in, seeds, out, B, n, groups, K, vec);
  } else {
    auto kernel = sample_gram_partial_kernel<term_t, T>;
    kernel<<<grid_size(items * kBlock, kernel), kBlock, 0, stream>>>(
        in, seeds, partial, n, groups, chunks, items, K, vec);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sample_gram_cuda(at::TensorList terms, const at::Tensor& seeds_in, at::IntArrayRef streams) {
  check_sample_gram_args(terms, seeds_in, streams);
  const at::Tensor& first = terms[0];
  TORCH_CHECK(first.is_cuda(), "fastdiff::sample_gram (CUDA): terms[0] must be a CUDA tensor, got ", first.device());
  c10::cuda::CUDAGuard guard(first.device());
  const int K = static_cast<int>(terms.size());
  const int T = K + static_cast<int>(streams.size());
  const int P = gram_packed_size(T);
  const int64_t B = first.size(0);
  if (B == 0 || first.numel() == 0) return at::zeros({B, P}, first.options().dtype(at::kDouble));
  const int64_t n = first.numel() / B;
  const int64_t groups = (n + 3) / 4, chunks = gram_chunks(n), items = B * chunks;
  const at::Tensor seeds = seeds_in.contiguous();  // the kernel indexes seeds[b] directly
  const bool per_warp = n <= kWarpGramElems;
  at::Tensor partial = per_warp ? at::Tensor() : at::empty({B, chunks, P}, first.options().dtype(at::kDouble));
  at::Tensor out = at::empty({B, P}, first.options().dtype(at::kDouble));
  cudaStream_t cuda_stream = at::cuda::getCurrentCUDAStream();
  with_data_type(first.scalar_type(), [&](auto tag) {
    using term_t = decltype(tag);
    GramInputs<term_t> in{};
    bool vec = n % 4 == 0;
    for (int i = 0; i < K; ++i) {
      in.terms[i] = terms[i].const_data_ptr<term_t>();
      vec = vec && aligned(in.terms[i], 4 * sizeof(term_t));
    }
    for (int d = 0; d < T - K; ++d) in.streams[K + d] = static_cast<uint32_t>(streams[d]);
    const int64_t* sp = seeds.const_data_ptr<int64_t>();
    double* pp = per_warp ? nullptr : partial.mutable_data_ptr<double>();
    double* op = out.mutable_data_ptr<double>();
    switch (T) {  // checked: 1 <= T <= kMaxGramTerms
      case 1: return launch_partial<term_t, 1>(in, sp, pp, op, B, n, groups, chunks, items, K, vec, cuda_stream);
      case 2: return launch_partial<term_t, 2>(in, sp, pp, op, B, n, groups, chunks, items, K, vec, cuda_stream);
      case 3: return launch_partial<term_t, 3>(in, sp, pp, op, B, n, groups, chunks, items, K, vec, cuda_stream);
      case 4: return launch_partial<term_t, 4>(in, sp, pp, op, B, n, groups, chunks, items, K, vec, cuda_stream);
      case 5: return launch_partial<term_t, 5>(in, sp, pp, op, B, n, groups, chunks, items, K, vec, cuda_stream);
      case 6: return launch_partial<term_t, 6>(in, sp, pp, op, B, n, groups, chunks, items, K, vec, cuda_stream);
      case 7: return launch_partial<term_t, 7>(in, sp, pp, op, B, n, groups, chunks, items, K, vec, cuda_stream);
      case 8: return launch_partial<term_t, 8>(in, sp, pp, op, B, n, groups, chunks, items, K, vec, cuda_stream);
      default: TORCH_CHECK(false, "fastdiff::sample_gram (CUDA): unreachable T = ", T);
    }
  });
  static_assert(kMaxGramTerms == 8, "the switch above instantiates T = 1..8");
  if (per_warp) return out;
  if (chunks <= kSerialChunks) {
    sample_gram_finish_kernel<<<grid_size(B * P, sample_gram_finish_kernel), kBlock, 0, cuda_stream>>>(
        partial.const_data_ptr<double>(), out.mutable_data_ptr<double>(), B, chunks, P);
  } else {
    auto kernel = sample_gram_tree_finish_kernel;
    kernel<<<grid_size(B * P * kBlock, kernel), kBlock, 0, cuda_stream>>>(
        partial.const_data_ptr<double>(), out.mutable_data_ptr<double>(), B, chunks, P);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("sample_gram", &fastdiff::sample_gram_cuda);
}
