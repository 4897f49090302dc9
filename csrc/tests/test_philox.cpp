// Header-only test of the noise stream, spec v1 (docs/design.md §3), in csrc/include/fastdiff/philox.h:
//  - the Philox4x32-10 known answers of tests/noise_vectors.json, word for word;
//  - the golden normals of the same file through normal4<float> (1e-5) and normal4<double> (1e-12);
//  - a sweep of ~1.6M elements against a naive double evaluation of the spec's formulas (which checks
//    the rewritten log / angle forms of philox.h and the counter/key layout away from the golden set).
// The vectors come from fastdiff_test/noise_vectors.h, generated from the JSON at configure time.
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "check.h"
#include "fastdiff/philox.h"
#include "fastdiff_test/noise_vectors.h"

using fastdiff_test::Checker;

namespace {

// The spec written out literally in double (no shared code with normal4 beyond philox4x32_10).
double naive_normal(uint64_t seed, uint32_t stream, uint64_t e) {
  const uint64_t q = e >> 2;
  const fastdiff::Philox4 p = fastdiff::philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), stream,
                                                      0u, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const int lane = static_cast<int>(e & 3);
  const uint32_t first = lane < 2 ? p.w[0] : p.w[2];
  const uint32_t second = lane < 2 ? p.w[1] : p.w[3];
  auto u = [](uint32_t w) { return (static_cast<double>(w >> 8) + 0.5) * std::ldexp(1.0, -24); };
  const double r = std::sqrt(-2.0 * std::log(u(first)));
  const double theta = 2.0 * 3.14159265358979323846 * u(second);
  return (lane == 0 || lane == 2) ? r * std::cos(theta) : r * std::sin(theta);
}

}  // namespace

int main() {
  using namespace fastdiff_test;
  int status = 0;

  Checker kat("philox4x32_10 known answers");
  for (std::size_t i = 0; i < kNumPhiloxKnownAnswers; ++i) {
    const PhiloxKnownAnswer& v = kPhiloxKnownAnswers[i];
    const fastdiff::Philox4 p =
        fastdiff::philox4x32_10(v.counter[0], v.counter[1], v.counter[2], v.counter[3], v.key[0], v.key[1]);
    for (int j = 0; j < 4; ++j) {
      char what[96];
      std::snprintf(what, sizeof what, "vector %zu word %d: got %u, want %u", i, j, p.w[j], v.output[j]);
      kat.expect(p.w[j] == v.output[j], what);
    }
  }
  status |= kat.report();

  Checker gf("golden normals, normal4<float>");
  Checker gd("golden normals, normal4<double>");
  for (std::size_t i = 0; i < kNumGoldenNormals; ++i) {
    const GoldenNormal& v = kGoldenNormals[i];
    float f[4];
    double d[4];
    fastdiff::normal4<float>(v.seed, v.element >> 2, v.stream, f);
    fastdiff::normal4<double>(v.seed, v.element >> 2, v.stream, d);
    const int lane = static_cast<int>(v.element & 3);
    const auto seed = static_cast<unsigned long long>(v.seed);
    const auto elem = static_cast<unsigned long long>(v.element);
    gf.near(f[lane], v.normal, 1e-5, "seed %llu stream %u element %llu", seed, v.stream, elem);
    gd.near(d[lane], v.normal, 1e-12, "seed %llu stream %u element %llu", seed, v.stream, elem);
  }
  status |= gf.report();
  status |= gd.report();

  // Sweep: groups [0, 2^16) and the groups around q = 2^32 (where the counter's high word starts).
  Checker sf("sweep vs naive spec, float");
  Checker sd("sweep vs naive spec, double");
  const uint64_t seeds[] = {0ull, 42ull, 0xFFFFFFFFFFFFFFFFull};
  const uint32_t streams[] = {0u, 7u, 0x80000000u};
  const uint64_t starts[] = {0ull, (1ull << 32) - 1024};
  long over_1e6 = 0;
  for (uint64_t seed : seeds) {
    for (uint32_t stream : streams) {
      for (uint64_t start : starts) {
        const uint64_t groups = start == 0 ? (1ull << 16) : 2048;
        for (uint64_t q = start; q < start + groups; ++q) {
          float f[4];
          double d[4];
          fastdiff::normal4<float>(seed, q, stream, f);
          fastdiff::normal4<double>(seed, q, stream, d);
          for (int lane = 0; lane < 4; ++lane) {
            const uint64_t e = 4 * q + lane;
            const double want = naive_normal(seed, stream, e);
            const auto s = static_cast<unsigned long long>(seed);
            const auto el = static_cast<unsigned long long>(e);
            sf.near(f[lane], want, 1e-5, "seed %llu stream %u element %llu", s, stream, el);
            sd.near(d[lane], want, 1e-12, "seed %llu stream %u element %llu", s, stream, el);
            if (std::fabs(f[lane] - want) > 1e-6) ++over_1e6;
          }
        }
      }
    }
  }
  char detail[64];
  std::snprintf(detail, sizeof detail, "(%ld above 1e-6)", over_1e6);
  status |= sf.report(detail);
  status |= sd.report();

  std::printf("test_philox: %s (%zu known answers, %zu golden normals, %ld sweep elements)\n",
              status ? "FAILED" : "PASSED", kNumPhiloxKnownAnswers, kNumGoldenNormals, sf.checks);
  return status;
}
