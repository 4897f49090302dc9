// Minimal assertion helpers for the C++ tests (plain executables; no test framework).
#pragma once

#include <cmath>
#include <cstdio>

namespace fastdiff_test {

// Counts checks and failures of one test group; prints the first few failures in full.
struct Checker {
  const char* group;
  long checks = 0;
  long failures = 0;
  double max_err = 0.0;

  explicit Checker(const char* name) : group(name) {}

  bool expect(bool ok, const char* what) {
    ++checks;
    if (!ok) {
      if (failures < 10) std::printf("  FAIL [%s] %s\n", group, what);
      ++failures;
    }
    return ok;
  }

  // |got - want| <= tol; records the largest error seen.
  template <typename... Args>
  bool near(double got, double want, double tol, const char* fmt, Args... args) {
    ++checks;
    const double err = std::fabs(got - want);
    if (err > max_err || std::isnan(err)) max_err = std::isnan(err) ? INFINITY : err;
    if (!(err <= tol)) {
      if (failures < 10) {
        std::printf("  FAIL [%s] ", group);
        std::printf(fmt, args...);
        std::printf(": got %.17g, want %.17g, |err| %.3g > %.3g\n", got, want, err, tol);
      }
      ++failures;
      return false;
    }
    return true;
  }

  bool ok() const { return failures == 0; }

  // One summary line per group; returns 1 on failure (to accumulate an exit status).
  int report(const char* detail = "") const {
    std::printf("%-4s %-34s %7ld checks, %ld failed, max |err| %.3g%s%s\n", failures ? "FAIL" : "ok", group,
                checks, failures, max_err, *detail ? "  " : "", detail);
    return failures ? 1 : 0;
  }
};

}  // namespace fastdiff_test
