// The registered op fastdiff::guided_step on CPU, called through the c10 dispatcher, against the
// per-element definition (fastdiff::step_element<..., float>) with spec-v1 noise from
// fastdiff::normal4<float>: odd per-sample sizes (partial blocks), batches, float32 / float16 /
// bfloat16 predictions, every combination of pred_uncond / extra / side / noise, in place (out = x,
// side = extra); the AVX2 loop against the portable one (FASTDIFF_CPU_SIMD=portable); exact widening
// of every float16 / bfloat16 value; and the argument checks.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "check.h"
#include "fastdiff/philox.h"
#include "fastdiff/step.h"

using fastdiff_test::Checker;

namespace {

using OptTensor = std::optional<at::Tensor>;
using StepFn = void(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&, int64_t,
                    double, double, double, double, double, double, double, double, const at::Tensor&,
                    const OptTensor&);
using SimdFn = std::string();

c10::TypedOperatorHandle<StepFn> step_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdiff::guided_step", "").typed<StepFn>();
  return op;
}

std::string cpu_simd() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdiff::cpu_simd", "").typed<SimdFn>();
  return op.call();
}

struct Coeffs {
  double cfg = 3.5, c_x = 0.9, c_pred = -0.35, c_extra = 0.21, c_noise = 0.6, s_x = 1.3, s_pred = 0.7, s_extra = -0.4;
};

struct Case {
  int64_t B;
  std::vector<int64_t> shape;  // per-sample dims
  at::ScalarType pred_dtype;
  bool uncond, extra, side, noise, in_place;
};

struct Inputs {
  at::Tensor x, pred, uncond, extra, seeds;
};

const int64_t kSeeds[] = {3, (1LL << 40) + 7, -5};  // -5: the seed 2^64 - 5
constexpr int64_t kStream = 5;

std::vector<int64_t> full_shape(const Case& k) {
  std::vector<int64_t> s{k.B};
  s.insert(s.end(), k.shape.begin(), k.shape.end());
  return s;
}

Inputs make_inputs(const Case& k) {
  at::manual_seed(1234);
  const auto shape = full_shape(k);
  Inputs in;
  in.x = at::randn(shape);
  in.pred = at::randn(shape).to(k.pred_dtype);
  in.uncond = at::randn(shape).to(k.pred_dtype);
  in.extra = at::randn(shape);
  in.seeds = at::from_blob(const_cast<int64_t*>(kSeeds), {k.B}, at::kLong).clone();
  return in;
}

template <typename F>
void with_bool(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The expected out and side ([B, n] float32) from the header, element by element.
void expected(const Case& k, const Inputs& in, const Coeffs& c, at::Tensor& out, at::Tensor& side) {
  const int64_t B = k.B;
  const at::Tensor x = in.x.reshape({B, -1}).contiguous(), e = in.extra.reshape({B, -1}).contiguous();
  const at::Tensor p = in.pred.to(at::kFloat).reshape({B, -1}).contiguous();
  const at::Tensor u = in.uncond.to(at::kFloat).reshape({B, -1}).contiguous();
  const int64_t n = x.size(1);
  out = at::empty({B, n});
  side = at::empty({B, n});
  const float *xp = x.data_ptr<float>(), *ep = e.data_ptr<float>(), *pp = p.data_ptr<float>(), *up = u.data_ptr<float>();
  float *op = out.data_ptr<float>(), *sp = side.data_ptr<float>();
  const fastdiff::StepCoeffs sc =
      fastdiff::make_step_coeffs(c.cfg, c.c_x, c.c_pred, c.c_extra, c.c_noise, c.s_x, c.s_pred, c.s_extra);
  with_bool(k.uncond, [&](auto U) {
    with_bool(k.extra, [&](auto E) {
      with_bool(k.noise, [&](auto N) {
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t i = 0; i < n; ++i) {
            float z4[4] = {0, 0, 0, 0};
            if (N) fastdiff::normal4<float>(static_cast<uint64_t>(kSeeds[b]), static_cast<uint64_t>(i >> 2), kStream, z4);
            const int64_t j = b * n + i;
            const auto r = fastdiff::step_element<decltype(U)::value, decltype(E)::value, decltype(N)::value, true>(
                sc, xp[j], pp[j], up[j], ep[j], z4[i & 3]);
            op[j] = r.out;
            sp[j] = r.side;
          }
        }
      });
    });
  });
}

// Runs the op for one case; returns {out, side} as [B, n] float32 (side undefined when not requested).
std::pair<at::Tensor, at::Tensor> run_op(const Case& k, const Inputs& in, const Coeffs& c) {
  at::Tensor x = in.x.clone();
  at::Tensor extra = in.extra.clone();
  at::Tensor out = k.in_place ? x : at::full_like(x, NAN);
  OptTensor side;
  if (k.side) side = (k.in_place && k.extra) ? extra : at::full_like(x, NAN);
  const double c_extra = k.extra ? c.c_extra : 0.0, s_extra = k.extra ? c.s_extra : 0.0;
  step_op().call(x, in.pred, k.uncond ? OptTensor(in.uncond) : std::nullopt, k.extra ? OptTensor(extra) : std::nullopt,
                 in.seeds, kStream, c.cfg, c.c_x, c.c_pred, c_extra, k.noise ? c.c_noise : 0.0, c.s_x, c.s_pred,
                 s_extra, out, side);
  return {out.reshape({k.B, -1}), side ? side->reshape({k.B, -1}) : at::Tensor()};
}

std::vector<Case> cases() {
  std::vector<Case> all;
  const std::vector<std::vector<int64_t>> shapes = {{1}, {3}, {37}, {64}, {3, 5, 7}, {1023}};
  const at::ScalarType dtypes[] = {at::kFloat, at::kHalf, at::kBFloat16};
  int i = 0;
  for (const auto& shape : shapes) {
    for (at::ScalarType dt : dtypes) {
      for (int flags = 0; flags < 16; ++flags) {
        const bool unc = flags & 1, ext = flags & 2, sd = flags & 4, nz = flags & 8;
        all.push_back({1 + 2 * (i % 2), shape, dt, unc, ext, sd, nz, (i / 2) % 2 == 1});
        ++i;
      }
    }
  }
  return all;
}

std::string describe(const Case& k) {
  char buf[160];
  std::string shape;
  for (auto s : k.shape) shape += std::to_string(s) + ",";
  std::snprintf(buf, sizeof buf, "B=%lld [%s] %s uncond=%d extra=%d side=%d noise=%d in_place=%d",
                static_cast<long long>(k.B), shape.c_str(), c10::toString(k.pred_dtype), k.uncond, k.extra, k.side,
                k.noise, k.in_place);
  return buf;
}

void compare(Checker& c, const at::Tensor& got, const at::Tensor& want, double tol, const std::string& what) {
  const at::Tensor g = got.contiguous(), w = want.contiguous();
  const float* gp = g.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  for (int64_t j = 0; j < g.numel(); ++j) c.near(gp[j], wp[j], tol, "%s element %lld", what.c_str(), static_cast<long long>(j));
}

}  // namespace

int main() {
  int status = 0;
  try {
    step_op();
  } catch (const c10::Error& err) {
    std::printf("FAIL fastdiff::guided_step is not registered (was libfastdiff loaded?): %s\n",
                err.what_without_backtrace());
    return 1;
  }
  const std::string simd_default = cpu_simd();
  const Coeffs coeffs;
  const std::vector<Case> all = cases();

  // 1. Every case against the header. float32 math in a different order of evaluation (FMA
  //    contraction, Sleef vs libm in the noise): a few ulps of values up to ~20.
  std::vector<std::pair<at::Tensor, at::Tensor>> default_results;
  {
    Checker c("guided_step vs step_element");
    for (const Case& k : all) {
      const Inputs in = make_inputs(k);
      at::Tensor want_out, want_side;
      expected(k, in, coeffs, want_out, want_side);
      const auto got = run_op(k, in, coeffs);
      compare(c, got.first, want_out, 1e-5, describe(k) + " out");
      if (k.side) compare(c, got.second, want_side, 1e-5, describe(k) + " side");
      default_results.push_back(got);
    }
    std::string detail = "(cpu_simd=" + simd_default + ", " + std::to_string(all.size()) + " cases)";
    status |= c.report(detail.c_str());
  }

  // 2. A large odd case (several parallel_for tasks, a partial last block) against the header.
  {
    Checker c("guided_step large, 3 x 70001");
    for (bool noise : {false, true}) {
      const Case k{3, {70001}, at::kHalf, true, true, true, noise, true};
      const Inputs in = make_inputs(k);
      at::Tensor want_out, want_side;
      expected(k, in, coeffs, want_out, want_side);
      const auto got = run_op(k, in, coeffs);
      compare(c, got.first, want_out, 1e-5, describe(k) + " out");
      compare(c, got.second, want_side, 1e-5, describe(k) + " side");
    }
    status |= c.report();
  }

  // 3. The portable loop gives the same numbers as the default one.
  {
    Checker c("portable loop vs default");
    setenv("FASTDIFF_CPU_SIMD", "portable", 1);
    const std::string simd_portable = cpu_simd();
    c.expect(simd_portable == "portable", "cpu_simd() reports 'portable' under FASTDIFF_CPU_SIMD=portable");
    for (std::size_t i = 0; i < all.size(); ++i) {
      const Case& k = all[i];
      const auto got = run_op(k, make_inputs(k), coeffs);
      compare(c, got.first, default_results[i].first, 1e-5, describe(k) + " out");
      if (k.side) compare(c, got.second, default_results[i].second, 1e-5, describe(k) + " side");
    }
    unsetenv("FASTDIFF_CPU_SIMD");
    std::string detail = "(" + simd_default + " vs " + simd_portable + ")";
    status |= c.report(detail.c_str());
  }

  // 4. float16 / bfloat16 predictions are widened exactly: out = 1 * pred for all 2^16 bit patterns
  //    (but -0, which 0 * x + (-0) turns into +0), in both loops.
  for (const char* simd : {"default", "portable"}) {
    if (std::strcmp(simd, "portable") == 0) setenv("FASTDIFF_CPU_SIMD", "portable", 1);
    std::string name = std::string("16-bit pred widening, ") + simd;
    Checker c(name.c_str());
    for (at::ScalarType dt : {at::kHalf, at::kBFloat16}) {
      const at::Tensor bits = at::arange(0, 65535, at::kInt).to(at::kShort).view({1, 65535});  // odd: partial block
      const at::Tensor pred = bits.view(dt);
      const at::Tensor x = at::zeros({1, 65535});
      const at::Tensor out = at::empty_like(x);
      step_op().call(x, pred, std::nullopt, std::nullopt, at::zeros({1}, at::kLong), 0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0,
                     0.0, 0.0, out, std::nullopt);
      const at::Tensor want = pred.to(at::kFloat);
      const int32_t* g = out.view(at::kInt).data_ptr<int32_t>();
      const int32_t* w = want.view(at::kInt).data_ptr<int32_t>();
      for (int64_t j = 0; j < 65535; ++j) {
        const bool nan = std::isnan(out.data_ptr<float>()[j]) && std::isnan(want.data_ptr<float>()[j]);
        const bool neg_zero = w[j] == static_cast<int32_t>(0x80000000u) && g[j] == 0;
        char what[80];
        std::snprintf(what, sizeof what, "%s bits 0x%04llx", c10::toString(dt), static_cast<long long>(j));
        c.expect(g[j] == w[j] || nan || neg_zero, what);
      }
    }
    unsetenv("FASTDIFF_CPU_SIMD");
    status |= c.report();
  }

  // 5. Argument checks raise c10::Error whose message names the argument.
  {
    Checker c("guided_step argument checks");
    auto raises = [&](const char* what, const char* needle, auto&& fn) {
      std::string msg;
      try {
        fn();
      } catch (const c10::Error& err) {
        msg = err.what_without_backtrace();
      }
      const bool ok = !msg.empty() && msg.find(needle) != std::string::npos;
      if (!ok) std::printf("  [%s] message: %s\n", what, msg.empty() ? "(no error)" : msg.c_str());
      c.expect(ok, what);
    };
    const at::Tensor x = at::zeros({2, 5}), p = at::zeros({2, 5}), seeds = at::zeros({2}, at::kLong);
    auto call = [&](const at::Tensor& xx, const at::Tensor& pp, const OptTensor& uu, const OptTensor& ee,
                    const at::Tensor& ss, int64_t stream, const at::Tensor& oo, const OptTensor& sd) {
      step_op().call(xx, pp, uu, ee, ss, stream, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, oo, sd);
    };
    raises("pred shape", "pred must have x's shape", [&] { call(x, at::zeros({2, 4}), {}, {}, seeds, 0, at::empty_like(x), {}); });
    raises("pred int dtype", "pred must be float32, float16 or bfloat16", [&] {
      call(x, at::zeros({2, 5}, at::kInt), {}, {}, seeds, 0, at::empty_like(x), {});
    });
    raises("pred_uncond dtype", "pred_uncond must have pred's dtype", [&] {
      call(x, p, at::zeros({2, 5}, at::kHalf), {}, seeds, 0, at::empty_like(x), {});
    });
    raises("x float64", "x must be float32", [&] {
      call(at::zeros({2, 5}, at::kDouble), p.to(at::kDouble), {}, {}, seeds, 0, at::empty_like(x), {});
    });
    raises("extra half", "extra must be float32", [&] { call(x, p, {}, at::zeros({2, 5}, at::kHalf), seeds, 0, at::empty_like(x), {}); });
    raises("out shape", "out must have x's shape", [&] { call(x, p, {}, {}, seeds, 0, at::empty({2, 6}), {}); });
    raises("side dtype", "side must be float32", [&] { call(x, p, {}, {}, seeds, 0, at::empty_like(x), at::empty({2, 5}, at::kHalf)); });
    raises("non-contiguous x", "x must be contiguous", [&] {
      const at::Tensor xt = at::zeros({5, 2}).t();
      call(xt, at::zeros({2, 5}), {}, {}, seeds, 0, at::empty({2, 5}), {});
    });
    raises("non-contiguous pred", "pred must be contiguous", [&] {
      call(x, at::zeros({5, 2}).t(), {}, {}, seeds, 0, at::empty_like(x), {});
    });
    raises("seeds size", "seeds must be [B] = [2]", [&] { call(x, p, {}, {}, at::zeros({3}, at::kLong), 0, at::empty_like(x), {}); });
    raises("seeds dtype", "seeds must be int64", [&] { call(x, p, {}, {}, at::zeros({2}, at::kInt), 0, at::empty_like(x), {}); });
    raises("stream -1", "stream must be in [0, 2^32)", [&] { call(x, p, {}, {}, seeds, -1, at::empty_like(x), {}); });
    raises("0-d x", "x must have a batch dimension", [&] {
      call(at::zeros({}), at::zeros({}), {}, {}, seeds, 0, at::zeros({}), {});
    });
    raises("out partially overlaps x", "out partially overlaps x", [&] {
      const at::Tensor buf = at::zeros({11});
      call(buf.narrow(0, 0, 10).view({2, 5}), p, {}, {}, seeds, 0, buf.narrow(0, 1, 10).view({2, 5}), {});
    });
    raises("out and side alias", "out and side must not overlap", [&] {
      const at::Tensor o = at::empty_like(x);
      call(x, p, {}, {}, seeds, 0, o, o);
    });
    // Allowed aliasing does not raise: out = x, side = extra.
    bool threw = false;
    try {
      const at::Tensor xx = at::ones({2, 5}), ee = at::ones({2, 5});
      step_op().call(xx, p, std::nullopt, ee, seeds, 0, 1.0, 2.0, 0.0, 1.0, 0.0, 0.0, 0.0, 3.0, xx, ee);
      c.expect(at::allclose(xx, at::full({2, 5}, 3.0)) && at::allclose(ee, at::full({2, 5}, 3.0)),
               "in-place out = x, side = extra values");
    } catch (const c10::Error& err) {
      threw = true;
      std::printf("  in-place call raised: %s\n", err.what_without_backtrace());
    }
    c.expect(!threw, "out = x and side = extra are accepted");
    status |= c.report();
  }

  std::printf("test_guided_step: %s (cpu_simd default: %s, %d threads)\n", status ? "FAILED" : "PASSED",
              simd_default.c_str(), at::get_num_threads());
  return status;
}
