"""Build parameters of the native extension ``fastdiff._C``: source lists and flags.

One module feeds ``setup.py`` (ahead-of-time build) and :func:`fastdiff._native.jit_build`
(``torch.utils.cpp_extension.load``), so the two cannot drift. It imports nothing from fastdiff and
no torch at module level, so setup.py can load it by path.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

# Architectures built when TORCH_CUDA_ARCH_LIST is unset: A100 (sm_80) and H100/H200 (sm_90) as
# machine code, plus compute_90 PTX, which the driver compiles for any newer GPU (Blackwell …): SASS
# alone would make `auto` pick CUDA there and fail at the first launch with "no kernel image".
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

CXX_FLAGS = ["-O3", "-fvisibility=hidden"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
# Release builds carry no debug information: Python's own CFLAGS add -g, which made _C 103 MB, 95 MB of
# it DWARF (and compiling it a fifth of the build). FASTDIFF_DEBUG_BUILD=1 keeps it.
DEBUG_ENV = "FASTDIFF_DEBUG_BUILD"
# Which SIMD levels to build beside the portable one (the runtime picks the best the CPU runs, simd.h).
ISAS_ENV = "FASTDIFF_CPU_ISAS"
# Files under csrc/cpu/avx2 and csrc/cpu/avx512 get these on top of CXX_FLAGS; they run only after a
# runtime CPU check (randn.cpp, simd_level()). The AVX-512 set is the one ATen builds its AVX512 kernels
# with, so at::vec::Vectorized<float> is 16 lanes there.
AVX2_FLAGS = ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
AVX512_FLAGS = ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma", "-DCPU_CAPABILITY=AVX512",
                "-DCPU_CAPABILITY_AVX512"]
SIMD_FLAGS = {"avx2": AVX2_FLAGS, "avx512": AVX512_FLAGS}


def cxx_std_flag() -> str:
    """-std=c++20 where torch's headers demand it (torch 2.14 does), else -std=c++17."""
    import torch

    header = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(header) as f:
            needs_20 = "C++20 or later" in f.read()
    except OSError:
        needs_20 = False
    return "-std=c++20" if needs_20 else "-std=c++17"


def debug_build() -> bool:
    """FASTDIFF_DEBUG_BUILD=1: compile with -g (gdb, perf annotate); else no debug information."""
    value = os.environ.get(DEBUG_ENV, "0").strip().lower()
    if value not in ("0", "1", "", "false", "true", "no", "yes"):
        raise ValueError(f"{DEBUG_ENV} must be 0 or 1, got {value!r}")
    return value in ("1", "true", "yes")


def cxx_flags() -> list[str]:
    # -g0 comes after Python's -g on the command line, so it wins
    return [cxx_std_flag(), *CXX_FLAGS, "-g" if debug_build() else "-g0", *openmp_flags()]


def openmp_flags() -> list[str]:
    """-fopenmp where torch runs its intra-op thread pool on OpenMP (Linux wheels do), else nothing.

    at::parallel_for is a header template: compiled without -fopenmp it runs every loop on ONE thread
    (ATen/ParallelOpenMP.h is skipped), whatever torch.set_num_threads says. Measured before this flag
    (2 threads, N = 2^22): the fp32 ODE step took 5.3 ms on both 1 and 2 threads while torch.compile's
    took 3.4. Linked with -fopenmp, _C needs libgomp.so.1, which resolves to the copy torch has already
    loaded (same soname), so torch.set_num_threads governs fastdiff's loops too. Only GCC's runtime
    is wanted (Clang's -fopenmp would load a second runtime, libomp), so other platforms go without.
    """
    if not sys.platform.startswith("linux"):
        return []
    import torch

    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


def link_flags() -> list[str]:
    return openmp_flags()


def nvcc_flags() -> list[str]:
    return [cxx_std_flag(), *NVCC_FLAGS, *(["-g"] if debug_build() else [])]


def _rel(paths: list[str], root: str) -> list[str]:
    return sorted(os.path.relpath(p, root) for p in paths)


def sources(root: str, cuda: bool) -> dict[str, list[str]]:
    """Source files relative to ``root`` (the repository): 'cpp', 'avx2', 'avx512' and 'cuda' lists
    (csrc/cpu/<level>/*.cpp are compiled with SIMD_FLAGS[level]; csrc/python/*.cpp is the Python module's own,
    which the CMake library leaves out)."""
    csrc = os.path.join(root, "csrc")
    cpp = [p for folder in ("", "cpu", "python") for p in glob.glob(os.path.join(csrc, folder, "*.cpp"))]
    isas = cpu_isas()
    simd = {level: glob.glob(os.path.join(csrc, "cpu", level, "*.cpp")) if level in isas else []
            for level in SIMD_FLAGS}
    cu = glob.glob(os.path.join(csrc, "cuda", "*.cu")) + glob.glob(os.path.join(csrc, "cuda", "*.cpp")) if cuda else []
    return {"cpp": _rel(cpp, root), **{k: _rel(v, root) for k, v in simd.items()}, "cuda": _rel(cu, root)}


def include_dirs(root: str) -> list[str]:
    return [os.path.join(root, "csrc", "include"), os.path.join(root, "csrc")]


def has_x86_simd() -> bool:
    """Whether the AVX2 / AVX-512 translation units can be compiled here (x86-64 with GCC or Clang)."""
    return platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"


def native_isas() -> list[str]:
    """The SIMD levels this machine's CPU runs (from /proc/cpuinfo's flags, as simd() checks at run time)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return list(SIMD_FLAGS)  # unknown: build them all
    out = []
    if {"avx2", "fma"} <= flags:
        out.append("avx2")
        if {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags:
            out.append("avx512")
    return out


def cpu_isas() -> list[str]:
    """The SIMD levels to compile beside the portable loops, from FASTDIFF_CPU_ISAS:

    ``all`` (default): AVX2 and AVX-512, so the build runs at its best on any x86-64 CPU (wheels);
    ``native``: only the best level this CPU runs (one SIMD copy of each loop: the quickest local build);
    ``none``: the portable loops alone; or a comma list such as ``avx2``. Non-x86-64 builds: none.
    """
    value = os.environ.get(ISAS_ENV, "all").strip().lower() or "all"
    if not has_x86_simd():
        return []
    if value == "all":
        return list(SIMD_FLAGS)
    if value == "native":
        return native_isas()[-1:]
    if value == "none":
        return []
    levels = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in levels if v not in SIMD_FLAGS]
    if unknown:
        raise ValueError(f"{ISAS_ENV}={value!r}: unknown level(s) {unknown}; use all, native, none or a comma list "
                         f"of {', '.join(SIMD_FLAGS)}")
    return [level for level in SIMD_FLAGS if level in levels]


def defines(cuda: bool) -> list[str]:
    out = [f"-DFASTDIFF_HAVE_{level.upper()}" for level in cpu_isas()]
    if cuda:
        out.append("-DFASTDIFF_WITH_CUDA")
    return out


def nvidia_include_dirs() -> list[str]:
    """Headers that CUDA builds of torch get from the nvidia-* wheels (cusparse.h, cublas_v2.h, ...).

    A CUDA toolkit without the math libraries lacks them; the wheels ship them under
    site-packages/nvidia/cu13/include (CUDA 13) or nvidia/<lib>/include (CUDA 12).
    """
    found = []
    for site in sys.path:
        base = os.path.join(site, "nvidia")
        if not os.path.isdir(base):
            continue
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if inc not in found:
                found.append(inc)
    return found


def nvcc_path(home: str) -> str:
    return os.path.join(home, "bin", "nvcc.exe" if sys.platform == "win32" else "nvcc")


def _is_toolkit(home: str | None) -> bool:
    """A CUDA toolkit that can build: the compiler, not just the runtime (runtime-only images have
    libcudart and the headers but no bin/nvcc)."""
    if not home:
        return False
    has_lib = any(os.path.exists(os.path.join(home, d, "libcudart.so")) for d in ("lib64", "lib"))
    return (has_lib and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
            and os.path.exists(nvcc_path(home)))


def find_cuda_home() -> str | None:
    """The CUDA toolkit to build with; also installed as torch.utils.cpp_extension.CUDA_HOME.

    torch guesses CUDA_HOME from the nvcc on PATH; where nvcc sits outside its toolkit (e.g.
    /usr/local/bin/nvcc with the libraries in /usr/local/cuda) that guess has no libcudart to link,
    so an unset CUDA_HOME/CUDA_PATH falls back to the first real toolkit among the usual places.
    """
    import torch.utils.cpp_extension as cpp

    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or _is_toolkit(cpp.CUDA_HOME):
        return cpp.CUDA_HOME
    for home in ("/usr/local/cuda", "/opt/cuda", "/usr/lib/cuda"):
        if _is_toolkit(home):
            home = os.path.realpath(home)
            cpp.CUDA_HOME = home
            os.environ["CUDA_HOME"] = home
            return home
    return cpp.CUDA_HOME


def want_cuda() -> tuple[bool, str]:
    """(build the CUDA sources?, why). FASTDIFF_CUDA=0/1 overrides the detection."""
    import torch

    CUDA_HOME = find_cuda_home()

    forced = os.environ.get("FASTDIFF_CUDA")
    if forced == "0":
        return False, "FASTDIFF_CUDA=0"
    if torch.version.cuda is None:
        if forced == "1":
            raise RuntimeError("FASTDIFF_CUDA=1 but this torch is a CPU build (torch.version.cuda is None)")
        return False, f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        if forced == "1":
            raise RuntimeError("FASTDIFF_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    if not os.path.exists(nvcc_path(CUDA_HOME)):
        why = f"{nvcc_path(CUDA_HOME)} does not exist (a CUDA runtime without the compiler)"
        if forced == "1":
            raise RuntimeError(f"FASTDIFF_CUDA=1 but {why}; install the CUDA toolkit or set CUDA_HOME to one")
        return False, f"{why}; building the CPU kernels only"
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def set_default_cuda_archs() -> str:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    return os.environ["TORCH_CUDA_ARCH_LIST"]


def _arch(text: str) -> tuple[int, int]:
    major, _, minor = text.strip().partition(".")
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def arch_runs_on(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a build for TORCH_CUDA_ARCH_LIST ``arch_list`` ("8.0;9.0+PTX", "8.6 9.0a", named
    entries such as "Hopper" are accepted as unknown) has code for a GPU of ``capability``.

    Machine code for sm_XY runs on sm_XZ with Z >= Y (same major); arch-specific targets (9.0a) run
    only on their own architecture; PTX for compute_XY is compiled by the driver for any GPU >= XY.
    """
    cap = tuple(capability)
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        base, ptx = (entry[:-4], True) if entry.upper().endswith("+PTX") else (entry, False)
        if not base[:1].isdigit():
            return True  # a named architecture list ("Ampere"): torch expands it; do not second-guess
        arch = _arch(base.rstrip("af"))
        specific = base[-1:] in ("a", "f")
        if arch == cap or (not specific and arch[0] == cap[0] and arch[1] <= cap[1]) or (ptx and arch <= cap):
            return True
    return False
