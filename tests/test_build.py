"""Build decisions that need no compiler run: which CUDA toolkit can build, which GPUs a build has code
for, and how the backend status reads them. (In-place and editable builds themselves run in CI.)"""

import os

import pytest
import torch

import fastdiff
from fastdiff import _build, _native, dispatch
from fastdiff._backends import cuda as cuda_backend


@pytest.mark.parametrize("archs,cap,runs", [
    ("8.0;9.0", (9, 0), True),
    ("8.0;9.0", (8, 6), True),  # sm_80 machine code runs on sm_86
    ("8.0;9.0", (10, 0), False),  # ... but nothing of it on Blackwell: "no kernel image"
    ("8.0;9.0+PTX", (10, 0), True),  # PTX is compiled by the driver for newer GPUs
    ("8.0;9.0+PTX", (12, 0), True),
    ("9.0+PTX", (8, 0), False),  # PTX never runs on an older GPU
    ("9.0a", (9, 0), True),
    ("9.0a", (10, 0), False),  # arch-specific code is for its own architecture only
    ("8.6 9.0", (8, 9), True),
    ("7.5", (8, 0), False),
    ("Hopper", (9, 0), True),
])
def test_arch_runs_on(archs, cap, runs):
    assert _build.arch_runs_on(archs, cap) is runs


def test_default_archs_embed_ptx_for_newer_gpus():
    assert "+PTX" in _build.DEFAULT_CUDA_ARCHS
    assert _build.arch_runs_on(_build.DEFAULT_CUDA_ARCHS, (10, 0))


def _toolkit(root, nvcc: bool):
    os.makedirs(root / "lib64")
    os.makedirs(root / "include")
    (root / "lib64" / "libcudart.so").write_text("")
    (root / "include" / "cuda_runtime.h").write_text("")
    if nvcc:
        os.makedirs(root / "bin")
        (root / "bin" / "nvcc").write_text("")
    return str(root)


@pytest.fixture
def cuda_torch(monkeypatch):
    """A CUDA build of torch, as far as the build decision can tell."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("FASTDIFF_CUDA", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    return cpp


def test_a_cuda_runtime_without_nvcc_builds_the_cpu_kernels(tmp_path, monkeypatch, cuda_torch):
    home = _toolkit(tmp_path / "cuda", nvcc=False)
    monkeypatch.setenv("CUDA_HOME", home)
    monkeypatch.setattr(cuda_torch, "CUDA_HOME", home)
    cuda, why = _build.want_cuda()
    assert not cuda and "nvcc" in why and "CPU kernels" in why
    monkeypatch.setenv("FASTDIFF_CUDA", "1")
    with pytest.raises(RuntimeError, match="nvcc"):
        _build.want_cuda()


def test_a_runtime_only_dir_is_not_taken_for_a_toolkit(tmp_path, monkeypatch, cuda_torch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    runtime = _toolkit(tmp_path / "runtime", nvcc=False)
    monkeypatch.setattr(cuda_torch, "CUDA_HOME", runtime)
    assert not _build._is_toolkit(runtime)
    assert _build._is_toolkit(_toolkit(tmp_path / "full", nvcc=True))


def test_a_full_toolkit_builds_cuda(tmp_path, monkeypatch, cuda_torch):
    home = _toolkit(tmp_path / "cuda", nvcc=True)
    monkeypatch.setenv("CUDA_HOME", home)
    monkeypatch.setattr(cuda_torch, "CUDA_HOME", home)
    cuda, why = _build.want_cuda()
    assert cuda and home in why


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible GPU of a chosen capability and a _C that registered CUDA kernels."""
    cuda_backend.arch_status.cache_clear()
    monkeypatch.setattr(_native.status, "loaded", True)
    monkeypatch.setattr(_native.status, "build", dict(_native.status.build, cuda="13.0", cuda_archs="8.0;9.0"))
    monkeypatch.setattr(cuda_backend, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake GPU")
    yield lambda cap: monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap)
    cuda_backend.arch_status.cache_clear()


def test_cuda_backend_refuses_a_gpu_the_build_has_no_code_for(fake_gpu):
    fake_gpu((10, 0))
    st = dispatch._status("cuda", "cuda", 0)
    assert not st and "sm_100" in st.reason and "TORCH_CUDA_ARCH_LIST" in st.reason
    assert dispatch.resolve(torch.device("cuda", 0), "auto") != "cuda"  # auto falls back (Triton/reference)
    with pytest.raises(fastdiff.BackendUnavailable, match="sm_100"):
        dispatch.resolve(torch.device("cuda", 0), "cuda")


def test_cuda_backend_takes_a_gpu_the_build_covers(fake_gpu):
    fake_gpu((9, 0))
    assert dispatch._status("cuda", "cuda", 0)
    assert dispatch.resolve(torch.device("cuda", 0), "auto") == "cuda"


def test_cuda_status_asks_the_dispatcher_not_the_record(monkeypatch):
    """An in-place or editable build may lack the record; what counts is whether _C registered CUDA kernels."""
    monkeypatch.setattr(_native.status, "build", {})
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("fastdiff::sampler_step", "CUDA") \
        if _native.status.loaded else False
    assert cuda_backend.has_cuda_kernels() is registered
    reason = dispatch._status("cuda", "cuda").reason
    assert ("built without CUDA" in reason) is (not registered)
