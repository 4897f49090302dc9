// Header-only test of the per-sample reduction's packed layout (csrc/include/fastdiff/sample_gram.h):
// gram_accumulate over random vectors, for every T, against the Gram matrix written out with gram_index,
// and the sizes and chunk counts the kernels allocate by.
#include <cstdint>
#include <cstdio>
#include <random>

#include "check.h"
#include "fastdiff/sample_gram.h"

using fastdiff_test::Checker;

namespace {

template <int T>
void check_layout(Checker& c, std::mt19937_64& rng) {
  constexpr int P = fastdiff::gram_packed_size(T);
  std::normal_distribution<float> normal;
  double acc[P] = {};
  double sums[T] = {}, gram[T][T] = {};
  for (int e = 0; e < 257; ++e) {
    double u[T];
    for (int i = 0; i < T; ++i) u[i] = static_cast<double>(normal(rng));
    fastdiff::gram_accumulate<T>(acc, u);
    for (int i = 0; i < T; ++i) {
      sums[i] += u[i];
      for (int j = 0; j < T; ++j) gram[i][j] += u[i] * u[j];
    }
  }
  for (int i = 0; i < T; ++i) {
    c.near(acc[i], sums[i], 1e-12, "T=%d sum %d", T, i);
    for (int j = i; j < T; ++j) c.near(acc[fastdiff::gram_index(T, i, j)], gram[i][j], 1e-11, "T=%d (%d, %d)", T, i, j);
  }
  c.expect(fastdiff::gram_index(T, T - 1, T - 1) == P - 1, "the last product ends the packed row");
}

}  // namespace

int main() {
  int status = 0;
  std::mt19937_64 rng(7);
  Checker layout("gram_accumulate / gram_index");
  check_layout<1>(layout, rng);
  check_layout<2>(layout, rng);
  check_layout<3>(layout, rng);
  check_layout<4>(layout, rng);
  check_layout<5>(layout, rng);
  check_layout<6>(layout, rng);
  check_layout<7>(layout, rng);
  check_layout<8>(layout, rng);
  status |= layout.report();

  Checker sizes("sizes");
  sizes.expect(fastdiff::gram_packed_size(3) == 9, "P(3) = 3 sums + 6 products");
  sizes.expect(fastdiff::gram_packed_size(fastdiff::kMaxGramTerms) == 44, "P(8) = 44");
  sizes.expect(fastdiff::gram_chunks(1) == 1 && fastdiff::gram_chunks(4096) == 1 && fastdiff::gram_chunks(4097) == 2,
               "chunks of 4096");
  status |= sizes.report();

  std::printf("test_sample_gram: %s\n", status ? "FAILED" : "PASSED");
  return status;
}
