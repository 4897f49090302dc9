// The registered op fastdiff::sampler_step on CPU, called through the c10 dispatcher, against the
// per-element definition of fastdiff/sampler_step.h (load_sample_coeffs, draw_used, blend and combine
// with T = float, i.e. fmaf) with spec-v1 noise from fastdiff::normal4<float>:
//
//   odd per-sample sizes (partial blocks of 64 / 128 elements), batches, float32 / float16 / bfloat16
//   predictions, (K1, H, D) on the fixed-shape paths (K1 <= 2, H <= 1, D <= 1) and the runtime-shape
//   one up to (8, 4, 4), 1 to 8 outputs, side on and off, the finite flags, host coefficients and
//   per-sample rows (with zero noise coefficients per sample), in place (outs[0] = x, side = history[0]).
//
// Without noise the FMA levels (avx2, avx512) must give the definition's bits; with noise they give the
// definition's bits when the normals are the fastdiff::randn op's, and are within 1e-5 of it with
// normal4<float> (libm vs the kernels' own log / sin / cos). Further groups: samples spanning several
// parallel_for tasks (1 vs 4 threads bitwise), the SIMD levels against each other, exact widening of
// every float16 / bfloat16 bit pattern with its finite flag, the argument checks, and empty inputs.
//
// The portable level on x86-64 rounds a * b + c twice (ATen's generic at::vec::fmadd is a * b + c and
// the baseline has no FMA), as the reference: it is compared within a few ulps of the terms' magnitude.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include "check.h"
#include "fastdiff/philox.h"
#include "fastdiff/sampler_step.h"

using fastdiff_test::Checker;

namespace {

using OptTensor = std::optional<at::Tensor>;
using OptClip = std::optional<at::ArrayRef<double>>;
using StepFn = void(const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&, at::IntArrayRef,
                    at::ArrayRef<double>, at::ArrayRef<double>, const OptTensor&, const OptTensor&, at::TensorList,
                    const OptTensor&, const OptTensor&, OptClip, std::optional<at::TensorList>,
                    at::OptionalIntArrayRef);
using RandnFn = at::Tensor(const at::Tensor&, int64_t, c10::IntArrayRef, int64_t, c10::ScalarType);
using SimdFn = std::string();

// The op with its trailing clip = [c, d] optional (none unless given); no statistics (tests/test_step_stats.py).
struct StepOp {
  c10::TypedOperatorHandle<StepFn> op;
  void call(const at::Tensor& x, at::TensorList preds, at::TensorList history, const at::Tensor& seeds,
            at::IntArrayRef streams, at::ArrayRef<double> weights, at::ArrayRef<double> coeffs, const OptTensor& sw,
            const OptTensor& sc, at::TensorList outs, const OptTensor& side, const OptTensor& finite,
            OptClip clip = std::nullopt) const {
    op.call(x, preds, history, seeds, streams, weights, coeffs, sw, sc, outs, side, finite, clip, std::nullopt,
            std::nullopt);
  }
};

StepOp step_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdiff::sampler_step", "").typed<StepFn>();
  return StepOp{op};
}

c10::TypedOperatorHandle<RandnFn> randn_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdiff::randn", "").typed<RandnFn>();
  return op;
}

std::string cpu_simd() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdiff::cpu_simd", "").typed<SimdFn>();
  return op.call();
}

bool fma_level(const std::string& level) { return level == "avx2" || level == "avx512"; }

// FASTDIFF_CPU_SIMD as the test found it (groups 1 - 3 run at that level; the others switch levels).
std::optional<std::string> initial_simd_env() {
  static const std::optional<std::string> env = [] {
    const char* e = std::getenv("FASTDIFF_CPU_SIMD");
    return e != nullptr ? std::optional<std::string>(e) : std::nullopt;
  }();
  return env;
}

void restore_simd_env() {
  if (initial_simd_env()) {
    setenv("FASTDIFF_CPU_SIMD", initial_simd_env()->c_str(), 1);
  } else {
    unsetenv("FASTDIFF_CPU_SIMD");
  }
}

const int64_t kSeeds[] = {3, (1LL << 40) + 7, -5, 0, 123456789};  // -5: the seed 2^64 - 5
const int64_t kStreams[] = {5, 0xFFFFFFFFLL, 1LL << 31, 17};

struct Case {
  int64_t B;
  std::vector<int64_t> shape;  // per-sample dims
  at::ScalarType dtype;        // of the predictions
  int K1, H, D, nout;
  bool side, finite, per_w, per_c, in_place;
  int zero;  // host rows: bit 0 zeroes the out row's draw 0, bit 1 the side row's draw 0, bit 2 both rows' last draw
};

struct Inputs {
  at::Tensor x, seeds, finite;  // x [B, ...]; finite [B] int32 (the initial flags)
  std::vector<at::Tensor> preds, history;
  std::vector<int64_t> streams;
  std::vector<double> weights, coeffs;  // host rows (K1, 2M); the op ignores them where per-sample rows are given
  OptTensor sample_weights, sample_coeffs;
};

int64_t numel(const Case& k) {
  int64_t n = 1;
  for (auto s : k.shape) n *= s;
  return n;
}

std::vector<int64_t> full_shape(const Case& k) {
  std::vector<int64_t> s{k.B};
  s.insert(s.end(), k.shape.begin(), k.shape.end());
  return s;
}

std::vector<double> doubles(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

Inputs make_inputs(const Case& k, uint64_t seed) {
  at::manual_seed(seed);
  const auto shape = full_shape(k);
  const int64_t B = k.B, n = numel(k), M = 2 + k.H + k.D;
  Inputs in;
  in.x = at::randn(shape);
  for (int i = 0; i < k.K1; ++i) in.preds.push_back(at::randn(shape).to(k.dtype));
  for (int j = 0; j < k.H; ++j) in.history.push_back(at::randn(shape));
  std::vector<int64_t> seeds;
  for (int64_t b = 0; b < B; ++b) seeds.push_back(b < 5 ? kSeeds[b] : 11 * b);
  in.seeds = at::tensor(seeds, at::kLong);
  for (int d = 0; d < k.D; ++d) in.streams.push_back(kStreams[d]);
  // float64 coefficients that are not float32 numbers: the op rounds them once to float32
  in.weights = doubles(at::randn({k.K1}, at::kDouble) * 3);
  in.weights[0] = (k.K1 % 2) ? 1.0 : 0.8125;
  in.coeffs = doubles(at::randn({2 * M}, at::kDouble));
  if (k.D > 0) {
    if (k.zero & 1) in.coeffs[2 + k.H] = 0.0;
    if (k.zero & 2) in.coeffs[M + 2 + k.H] = 0.0;
    if (k.zero & 4) in.coeffs[2 + k.H + k.D - 1] = in.coeffs[M + 2 + k.H + k.D - 1] = 0.0;
  }
  if (k.per_w) in.sample_weights = at::randn({B, k.K1}) * 2;
  if (k.per_c) {
    at::Tensor c = at::randn({B, 2 * M});
    if (k.D > 0) {
      for (int64_t r = 0; r < 2; ++r)  // sample 0: no noise at all; the last sample: not in its out row
        for (int d = 0; d < k.D; ++d) c.index_put_({0, r * M + 2 + k.H + d}, 0.0);
      if (B > 1) c.index_put_({B - 1, 2 + k.H + k.D - 1}, 0.0);
    }
    in.sample_coeffs = c;
  }
  std::vector<int32_t> flags;
  for (int64_t b = 0; b < B; ++b) flags.push_back(b == 0 ? 7 : (b == 3 ? 0 : 1));  // 7 and 0 are kept when finite
  in.finite = at::tensor(flags, at::kInt);
  if (k.finite && n > 0) {
    // inf / NaN in different branches and samples: sample 1 in its last element (the partial last
    // block), sample 2 in its first; sample 0 has inf in x and NaN in history only (not a prediction)
    if (B > 1) in.preds[k.K1 - 1].view({B, n}).index_put_({1, n - 1}, INFINITY);
    if (B > 2) in.preds[0].view({B, n}).index_put_({2, 0}, NAN);
    if (B > 2 && n > 7) in.preds[k.K1 / 2].view({B, n}).index_put_({2, n / 2}, -INFINITY);
    in.x.view({B, n}).index_put_({0, n / 3}, INFINITY);
    if (k.H > 0) in.history[0].view({B, n}).index_put_({0, 0}, NAN);
  }
  return in;
}

struct Result {
  at::Tensor out, side, finite;  // out, side [B, n] float32; finite [B] int32
  at::Tensor mag_out, mag_side;  // expected only: the magnitude of each row's terms (float64 [B, n])
  bool noisy = false;            // expected only: some noise term was added
};

// The header's definition, element by element. normals: the op's normals per draw ([B, n]), or
// nullptr for normal4<float>.
Result expected(const Case& k, const Inputs& in, const std::vector<at::Tensor>* normals) {
  const int64_t B = k.B, n = numel(k);
  const fastdiff::StepShape s{k.K1, k.H, k.D};
  const int M = s.terms();
  auto rows = [&](const at::Tensor& t) { return t.to(at::kFloat).reshape({B, n}).contiguous(); };
  const at::Tensor x = rows(in.x);
  std::vector<at::Tensor> p, h, z;
  for (const auto& t : in.preds) p.push_back(rows(t));
  for (const auto& t : in.history) h.push_back(rows(t));
  if (normals != nullptr)
    for (const auto& t : *normals) z.push_back(rows(t));
  Result r;
  r.out = at::empty({B, n});
  r.side = at::empty({B, n});
  r.mag_out = at::empty({B, n}, at::kDouble);
  r.mag_side = at::empty({B, n}, at::kDouble);
  r.finite = in.finite.clone();
  const at::Tensor sw = k.per_w ? in.sample_weights->contiguous() : at::Tensor();
  const at::Tensor sc = k.per_c ? in.sample_coeffs->contiguous() : at::Tensor();
  for (int64_t b = 0; b < B; ++b) {
    float w[fastdiff::kMaxBranches], c[2 * fastdiff::kMaxTerms];
    for (int i = 0; i < k.K1; ++i) w[i] = k.per_w ? sw.data_ptr<float>()[b * k.K1 + i] : static_cast<float>(in.weights[i]);
    for (int j = 0; j < 2 * M; ++j) c[j] = k.per_c ? sc.data_ptr<float>()[b * 2 * M + j] : static_cast<float>(in.coeffs[j]);
    fastdiff::SampleCoeffs kc;
    fastdiff::load_sample_coeffs(s, w, c, kc);
    bool used[fastdiff::kMaxDraws];
    for (int d = 0; d < k.D; ++d) {
      used[d] = fastdiff::draw_used(s, kc, d, k.side);
      r.noisy = r.noisy || used[d];
    }
    bool bad = false;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = b * n + i;
      float pv[fastdiff::kMaxBranches], hv[fastdiff::kMaxHistory], zv[fastdiff::kMaxDraws];
      for (int q = 0; q < k.K1; ++q) {
        pv[q] = p[q].data_ptr<float>()[j];
        bad = bad || !std::isfinite(pv[q]);
      }
      for (int q = 0; q < k.H; ++q) hv[q] = h[q].data_ptr<float>()[j];
      for (int d = 0; d < k.D; ++d) {
        zv[d] = 0.0f;
        if (!used[d]) continue;
        if (normals != nullptr) {
          zv[d] = z[d].data_ptr<float>()[j];
        } else {
          float z4[4];
          fastdiff::normal4<float>(static_cast<uint64_t>(in.seeds.data_ptr<int64_t>()[b]), static_cast<uint64_t>(i >> 2),
                                   static_cast<uint32_t>(in.streams[d]), z4);
          zv[d] = z4[i & 3];
        }
      }
      const float xv = x.data_ptr<float>()[j];
      const float g = fastdiff::blend<float>(s, kc, pv);
      r.out.data_ptr<float>()[j] = fastdiff::combine<float>(s, kc, 0, xv, g, hv, zv);
      r.side.data_ptr<float>()[j] = fastdiff::combine<float>(s, kc, 1, xv, g, hv, zv);
      double gm = std::fabs(static_cast<double>(kc.w[0]) * pv[0]);
      for (int q = 1; q < k.K1; ++q) gm += std::fabs(kc.w[q]) * (std::fabs(pv[q]) + std::fabs(pv[0]));
      for (int row = 0; row < 2; ++row) {
        double m = std::fabs(static_cast<double>(kc.c[row][0]) * xv) + std::fabs(kc.c[row][1]) * gm;
        for (int q = 0; q < k.H; ++q) m += std::fabs(static_cast<double>(kc.c[row][2 + q]) * hv[q]);
        for (int d = 0; d < k.D; ++d) m += std::fabs(kc.c[row][fastdiff::kDrawColumn + d]) * 6.0;
        (row ? r.mag_side : r.mag_out).data_ptr<double>()[j] = m;
      }
    }
    if (bad) r.finite.data_ptr<int32_t>()[b] = 0;
  }
  return r;
}

std::vector<at::Tensor> op_normals(const Case& k, const Inputs& in) {
  std::vector<at::Tensor> z;
  for (int64_t s : in.streams) z.push_back(randn_op().call(in.seeds, s, k.shape, 0, at::kFloat));
  return z;
}

// Runs the op on copies of the inputs; every output must equal outs[0] bit for bit (checked in c).
Result run_op(Checker& c, const Case& k, const Inputs& in) {
  const int64_t B = k.B, n = numel(k);
  at::Tensor x = in.x.clone();
  std::vector<at::Tensor> history;
  for (const auto& t : in.history) history.push_back(t.clone());
  std::vector<at::Tensor> outs;
  for (int i = 0; i < k.nout; ++i) outs.push_back(at::full_like(x, NAN));
  OptTensor side;
  if (k.side) side = at::full_like(x, NAN);
  if (k.in_place) {
    outs[0] = x;
    if (k.side && k.H > 0) side = history[0];
  }
  at::Tensor finite = in.finite.clone();
  step_op().call(x, in.preds, history, in.seeds, in.streams, in.weights, in.coeffs, in.sample_weights,
                 in.sample_coeffs, outs, side, k.finite ? OptTensor(finite) : std::nullopt);
  for (int i = 1; i < k.nout; ++i) {
    c.expect(std::memcmp(outs[i].data_ptr(), outs[0].data_ptr(), sizeof(float) * B * n) == 0,
             "every outs[i] holds outs[0]'s bits");
  }
  Result r;
  r.out = outs[0].reshape({B, n});
  r.side = side ? side->reshape({B, n}) : at::Tensor();
  r.finite = finite;
  return r;
}

std::string describe(const Case& k) {
  std::string shape;
  for (auto s : k.shape) shape += std::to_string(s) + ",";
  char buf[256];
  std::snprintf(buf, sizeof buf, "B=%lld [%s] %s K1=%d H=%d D=%d outs=%d side=%d finite=%d per_w=%d per_c=%d "
                "in_place=%d zero=%d", static_cast<long long>(k.B), shape.c_str(), c10::toString(k.dtype), k.K1, k.H,
                k.D, k.nout, k.side, k.finite, k.per_w, k.per_c, k.in_place, k.zero);
  return buf;
}

// Element by element: equal bits (any NaN equals any NaN) where tol is undefined, else |got - want| <=
// tol (a [B, n] float64 tensor) + abs_tol.
long compare(Checker& c, const at::Tensor& got, const at::Tensor& want, const at::Tensor* tol, double abs_tol,
             const std::string& what) {
  const at::Tensor g = got.contiguous(), w = want.contiguous();
  const float* gp = g.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const double* tp = tol != nullptr ? tol->data_ptr<double>() : nullptr;
  long differ = 0;
  for (int64_t j = 0; j < g.numel(); ++j) {
    const bool nan = std::isnan(gp[j]) && std::isnan(wp[j]);
    const bool same = nan || std::memcmp(&gp[j], &wp[j], sizeof(float)) == 0;
    differ += !same;
    if (tp == nullptr && abs_tol == 0.0) {
      if (!same) {
        char msg[320];
        std::snprintf(msg, sizeof msg, "%s element %lld: got %.9g, want %.9g (bitwise)", what.c_str(),
                      static_cast<long long>(j), gp[j], wp[j]);
        c.expect(false, msg);
      } else {
        c.expect(true, "");
      }
    } else if (same || gp[j] == wp[j]) {
      c.expect(true, "");
    } else {
      c.near(gp[j], wp[j], (tp != nullptr ? tp[j] : 0.0) + abs_tol, "%s element %lld", what.c_str(),
             static_cast<long long>(j));
    }
  }
  return differ;
}

// A few float32 roundings of the terms' magnitude (the portable level's double rounding).
at::Tensor bound(const Case& k, const at::Tensor& mag) { return mag * (2.0 * (k.K1 + k.H + k.D + 2) * std::ldexp(1.0, -24)); }

std::vector<Case> cases() {
  std::vector<Case> all;
  const std::vector<std::vector<int64_t>> shapes = {{1}, {3}, {5}, {37}, {64}, {67}, {128}, {129}, {3, 5, 7}, {1000},
                                                    {4099}};
  const at::ScalarType dtypes[] = {at::kFloat, at::kHalf, at::kBFloat16};
  // (K1, H, D): the eight fixed shapes, then runtime shapes up to the limits
  const int counts[][3] = {{1, 0, 0}, {2, 0, 0}, {1, 1, 0}, {2, 1, 0}, {1, 0, 1}, {2, 0, 1}, {1, 1, 1}, {2, 1, 1},
                           {3, 0, 0}, {1, 2, 0}, {1, 0, 2}, {4, 3, 2}, {8, 4, 4}, {5, 1, 1}, {2, 2, 1}, {3, 4, 3},
                           {6, 0, 4}, {7, 2, 0}};
  int i = 0;
  for (const auto& shape : shapes) {
    for (const auto& kc : counts) {
      Case k;
      k.B = 1 + i % 3 + (i % 7 == 0 ? 2 : 0);  // 1 .. 5
      k.shape = shape;
      k.dtype = dtypes[(i / 2) % 3];
      k.K1 = kc[0];
      k.H = kc[1];
      k.D = kc[2];
      k.nout = (i % 11 == 5) ? 8 : 1 + i % 3;
      k.side = i % 2 == 0 || k.H == 0;
      k.finite = i % 4 != 1;
      k.per_w = i % 5 == 2 || i % 5 == 4;
      k.per_c = i % 5 == 3 || i % 5 == 4;
      k.in_place = i % 3 == 1;
      k.zero = (i / 3) % 5 == 0 ? 0 : 1 + (i / 3) % 4;  // 0 .. 4 (bits of Case::zero)
      all.push_back(k);
      ++i;
    }
  }
  return all;
}

void check_finite(Checker& c, const Case& k, const Result& got, const Result& want, const std::string& what) {
  if (!k.finite) return;
  const bool same = at::equal(got.finite, want.finite);
  if (!same) {
    std::string g, w;
    for (int64_t b = 0; b < k.B; ++b) {
      g += std::to_string(got.finite.data_ptr<int32_t>()[b]) + " ";
      w += std::to_string(want.finite.data_ptr<int32_t>()[b]) + " ";
    }
    std::printf("  %s: finite got [%s] want [%s]\n", what.c_str(), g.c_str(), w.c_str());
  }
  c.expect(same, (what + " finite flags").c_str());
}

}  // namespace

int main() {
  int status = 0;
  try {
    step_op();
    randn_op();
  } catch (const c10::Error& err) {
    std::printf("FAIL fastdiff::sampler_step is not registered (was libfastdiff loaded?): %s\n",
                err.what_without_backtrace());
    return 1;
  }
  initial_simd_env();
  const std::string simd_default = cpu_simd();
  const bool exact = fma_level(simd_default);
  const std::vector<Case> all = cases();

  // 0. The header itself: the fixed-shape and runtime-shape forms of blend / combine agree.
  {
    Checker c("header: FixedStepShape == StepShape");
    at::manual_seed(7);
    const at::Tensor v = at::randn({64});
    const float* r = v.data_ptr<float>();
    fastdiff::SampleCoeffs kc;
    const float w[2] = {1.0f, 3.7f}, co[8] = {0.9f, -0.3f, 0.2f, 0.6f, 1.1f, 0.7f, -0.4f, 0.0f};
    const fastdiff::StepShape s{2, 1, 1};
    const fastdiff::FixedStepShape<2, 1, 1> f;
    c.expect(s.terms() == 4 && f.terms() == 4, "terms() = 2 + H + D");
    fastdiff::load_sample_coeffs(s, w, co, kc);
    c.expect(fastdiff::draw_used(s, kc, 0, false) && fastdiff::draw_used(s, kc, 0, true), "draw_used: out row");
    {
      const float co2[8] = {0.9f, -0.3f, 0.2f, 0.0f, 1.1f, 0.7f, -0.4f, 0.5f};  // the draw feeds only side
      fastdiff::SampleCoeffs k2;
      fastdiff::load_sample_coeffs(s, w, co2, k2);
      c.expect(!fastdiff::draw_used(s, k2, 0, false) && fastdiff::draw_used(s, k2, 0, true), "draw_used: side row");
    }
    for (int i = 0; i + 5 <= 64; i += 5) {
      const float p[2] = {r[i], r[i + 1]}, h[1] = {r[i + 2]}, z[1] = {r[i + 3]};
      const float gs = fastdiff::blend<float>(s, kc, p), gf = fastdiff::blend<float>(f, kc, p);
      c.expect(gs == gf, "blend");
      c.expect(fastdiff::combine<float>(s, kc, 0, r[i + 4], gs, h, z) == fastdiff::combine<float>(f, kc, 0, r[i + 4], gf, h, z),
               "combine out row");
      c.expect(fastdiff::combine<float>(s, kc, 1, r[i + 4], gs, h, z) == fastdiff::combine<float>(f, kc, 1, r[i + 4], gf, h, z),
               "combine side row");
      // the definition: g = 1 p0 + fma(3.7, p1 - p0, .), out = fma(c_g, g, c_x x), then fma per term
      const float g = std::fmaf(3.7f, p[1] - p[0], 1.0f * p[0]);
      const float out = std::fmaf(0.6f, z[0], std::fmaf(0.2f, h[0], std::fmaf(-0.3f, g, 0.9f * r[i + 4])));
      c.expect(gs == g && fastdiff::combine<float>(s, kc, 0, r[i + 4], gs, h, z) == out, "blend / combine = the fmas");
    }
    // the side row's zero noise coefficient: the draw is not read (a NaN there does not matter)
    const float p[2] = {1.0f, 2.0f}, h[1] = {0.5f}, z[1] = {NAN};
    c.expect(!std::isnan(fastdiff::combine<float>(s, kc, 1, 1.0f, fastdiff::blend<float>(s, kc, p), h, z)),
             "a zero noise coefficient skips the draw");
    status |= c.report();
  }

  // 1. Every case against the definition with normal4<float> noise: bitwise without noise at the FMA
  //    levels, within 1e-5 with noise (the kernels' log / sin / cos are not libm's), within a few ulps
  //    of the terms' magnitude at the portable level.
  std::vector<Result> default_results;
  {
    Checker c("sampler_step vs definition (normal4)");
    long noisy = 0;
    for (const Case& k : all) {
      const Inputs in = make_inputs(k, 1000 + default_results.size());
      const Result want = expected(k, in, nullptr);
      const Result got = run_op(c, k, in);
      noisy += want.noisy;
      const double noise_tol = want.noisy ? 1e-5 : 0.0;
      const at::Tensor tol_out = bound(k, want.mag_out), tol_side = bound(k, want.mag_side);
      compare(c, got.out, want.out, exact ? nullptr : &tol_out, noise_tol, describe(k) + " out");
      if (k.side) compare(c, got.side, want.side, exact ? nullptr : &tol_side, noise_tol, describe(k) + " side");
      check_finite(c, k, got, want, describe(k));
      default_results.push_back(got);
    }
    const std::string detail = "(cpu_simd=" + simd_default + ", " + std::to_string(all.size()) + " cases, " +
                               std::to_string(noisy) + " with noise)";
    status |= c.report(detail.c_str());
  }

  // 2. With the op's own normals (fastdiff::randn at the same level) the definition is the kernel's
  //    arithmetic exactly: bitwise at the FMA levels, noise or not.
  {
    Checker c("sampler_step vs definition (op normals)");
    for (std::size_t i = 0; i < all.size(); ++i) {
      const Case& k = all[i];
      const Inputs in = make_inputs(k, 1000 + i);
      const std::vector<at::Tensor> z = op_normals(k, in);
      const Result want = expected(k, in, &z);
      const at::Tensor tol_out = bound(k, want.mag_out), tol_side = bound(k, want.mag_side);
      compare(c, default_results[i].out, want.out, exact ? nullptr : &tol_out, 0.0, describe(k) + " out");
      if (k.side) compare(c, default_results[i].side, want.side, exact ? nullptr : &tol_side, 0.0, describe(k) + " side");
    }
    status |= c.report(exact ? "(bitwise)" : "(portable: within a few ulps)");
  }

  // 3. Samples spanning several parallel_for tasks (4 threads: tasks start and end inside samples),
  //    bitwise the same as one thread, and the finite flag of a bad value in each part of a sample.
  {
    Checker c("large, 3 x 70001, 1 vs 4 threads");
    const int threads = at::get_num_threads();
    for (bool noise : {false, true}) {
      for (bool per : {false, true}) {
        Case k{3, {70001}, at::kHalf, 2, 1, noise ? 1 : 0, 2, true, true, per, per, true, 0};
        const Inputs in = make_inputs(k, noise + 2 * per);
        const std::vector<at::Tensor> z = op_normals(k, in);
        const Result want = expected(k, in, &z);
        at::set_num_threads(4);
        const Result got4 = run_op(c, k, in);
        at::set_num_threads(1);
        const Result got1 = run_op(c, k, in);
        at::set_num_threads(threads);
        const at::Tensor tol_out = bound(k, want.mag_out), tol_side = bound(k, want.mag_side);
        compare(c, got4.out, want.out, exact ? nullptr : &tol_out, 0.0, describe(k) + " out");
        compare(c, got4.side, want.side, exact ? nullptr : &tol_side, 0.0, describe(k) + " side");
        check_finite(c, k, got4, want, describe(k));
        compare(c, got1.out, got4.out, nullptr, 0.0, describe(k) + " 1 vs 4 threads out");
        compare(c, got1.side, got4.side, nullptr, 0.0, describe(k) + " 1 vs 4 threads side");
        check_finite(c, k, got1, want, describe(k) + " 1 thread");
      }
    }
    // one NaN per run, at the start, a third, two thirds and the end of sample b
    at::set_num_threads(4);
    const int64_t n = 70001;
    for (int64_t b = 0; b < 3; ++b) {
      for (int64_t at_i : {int64_t{0}, n / 3, 2 * n / 3, n - 1}) {
        Case k{3, {n}, at::kFloat, 2, 0, 1, 1, false, false, false, false, false, 0};
        Inputs in = make_inputs(k, 50);
        in.preds[b % 2].index_put_({b, at_i}, NAN);
        in.finite = at::ones({3}, at::kInt);
        at::Tensor x = in.x.clone(), out = at::empty_like(x), finite = in.finite.clone();
        step_op().call(x, in.preds, in.history, in.seeds, in.streams, in.weights, in.coeffs, std::nullopt,
                       std::nullopt, {out}, std::nullopt, finite);
        for (int64_t q = 0; q < 3; ++q) {
          char what[96];
          std::snprintf(what, sizeof what, "NaN at sample %lld element %lld: finite[%lld]", static_cast<long long>(b),
                        static_cast<long long>(at_i), static_cast<long long>(q));
          c.expect(finite.data_ptr<int32_t>()[q] == (q == b ? 0 : 1), what);
        }
      }
    }
    at::set_num_threads(threads);
    status |= c.report();
  }

  // 4. The SIMD levels: avx2 and avx512 bitwise equal (blocks of 64 and 128 elements); the portable
  //    level within a few ulps of the terms' magnitude (+ 1e-5 with noise) of the default.
  {
    Checker c("SIMD levels");
    std::vector<std::string> levels;
    std::vector<std::vector<Result>> results;
    for (const char* level : {"portable", "avx2", "avx512"}) {
      setenv("FASTDIFF_CPU_SIMD", level, 1);
      if (cpu_simd() != level) continue;
      levels.push_back(level);
      results.emplace_back();
      for (std::size_t i = 0; i < all.size(); ++i) results.back().push_back(run_op(c, all[i], make_inputs(all[i], 1000 + i)));
    }
    restore_simd_env();
    c.expect(cpu_simd() == simd_default, "restoring FASTDIFF_CPU_SIMD restores the level");
    std::string detail = "(";
    for (std::size_t l = 0; l < levels.size(); ++l) detail += (l ? ", " : "") + levels[l];
    detail += ")";
    long portable_differs = 0;
    for (std::size_t l = 1; l < levels.size(); ++l) {
      for (std::size_t i = 0; i < all.size(); ++i) {
        const Case& k = all[i];
        const Result& a = results[0][i];
        const Result& b = results[l][i];
        const std::string what = describe(k) + " " + levels[0] + " vs " + levels[l];
        if (levels[0] == "portable") {
          const Inputs in = make_inputs(k, 1000 + i);
          const Result want = expected(k, in, nullptr);
          const at::Tensor tol_out = bound(k, want.mag_out), tol_side = bound(k, want.mag_side);
          const double noise_tol = want.noisy ? 1e-5 : 0.0;
          portable_differs += compare(c, a.out, b.out, &tol_out, noise_tol, what + " out");
          if (k.side) compare(c, a.side, b.side, &tol_side, noise_tol, what + " side");
        } else {
          compare(c, a.out, b.out, nullptr, 0.0, what + " out");
          if (k.side) compare(c, a.side, b.side, nullptr, 0.0, what + " side");
        }
        if (k.finite) c.expect(at::equal(a.finite, b.finite), (what + " finite").c_str());
      }
    }
    for (std::size_t l = 1; l + 1 < levels.size(); ++l) {  // avx2 vs avx512
      for (std::size_t i = 0; i < all.size(); ++i) {
        const std::string what = describe(all[i]) + " " + levels[l] + " vs " + levels[l + 1];
        compare(c, results[l][i].out, results[l + 1][i].out, nullptr, 0.0, what + " out");
        if (all[i].side) compare(c, results[l][i].side, results[l + 1][i].side, nullptr, 0.0, what + " side");
      }
    }
    detail += ", portable differs from the next level in " + std::to_string(portable_differs) + " out elements";
    status |= c.report(detail.c_str());
  }

  // 5. Fused means fused: x = 1, c_x = 1, c_g = 1 + 2^-12, p0 = (2^24 - 4095) 2^-48, so that c_g p0 =
  //    2^-24 (1 + 2^-36): fma(c_g, p0, 1) = 1 + 2^-23, a rounded product and sum give 1 (a tie to even).
  {
    const double a = 1.0 + std::ldexp(1.0, -12), pb = (std::ldexp(1.0, 24) - 4095) * std::ldexp(1.0, -48);
    const float want = 1.0f + std::ldexp(1.0f, -23);
    Checker fused("FMA levels are fused");
    int portable_fused = -1;  // -1: not run
    for (const char* level : {"portable", "avx2", "avx512"}) {
      setenv("FASTDIFF_CPU_SIMD", level, 1);
      if (cpu_simd() != level) continue;
      const at::Tensor x = at::ones({1, 133}), p = at::full({1, 133}, pb), out = at::empty_like(x);
      step_op().call(x, {p}, {}, at::zeros({1}, at::kLong), {}, {1.0}, {1.0, a, 0.0, 0.0}, std::nullopt, std::nullopt,
                     {out}, std::nullopt, std::nullopt);
      const bool ok = at::equal(out, at::full({1, 133}, want));
      if (fma_level(level)) {
        const std::string what = std::string(level) + ": fma(1 + 2^-12, (2^24 - 4095) 2^-48, 1) = 1 + 2^-23";
        fused.expect(ok, what.c_str());
      } else {
        portable_fused = ok;
      }
    }
    restore_simd_env();
    status |= fused.report();
#if defined(__x86_64__) || defined(_M_X64)
    // The x86-64 baseline has no FMA instruction: the portable level rounds product and sum apart, as the
    // reference does and as the kernels before sampler_step did (bit-identical sampling at every level).
    if (portable_fused != -1) {
      Checker portable("portable level rounds twice (x86-64)");
      portable.expect(portable_fused == 0, "portable: 1 * x + (1 + 2^-12) p0 rounded twice gives 1");
      status |= portable.report();
    }
#endif
  }

  // 6. float16 / bfloat16 predictions are widened exactly and their finite flags are per sample: sample
  //    b of [B, n] holds bit patterns b n .. b n + n - 1; out = 1 * p (but -0, which 0 * x + (-0) turns
  //    into +0), finite[b] = 0 exactly where one of them is inf or NaN. [65536, 1]: every block partial;
  //    [512, 128]: whole blocks; at every level.
  for (const char* level : {"portable", "avx2", "avx512"}) {
    setenv("FASTDIFF_CPU_SIMD", level, 1);
    if (cpu_simd() != level) continue;
    std::string name = std::string("16-bit widening + finite, ") + level;
    Checker c(name.c_str());
    for (at::ScalarType dt : {at::kHalf, at::kBFloat16}) {
      const at::Tensor bits = at::arange(0, 65536, at::kInt).to(at::kShort);
      const at::Tensor all_p = bits.view(dt);
      const at::Tensor want = all_p.to(at::kFloat);
      const at::Tensor want_bad = (~at::isfinite(want));
      for (int64_t n : {int64_t{1}, int64_t{128}}) {
        const int64_t B = 65536 / n;
        const at::Tensor pred = all_p.view({B, n});
        const at::Tensor x = at::zeros({B, n}), out = at::empty_like(x);
        const at::Tensor finite = at::ones({B}, at::kInt);
        step_op().call(x, {pred}, {}, at::zeros({B}, at::kLong), {}, {1.0}, {0.0, 1.0, 0.0, 0.0}, std::nullopt,
                       std::nullopt, {out}, std::nullopt, finite);
        const int32_t* g = out.view(at::kInt).data_ptr<int32_t>();
        const int32_t* w = want.view(at::kInt).data_ptr<int32_t>();
        const float* gf = out.data_ptr<float>();
        const float* wf = want.data_ptr<float>();
        for (int64_t j = 0; j < 65536; ++j) {
          const bool nan = std::isnan(gf[j]) && std::isnan(wf[j]);
          const bool neg_zero = w[j] == static_cast<int32_t>(0x80000000u) && g[j] == 0;
          if (!(g[j] == w[j] || nan || neg_zero)) {
            char what[96];
            std::snprintf(what, sizeof what, "%s bits 0x%04llx (n = %lld)", c10::toString(dt), static_cast<long long>(j),
                          static_cast<long long>(n));
            c.expect(false, what);
          } else {
            c.expect(true, "");
          }
        }
        const at::Tensor want_finite = (~want_bad.view({B, n}).any(1)).to(at::kInt);
        c.expect(at::equal(finite, want_finite), (std::string(c10::toString(dt)) + " finite flags per sample, n = " +
                                                  std::to_string(n)).c_str());
      }
    }
    status |= c.report();
  }
  restore_simd_env();

  // 7. Argument checks raise c10::Error whose message names the argument; exact aliases are accepted.
  {
    Checker c("sampler_step argument checks");
    auto raises = [&](const char* what, const char* needle, const std::function<void()>& fn) {
      std::string msg;
      try {
        fn();
      } catch (const c10::Error& err) {
        msg = err.what_without_backtrace();
      }
      const bool ok = !msg.empty() && msg.find(needle) != std::string::npos &&
                      msg.find("fastdiff::sampler_step: ") != std::string::npos;
      if (!ok) std::printf("  [%s] message: %s\n", what, msg.empty() ? "(no error)" : msg.c_str());
      c.expect(ok, what);
    };
    // B = 2, n = 5, K1 = 2, H = 1, D = 1 (M = 4)
    struct Args {
      at::Tensor x = at::zeros({2, 5});
      std::vector<at::Tensor> preds{at::zeros({2, 5}), at::zeros({2, 5})};
      std::vector<at::Tensor> history{at::zeros({2, 5})};
      at::Tensor seeds = at::zeros({2}, at::kLong);
      std::vector<int64_t> streams{3};
      std::vector<double> weights{1.0, 2.0};
      std::vector<double> coeffs = std::vector<double>(8, 0.5);
      OptTensor sample_weights, sample_coeffs;
      std::vector<at::Tensor> outs{at::empty({2, 5})};
      OptTensor side, finite;
      void call() const {
        step_op().call(x, preds, history, seeds, streams, weights, coeffs, sample_weights, sample_coeffs, outs, side,
                       finite);
      }
    };
    auto bad = [&](const char* what, const char* needle, const std::function<void(Args&)>& edit) {
      Args a;
      edit(a);
      raises(what, needle, [&] { a.call(); });
    };
    const at::Tensor z = at::zeros({2, 5});
    bad("weights length", "weights must hold 2 numbers, got 1", [](Args& a) { a.weights = {1.0}; });
    bad("weights length 3", "weights must hold 2 numbers, got 3", [](Args& a) { a.weights = {1.0, 2.0, 3.0}; });
    bad("coeffs length", "coeffs must hold 2 (2 + H + D) = 8 numbers, got 6", [](Args& a) { a.coeffs.resize(6); });
    bad("coeffs length, no draws", "coeffs must hold 2 (2 + H + D) = 6 numbers, got 8", [](Args& a) { a.streams = {}; });
    bad("sample_weights shape", "sample_weights must be [B, 2] = [2, 2]", [](Args& a) { a.sample_weights = at::zeros({2, 3}); });
    bad("sample_weights rows", "sample_weights must be [B, 2] = [2, 2]", [](Args& a) { a.sample_weights = at::zeros({3, 2}); });
    bad("sample_weights dtype", "sample_weights must be float32", [](Args& a) {
      a.sample_weights = at::zeros({2, 2}, at::kDouble);
    });
    bad("sample_weights non-contiguous", "sample_weights must be contiguous", [](Args& a) {
      a.sample_weights = at::zeros({2, 2}).t();
    });
    bad("sample_coeffs shape", "sample_coeffs must be [B, 8] = [2, 8]", [](Args& a) { a.sample_coeffs = at::zeros({2, 6}); });
    bad("preds empty", "preds must hold 1 to 8 tensors, got 0", [](Args& a) { a.preds.clear(); });
    bad("preds 9", "preds must hold 1 to 8 tensors, got 9", [&](Args& a) {
      a.preds.assign(9, z);
      a.weights.assign(9, 1.0);
    });
    bad("history 5", "history holds at most 4 tensors, got 5", [&](Args& a) { a.history.assign(5, z); });
    bad("streams 5", "streams holds at most 4 draws, got 5", [](Args& a) { a.streams.assign(5, 1); });
    bad("outs empty", "outs must hold 1 to 8 tensors, got 0", [](Args& a) { a.outs.clear(); });
    bad("outs 9", "outs must hold 1 to 8 tensors, got 9", [](Args& a) {
      a.outs.clear();
      for (int i = 0; i < 9; ++i) a.outs.push_back(at::empty({2, 5}));
    });
    bad("stream -1", "streams must be in [0, 2^32), got -1", [](Args& a) { a.streams = {-1}; });
    bad("stream 2^32", "streams must be in [0, 2^32), got 4294967296", [](Args& a) { a.streams = {1LL << 32}; });
    bad("x float64", "x must be float32", [](Args& a) { a.x = at::zeros({2, 5}, at::kDouble); });
    bad("x 0-d", "x must have a batch dimension", [](Args& a) { a.x = at::zeros({}); });
    bad("x non-contiguous", "x must be contiguous", [](Args& a) { a.x = at::zeros({5, 2}).t(); });
    bad("preds shape", "preds[1] must have x's shape", [](Args& a) { a.preds[1] = at::zeros({2, 4}); });
    bad("preds int", "preds[0] must be float32, float16 or bfloat16", [](Args& a) {
      a.preds = {at::zeros({2, 5}, at::kInt), at::zeros({2, 5}, at::kInt)};
    });
    bad("preds mixed dtypes", "preds[1] must have preds[0]'s dtype Half", [](Args& a) { a.preds[0] = a.preds[0].to(at::kHalf); });
    bad("preds non-contiguous", "preds[1] must be contiguous", [](Args& a) { a.preds[1] = at::zeros({5, 2}).t(); });
    bad("history dtype", "history[0] must be float32", [](Args& a) { a.history[0] = at::zeros({2, 5}, at::kHalf); });
    bad("outs dtype", "outs[1] must be float32", [](Args& a) { a.outs.push_back(at::zeros({2, 5}, at::kBFloat16)); });
    bad("outs shape", "outs[0] must have x's shape", [](Args& a) { a.outs[0] = at::empty({2, 6}); });
    bad("side dtype", "side must be float32", [](Args& a) { a.side = at::zeros({2, 5}, at::kHalf); });
    bad("side non-contiguous", "side must be contiguous", [](Args& a) { a.side = at::zeros({5, 2}).t(); });
    bad("seeds length", "seeds must be [B] = [2]", [](Args& a) { a.seeds = at::zeros({3}, at::kLong); });
    bad("seeds dtype", "seeds must be int64", [](Args& a) { a.seeds = at::zeros({2}, at::kInt); });
    bad("finite dtype", "finite must be int32 [B] = [2]", [](Args& a) { a.finite = at::ones({2}, at::kLong); });
    bad("finite length", "finite must be int32 [B] = [2]", [](Args& a) { a.finite = at::ones({3}, at::kInt); });
    bad("finite non-contiguous", "finite must be contiguous", [](Args& a) {
      a.finite = at::ones({2, 2}, at::kInt).select(1, 0);
    });
    const at::Tensor buf = at::zeros({11});
    const at::Tensor base = buf.narrow(0, 0, 10).view({2, 5}), shifted = buf.narrow(0, 1, 10).view({2, 5});
    bad("outs partially overlaps x", "outs[0] partially overlaps x", [&](Args& a) {
      a.x = base;
      a.outs = {shifted};
    });
    bad("outs partially overlaps preds", "outs[0] partially overlaps preds[1]", [&](Args& a) {
      a.preds[1] = base;
      a.outs = {shifted};
    });
    bad("side partially overlaps history", "side partially overlaps history[0]", [&](Args& a) {
      a.history[0] = base;
      a.side = shifted;
    });
    bad("outs[1] partially overlaps x", "outs[1] partially overlaps x", [&](Args& a) {
      a.x = base;
      a.outs = {at::empty({2, 5}), shifted};
    });
    bad("outs overlap each other", "outs[1] and outs[0] must not overlap", [&](Args& a) {
      const at::Tensor o = at::empty({2, 5});
      a.outs = {o, o};
    });
    bad("side is outs[0]", "side and outs[0] must not overlap", [&](Args& a) { a.side = a.outs[0]; });
    bad("side partially overlaps outs", "side and outs[0] must not overlap", [&](Args& a) {
      a.outs = {base};
      a.side = shifted;
    });
    bad("side and outs[0] both x", "side and outs[0] must not overlap", [&](Args& a) {
      a.outs = {a.x};
      a.side = a.x;
    });
    // Exact aliases are accepted and give the step's values: outs[0] = x, side = history[0]
    // (out = 2 x + 0 g + 1 h = 3, side = 0 x + 1 g + 1 h = 3), and outs[0] = preds[0] (float32).
    try {
      const at::Tensor x = at::ones({2, 5}), e = at::ones({2, 5}), p = at::full({2, 5}, 2.0);
      step_op().call(x, {p}, {e}, at::zeros({2}, at::kLong), {}, {1.0}, {2.0, 0.0, 1.0, 0.0, 1.0, 1.0}, std::nullopt,
                     std::nullopt, {x}, e, std::nullopt);
      c.expect(at::equal(x, at::full({2, 5}, 3.0)) && at::equal(e, at::full({2, 5}, 3.0)),
               "outs[0] = x, side = history[0]: values");
      const at::Tensor q = at::full({2, 5}, 2.0);
      step_op().call(at::ones({2, 5}), {q}, {}, at::zeros({2}, at::kLong), {}, {1.0}, {1.0, 1.0, 0.0, 0.0},
                     std::nullopt, std::nullopt, {q}, std::nullopt, std::nullopt);
      c.expect(at::equal(q, at::full({2, 5}, 3.0)), "outs[0] = preds[0]: values");
    } catch (const c10::Error& err) {
      std::printf("  exact aliases raised: %s\n", err.what_without_backtrace());
      c.expect(false, "exact aliases are accepted");
    }
    status |= c.report();
  }

  // 8. Empty inputs (B = 0, n = 0) raise nothing and write nothing.
  {
    Checker c("empty inputs");
    for (const std::vector<int64_t>& shape : {std::vector<int64_t>{0, 5}, std::vector<int64_t>{3, 0},
                                              std::vector<int64_t>{2, 3, 0}}) {
      const int64_t B = shape[0];
      const at::Tensor x = at::zeros(shape);
      const at::Tensor finite = at::full({B}, 7, at::kInt);
      try {
        step_op().call(x, {x.to(at::kHalf), x.to(at::kHalf)}, {x}, at::zeros({B}, at::kLong), {1, 2}, {1.0, 2.0},
                       std::vector<double>(10, 0.5), at::ones({B, 2}), at::ones({B, 10}), {at::empty_like(x)},
                       at::empty_like(x), finite);
        c.expect(at::equal(finite, at::full({B}, 7, at::kInt)), "finite unchanged");
      } catch (const c10::Error& err) {
        std::printf("  empty shape raised: %s\n", err.what_without_backtrace());
        c.expect(false, "empty inputs raise nothing");
      }
    }
    status |= c.report();
  }

  // 9. clip = [c, d] (clip_sample fused): the side row s computed with or without a side output, s_c =
  //    clip_clamp(s, c), out = clip_update(out, s, s_c, d) (t = s_c - s, u = d t, out + u: three roundings),
  //    side = s_c. Against the definition with the op's normals: bitwise at the FMA levels (the clip's own
  //    arithmetic has no fma to differ in), within the base step's bound plus |d| times it at the portable one.
  //    Fixed and runtime shapes, partial blocks, several outputs, in place; and the checks name clip.
  {
    Checker c("clip");
    const double clip_values[2] = {0.8700000000000001, -0.6180339887498949};  // not float32 numbers
    const float cf = static_cast<float>(clip_values[0]), df = static_cast<float>(clip_values[1]);
    const Case clip_cases[] = {
        {3, {133}, at::kFloat, 2, 1, 1, 2, true, false, false, false, false, 0},
        {3, {133}, at::kFloat, 2, 1, 1, 1, false, false, false, false, false, 0},
        {2, {5, 7}, at::kHalf, 1, 0, 0, 1, false, false, false, false, false, 0},
        {1, {4099}, at::kBFloat16, 1, 1, 0, 1, true, false, false, false, true, 0},
        {3, {67}, at::kFloat, 3, 2, 2, 3, true, false, true, false, false, 0},
        {2, {200}, at::kFloat, 4, 0, 1, 1, false, false, false, false, false, 0}};
    long acted = 0, kept = 0;
    for (const Case& k : clip_cases) {
      const Inputs in = make_inputs(k, 77);
      const int64_t B = k.B, n = numel(k);
      const std::vector<at::Tensor> z = op_normals(k, in);
      Case with_side = k;
      with_side.side = true;  // the definition's side row is the unclamped s
      Result want = expected(with_side, in, &z);
      const at::Tensor s = want.side.clone();
      for (int64_t j = 0; j < B * n; ++j) {
        const float sv = s.data_ptr<float>()[j];
        const float sc = fastdiff::clip_clamp(sv, cf);
        acted += sc != sv;
        kept += sc == sv;
        want.out.data_ptr<float>()[j] = fastdiff::clip_update(want.out.data_ptr<float>()[j], sv, sc, df);
        want.side.data_ptr<float>()[j] = sc;
      }
      at::Tensor x = in.x.clone();
      std::vector<at::Tensor> history;
      for (const auto& t : in.history) history.push_back(t.clone());
      std::vector<at::Tensor> outs;
      for (int i = 0; i < k.nout; ++i) outs.push_back(at::full_like(x, NAN));
      OptTensor side;
      if (k.side) side = at::full_like(x, NAN);
      if (k.in_place) {
        outs[0] = x;
        if (k.side && k.H > 0) side = history[0];
      }
      step_op().call(x, in.preds, history, in.seeds, in.streams, in.weights, in.coeffs, in.sample_weights,
                     std::nullopt, outs, side, std::nullopt, at::ArrayRef<double>(clip_values, 2));
      const at::Tensor tol_out = bound(k, want.mag_out) + bound(k, want.mag_side) * std::fabs(df);
      const at::Tensor tol_side = bound(k, want.mag_side);
      for (int i = 0; i < k.nout; ++i)
        compare(c, outs[i].reshape({B, n}), want.out, exact ? nullptr : &tol_out, 0.0, describe(k) + " clip out");
      if (k.side) compare(c, side->reshape({B, n}), want.side, exact ? nullptr : &tol_side, 0.0, describe(k) + " clip side");
    }
    c.expect(acted > 0 && kept > 0, "the clamp acts on some elements and not on others");
    // the checks name clip
    const at::Tensor x = at::randn({2, 5});
    auto call_with = [&](std::vector<double> clip, OptTensor sample_coeffs) {
      step_op().call(x, {x}, {}, at::zeros({2}, at::kLong), {}, {1.0}, {1.0, 0.5, 0.25, 1.0}, std::nullopt,
                     sample_coeffs, {at::empty_like(x)}, std::nullopt, std::nullopt, at::ArrayRef<double>(clip));
    };
    const std::pair<std::vector<double>, const char*> bad[] = {
        {{1.0}, "clip must hold 2"}, {{0.0, 1.0}, "clip[0]"}, {{-1.0, 1.0}, "clip[0]"}, {{1e-50, 1.0}, "clip[0]"},
        {{INFINITY, 1.0}, "clip[0]"}, {{NAN, 1.0}, "clip[0]"}, {{1.0, NAN}, "clip[1]"}, {{1.0, 1e300}, "clip[1]"}};
    for (const auto& [clip, needle] : bad) {
      try {
        call_with(clip, std::nullopt);
        c.expect(false, "a bad clip is refused");
      } catch (const c10::Error& err) {
        c.expect(std::string(err.what_without_backtrace()).find(needle) != std::string::npos, "the error names clip");
      }
    }
    try {
      call_with({1.0, 1.0}, at::ones({2, 4}));
      c.expect(false, "clip with sample_coeffs is refused");
    } catch (const c10::Error& err) {
      c.expect(std::string(err.what_without_backtrace()).find("clip is not supported with per-sample") !=
                   std::string::npos, "the error names clip and sample_coeffs");
    }
    status |= c.report(exact ? "(bitwise)" : "(portable: within a few ulps)");
  }

  std::printf("test_sampler_step: %s (cpu_simd default: %s, %d threads)\n", status ? "FAILED" : "PASSED",
              simd_default.c_str(), at::get_num_threads());
  return status;
}
