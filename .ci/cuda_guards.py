"""Compile-only guards on the sm_90 build of the CUDA kernels (CI has no GPU; issue 31): from the built library's
cubins, read with cuobjdump (Triton's copy when the toolkit has none),

- every sampler_step kernel instantiation has no stack frame (STACK:0, LOCAL:0): the runtime-shape kernel once
  kept its coefficients and draws in a 368-byte frame (151 local loads and 58 local stores);
- the aligned float32 randn kernel (randn_kernel<float, uint32 index, aligned>) stays within its SASS budget
  (450 instructions; 1000 with accurate sinf / cosf and a log1p from log and division, 392 with sincospif and
  log1pf), as does every float32 / float16 / bfloat16 randn instantiation (600);
- no kernel of the library spills or uses local memory, the float64 randn kernels aside (double sin / cos).

    python .ci/cuda_guards.py path/to/_C.so [more cubins or libraries] [--cuobjdump PATH]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys

RANDN_ALIGNED_FP32 = "randn_kernelIfjLb1E"  # mangled: randn_kernel<float, unsigned int, true>
RANDN_ALIGNED_FP32_BUDGET = 450
RANDN_16_32_BIT = re.compile(r"randn_kernelI(f|N3c104HalfE|N3c108BFloat16E)")
RANDN_BUDGET = 600


def find_cuobjdump(given: str | None) -> str:
    if given:
        return given
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    sys.exit("cuda_guards: no cuobjdump (the CUDA toolkit's, or Triton's backends/nvidia/bin/cuobjdump)")


def _by_function(cuobjdump: str, flag: str, lib: str, header: str):
    """(function, line) for every line of ``cuobjdump flag lib`` under a function header (regex ``header``)."""
    out = subprocess.run([cuobjdump, flag, lib], capture_output=True, text=True, check=True).stdout
    name = None
    for line in out.splitlines():
        m = re.match(header, line)
        if m:
            name = m.group(1)
            yield name, None
        elif name is not None:
            yield name, line


def resources(cuobjdump: str, lib: str) -> dict[str, dict[str, int]]:
    """Per kernel: REG, STACK, SHARED, LOCAL, ... (cuobjdump -res-usage)."""
    return {name: {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            for name, line in _by_function(cuobjdump, "-res-usage", lib, r"\s*Function (\S+):")
            if line is not None and "REG:" in line}


def instructions(cuobjdump: str, lib: str) -> dict[str, int]:
    """Per kernel: its SASS instructions (cuobjdump -sass)."""
    counts: dict[str, int] = {}
    instruction = re.compile(r"\s*/\*[0-9a-f]{4}\*/\s+\S")  # "/*0a40*/  FFMA R3, ..."
    for name, line in _by_function(cuobjdump, "-sass", lib, r"\s*Function : (\S+)"):
        counts[name] = counts.get(name, 0) + (line is not None and instruction.match(line) is not None)
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("libs", nargs="+", help="the built fastdiff._C shared library (or a folder holding it), or cubins")
    p.add_argument("--cuobjdump")
    args = p.parse_args()
    tool = find_cuobjdump(args.cuobjdump)
    res, sass = {}, {}
    for lib in args.libs:
        if os.path.isdir(lib):
            found = glob.glob(os.path.join(lib, "_C*.so"))
            if not found:
                sys.exit(f"cuda_guards: no _C*.so in {lib}")
            lib = found[0]
        res.update(resources(tool, lib))
        sass.update(instructions(tool, lib))
    lib = " ".join(args.libs)
    if not res or not sass:
        sys.exit(f"cuda_guards: no CUDA kernels in {lib} (built without CUDA?)")
    failures = []
    steps = [n for n in res if "sampler_step_kernel" in n]
    if not steps:
        sys.exit(f"cuda_guards: no sampler_step kernel in {lib}")
    framed = [n for n in steps if res[n].get("STACK") or res[n].get("LOCAL")]
    failures += [f"sampler_step kernel with a stack frame: {n} {res[n]}" for n in framed]
    for name, usage in res.items():
        if "randn_kernelId" in name:  # float64 normals: double sin / cos keep their frame
            continue
        if usage.get("LOCAL") and name not in framed:
            failures.append(f"local memory: {name} {usage}")
    aligned = [n for n in sass if RANDN_ALIGNED_FP32 in n]
    if not aligned:
        failures.append(f"no {RANDN_ALIGNED_FP32} kernel found")
    failures += [f"randn aligned fp32: {sass[n]} SASS instructions > {RANDN_ALIGNED_FP32_BUDGET}" for n in aligned
                 if sass[n] > RANDN_ALIGNED_FP32_BUDGET]
    failures += [f"randn {n}: {sass[n]} SASS instructions > {RANDN_BUDGET}" for n in sass
                 if RANDN_16_32_BIT.search(n) and sass[n] > RANDN_BUDGET]
    regs = sorted(res[n]["REG"] for n in steps)
    print(f"cuda_guards: {lib}")
    print(f"  sampler_step kernels: {len(steps)}, stack frames: {len(framed)}, registers {regs[0]}..{regs[-1]}")
    print(f"  randn aligned fp32: {', '.join(str(sass[n]) for n in aligned)} SASS instructions "
          f"(budget {RANDN_ALIGNED_FP32_BUDGET}); kernels checked: {len(res)}")
    for f in failures:
        print("  FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
