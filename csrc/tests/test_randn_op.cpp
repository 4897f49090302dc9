// The registered op fastdiff::randn on CPU, called through the c10 dispatcher as any C++ user would,
// against the spec-v1 header (fastdiff::normal4): odd offsets and lengths, the q = 2^32 boundary,
// float32 / float16 / bfloat16 / float64 outputs, batches (sample b equals its seed alone), the
// AVX2 loop against the portable one (FASTDIFF_CPU_SIMD=portable), and fastdiff::philox4x32_10
// against the known answers. Links libfastdiff.so, whose static registrations provide the ops.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "check.h"
#include "fastdiff/philox.h"
#include "fastdiff_test/noise_vectors.h"

using fastdiff_test::Checker;

namespace {

using RandnFn = at::Tensor(const at::Tensor&, int64_t, c10::IntArrayRef, int64_t, c10::ScalarType);
using PhiloxFn = at::Tensor(const at::Tensor&, const at::Tensor&);
using SimdFn = std::string();

c10::TypedOperatorHandle<RandnFn> randn_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdiff::randn", "").typed<RandnFn>();
  return op;
}

std::string cpu_simd() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdiff::cpu_simd", "").typed<SimdFn>();
  return op.call();
}

at::Tensor long_tensor(const std::vector<int64_t>& v, std::vector<int64_t> sizes) {
  return at::from_blob(const_cast<int64_t*>(v.data()), sizes, at::kLong).clone();
}

at::Tensor call_randn(const std::vector<int64_t>& seeds, int64_t stream, std::vector<int64_t> shape, int64_t offset,
                      at::ScalarType dtype) {
  return randn_op().call(long_tensor(seeds, {static_cast<int64_t>(seeds.size())}), stream, shape, offset, dtype);
}

struct Case {
  std::vector<int64_t> seeds;  // int64 two's complement of the uint64 seeds
  int64_t stream;
  std::vector<int64_t> shape;
  int64_t offset;
};

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

// Elementwise check of one op output against normal4<float> (normal4<double> for float64).
void check_against_spec(Checker& c, const Case& k, at::ScalarType dtype, const at::Tensor& out) {
  std::vector<int64_t> want_sizes{static_cast<int64_t>(k.seeds.size())};
  want_sizes.insert(want_sizes.end(), k.shape.begin(), k.shape.end());
  if (!c.expect(out.sizes().vec() == want_sizes && out.scalar_type() == dtype && out.device().is_cpu(),
                "output sizes / dtype / device")) {
    return;
  }
  const at::Tensor got = out.to(at::kDouble).contiguous().view({static_cast<int64_t>(k.seeds.size()), -1});
  const int64_t n = got.size(1);
  const double* g = got.data_ptr<double>();
  for (std::size_t b = 0; b < k.seeds.size(); ++b) {
    const auto seed = static_cast<uint64_t>(k.seeds[b]);
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t e = static_cast<uint64_t>(k.offset + i);
      double want;
      if (dtype == at::kDouble) {
        double w4[4];
        fastdiff::normal4<double>(seed, e >> 2, static_cast<uint32_t>(k.stream), w4);
        want = w4[e & 3];
      } else {
        float w4[4];
        fastdiff::normal4<float>(seed, e >> 2, static_cast<uint32_t>(k.stream), w4);
        want = w4[e & 3];
      }
      // float32: the AVX2 loop (Sleef) vs libm; half / bfloat16: one rounding of the float value
      // (half an ulp, up to a full ulp where the float values straddle a rounding boundary).
      double tol = 1e-6;
      if (dtype == at::kDouble) tol = 1e-12;
      if (dtype == at::kHalf) tol = std::ldexp(std::fabs(want), -10) + 2e-6;
      if (dtype == at::kBFloat16) tol = std::ldexp(std::fabs(want), -7) + 2e-6;
      c.near(g[b * n + i], want, tol, "%s seed %llu stream %lld offset %lld element %lld", dtype_name(dtype),
             static_cast<unsigned long long>(seed), static_cast<long long>(k.stream),
             static_cast<long long>(k.offset), static_cast<long long>(e));
    }
  }
}

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {{0}, 0, {37}, 5},                                       // odd offset, odd length
      {{42}, 1, {37}, 0},
      {{-1}, 0x80000000LL, {3, 5, 7}, 3},                      // seed 2^64 - 1, stream 2^31
      {{1099511627783LL}, 0xFFFFFFFFLL, {37}, 17179869180LL},  // crosses q = 2^32, stream 2^32 - 1
      {{7}, 2, {}, 0},                                         // one element per sample
      {{7}, 2, {0}, 11},                                       // empty
      {{3, 4}, 9, {70001}, 1},                                 // large: several parallel_for chunks
      {{0, 1, 42, INT64_MAX, -1, 1099511627783LL}, 5, {2, 37}, 5},  // batch
  };
  return all;
}

}  // namespace

int main() {
  int status = 0;
  try {
    randn_op();
  } catch (const c10::Error& err) {
    std::printf("FAIL fastdiff::randn is not registered (was libfastdiff loaded?): %s\n", err.what_without_backtrace());
    return 1;
  }
  const std::string simd_default = cpu_simd();
  const at::ScalarType dtypes[] = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};

  // 1. Every case and dtype against the header (default loop: AVX2 where the CPU has it).
  std::vector<at::Tensor> default_float;
  for (at::ScalarType dtype : dtypes) {
    std::string name = std::string("randn vs normal4, ") + dtype_name(dtype);
    Checker c(name.c_str());
    for (const Case& k : cases()) {
      const at::Tensor out = call_randn(k.seeds, k.stream, k.shape, k.offset, dtype);
      check_against_spec(c, k, dtype, out);
      if (dtype == at::kFloat) default_float.push_back(out);
    }
    std::string detail = "(cpu_simd=" + simd_default + ")";
    status |= c.report(detail.c_str());
  }

  // 2. Batches: sample b is its seed alone, bit for bit, in every dtype.
  {
    Checker c("batch row b == seed b alone");
    for (at::ScalarType dtype : dtypes) {
      for (const Case& k : cases()) {
        if (k.seeds.size() < 2) continue;
        const at::Tensor batch = call_randn(k.seeds, k.stream, k.shape, k.offset, dtype);
        for (std::size_t b = 0; b < k.seeds.size(); ++b) {
          const at::Tensor alone = call_randn({k.seeds[b]}, k.stream, k.shape, k.offset, dtype);
          char what[96];
          std::snprintf(what, sizeof what, "%s seed %lld", dtype_name(dtype), static_cast<long long>(k.seeds[b]));
          c.expect(at::equal(batch[static_cast<int64_t>(b)], alone[0]), what);
        }
      }
    }
    status |= c.report();
  }

  // 3. The portable loop (FASTDIFF_CPU_SIMD=portable) gives the same numbers as the default one.
  {
    Checker c("portable loop vs default, float32");
    setenv("FASTDIFF_CPU_SIMD", "portable", 1);
    const std::string simd_portable = cpu_simd();
    c.expect(simd_portable == "portable", "cpu_simd() reports 'portable' under FASTDIFF_CPU_SIMD=portable");
    Checker spec("portable loop vs normal4, float32");
    for (std::size_t i = 0; i < cases().size(); ++i) {
      const Case& k = cases()[i];
      const at::Tensor out = call_randn(k.seeds, k.stream, k.shape, k.offset, at::kFloat);
      check_against_spec(spec, k, at::kFloat, out);
      const at::Tensor a = out.contiguous().view(-1);
      const at::Tensor d = default_float[i].contiguous().view(-1);
      for (int64_t j = 0; j < a.numel(); ++j) {
        c.near(a.data_ptr<float>()[j], d.data_ptr<float>()[j], 1e-6, "case %zu element %lld", i,
               static_cast<long long>(j));
      }
    }
    unsetenv("FASTDIFF_CPU_SIMD");
    c.expect(cpu_simd() == simd_default, "cpu_simd() back to its default after unsetenv");
    std::string detail = "(" + simd_default + " vs " + simd_portable + ")";
    status |= spec.report();
    status |= c.report(detail.c_str());
  }

  // 4. fastdiff::philox4x32_10 against the known answers of tests/noise_vectors.json.
  {
    Checker c("philox4x32_10 op known answers");
    using namespace fastdiff_test;
    std::vector<int64_t> counter, key;
    for (std::size_t i = 0; i < kNumPhiloxKnownAnswers; ++i) {
      for (uint32_t w : kPhiloxKnownAnswers[i].counter) counter.push_back(w);
      for (uint32_t w : kPhiloxKnownAnswers[i].key) key.push_back(w);
    }
    const auto n = static_cast<int64_t>(kNumPhiloxKnownAnswers);
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdiff::philox4x32_10", "").typed<PhiloxFn>();
    const at::Tensor out = op.call(long_tensor(counter, {n, 4}), long_tensor(key, {n, 2})).contiguous();
    if (c.expect(out.sizes().vec() == std::vector<int64_t>{n, 4} && out.scalar_type() == at::kLong, "output [N, 4] int64")) {
      for (int64_t i = 0; i < n; ++i) {
        for (int j = 0; j < 4; ++j) {
          char what[96];
          std::snprintf(what, sizeof what, "vector %lld word %d", static_cast<long long>(i), j);
          c.expect(out.data_ptr<int64_t>()[4 * i + j] == static_cast<int64_t>(kPhiloxKnownAnswers[i].output[j]), what);
        }
      }
    }
    status |= c.report();
  }

  // 5. Argument checks raise c10::Error instead of writing garbage.
  {
    Checker c("randn argument checks");
    auto raises = [&](const char* what, auto&& fn) {
      bool threw = false;
      try {
        fn();
      } catch (const c10::Error&) {
        threw = true;
      }
      c.expect(threw, what);
    };
    raises("2-D seeds", [] { randn_op().call(at::zeros({2, 2}, at::kLong), 0, {4}, 0, at::kFloat); });
    raises("int32 seeds", [] { randn_op().call(at::zeros({2}, at::kInt), 0, {4}, 0, at::kFloat); });
    raises("stream -1", [] { call_randn({0}, -1, {4}, 0, at::kFloat); });
    raises("stream 2^32", [] { call_randn({0}, 1LL << 32, {4}, 0, at::kFloat); });
    raises("offset -1", [] { call_randn({0}, 0, {4}, -1, at::kFloat); });
    raises("int32 dtype", [] { call_randn({0}, 0, {4}, 0, at::kInt); });
    status |= c.report();
  }

  std::printf("test_randn_op: %s (cpu_simd default: %s, %d threads)\n", status ? "FAILED" : "PASSED",
              simd_default.c_str(), at::get_num_threads());
  return status;
}
