"""Backend selection: "auto", "cuda", "triton", "cpu", "reference".

The backend comes from, in order: an explicit ``backend=`` argument, the innermost
:func:`use_backend` block, the ``FASTDIFF_BACKEND`` environment variable, else "auto". An explicit
backend that cannot run on the tensors' device raises :class:`BackendUnavailable` saying why;
"auto" picks the fastest available one: CUDA tensors cuda → triton → reference, CPU tensors
cpu → reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

from fastdiff import _native

NAMES = ("auto", "cuda", "triton", "cpu", "reference")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastdiff_backend", default=None)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (the message says why)."""


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str  # why not, or what it runs on

    def __bool__(self) -> bool:
        return self.available


def check_name(name: str, argument: str = "backend") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a string, one of {', '.join(NAMES)}; got {type(name).__name__}")
    if name not in NAMES:
        raise ValueError(f"{argument}={name!r} is not a backend; choose one of {', '.join(NAMES)}")
    return name


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _has_cuda_kernels() -> bool:
    """Whether _C registered CUDA kernels: the dispatcher's word, which holds for every kind of build
    (installed, in place, editable, JIT) whatever build record sits next to _C."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("fastdiff::guided_step", "CUDA")
    except RuntimeError:  # the op is not registered at all
        return False


@functools.lru_cache(maxsize=None)
def _cuda_arch_status(index: int) -> BackendStatus:
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


def _status(name: str, device_type: str | None = None, index: int | None = None) -> BackendStatus:
    """Availability of a backend, for tensors on ``device_type`` (None: on any device of this machine)
    and, for CUDA, on GPU ``index`` (None: the current one)."""
    if name == "reference":
        return BackendStatus(True, "pure PyTorch, any device")
    if name == "cpu":
        if device_type not in (None, "cpu"):
            return BackendStatus(False, f"the cpu backend runs on CPU tensors, not {device_type}")
        if not _native.status.loaded:
            return BackendStatus(False, _native.status.reason)
        return BackendStatus(True, f"C++ kernels ({torch.ops.fastdiff.cpu_simd()}), {torch.get_num_threads()} threads")
    if name == "cuda":
        if device_type not in (None, "cuda"):
            return BackendStatus(False, f"the cuda backend runs on CUDA tensors, not {device_type}")
        if not _native.status.loaded:
            return BackendStatus(False, _native.status.reason)
        if not _has_cuda_kernels():
            return BackendStatus(False, f"fastdiff._C was built without CUDA (torch {torch.__version__}, "
                                        "CUDA sources need a CUDA build of torch and nvcc at build time)")
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device is visible (torch.cuda.is_available() is False)")
        return _cuda_arch_status(torch.cuda.current_device() if index is None else index)
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(False, "triton is not installed")
        if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
            if _triton_interpret():
                return BackendStatus(True, "Triton interpreter on the CPU (TRITON_INTERPRET=1)")
            return BackendStatus(False, "Triton needs a GPU (or TRITON_INTERPRET=1 to interpret on the CPU)")
        if device_type not in (None, "cuda"):
            return BackendStatus(False, f"Triton does not run on {device_type} tensors")
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device is visible (torch.cuda.is_available() is False)")
        return BackendStatus(True, "Triton kernels" + (" (interpreted)" if _triton_interpret() else ""))
    raise AssertionError(name)


def backends() -> dict[str, BackendStatus]:
    """For each backend: whether it can run on this machine and, if not, why."""
    return {name: _status(name) for name in NAMES[1:]}


def current() -> str:
    """The backend in force: innermost use_backend(), else FASTDIFF_BACKEND, else "auto"."""
    name = _current.get()
    if name is None:
        name = check_name(os.environ.get("FASTDIFF_BACKEND", "auto") or "auto", "FASTDIFF_BACKEND")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed fastdiff ops on backend ``name`` ("auto" restores automatic choice)."""
    token = _current.set(check_name(name))
    try:
        yield
    finally:
        _current.reset(token)


def resolve(device: torch.device, backend: str | None = None) -> str:
    """The concrete backend that runs an op on tensors on ``device``."""
    name = current() if backend is None else check_name(backend)
    device = torch.device(device)
    device_type, index = device.type, device.index
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            if _status(candidate, device_type, index):
                return candidate
        return "reference"
    st = _status(name, device_type, index)
    if not st:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device_type} tensors: {st.reason}")
    return name
