// The per-sample reduction pass fastdiff::sample_gram (docs/design.md §2; the specification is
// sample_gram_reference in fastdiff/ops/sample_gram.py), written once for the CPU loop, the CUDA kernel
// and the C++ tests. For the T <= kMaxGramTerms vectors u_0..u_{T-1} of a sample (the terms, then the
// noise draws) the packed row holds
//
//   [0, T)                  sum_e u_i[e]
//   [T, T + T (T + 1) / 2)  sum_e u_i[e] u_j[e] for i <= j, row-major (gram_index)
//
// in float64: a product of two float32 values is exact in float64. Each sample is cut into chunks of
// kGramChunk elements; one thread (CPU) or one block (CUDA) forms a chunk's sums in an order fixed by
// the element indices, and the chunks are added in index order: the bits depend on neither the batch
// size nor the thread count.
#pragma once

#include <cstdint>

#include "fastdiff/macros.h"

namespace fastdiff {

constexpr int kMaxGramTerms = 8;
constexpr int kMaxGramDraws = 4;
// Elements per chunk (a multiple of the CPU noise blocks, 64 and 128, and of the CUDA group, 4).
constexpr int64_t kGramChunk = 4096;

FASTDIFF_HD constexpr int gram_packed_size(int T) { return T + T * (T + 1) / 2; }

FASTDIFF_HD int64_t gram_chunks(int64_t n) { return (n + kGramChunk - 1) / kGramChunk; }

// Position of sum_e u_i u_j (i <= j) in the packed row.
FASTDIFF_HD constexpr int gram_index(int T, int i, int j) { return T + i * T - i * (i - 1) / 2 + (j - i); }

// Adds one element's values u[0..T) to the running sums acc[0 .. gram_packed_size(T)). Acc is double or a
// vector of doubles (the counts are compile-time: the loops unroll).
template <int T, typename Acc>
FASTDIFF_HD void gram_accumulate(Acc* acc, const Acc* u) {
  for (int i = 0; i < T; ++i) acc[i] = acc[i] + u[i];
  int p = T;
  for (int i = 0; i < T; ++i) {
    for (int j = i; j < T; ++j, ++p) acc[p] = acc[p] + u[i] * u[j];
  }
}

}  // namespace fastdiff
