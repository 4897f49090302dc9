"""The triton backend: the Triton kernels of fastdiff.kernels, on CUDA tensors, or on CPU tensors
under TRITON_INTERPRET=1 (how the tests run them without a GPU)."""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from fastdiff._backends.registry import Backend, BackendStatus, register_backend, register_kernel


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def status(device_type=None, index=None) -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed")
    if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
        if interpreted():
            return BackendStatus(True, "Triton interpreter on the CPU (TRITON_INTERPRET=1)")
        return BackendStatus(False, "Triton needs a GPU (or TRITON_INTERPRET=1 to interpret on the CPU)")
    if device_type not in (None, "cuda"):
        return BackendStatus(False, f"Triton does not run on {device_type} tensors")
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA device is visible (torch.cuda.is_available() is False)")
    return BackendStatus(True, "Triton kernels" + (" (interpreted)" if interpreted() else ""))


register_backend(Backend("triton", status, auto={"cuda": 1}))


# Each op's kernel in fastdiff.kernels (module, function), imported on first use so that importing
# fastdiff does not need Triton.
KERNELS = {"randn": ("randn", "randn"), "philox4x32_10": ("randn", "philox4x32_10"),
           "sampler_step": ("sampler_step", "sampler_step"), "sample_gram": ("sample_gram", "sample_gram"),
           "add_noise": ("loss", "add_noise"),
           "diffusion_loss": ("loss", "diffusion_loss"), "diffusion_loss_backward": ("loss", "diffusion_loss_backward")}


def _lazy(module: str, function: str):
    def call(*args):
        return getattr(importlib.import_module(f"fastdiff.kernels.{module}"), function)(*args)

    call.__name__ = function
    return call


for _op, (_module, _function) in KERNELS.items():
    register_kernel("triton", _op)(_lazy(_module, _function))
