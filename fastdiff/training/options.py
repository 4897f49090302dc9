"""Checks of the Trainer's constructor arguments, so that a bad value fails at construction with a message
naming it, not as a NaN or a crash steps into training."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from fastdiff import _checks
from fastdiff.training import checkpoint as ckpt
from fastdiff.training.nonfinite import ON_NONFINITE
from fastdiff.training.objective import SEED_SHIFT, DiffusionObjective
from fastdiff.training.score_matching import ScoreMatchingObjective

MAX_LOG_EVERY = 1 << 20
MAX_SAMPLES = 1 << SEED_SHIFT  # training sample n has the noise seed (seed << 40) + n: n < 2^40


def _check_float(name: str, v, *, low: float, high: Optional[float] = None, low_open: bool = False) -> None:
    """v a finite real number with low <= v (low < v if low_open) and v < high."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and (high is None or v < high)
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
        kind = "" if isinstance(v, (int, float)) else f" (a Python int or float: float({name}), not {type(v).__name__})"
        raise ValueError(f"{name} must be a finite number {bounds}{kind}, got {v!r}")


def check_trainer_args(model, *, steps, warmup, checkpoint_every, keep, log_every, max_consecutive_skips, seed,
                       lr, lr_min, weight_decay, lr_schedule, ema_decay, grad_clip, betas, on_nonfinite,
                       out_dir, objective=None, amp=False, progress=True, resume=True, callback=None,
                       overwrite=False) -> tuple:
    """Raise TypeError or ValueError for the first bad argument of :class:`Trainer`; returns ``betas``
    as a tuple."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):  # else AdamW's "empty parameter list"
        raise ValueError(f"model has no trainable parameters ({type(model).__name__}: none, or all frozen)")
    if objective is not None and not isinstance(objective, (DiffusionObjective, ScoreMatchingObjective)):
        raise TypeError("objective must be a DiffusionObjective (e.g. DiffusionObjective(\"condot\", \"velocity\"); "
                        "prediction velocity, eps, score or x0), a ScoreMatchingObjective or ncsn_objective(...), "
                        f"got {type(objective).__name__} {objective!r}")
    _checks.flag("amp", amp)
    _checks.flag("progress", progress)
    if _checks.flag("overwrite", overwrite) and resume is not False:
        raise ValueError(f"overwrite=True starts a new run in out_dir (removing an earlier run's checkpoints): pass "
                         f"resume=False with it, got resume={resume!r}")
    if not isinstance(resume, (bool, str, os.PathLike)):
        raise TypeError(f"resume must be True, False or a checkpoint path, got {type(resume).__name__} {resume!r}")
    for name, v, least in (("steps", steps, 1), ("warmup", warmup, 0), ("checkpoint_every", checkpoint_every, 0),
                           ("keep", keep, 0), ("log_every", log_every, 1),
                           ("max_consecutive_skips", max_consecutive_skips, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            kind = "" if isinstance(v, (int, float)) else f" (a Python int: int({name}), not {type(v).__name__})"
            raise ValueError(f"{name} must be an int >= {least}{kind}, got {v!r}")
    check_steps(steps)
    if log_every > MAX_LOG_EVERY:  # the non-finite guard keeps a device row per unread step
        raise ValueError(f"log_every must be at most {MAX_LOG_EVERY} (steps between loss read-backs), got {log_every}")
    if out_dir is not None and (not isinstance(out_dir, (str, os.PathLike)) or os.fspath(out_dir) in ("", b"")):
        raise TypeError(f"out_dir must be None or a folder path (str or os.PathLike), got "
                        f"{type(out_dir).__name__} {out_dir!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be None or callable as callback(trainer), got "
                        f"{type(callback).__name__} {callback!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 1 << (63 - SEED_SHIFT):
        raise ValueError(f"seed must be an int in [0, 2^{63 - SEED_SHIFT}), got {seed!r}")
    _check_float("lr", lr, low=0.0, low_open=True)
    _check_float("lr_min", lr_min, low=0.0)
    _check_float("weight_decay", weight_decay, low=0.0)
    if lr * weight_decay > 1.0:  # AdamW scales the weights by 1 - lr * weight_decay each step: past 1 they flip sign
        raise ValueError(f"lr * weight_decay must be at most 1 (AdamW's decay factor 1 - lr * weight_decay), got "
                         f"lr = {lr:g}, weight_decay = {weight_decay:g}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    _check_float("ema_decay", ema_decay, low=0.0, high=1.0)
    if grad_clip is not None:
        _check_float("grad_clip", grad_clip, low=0.0)  # NaN would pass `< 0` and clip every gradient to NaN
    if isinstance(betas, (str, bytes)) or not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be two floats (AdamW's beta1, beta2), got {type(betas).__name__} {betas!r}")
    betas = tuple(betas)
    if len(betas) != 2:
        raise ValueError(f"betas must be two floats, got {betas!r}")
    for i, b in enumerate(betas):
        _check_float(f"betas[{i}]", b, low=0.0, high=1.0)
    # Adam's first step size is lr / (1 - beta1), a float32 scalar in torch's update: past float32's range (3.4e38,
    # a little under its maximum: 1 - beta1 is rounded) the optimizer failed inside torch with "value cannot be
    # converted to type float without overflow" (lr = 3.4e37, found by tests/test_argument_properties.py)
    if betas[0] < 1.0 and lr / (1.0 - betas[0]) > 3.4e38:
        raise ValueError(f"lr = {lr:g} is too large: Adam's step size lr / (1 - betas[0]) = {lr / (1.0 - betas[0]):g} "
                         "overflows float32")
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    if checkpoint_every and out_dir is None:
        raise ValueError("checkpoint_every needs out_dir")
    return betas


def check_steps(steps: int, batch_size: int = 1) -> None:
    """Refuse a run longer than the noise seeds allow: sample n of a run draws with seed (seed << 40) + n, so
    steps × batch_size must stay within 2^40 (beyond, runs of different seeds would share noise)."""
    if steps * batch_size > MAX_SAMPLES:
        raise ValueError(f"steps must be at most 2^{SEED_SHIFT} // batch_size = {MAX_SAMPLES // batch_size} (the "
                         f"training samples' noise seeds), got steps={steps} with batch_size={batch_size}")


def check_resumed_objective(saved, mine: dict, where: str) -> None:
    """Refuse to resume a checkpoint of another kind of objective, or whose path / prediction (diffusion) or
    time / noise (score matching) differ: the weights would then mean something else."""
    saved = saved if isinstance(saved, dict) else {}

    def kind(cfg):  # DiffusionObjective's config has no "objective" key (older checkpoints neither)
        return "ScoreMatchingObjective" if cfg.get("objective") == "score_matching" else "DiffusionObjective"

    if kind(saved) != kind(mine):
        raise ckpt.CheckpointError(
            f"{where} was trained with a {kind(saved)} ({_summary(saved)}); this run has a {kind(mine)} "
            f"({_summary(mine)}): resuming would train the weights for another objective (use a "
            f"{kind(saved)}, or start a new out_dir)")
    for key in (("path", "prediction") if kind(mine) == "DiffusionObjective" else ("t", "noise_std")):
        if key in saved and saved[key] != mine[key]:
            raise ckpt.CheckpointError(
                f"{where} was trained with {key} {saved[key]!r}; this run has {key} {mine[key]!r}: resuming "
                f"would change what the weights mean (use {key} {saved[key]!r}, or start a new out_dir)")


def _summary(cfg: dict) -> str:
    keys = ("kind", "t", "noise_std") if cfg.get("objective") == "score_matching" else ("path", "prediction")
    return ", ".join(f"{k}={cfg[k]!r}" for k in keys if k in cfg)
