"""Where a Triton launch runs. Triton launches on the *current* CUDA device and its current stream,
so a launcher must make the tensors' device current first: otherwise tensors on cuda:1 while cuda:0
is current are read from the wrong device (a fault) on cuda:0's stream (a race with cuda:1's work).
"""

import contextlib

import torch


def on_device(device):
    """Context manager for a launch on ``device`` (a torch.device or a tensor's device):
    ``torch.cuda.device(device)`` for CUDA, a no-op otherwise (the interpreter on CPU tensors)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
