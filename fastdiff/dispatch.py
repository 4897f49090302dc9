"""Backend selection among the registered backends (fastdiff/_backends: "cuda", "triton", "cpu",
"reference"), or "auto".

The backend comes from, in order: an explicit ``backend=`` argument, the innermost
:func:`use_backend` block, the ``FASTDIFF_BACKEND`` environment variable, else "auto". An explicit
backend that cannot run on the tensors' device raises :class:`BackendUnavailable` saying why;
"auto" picks the fastest available one: CUDA tensors cuda → triton → reference, CPU tensors
cpu → reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from fastdiff import _backends as _registry
from fastdiff._backends import BackendStatus  # noqa: F401  (public: the values of fastdiff.backends())

NAMES = ("auto", *_registry.names())

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastdiff_backend", default=None)


class BackendUnavailable(ValueError, RuntimeError):
    """An explicitly requested backend cannot run here (the message says why). A ValueError, since the argument
    asks for what cannot be (and a RuntimeError, as it was first)."""


def check_name(name: str, argument: str = "backend") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a string, one of {', '.join(NAMES)}; got {type(name).__name__}")
    if name not in NAMES:
        raise ValueError(f"{argument}={name!r} is not a backend; choose one of {', '.join(NAMES)}")
    return name


def _status(name: str, device_type: str | None = None, index: int | None = None) -> BackendStatus:
    """Availability of a backend, for tensors on ``device_type`` (None: on any device of this machine)
    and, for CUDA, on GPU ``index`` (None: the current one): the backend record's own rule."""
    return _registry.get(name).status(device_type, index)


def kernel(name: str, op: str):
    """The implementation of ``op`` on the resolved backend ``name`` (fastdiff/_backends)."""
    return _registry.kernel(name, op)


def has_kernel(name: str, op: str) -> bool:
    return _registry.has_kernel(name, op)


def native_autograd(name: str) -> bool:
    """Whether backend ``name``'s kernels carry their own autograd (torch.ops.fastdiff registrations)."""
    return _registry.get(name).native_autograd


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
        for candidate in _registry.auto_order(device_type):
            if _status(candidate, device_type, index):
                return candidate
        return "reference"
    st = _status(name, device_type, index)
    if not st:
        raise BackendUnavailable(f"backend={name!r} cannot run on {device_type} tensors: {st.reason}")
    return name
