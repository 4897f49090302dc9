"""Per-sample options: EDM churn (s_churn, s_tmin, s_tmax, s_noise) with one value per sample.

A churned step starts at a raised noise level, so per-sample churn means per-sample model times and
per-sample coefficients. The host builds one stage table per distinct setting (float64, as always) and
merges them: one table of the same kernel calls whose coefficient rows are float32 tensors [B, 2M]
(sampler_step's per-sample rows, docs/design.md §2) and whose model times are one row per stage. The
values are read once before the loop (a CUDA tensor of them costs one synchronization there); the loop
itself reads nothing back.
"""

from __future__ import annotations

import numbers

import torch

import fastdiff.sampling.methods.churn as churn


def split(record, options: dict) -> tuple[dict, dict]:
    """(options with one number per option, {name: per-sample values}) of a method's options: a churn option
    given as a sequence or 1-D tensor (one value per sample) is taken out and replaced by a stand-in for the
    option checks (its first non-neutral value)."""
    per_sample = {}
    out = dict(options)
    for name in churn.OPTIONS:
        value = options.get(name)
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                out[name] = float(value)
                continue
            if value.dim() != 1 or value.is_complex():
                raise ValueError(f"{name} as a tensor must be 1-D with one real value per sample, got shape "
                                 f"{tuple(value.shape)}")
            value = value.detach().double().cpu().tolist()  # once, before the loop
        elif not isinstance(value, (list, tuple)):
            continue
        for i, v in enumerate(value):
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise TypeError(f"{name}[{i}] must be a number, got {type(v).__name__}")
        per_sample[name] = [float(v) for v in value]
        neutral = churn.OPTIONS[name]
        out[name] = next((v for v in per_sample[name] if v != neutral), neutral)
    return out, per_sample
