"""The cpu backend: fastdiff._C's C++ kernels for CPU tensors (runtime-dispatched SIMD levels)."""

from __future__ import annotations

import torch

from fastdiff import _native
from fastdiff._backends import native_ops
from fastdiff._backends.registry import Backend, BackendStatus, register_backend


def status(device_type=None, index=None) -> BackendStatus:
    if device_type not in (None, "cpu"):
        return BackendStatus(False, f"the cpu backend runs on CPU tensors, not {device_type}")
    if not _native.status.loaded:
        return BackendStatus(False, _native.status.reason)
    return BackendStatus(True, lambda: f"C++ kernels ({torch.ops.fastdiff.cpu_simd()}), "
                                       f"{torch.get_num_threads()} threads")


register_backend(Backend("cpu", status, auto={"cpu": 0}, native_autograd=True))
native_ops.register("cpu", residual=True)
