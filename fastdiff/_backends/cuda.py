"""The cuda backend: fastdiff._C's CUDA kernels for CUDA tensors."""

from __future__ import annotations

import functools

import torch

from fastdiff import _native
from fastdiff._backends import native_ops
from fastdiff._backends.registry import Backend, BackendStatus, register_backend


def has_cuda_kernels() -> bool:
    """Whether _C registered CUDA kernels: the dispatcher's word, which holds for every kind of build
    (installed, in place, editable, JIT) whatever build record sits next to _C."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("fastdiff::sampler_step", "CUDA")
    except RuntimeError:  # the op is not registered at all
        return False


@functools.lru_cache(maxsize=None)
def arch_status(index: int) -> BackendStatus:
    """Whether _C has code for the GPU ``index`` (its build record names the architectures)."""
    from fastdiff import _build

    archs = _native.status.build.get("cuda_archs")
    cap = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if archs and not _build.arch_runs_on(archs, cap):
        return BackendStatus(False, f"fastdiff._C was built for TORCH_CUDA_ARCH_LIST={archs}, which has no code for "
                                    f"cuda:{index} ({name}, sm_{cap[0]}{cap[1]}); rebuild with "
                                    f"TORCH_CUDA_ARCH_LIST=\"{cap[0]}.{cap[1]}\" (or add +PTX to an older entry)")
    return BackendStatus(True, f"CUDA kernels, {name}")


def status(device_type=None, index=None) -> BackendStatus:
    if device_type not in (None, "cuda"):
        return BackendStatus(False, f"the cuda backend runs on CUDA tensors, not {device_type}")
    if not _native.status.loaded:
        return BackendStatus(False, _native.status.reason)
    if not has_cuda_kernels():
        return BackendStatus(False, f"fastdiff._C was built without CUDA (torch {torch.__version__}, "
                                    "CUDA sources need a CUDA build of torch and nvcc at build time)")
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA device is visible (torch.cuda.is_available() is False)")
    return arch_status(torch.cuda.current_device() if index is None else index)


register_backend(Backend("cuda", status, auto={"cuda": 0}, native_autograd=True))
native_ops.register("cuda")
