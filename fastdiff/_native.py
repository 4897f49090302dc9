"""Loads the native extension ``fastdiff._C`` (the torch.ops.fastdiff CPU/CUDA kernels).

A torch extension only works with the torch it was compiled against, so the build writes
``_C.build.json`` (torch version, CUDA, SIMD) next to ``_C`` and this module refuses a mismatched
build with a message instead of crashing on a missing symbol. Without a usable ``_C`` the CPU and
CUDA backends are unavailable and ``backend="auto"`` falls back to Triton or the reference ops.
``FASTDIFF_JIT=1`` compiles csrc/ on import with torch.utils.cpp_extension.load (source checkouts).
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_PKG_DIR)


@dataclass
class NativeStatus:
    loaded: bool = False
    path: str | None = None  # the shared library that registered the ops
    build: dict = field(default_factory=dict)  # contents of _C.build.json (or the JIT's equivalent)
    reason: str = ""  # why it is not loaded, or how it was loaded


status = NativeStatus()


def _ops_registered() -> bool:
    return hasattr(torch.ops.fastdiff, "randn")


def _candidates() -> list[str]:
    """Directories that may hold _C: this package, then (for a source checkout imported from the
    repository root, which shadows the installed package) every installed fastdiff on sys.path."""
    dirs = [_PKG_DIR]
    for entry in sys.path:
        d = os.path.join(os.path.abspath(entry or os.getcwd()), "fastdiff")
        if os.path.isdir(d) and os.path.realpath(d) != os.path.realpath(_PKG_DIR) and d not in dirs:
            dirs.append(d)
    return dirs


def _load_from(directory: str) -> tuple[bool, str]:
    libs = [p for s in importlib.machinery.EXTENSION_SUFFIXES for p in glob.glob(os.path.join(directory, "_C" + s))]
    if not libs:
        return False, f"no compiled fastdiff._C in {directory}"
    record_path = os.path.join(directory, "_C.build.json")
    record = {}
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
    built_for = record.get("torch")
    if built_for is not None and built_for != torch.__version__:
        return False, (
            f"fastdiff._C in {directory} was built against torch {built_for} but torch {torch.__version__} "
            "is installed; a torch extension only runs with the torch it was compiled with. Rebuild it with "
            "`pip install --no-build-isolation --force-reinstall --no-deps .` (or set FASTDIFF_JIT=1 in a "
            "source checkout)"
        )
    spec = importlib.util.spec_from_file_location("fastdiff._C", libs[0])
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        return False, f"fastdiff._C in {directory} failed to load ({exc}); rebuild it against torch {torch.__version__}"
    sys.modules["fastdiff._C"] = module
    status.path, status.build = libs[0], record
    return True, f"loaded {libs[0]}"


def jit_build(verbose: bool = False) -> None:
    """Compile csrc/ with torch.utils.cpp_extension.load and register the ops (source checkouts only).

    The JIT build has no per-file flags, so it leaves out the AVX2 loop (the CPU backend then runs the
    portable vectorized loop) and builds the CUDA sources when torch is a CUDA build with nvcc present.
    """
    from torch.utils.cpp_extension import load

    from fastdiff import _build

    if not os.path.isdir(os.path.join(_REPO_ROOT, "csrc")):
        raise RuntimeError("FASTDIFF_JIT needs a source checkout (csrc/ next to fastdiff/); none found")
    cuda, _ = _build.want_cuda()
    if cuda:
        _build.set_default_cuda_archs()
    src = _build.sources(_REPO_ROOT, cuda)
    defines = [d for d in _build.defines(cuda) if d not in ("-DFASTDIFF_HAVE_AVX2", "-DFASTDIFF_HAVE_AVX512")]
    load(
        name="fastdiff_jit",
        sources=[os.path.join(_REPO_ROOT, s) for s in src["cpp"] + src["cuda"]],
        extra_include_paths=_build.include_dirs(_REPO_ROOT) + (_build.nvidia_include_dirs() if cuda else []),
        extra_cflags=_build.cxx_flags() + defines,
        extra_cuda_cflags=_build.nvcc_flags() + defines,
        extra_ldflags=_build.link_flags(),
        is_python_module=False,
        verbose=verbose,
    )
    # the same library as the module fastdiff._C (csrc/python/module.cpp: PreparedStep), as the built one is;
    # without it the sampling plans call the ops (fastdiff.ops.step_call), only slower at small sizes
    try:
        from torch.utils.cpp_extension import _get_build_directory

        libs = glob.glob(os.path.join(_get_build_directory("fastdiff_jit", verbose), "fastdiff_jit*.so"))
        spec = importlib.util.spec_from_file_location("fastdiff._C", libs[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["fastdiff._C"] = module
    except (ImportError, AttributeError, IndexError, OSError) as exc:
        warnings.warn(f"fastdiff: the JIT build's library did not load as fastdiff._C ({exc}); the sampling plans "
                      "call the ops instead of prepared calls", RuntimeWarning, stacklevel=2)
    status.build = {"torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
                    "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None, "avx2": False,
                    "avx512": False, "jit": True}


def load() -> NativeStatus:
    if status.loaded:
        return status
    reasons = []
    for directory in _candidates():
        ok, why = _load_from(directory)
        if ok:
            status.loaded, status.reason = _ops_registered(), why
            return status
        reasons.append(why)
        if directory == _PKG_DIR and "built against" in why:
            break  # the package's own build is stale: say that, rather than loading another copy
    if os.environ.get("FASTDIFF_JIT") == "1":
        jit_build(verbose=os.environ.get("FASTDIFF_JIT_VERBOSE") == "1")
        status.loaded, status.reason = _ops_registered(), "compiled at import (FASTDIFF_JIT=1)"
        return status
    status.reason = reasons[0]
    if "built against" in reasons[0] or "failed to load" in reasons[0]:
        warnings.warn(f"{reasons[0]}. Using the Triton/reference backends.", RuntimeWarning, stacklevel=3)
    return status
