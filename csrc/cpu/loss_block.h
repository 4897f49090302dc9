// The CPU loops of fastdiff::add_noise, fastdiff::diffusion_loss and fastdiff::diffusion_loss_backward,
// built once per instruction set like sampler_step_block.h (simd.h): by loss.cpp (portable), avx2/loss.cpp and
// avx512/loss.cpp.
//
// Work is cut into blocks of kBlockElems (64; 128 under AVX-512) elements of one sample (one normal_block of noise); the math of a
// block runs in at::vec::Vectorized<float> through fastdiff/loss.h, the definition the CUDA kernels
// use. A partial last block goes through zero-padded buffers (its padded normals are zeroed too, so
// they add nothing to the loss). A sample whose noise coefficient (beta, coef_eps) is 0 draws no
// noise: eps = 0 gives the same numbers, since every normal is finite.
//
// The loss sums are deterministic: one task computes a whole chunk of kLossChunk elements (block
// order; each block's squares summed in float per vector lane, then each lane added in float64), and
// loss.cpp adds the chunks' partial sums in index order. No sum depends on the thread count.
//
// float16 / bfloat16 inputs are widened by to_float_block (widen_block.h: AVX2 intrinsics on the raw
// words in the SIMD builds). The backward's float16 / bfloat16 output is narrowed by narrow_block,
// defined in the portable loss.cpp: the SIMD builds call it and instantiate no c10::Half /
// c10::BFloat16 function itself (see widen_block.h for why).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fastdiff/loss.h"
#include "noise_block.h"
#include "widen_block.h"

namespace fastdiff {
namespace cpu {

// add_noise on contiguous buffers.
template <typename z_t>
struct AddNoiseArgs {
  const z_t* z;          // [B, n]
  const float* alpha;    // [B]
  const float* beta;     // [B]
  const int64_t* seeds;  // [B]
  float* out;            // [B, n]
  int64_t B, n;
  uint32_t stream;
};

// diffusion_loss (partial != nullptr; with residual, diffusion_loss_residual) or its backward
// (grad != nullptr) on contiguous buffers.
template <typename pred_t, typename z_t>
struct LossArgs {
  const pred_t* pred;      // [B, n]
  const z_t* z;            // [B, n]
  const float* coef_z;     // [B]
  const float* coef_eps;   // [B]
  const float* weight;     // [B]
  const int64_t* seeds;    // [B]
  const float* grad_loss;  // [B] (backward)
  double* partial;         // [B, loss_chunks(n)] sums of squared residuals (forward)
  float* residual;         // [B, n] pred - target, or nullptr (forward of diffusion_loss_residual)
  pred_t* grad;            // [B, n] (backward)
  int64_t B, n;
  uint32_t stream;
};

// dst[0 .. count) = src[0 .. count) rounded to float16 / bfloat16. Defined in loss.cpp (portable).
void narrow_block(const float* src, int count, c10::Half* dst);
void narrow_block(const float* src, int count, c10::BFloat16* dst);

// add_noise_<isa>, diffusion_loss_<isa> and diffusion_loss_backward_<isa> for every pair of float32 /
// float16 / bfloat16 inputs; defined by FASTDIFF_DEFINE_LOSS_LOOPS in loss.cpp, avx2/ and avx512/.
#define FASTDIFF_DECLARE_LOSS_LOOPS(isa)                              \
  template <typename z_t>                                             \
  void add_noise_##isa(const AddNoiseArgs<z_t>& a);                   \
  template <typename pred_t, typename z_t>                            \
  void diffusion_loss_##isa(const LossArgs<pred_t, z_t>& a);          \
  template <typename pred_t, typename z_t>                            \
  void diffusion_loss_backward_##isa(const LossArgs<pred_t, z_t>& a);
FASTDIFF_DECLARE_LOSS_LOOPS(portable)
FASTDIFF_DECLARE_LOSS_LOOPS(avx2)
FASTDIFF_DECLARE_LOSS_LOOPS(avx512)
#undef FASTDIFF_DECLARE_LOSS_LOOPS

#define FASTDIFF_LOSS_PAIR(isa, P, Z)                                                 \
  template void diffusion_loss_##isa<P, Z>(const LossArgs<P, Z>&);                    \
  template void diffusion_loss_backward_##isa<P, Z>(const LossArgs<P, Z>&);
#define FASTDIFF_LOSS_PRED(isa, P)          \
  FASTDIFF_LOSS_PAIR(isa, P, float)         \
  FASTDIFF_LOSS_PAIR(isa, P, c10::Half)     \
  FASTDIFF_LOSS_PAIR(isa, P, c10::BFloat16)
#define FASTDIFF_DEFINE_LOSS_LOOPS(isa)                                      \
  template <typename z_t>                                                    \
  void add_noise_##isa(const AddNoiseArgs<z_t>& a) {                         \
    add_noise_rows(a);                                                       \
  }                                                                          \
  template <typename pred_t, typename z_t>                                   \
  void diffusion_loss_##isa(const LossArgs<pred_t, z_t>& a) {                \
    loss_rows(a);                                                            \
  }                                                                          \
  template <typename pred_t, typename z_t>                                   \
  void diffusion_loss_backward_##isa(const LossArgs<pred_t, z_t>& a) {       \
    loss_backward_rows(a);                                                   \
  }                                                                          \
  template void add_noise_##isa<float>(const AddNoiseArgs<float>&);          \
  template void add_noise_##isa<c10::Half>(const AddNoiseArgs<c10::Half>&);  \
  template void add_noise_##isa<c10::BFloat16>(const AddNoiseArgs<c10::BFloat16>&); \
  FASTDIFF_LOSS_PRED(isa, float)                                             \
  FASTDIFF_LOSS_PRED(isa, c10::Half)                                         \
  FASTDIFF_LOSS_PRED(isa, c10::BFloat16)

namespace {  // one copy per translation unit: the AVX2 and portable builds must not merge

// The normals of the block starting at element e0 of a sample, or zeros when `draw` is false;
// entries count .. 31 are zeroed.
inline void block_noise(bool draw, uint64_t seed, int64_t e0, uint32_t stream, int count, float* eps) {
  if (draw) {
    normal_block(seed, static_cast<uint64_t>(e0 >> 2), stream, eps);
    for (int j = count; j < kBlockElems; ++j) eps[j] = 0.0f;
  } else {
    for (int j = 0; j < kBlockElems; ++j) eps[j] = 0.0f;
  }
}

// Inputs of a block as float: the data itself (float32, full block) or `buf` (widened / padded).
template <typename T>
inline const float* block_floats(const T* src, int count, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (count == kBlockElems) return src;
    for (int j = 0; j < kBlockElems; ++j) buf[j] = j < count ? src[j] : 0.0f;
  } else {
    to_float_block(src, count, buf);
  }
  return buf;
}

template <typename z_t>
void add_noise_rows(const AddNoiseArgs<z_t>& a) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int V = Vec::size();
  const int64_t n = a.n;
  if (a.B == 0 || n == 0) return;
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;
  at::parallel_for(0, a.B * blocks, 128, [&](int64_t begin, int64_t end) {
    alignas(64) float eps[kBlockElems], zbuf[kBlockElems], obuf[kBlockElems];
    int64_t b = begin / blocks;
    int64_t blk = begin - b * blocks;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t e0 = blk * kBlockElems;
      const int count = n - e0 < kBlockElems ? static_cast<int>(n - e0) : kBlockElems;
      const int64_t base = b * n + e0;
      const float beta = a.beta[b];
      block_noise(beta != 0.0f, static_cast<uint64_t>(a.seeds[b]), e0, a.stream, count, eps);
      const float* z = block_floats(a.z + base, count, zbuf);
      float* out = count == kBlockElems ? a.out + base : obuf;
      const Vec av(a.alpha[b]), bv(beta);
      for (int j = 0; j < kBlockElems; j += V) {
        const Vec zv = Vec::loadu(z + j), ev = Vec::loadu(eps + j);
        noised_element(av, bv, zv, ev).store(out + j);
      }
      if (count < kBlockElems) std::memcpy(a.out + base, obuf, sizeof(float) * count);
      if (++blk == blocks) {
        blk = 0;
        ++b;
      }
    }
  });
}

template <typename pred_t, typename z_t>
void loss_rows(const LossArgs<pred_t, z_t>& a) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int V = Vec::size();
  const int64_t n = a.n;
  if (a.B == 0 || n == 0) return;
  const int64_t chunks = loss_chunks(n);
  static_assert(kLossChunk % kBlockElems == 0, "a chunk holds whole blocks");
  // One chunk (4096 elements, 64 noise blocks) per job: enough work to amortize the scheduling.
  at::parallel_for(0, a.B * chunks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float eps[kBlockElems], pbuf[kBlockElems], zbuf[kBlockElems], rbuf[kBlockElems], lanes[V];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / chunks;
      const int64_t c = job - b * chunks;
      const uint64_t seed = static_cast<uint64_t>(a.seeds[b]);
      const float ce = a.coef_eps[b];
      const Vec czv(a.coef_z[b]), cev(ce);
      double acc[V];
      for (int l = 0; l < V; ++l) acc[l] = 0.0;
      const int64_t e_end = std::min<int64_t>(n, (c + 1) * kLossChunk);
      for (int64_t e0 = c * kLossChunk; e0 < e_end; e0 += kBlockElems) {
        const int count = e_end - e0 < kBlockElems ? static_cast<int>(e_end - e0) : kBlockElems;
        const int64_t base = b * n + e0;
        block_noise(ce != 0.0f, seed, e0, a.stream, count, eps);
        const float* p = block_floats(a.pred + base, count, pbuf);
        const float* z = block_floats(a.z + base, count, zbuf);
        Vec sq(0.0f);
        // the residual goes straight to its place in full blocks, through rbuf in a partial one
        float* res = a.residual == nullptr ? nullptr : count == kBlockElems ? a.residual + base : rbuf;
        for (int j = 0; j < kBlockElems; j += V) {
          const Vec r = loss_residual(Vec::loadu(p + j), czv, cev, Vec::loadu(z + j), Vec::loadu(eps + j));
          sq = sq + r * r;
          if (res != nullptr) r.store(res + j);
        }
        if (res == rbuf) std::memcpy(a.residual + base, rbuf, sizeof(float) * count);
        sq.store(lanes);
        for (int l = 0; l < V; ++l) acc[l] += static_cast<double>(lanes[l]);
      }
      double sum = 0.0;
      for (int l = 0; l < V; ++l) sum += acc[l];
      a.partial[job] = sum;
    }
  });
}

template <typename pred_t, typename z_t>
void loss_backward_rows(const LossArgs<pred_t, z_t>& a) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int V = Vec::size();
  const int64_t n = a.n;
  if (a.B == 0 || n == 0) return;
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;
  at::parallel_for(0, a.B * blocks, 128, [&](int64_t begin, int64_t end) {
    alignas(64) float eps[kBlockElems], pbuf[kBlockElems], zbuf[kBlockElems], obuf[kBlockElems];
    int64_t b = begin / blocks;
    int64_t blk = begin - b * blocks;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t e0 = blk * kBlockElems;
      const int count = n - e0 < kBlockElems ? static_cast<int>(n - e0) : kBlockElems;
      const int64_t base = b * n + e0;
      const float ce = a.coef_eps[b];
      block_noise(ce != 0.0f, static_cast<uint64_t>(a.seeds[b]), e0, a.stream, count, eps);
      const float* p = block_floats(a.pred + base, count, pbuf);
      const float* z = block_floats(a.z + base, count, zbuf);
      const Vec sv(loss_grad_scale(a.grad_loss[b], a.weight[b], n)), czv(a.coef_z[b]), cev(ce);
      float* out = obuf;
      if constexpr (std::is_same_v<pred_t, float>) {
        if (count == kBlockElems) out = a.grad + base;
      }
      for (int j = 0; j < kBlockElems; j += V) {
        loss_grad_element(sv, Vec::loadu(p + j), czv, cev, Vec::loadu(z + j), Vec::loadu(eps + j)).store(out + j);
      }
      if constexpr (std::is_same_v<pred_t, float>) {
        if (count < kBlockElems) std::memcpy(a.grad + base, obuf, sizeof(float) * count);
      } else {
        narrow_block(obuf, count, a.grad + base);
      }
      if (++blk == blocks) {
        blk = 0;
        ++b;
      }
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastdiff
