"""Dynamic thresholding (Imagen; diffusers' ``thresholding=True``) of each evaluation's x0 estimate: a quantile
and a clamp per sample, so not a coefficient of the fused step: the loop hands the step the prediction whose x0
is the thresholded one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastdiff.sampling.core.arguments import is_number


@dataclass(frozen=True)
class DynamicThresholding:
    """Imagen's dynamic thresholding (Saharia et al. 2022; diffusers' ``thresholding=True`` with
    ``dynamic_thresholding_ratio`` and ``sample_max_value``): per sample, s = the ``ratio`` quantile of |x0|,
    clamped to [1, max_value], and x0 <- clamp(x0, -s, s) / s; the step then runs on the prediction that
    gives that x0. Not affine (a quantile and a clamp): a few extra passes and a selection per evaluation."""

    ratio: float = 0.995
    max_value: float = 1.0

    def __post_init__(self):
        if not is_number(self.ratio) or not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding ratio must be in (0, 1], got {self.ratio!r}")
        if not is_number(self.max_value) or not 1.0 <= self.max_value < math.inf:
            raise ValueError(f"dynamic_thresholding max_value must be a finite number >= 1, got {self.max_value!r}")

    def prediction(self, conversion: tuple, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The prediction whose x0 estimate is the thresholded one: x0 = a x + b g (conversion = (a, b), b != 0)."""
        a, b = conversion
        return (self.apply(a * x + b * g) - a * x) / b

    def apply(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 [B, ...] thresholded per sample (float32)."""
        flat = x0.reshape(x0.shape[0], -1).abs()
        s = quantile_rows(flat, self.ratio).clamp(1.0, self.max_value).view(-1, *([1] * (x0.dim() - 1)))
        return torch.minimum(torch.maximum(x0, -s), s) / s


def get_thresholding(value):
    """sample()'s ``dynamic_thresholding``: None / False (off), True (the defaults), a ratio, or the record."""
    if value is None or value is False:
        return None
    if value is True:
        return DynamicThresholding()
    if isinstance(value, DynamicThresholding):
        return value
    if is_number(value):
        return DynamicThresholding(ratio=float(value))
    raise TypeError(f"dynamic_thresholding must be True, a ratio or a DynamicThresholding, got {type(value).__name__}")


def quantile_rows(rows: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(rows, q, dim=1) (linear interpolation between order statistics) by two selections, which
    have no size limit (torch.quantile refuses inputs over 2^24 elements)."""
    n = rows.shape[1]
    pos = q * (n - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    low = rows.kthvalue(lo + 1, dim=1).values
    if frac == 0.0 or lo + 1 >= n:
        return low
    high = rows.kthvalue(lo + 2, dim=1).values
    return low + frac * (high - low)


def threshold_conversions(stages, path, prediction: str, thresholding, merged) -> list:
    """Per stage, the x0 conversion (a, b) of its evaluation (x0 = a input + b g) where dynamic thresholding
    applies, else None (off, or b = 0 / not finite there)."""
    if thresholding is None:
        return [None] * len(stages)
    if merged is not None:
        raise ValueError("dynamic_thresholding does not combine with per-sample churn options (yet)")
    from fastdiff.paths import affine_coefficients

    out = []
    for st in stages:
        try:
            a, b = affine_coefficients(path, st.t, prediction, "x0")
        except ValueError:
            a, b = math.nan, math.nan
        out.append((a, b) if math.isfinite(a) and math.isfinite(b) and b != 0.0 else None)
    return out
