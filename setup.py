"""Builds fastdiff._C with torch's cpp_extension (ninja): C++ CPU sources always, CUDA sources where a
CUDA build of torch and nvcc are present. Source lists and flags live in fastdiff/_build.py."""

import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
RECORD = "_C.build.json"  # what _C was built with; fastdiff/_native.py reads it before loading _C
_spec = importlib.util.spec_from_file_location("fastdiff_build", os.path.join(ROOT, "fastdiff", "_build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


class BuildFastdiff(BuildExtension):
    """BuildExtension plus per-file flags (csrc/cpu/avx2 and csrc/cpu/avx512 get their instruction
    sets) and a build record next to _C."""

    def finalize_options(self):
        super().finalize_options()
        # FASTDIFF_BUILD_TEMP keeps the objects in one folder: `pip install -e .` builds in a fresh temporary
        # folder each time, so without it every editable reinstall recompiles everything (~6 min with CUDA on
        # 2 cores); ninja then rebuilds only what changed.
        kept = os.environ.get("FASTDIFF_BUILD_TEMP")
        if kept:
            self.build_temp = os.path.abspath(kept)

    def build_extension(self, ext):
        """Compiles the SIMD groups (csrc/cpu/avx2, csrc/cpu/avx512: their own flags, so their own ninja
        file in their own folder) in threads while setuptools compiles the portable and CUDA sources, so
        every translation unit competes for the cores at once (before: one group after another, the
        slowest unit of each alone on one core); the objects join before the link."""
        simd = getattr(ext, "simd_sources", {})
        cxx = list(ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict)
                   else ext.extra_compile_args)
        groups = {level: files for level, files in simd.items() if files}

        def compile_group(level, files):
            flags = cxx + build.SIMD_FLAGS[level]
            return self.compiler.compile(
                files, output_dir=os.path.join(self.build_temp, level), include_dirs=ext.include_dirs,
                extra_postargs={"cxx": flags} if self.use_ninja else flags)

        # without ninja the compiler object swaps its executable per call: not safe from threads
        pool = ThreadPoolExecutor(max_workers=len(groups)) if groups and self.use_ninja else None
        futures = [pool.submit(compile_group, level, files) for level, files in groups.items()] if pool else []
        compile_main = self.compiler.compile

        def compile_then_join(*args, **kwargs):
            objects = compile_main(*args, **kwargs)
            if pool is None:
                results = [compile_group(level, files) for level, files in groups.items()]
            else:
                results = [f.result() for f in futures]
            ext.extra_objects = list(ext.extra_objects or []) + [o for r in results for o in r]
            return objects

        self.compiler.compile = compile_then_join
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_main
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        record = {
            "torch": torch.__version__,
            "cuda": torch.version.cuda if getattr(ext, "with_cuda", False) else None,
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if getattr(ext, "with_cuda", False) else None,
            "avx2": bool(simd.get("avx2")),
            "avx512": bool(simd.get("avx512")),
            "openmp": "-fopenmp" in build.link_flags(),
        }
        with open(self._record_path(ext), "w") as f:
            json.dump(record, f, indent=1)

    def _record_path(self, ext):
        return os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), RECORD)

    # The record travels with _C everywhere setuptools copies _C: `build_ext --inplace` and editable
    # installs (`pip install -e .`) build in build/ and copy only the extensions back to the source
    # tree, which left a _C without its record there, reported as "built without CUDA".
    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            record = os.path.join(os.path.dirname(regular_file), RECORD)
            if os.path.exists(record):
                self.copy_file(record, os.path.join(os.path.dirname(inplace_file), RECORD), level=self.verbose)

    def get_outputs(self):
        if self.inplace:  # setuptools lists the build-tree side of get_output_mapping, the record included
            return super().get_outputs()
        return super().get_outputs() + [self._record_path(ext) for ext in self.extensions]

    def get_output_mapping(self):
        mapping = dict(super().get_output_mapping())
        if self.inplace:
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                mapping[os.path.join(os.path.dirname(regular_file), RECORD)] = \
                    os.path.join(os.path.dirname(inplace_file), RECORD)
        return mapping


def extension():
    cuda, why = build.want_cuda()
    print(f"fastdiff: CUDA sources {'on' if cuda else 'off'} ({why}); CPU SIMD levels: "
          f"{', '.join(build.cpu_isas()) or 'none'} ({build.ISAS_ENV}={os.environ.get(build.ISAS_ENV, 'all')}); "
          f"{'debug' if build.debug_build() else 'release'} build ({build.DEBUG_ENV})")
    src = build.sources(ROOT, cuda)
    cxx = build.cxx_flags() + build.defines(cuda)
    kwargs = dict(
        name="fastdiff._C",
        sources=src["cpp"] + src["cuda"],
        include_dirs=build.include_dirs(ROOT),
        # _C is loaded as a Python module only to run the op registrations; it needs no libpython symbols
        # beyond PyModule_Create.
        py_limited_api=False,
    )
    if cuda:
        archs = build.set_default_cuda_archs()
        print(f"fastdiff: CUDA architectures {archs}")
        ext = CUDAExtension(**kwargs, extra_compile_args={"cxx": cxx, "nvcc": build.nvcc_flags() + build.defines(cuda)})
        ext.include_dirs += build.nvidia_include_dirs()
    else:
        ext = CppExtension(**kwargs, extra_compile_args={"cxx": cxx})
    ext.extra_link_args = list(ext.extra_link_args or []) + build.link_flags()
    ext.simd_sources = {level: src[level] for level in build.SIMD_FLAGS}
    ext.with_cuda = cuda
    return ext


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildFastdiff},
)
