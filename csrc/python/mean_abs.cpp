// fastdiff._C.mean_abs(a, b=None, norm=False, keep=False): mean |a - b| (mean |a| without b) over every element of
// float32 CPU tensors of one shape, any strides (a subsample view: x[..., ::8, ::8], a flat sample's first 1/64);
// with norm=True also mean |a| from the same read (a pair), with keep=True a is copied into b after it is read.
// Step caching's statistics (fastdiff/sampling/features/caching.py) read a 1/64 subsample per evaluation: torch's
// F.l1_loss on 65536 such elements took 57 us on the CPU (sub, abs, mean: three passes and two temporaries), this
// one read 12 us. Sums: blocks of 64 elements in float32, the blocks added in float64, rows in row order (the
// result does not depend on the thread count); the reference is the torch expression the tests compare with.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace fastdiff {

namespace {

struct Sums {
  double diff = 0, norm = 0;
};

// One row of n elements with strides sa, sb: eight running float32 sums per block of 64 (vectorized without
// reassociation: 2x a float64 loop), the block added in float64 (relative error ~1e-7: the statistics feed a
// threshold). kDiff: |a - b|, else |a|. (Both sums in one loop did not vectorize: 60 us against 16 + 4 for two.)
template <bool kDiff, bool kUnit>
Sums row_sums(const float* a, int64_t sa, const float* b, int64_t sb, int64_t n) {
  Sums out;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t k = i; k < i + 64; k += 8) {
      for (int j = 0; j < 8; ++j) {
        const float va = a[kUnit ? k + j : (k + j) * sa];
        s[j] += std::fabs(kDiff ? va - b[kUnit ? k + j : (k + j) * sb] : va);
      }
    }
    out.diff += static_cast<double>(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
  }
  for (; i < n; ++i) {
    const float va = a[i * sa];
    out.diff += std::fabs(kDiff ? va - b[i * sb] : va);
  }
  return out;
}

template <bool kDiff>
Sums row_sums_any(const float* a, int64_t sa, const float* b, int64_t sb, int64_t n) {
  return sa == 1 && (!kDiff || sb == 1) ? row_sums<kDiff, true>(a, 1, b, 1, n)
                                        : row_sums<kDiff, false>(a, sa, b, sb, n);
}

}  // namespace

pybind11::object mean_abs(const at::Tensor& a, const std::optional<at::Tensor>& b_opt, bool norm, bool keep) {
  TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kFloat, "mean_abs: a must be a float32 CPU tensor, got ",
              a.scalar_type(), " on ", a.device());
  const at::Tensor* b = b_opt.has_value() ? &*b_opt : nullptr;
  if (b) {
    TORCH_CHECK(b->device().is_cpu() && b->scalar_type() == at::kFloat,
                "mean_abs: b must be a float32 CPU tensor, got ", b->scalar_type(), " on ", b->device());
    TORCH_CHECK(b->sizes() == a.sizes(), "mean_abs: b must have a's shape ", a.sizes(), ", got ", b->sizes());
  }
  TORCH_CHECK(!keep || b, "mean_abs: keep=True copies a into b: b is required");
  const int64_t numel = a.numel(), dims = a.dim();
  const int64_t n = dims == 0 ? 1 : a.size(dims - 1);  // rows: each a strided run of the last dimension
  const int64_t rows = n == 0 ? 0 : numel / n;
  const int64_t sa = dims == 0 ? 1 : a.stride(dims - 1), sb = b && dims > 0 ? b->stride(dims - 1) : 1;
  const float* pa = a.const_data_ptr<float>();
  float* pb = b ? b->data_ptr<float>() : nullptr;
  auto offset = [&](const at::Tensor& t, int64_t r) {
    int64_t off = 0;
    for (int64_t d = dims - 2; d >= 0; --d) {
      off += (r % t.size(d)) * t.stride(d);
      r /= t.size(d);
    }
    return off;
  };
  std::vector<Sums> sums(rows);
  {
    std::optional<pybind11::gil_scoped_release> no_gil;  // large reads without the GIL; small ones keep it (cheaper)
    if (numel >= (int64_t{1} << 16)) no_gil.emplace();
    // threads from 2^14 elements: cold reads gain from two (below, starting them costs more than they save)
    at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(n, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* ra = pa + offset(a, r);
        float* rb = pb ? pb + offset(*b, r) : nullptr;
        sums[r] = rb ? row_sums_any<true>(ra, sa, rb, sb, n) : row_sums_any<false>(ra, sa, nullptr, 0, n);
        if (rb && norm) sums[r].norm = row_sums_any<false>(ra, sa, nullptr, 0, n).diff;  // the row again, from L1
        if (keep && sa == 1 && sb == 1) {
          std::memcpy(rb, ra, static_cast<size_t>(n) * sizeof(float));
        } else if (keep) {
          for (int64_t i = 0; i < n; ++i) rb[i * sb] = ra[i * sa];
        }
      }
    });
  }
  Sums total;
  for (const Sums& s : sums) {
    total.diff += s.diff;
    total.norm += s.norm;
  }
  const double count = static_cast<double>(numel);  // 0 elements: nan, as torch's mean
  const double diff = total.diff / count;
  if (!norm) return pybind11::float_(diff);
  return pybind11::make_tuple(diff, b ? total.norm / count : diff);
}

}  // namespace fastdiff
