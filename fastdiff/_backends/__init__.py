"""Backends as records: each backend module registers a :class:`Backend` (name, where it runs, the
rule that says whether it can run here and why not) and its implementation of each op, and
``fastdiff.dispatch`` chooses among them. Adding a backend is one module here (plus its build and
tests): a ``register_backend`` call and one ``@register_kernel`` function per op it implements.

Kernels receive arguments already checked and normalized by the public op (``fastdiff.ops``), with
the signatures below, and do no checking of their own:

    randn(seeds, stream, shape, offset, dtype)                       -> [B, *shape]
    philox4x32_10(counter, key)                                      -> int64 [N, 4]
    sampler_step(x, preds, history, seeds, streams, weights, coeffs,
                 sample_weights, sample_coeffs, outs, side, finite)  -> None (writes outs, side, finite)
    sample_gram(terms, seeds, streams)                               -> float64 [B, T + T (T + 1) / 2]
    add_noise(z, alpha, beta, seeds, stream)                         -> float32 like z
    diffusion_loss(pred, z, coef_z, coef_eps, weight, seeds, stream) -> float32 [B]
    diffusion_loss_residual(...)  (optional)                         -> (loss [B], float32 pred - target)
    diffusion_loss_backward(grad, pred, z, coef_z, coef_eps, weight, seeds, stream) -> grad of pred

The reference backend's kernels are the ops' pure-PyTorch references, registered by the op modules.
"""

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


# the built-in backends, in the order fastdiff.backends() lists them
from fastdiff._backends import cuda, triton, cpu, reference  # noqa: E402,F401
