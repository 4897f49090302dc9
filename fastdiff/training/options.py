"""Checks of the Trainer's constructor arguments, so that a bad value fails at construction with a message
naming it, not as a NaN or a crash steps into training."""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastdiff.training.nonfinite import ON_NONFINITE
from fastdiff.training.objective import SEED_SHIFT


def _check_float(name: str, v, *, low: float, high: Optional[float] = None, low_open: bool = False) -> None:
    """v a finite real number with low <= v (low < v if low_open) and v < high."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and (high is None or v < high)
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
        raise ValueError(f"{name} must be a finite number {bounds}, got {v!r}")


def check_trainer_args(model, *, steps, warmup, checkpoint_every, keep, log_every, max_consecutive_skips, seed,
                       lr, lr_min, weight_decay, lr_schedule, ema_decay, grad_clip, betas, on_nonfinite,
                       out_dir) -> tuple:
    """Raise TypeError or ValueError for the first bad argument of :class:`Trainer`; returns ``betas``
    as a tuple."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, v, least in (("steps", steps, 1), ("warmup", warmup, 0), ("checkpoint_every", checkpoint_every, 0),
                           ("keep", keep, 0), ("log_every", log_every, 1),
                           ("max_consecutive_skips", max_consecutive_skips, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << (63 - SEED_SHIFT):
        raise ValueError(f"seed must be an int in [0, 2^{63 - SEED_SHIFT}), got {seed!r}")
    _check_float("lr", lr, low=0.0, low_open=True)
    _check_float("lr_min", lr_min, low=0.0)
    _check_float("weight_decay", weight_decay, low=0.0)
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    _check_float("ema_decay", ema_decay, low=0.0, high=1.0)
    if grad_clip is not None:
        _check_float("grad_clip", grad_clip, low=0.0)  # NaN would pass `< 0` and clip every gradient to NaN
    betas = tuple(betas)
    if len(betas) != 2:
        raise ValueError(f"betas must be two floats, got {betas!r}")
    for i, b in enumerate(betas):
        _check_float(f"betas[{i}]", b, low=0.0, high=1.0)
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    if checkpoint_every and out_dir is None:
        raise ValueError("checkpoint_every needs out_dir")
    return betas
