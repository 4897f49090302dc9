// The registered ops fastdiff::add_noise, fastdiff::diffusion_loss and fastdiff::diffusion_loss_backward
// on CPU, called through the c10 dispatcher, against the per-element definitions of fastdiff/loss.h
// with spec-v1 noise from fastdiff::normal4<float> (loss sums in float64): odd per-sample sizes
// (partial noise blocks), sizes spanning several loss chunks, batches, every pred / z dtype pair,
// samples whose noise coefficient is 0; bitwise equal results for 1 and 2 threads; the AVX2 loops
// against the portable ones (FASTDIFF_CPU_SIMD=portable); and the argument checks.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "check.h"
#include "fastdiff/gaussian_path.h"
#include "fastdiff/loss.h"
#include "fastdiff/philox.h"

using fastdiff_test::Checker;

namespace {

using AddNoiseFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
using LossFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, int64_t);
using BackwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
using SimdFn = std::string();

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}
c10::TypedOperatorHandle<AddNoiseFn> add_noise_op() {
  static auto h = op<AddNoiseFn>("fastdiff::add_noise");
  return h;
}
c10::TypedOperatorHandle<LossFn> loss_op() {
  static auto h = op<LossFn>("fastdiff::diffusion_loss");
  return h;
}
c10::TypedOperatorHandle<BackwardFn> backward_op() {
  static auto h = op<BackwardFn>("fastdiff::diffusion_loss_backward");
  return h;
}
std::string cpu_simd() {
  static auto h = op<SimdFn>("fastdiff::cpu_simd");
  return h.call();
}

const int64_t kSeeds[] = {3, (1LL << 40) + 7, -5};  // -5: the seed 2^64 - 5
constexpr int64_t kStream = 7;

struct Case {
  int64_t B;
  std::vector<int64_t> shape;  // per-sample dims
  at::ScalarType pred_dtype, z_dtype;
};

struct Inputs {
  at::Tensor pred, z, alpha, beta, coef_z, coef_eps, weight, grad_loss, seeds;
};

Inputs make_inputs(const Case& k) {
  at::manual_seed(4321);
  std::vector<int64_t> shape{k.B};
  shape.insert(shape.end(), k.shape.begin(), k.shape.end());
  Inputs in;
  in.pred = at::randn(shape).to(k.pred_dtype);
  in.z = at::randn(shape).to(k.z_dtype);
  in.alpha = at::randn({k.B});
  in.beta = at::randn({k.B});
  in.coef_z = at::randn({k.B});
  in.coef_eps = at::randn({k.B});
  in.weight = at::rand({k.B}) + 0.5;
  in.grad_loss = at::randn({k.B});
  if (k.B > 1) {  // a sample without noise in each op
    in.beta.index_put_({1}, 0.0);
    in.coef_eps.index_put_({1}, 0.0);
  }
  in.seeds = at::from_blob(const_cast<int64_t*>(kSeeds), {k.B}, at::kLong).clone();
  return in;
}

struct Expected {
  at::Tensor noised;  // [B, n] float32
  at::Tensor loss;    // [B] float64 (sums in float64)
  at::Tensor grad;    // [B, n] float32 (before rounding to pred's dtype)
};

Expected expected(const Case& k, const Inputs& in) {
  const int64_t B = k.B;
  const at::Tensor p = in.pred.to(at::kFloat).reshape({B, -1}).contiguous();
  const at::Tensor z = in.z.to(at::kFloat).reshape({B, -1}).contiguous();
  const int64_t n = p.size(1);
  Expected e{at::empty({B, n}), at::empty({B}, at::kDouble), at::empty({B, n})};
  const float *pp = p.data_ptr<float>(), *zp = z.data_ptr<float>();
  const float *al = in.alpha.data_ptr<float>(), *be = in.beta.data_ptr<float>(), *cz = in.coef_z.data_ptr<float>();
  const float *ce = in.coef_eps.data_ptr<float>(), *w = in.weight.data_ptr<float>(), *gl = in.grad_loss.data_ptr<float>();
  float *np = e.noised.data_ptr<float>(), *gp = e.grad.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0.0;
    const float scale = fastdiff::loss_grad_scale(gl[b], w[b], n);
    for (int64_t i = 0; i < n; ++i) {
      float eps4[4];
      fastdiff::normal4<float>(static_cast<uint64_t>(kSeeds[b]), static_cast<uint64_t>(i >> 2), kStream, eps4);
      const float eps = eps4[i & 3];
      const int64_t j = b * n + i;
      np[j] = fastdiff::noised_element(al[b], be[b], zp[j], eps);
      const float r = fastdiff::loss_residual(pp[j], cz[b], ce[b], zp[j], eps);
      sum += static_cast<double>(r) * r;
      gp[j] = fastdiff::loss_grad_element(scale, pp[j], cz[b], ce[b], zp[j], eps);
    }
    e.loss.data_ptr<double>()[b] = static_cast<double>(w[b]) * sum / static_cast<double>(n);
  }
  return e;
}

struct Result {
  at::Tensor noised, loss, grad;
};

Result run_ops(const Inputs& in) {
  Result r;
  r.noised = add_noise_op().call(in.z, in.alpha, in.beta, in.seeds, kStream);
  r.loss = loss_op().call(in.pred, in.z, in.coef_z, in.coef_eps, in.weight, in.seeds, kStream);
  r.grad = backward_op().call(in.grad_loss, in.pred, in.z, in.coef_z, in.coef_eps, in.weight, in.seeds, kStream);
  return r;
}

std::vector<Case> cases() {
  std::vector<Case> all;
  const std::vector<std::vector<int64_t>> shapes = {{1}, {3}, {37}, {3, 5, 7}, {1023}, {2, 4100}};
  const at::ScalarType dtypes[] = {at::kFloat, at::kHalf, at::kBFloat16};
  int i = 0;
  for (const auto& shape : shapes) {
    for (at::ScalarType pd : dtypes) {
      for (at::ScalarType zd : dtypes) all.push_back({1 + 2 * (i++ % 2), shape, pd, zd});
    }
  }
  return all;
}

std::string describe(const Case& k) {
  std::string shape;
  for (auto s : k.shape) shape += std::to_string(s) + ",";
  return "B=" + std::to_string(k.B) + " [" + shape + "] pred " + c10::toString(k.pred_dtype) + " z " +
         c10::toString(k.z_dtype);
}

// got (any float dtype) against want (float32 / float64): |err| <= abs_tol + rel_tol |want|.
void compare(Checker& c, const at::Tensor& got, const at::Tensor& want, double abs_tol, double rel_tol,
             const std::string& what) {
  const at::Tensor g = got.to(at::kDouble).reshape({-1}).contiguous(), w = want.to(at::kDouble).reshape({-1}).contiguous();
  const double* gp = g.data_ptr<double>();
  const double* wp = w.data_ptr<double>();
  for (int64_t j = 0; j < g.numel(); ++j) {
    c.near(gp[j], wp[j], abs_tol + rel_tol * std::fabs(wp[j]), "%s element %lld", what.c_str(), static_cast<long long>(j));
  }
}

bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         std::memcmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0;
}

}  // namespace

int main() {
  int status = 0;
  try {
    add_noise_op();
    loss_op();
    backward_op();
  } catch (const c10::Error& err) {
    std::printf("FAIL the loss ops are not registered (was libfastdiff loaded?): %s\n", err.what_without_backtrace());
    return 1;
  }
  const std::string simd_default = cpu_simd();
  const std::vector<Case> all = cases();

  // 1. Every case against the header: add_noise and the float32 gradient within 1e-5 (a few ulps of
  //    values up to ~20; FMA contraction, Sleef vs libm in the noise); 16-bit gradients within one
  //    rounding of their dtype; the loss within 1e-5 relative (float64 sums in another order).
  std::vector<Result> default_results;
  {
    Checker c("loss ops vs fastdiff/loss.h");
    for (const Case& k : all) {
      const Inputs in = make_inputs(k);
      const Expected e = expected(k, in);
      const Result r = run_ops(in);
      const std::string what = describe(k);
      c.expect(r.noised.scalar_type() == at::kFloat && r.noised.sizes() == in.z.sizes(), "add_noise float32, z's shape");
      c.expect(r.loss.scalar_type() == at::kFloat && r.loss.sizes() == at::IntArrayRef{k.B}, "loss float32 [B]");
      c.expect(r.grad.scalar_type() == k.pred_dtype && r.grad.sizes() == in.pred.sizes(), "grad pred's dtype, shape");
      compare(c, r.noised, e.noised, 1e-5, 0.0, what + " add_noise");
      compare(c, r.loss, e.loss, 0.0, 1e-5, what + " loss");
      const double rel = k.pred_dtype == at::kHalf ? 0x1p-11 : k.pred_dtype == at::kBFloat16 ? 0x1p-8 : 0.0;
      compare(c, r.grad, e.grad, 1e-5, rel, what + " grad");
      default_results.push_back(r);
    }
    const std::string detail = "(cpu_simd=" + simd_default + ", " + std::to_string(all.size()) + " cases)";
    status |= c.report(detail.c_str());
  }

  // 2. A large odd case: many chunks (3 x 70001 = 18 chunks of 4096 per sample), a partial block;
  //    against the header and bitwise equal for 1 and 2 threads.
  {
    Checker c("large 3 x 70001, 1 vs 2 threads");
    const Case k{3, {70001}, at::kBFloat16, at::kHalf};
    const Inputs in = make_inputs(k);
    const Expected e = expected(k, in);
    const int threads = at::get_num_threads();
    at::set_num_threads(1);
    const Result one = run_ops(in);
    at::set_num_threads(2);
    const Result two = run_ops(in);
    at::set_num_threads(threads);
    compare(c, two.noised, e.noised, 1e-5, 0.0, "add_noise");
    compare(c, two.loss, e.loss, 0.0, 1e-5, "loss");
    compare(c, two.grad, e.grad, 1e-5, 0x1p-8, "grad");
    c.expect(bitwise_equal(one.noised, two.noised), "add_noise bitwise equal for 1 and 2 threads");
    c.expect(bitwise_equal(one.loss, two.loss), "loss bitwise equal for 1 and 2 threads");
    c.expect(bitwise_equal(one.grad, two.grad), "grad bitwise equal for 1 and 2 threads");
    status |= c.report();
  }

  // 3. The portable loops give the same numbers as the default ones.
  {
    Checker c("portable loops vs default");
    setenv("FASTDIFF_CPU_SIMD", "portable", 1);
    const std::string simd_portable = cpu_simd();
    c.expect(simd_portable == "portable", "cpu_simd() reports 'portable' under FASTDIFF_CPU_SIMD=portable");
    for (std::size_t i = 0; i < all.size(); ++i) {
      const Case& k = all[i];
      const Result r = run_ops(make_inputs(k));
      const Result& d = default_results[i];
      const std::string what = describe(k);
      compare(c, r.noised, d.noised, 1e-5, 0.0, what + " add_noise");
      compare(c, r.loss, d.loss, 0.0, 1e-5, what + " loss");
      const double rel = k.pred_dtype == at::kHalf ? 0x1p-10 : k.pred_dtype == at::kBFloat16 ? 0x1p-7 : 0.0;
      compare(c, r.grad, d.grad, 1e-5, rel, what + " grad");
    }
    unsetenv("FASTDIFF_CPU_SIMD");
    const std::string detail = "(" + simd_default + " vs " + simd_portable + ")";
    status |= c.report(detail.c_str());
  }

  // 4. Edge cases: n == 0 gives a NaN loss (the mean of nothing) and empty outputs; B == 0 works.
  {
    Checker c("empty inputs");
    const at::Tensor e20 = at::zeros({2, 0}), ones2 = at::ones({2}), seeds2 = at::zeros({2}, at::kLong);
    const at::Tensor l = loss_op().call(e20, e20, ones2, ones2, ones2, seeds2, 0);
    c.expect(l.sizes() == at::IntArrayRef{2} && std::isnan(l.data_ptr<float>()[0]), "n == 0: loss NaN");
    c.expect(backward_op().call(ones2, e20, e20, ones2, ones2, ones2, seeds2, 0).sizes() == e20.sizes(), "n == 0: grad");
    c.expect(add_noise_op().call(e20, ones2, ones2, seeds2, 0).sizes() == e20.sizes(), "n == 0: add_noise");
    const at::Tensor e05 = at::zeros({0, 5}), none = at::zeros({0}), seeds0 = at::zeros({0}, at::kLong);
    c.expect(loss_op().call(e05, e05, none, none, none, seeds0, 0).numel() == 0, "B == 0: loss");
    status |= c.report();
  }

  // 5. Argument checks raise c10::Error whose message names the op and the argument.
  {
    Checker c("loss ops argument checks");
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
    const at::Tensor p = at::zeros({2, 5}), v = at::ones({2}), seeds = at::zeros({2}, at::kLong);
    auto loss = [&](const at::Tensor& pp, const at::Tensor& zz, const at::Tensor& cz, const at::Tensor& w,
                    const at::Tensor& ss, int64_t stream) { loss_op().call(pp, zz, cz, v, w, ss, stream); };
    raises("loss z shape", "fastdiff::diffusion_loss: z must have pred's shape", [&] { loss(p, at::zeros({2, 4}), v, v, seeds, 0); });
    raises("loss pred dtype", "fastdiff::diffusion_loss: pred must be float32, float16 or bfloat16", [&] {
      loss(at::zeros({2, 5}, at::kDouble), p, v, v, seeds, 0);
    });
    raises("loss z dtype", "fastdiff::diffusion_loss: z must be float32, float16 or bfloat16", [&] {
      loss(p, at::zeros({2, 5}, at::kInt), v, v, seeds, 0);
    });
    raises("loss pred contiguous", "fastdiff::diffusion_loss: pred must be contiguous", [&] {
      loss(at::zeros({5, 2}).t(), p, v, v, seeds, 0);
    });
    raises("loss z contiguous", "fastdiff::diffusion_loss: z must be contiguous", [&] {
      loss(p, at::zeros({5, 2}).t(), v, v, seeds, 0);
    });
    raises("loss 0-d pred", "fastdiff::diffusion_loss: pred must have a batch dimension", [&] {
      loss(at::zeros({}), at::zeros({}), v, v, seeds, 0);
    });
    raises("loss coef_z size", "fastdiff::diffusion_loss: coef_z must be [B] = [2]", [&] { loss(p, p, at::ones({3}), v, seeds, 0); });
    raises("loss weight dtype", "fastdiff::diffusion_loss: weight must be float32", [&] {
      loss(p, p, v, at::ones({2}, at::kDouble), seeds, 0);
    });
    raises("loss seeds size", "fastdiff::diffusion_loss: seeds must be [B] = [2]", [&] {
      loss(p, p, v, v, at::zeros({3}, at::kLong), 0);
    });
    raises("loss seeds dtype", "fastdiff::diffusion_loss: seeds must be int64", [&] { loss(p, p, v, v, at::zeros({2}, at::kInt), 0); });
    raises("loss stream", "fastdiff::diffusion_loss: stream must be in [0, 2^32)", [&] { loss(p, p, v, v, seeds, 1LL << 32); });
    raises("backward grad_loss", "fastdiff::diffusion_loss_backward: grad_loss must be [B] = [2]", [&] {
      backward_op().call(at::ones({1}), p, p, v, v, v, seeds, 0);
    });
    raises("backward coef_eps dtype", "fastdiff::diffusion_loss_backward: coef_eps must be float32", [&] {
      backward_op().call(v, p, p, v, at::ones({2}, at::kHalf), v, seeds, 0);
    });
    raises("add_noise z dtype", "fastdiff::add_noise: z must be float32, float16 or bfloat16", [&] {
      add_noise_op().call(at::zeros({2, 5}, at::kDouble), v, v, seeds, 0);
    });
    raises("add_noise alpha size", "fastdiff::add_noise: alpha must be [B] = [2]", [&] {
      add_noise_op().call(p, at::ones({2, 1}), v, seeds, 0);
    });
    raises("add_noise beta dtype", "fastdiff::add_noise: beta must be float32", [&] {
      add_noise_op().call(p, v, at::ones({2}, at::kLong), seeds, 0);
    });
    raises("add_noise stream", "fastdiff::add_noise: stream must be in [0, 2^32)", [&] { add_noise_op().call(p, v, v, seeds, -1); });
    // Non-contiguous per-sample vectors are accepted (made contiguous inside).
    bool threw = false;
    try {
      const at::Tensor strided = at::ones({4}).slice(0, 0, 4, 2);
      const at::Tensor l = loss_op().call(at::ones({2, 5}), at::zeros({2, 5}), v, at::zeros({2}), strided, seeds, 0);
      c.expect(at::allclose(l, at::ones({2})), "strided weight: loss of ones = 1");
    } catch (const c10::Error& err) {
      threw = true;
      std::printf("  strided weight raised: %s\n", err.what_without_backtrace());
    }
    c.expect(!threw, "strided per-sample vectors are accepted");
    status |= c.report();
  }

  // 6. fastdiff/gaussian_path.h against closed forms of each path, and NaN outside [0, 1].
  {
    Checker c("gaussian_path.h pairs vs closed forms");
    using fastdiff::PathSpec;
    auto pair = [](PathSpec s, int32_t kind, double t) {
      s.pair = kind;
      float a = 0.0f, b = 0.0f;
      fastdiff::pair_at(s, t, &a, &b);
      return std::make_pair(static_cast<double>(a), static_cast<double>(b));
    };
    const PathSpec condot{fastdiff::kPathCondOT, 0, {0.0, 0.0}}, vp{fastdiff::kPathVP, 0, {0.1, 20.0}};
    const PathSpec cosine{fastdiff::kPathVPCosine, 0, {0.008, 0.0}}, ve{fastdiff::kPathVE, 0, {80.0, 0.0}};
    const double f = 0x1p-23;  // float32 rounding, relative
    for (double t : {0.0, 0.3, 0.5, 1.0}) {
      auto [a, b] = pair(condot, fastdiff::kPairNoising, t);
      c.near(a, t, f * t, "condot alpha(%g)", t);
      c.near(b, 1.0 - t, f, "condot beta(%g)", t);
      auto [va, vb] = pair(condot, fastdiff::kPairVelocity, t);
      c.expect(va == 1.0 && vb == -1.0, "condot velocity target (1, -1)");
      auto [ea, eb] = pair(ve, fastdiff::kPairNoising, t);
      c.expect(ea == 1.0, "ve alpha = 1");
      c.near(eb, 80.0 * (1.0 - t), f * 80.0, "ve beta(%g)", t);
      // VP: B(s) = 0.1 s + 9.95 s^2 at s = 1 - t; alpha = exp(-B/2), beta = sqrt(1 - alpha^2)
      const double s = 1.0 - t, big_b = 0.1 * s + 9.95 * s * s, alpha = std::exp(-0.5 * big_b);
      auto [pa, pb] = pair(vp, fastdiff::kPairNoising, t);
      c.near(pa, alpha, f * alpha, "vp alpha(%g)", t);
      c.near(pb, std::sqrt(1.0 - alpha * alpha), 2 * f, "vp beta(%g)", t);
      // VPCosine: alpha = sin(w t) / sin(w), w = pi / (2 (1 + s)); alpha^2 + beta^2 = 1
      const double w = M_PI / (2.0 * 1.008), ca = std::sin(w * t) / std::sin(w);
      auto [qa, qb] = pair(cosine, fastdiff::kPairNoising, t);
      c.near(qa, ca, 2 * f, "vp-cosine alpha(%g)", t);
      c.near(qb, std::sqrt(std::max(0.0, 1.0 - ca * ca)), 4 * f + (t == 1.0 ? 0.0 : 1e-6), "vp-cosine beta(%g)", t);
    }
    auto [sa, sb] = pair(condot, fastdiff::kPairScore, 0.5);
    c.expect(sa == 0.0 && sb == -2.0, "condot score target at 0.5: (0, -1 / beta) = (0, -2)");
    auto [xa, xb] = pair(vp, fastdiff::kPairX0, 0.7);
    auto [na, nb] = pair(vp, fastdiff::kPairEps, 0.7);
    c.expect(xa == 1.0 && xb == 0.0 && na == 0.0 && nb == 1.0, "x0 (1, 0) and eps (0, 1) targets");
    auto [vpa, vpb] = pair(vp, fastdiff::kPairNoising, 0.7);
    auto [va, vb] = pair(vp, fastdiff::kPairV, 0.7);
    c.expect(va == -vpb && vb == vpa, "v target (-beta, alpha): v = alpha eps - beta z");
    auto [ia, ib] = pair(vp, fastdiff::kPairVelocity, 1.0);
    c.expect(std::isinf(ib) && ib < 0, "vp velocity at t = 1: d beta = -inf (beta = 0)");
    for (double t : {-0.1, 1.5, static_cast<double>(NAN)}) {
      auto [ba, bb] = pair(vp, fastdiff::kPairNoising, t);
      c.expect(std::isnan(ba) && std::isnan(bb), "a time outside [0, 1] gives NaN");
    }
    (void)ia;
    status |= c.report();
  }

  std::printf("test_loss: %s (cpu_simd default: %s, %d threads)\n", status ? "FAILED" : "PASSED", simd_default.c_str(),
              at::get_num_threads());
  return status;
}
