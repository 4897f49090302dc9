"""Backends as records: each backend module registers a :class:`Backend` (name, where it runs, the
rule that says whether it can run here and why not) and its implementation of each op in the registry
(registry.py), and ``fastdiff.dispatch`` chooses among them. Adding a backend is one module here (plus its
build and tests): a ``register_backend`` call and one ``@register_kernel`` function per op it implements,
which a backend module imports from ``fastdiff._backends.registry`` (not from this package, which imports
the backend modules).

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

from fastdiff._backends.registry import (Backend, BackendStatus, auto_order, get, has_kernel,  # noqa: F401
                                         kernel, names, register_backend, register_kernel)

# the built-in backends, in the order fastdiff.backends() lists them (they register themselves on import)
from fastdiff._backends import cuda, triton, cpu, reference  # noqa: F401
