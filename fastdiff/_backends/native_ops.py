"""The kernels of fastdiff._C (torch.ops.fastdiff), shared by the cpu and cuda backends: the op's
device picks the CPU or CUDA implementation through PyTorch's dispatcher."""

from __future__ import annotations

import torch

from fastdiff._backends.registry import register_kernel

OPS = ("philox4x32_10", "sampler_step", "sample_gram", "add_noise", "diffusion_loss", "diffusion_loss_backward")
# At flow times, the coefficients computed in the kernel (fastdiff/ops/loss_at_times.py); a library built
# before them has none, and the ops then take the coefficient kernels above.
AT_TIMES_OPS = ("add_noise_at", "diffusion_loss_at")


def _call(name: str):
    def call(*args):
        return getattr(torch.ops.fastdiff, name)(*args)

    call.__name__ = name
    call.direct = lambda: getattr(torch.ops.fastdiff, name).default  # the op overload, for callers that resolve once
    return call


def _sampler_step():
    """The op with the kernels' trailing (clip, stats): stats = (tensors, pick) is the op's stats, stats_pick."""

    def call(*args):
        op = torch.ops.fastdiff.sampler_step.default
        if len(args) > 13 and args[13] is not None:
            return op(*args[:13], *args[13])
        return op(*args[:13])

    call.__name__ = "sampler_step"
    call.direct = lambda: call
    return call


def register(backend: str, *, residual: bool = False) -> None:
    """Registers the _C kernels for ``backend``; ``residual``: also the loss forward that keeps pred − target
    for a backward without a second pass over the noise (worth it where the normals are costly: CPU)."""
    for name in OPS + (("diffusion_loss_residual",) if residual else ()):
        register_kernel(backend, name)(_sampler_step() if name == "sampler_step" else _call(name))
    if all(hasattr(torch.ops.fastdiff, name) for name in AT_TIMES_OPS):
        for name in AT_TIMES_OPS + (("diffusion_loss_at_residual",) if residual else ()):
            register_kernel(backend, name)(_call(name))
    register_kernel(backend, "randn")(
        lambda seeds, stream, shape, offset, dtype: torch.ops.fastdiff.randn(seeds, stream, list(shape), offset, dtype))
