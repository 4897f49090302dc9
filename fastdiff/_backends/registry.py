"""The backend registry: the :class:`Backend` records, ``register_backend`` / ``register_kernel`` and the
look-ups ``fastdiff.dispatch`` makes (the kernel signatures: fastdiff/_backends/__init__.py). The backend
modules and the ops register here; the package's ``__init__`` imports the built-in backends, which import
this module, never the package."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    # why not, or what it runs on; a callable is called when .reason is read (ops resolve their backend on
    # every call and only need .available: the description can cost more than the check)
    detail: Union[str, Callable[[], str]]

    @property
    def reason(self) -> str:
        return self.detail() if callable(self.detail) else self.detail

    def __bool__(self) -> bool:
        return self.available

    def __repr__(self) -> str:  # the text, not the callable that makes it
        return f"BackendStatus(available={self.available}, reason={self.reason!r})"


@dataclass
class Backend:
    name: str
    # status(device_type, index): whether it runs on tensors of device_type ("cpu", "cuda", ...; None:
    # on any device of this machine) and GPU index (None: the current one), with the reason
    status: Callable[[Optional[str], Optional[int]], BackendStatus]
    # device types for which "auto" may pick it, and its rank there (lower first); the reference
    # backend is the fallback everywhere
    auto: dict[str, int] = field(default_factory=dict)
    # whether its kernels are torch.ops.fastdiff ops with registered autograd (else the ops wrap them)
    native_autograd: bool = False
    kernels: dict[str, Callable] = field(default_factory=dict)


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    if backend.name in _BACKENDS or backend.name == "auto":
        raise ValueError(f"backend {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend
    return backend


def register_kernel(backend: str, op: str):
    """Decorator: ``fn`` implements ``op`` on ``backend``."""
    def wrap(fn):
        _BACKENDS[backend].kernels[op] = fn
        return fn
    return wrap


def get(name: str) -> Backend:
    return _BACKENDS[name]


def names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def kernel(backend: str, op: str) -> Callable:
    """The implementation of ``op`` on ``backend`` (a KeyError names both if there is none)."""
    try:
        return _BACKENDS[backend].kernels[op]
    except KeyError:
        raise KeyError(f"backend {backend!r} has no kernel for {op!r}") from None


def has_kernel(backend: str, op: str) -> bool:
    return op in _BACKENDS[backend].kernels


def auto_order(device_type: str) -> tuple[str, ...]:
    """The backends "auto" tries for tensors on ``device_type``, best first, ending with the reference."""
    key = (device_type, len(_BACKENDS))  # every op call asks; backends are only ever added
    if key not in _AUTO_ORDER:
        ranked = sorted((b.auto[device_type], b.name) for b in _BACKENDS.values() if device_type in b.auto)
        _AUTO_ORDER[key] = tuple(name for _, name in ranked) + ("reference",)
    return _AUTO_ORDER[key]


_AUTO_ORDER: dict[tuple, tuple[str, ...]] = {}
