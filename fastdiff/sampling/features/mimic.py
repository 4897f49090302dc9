"""Mimic: the CFG scale fix of the sd-dynamic-thresholding extension (mcmonkeyprojects/sd-dynamic-thresholding,
dynthres_core.py; ComfyUI's DynamicThresholdingFull node), a tensor rule (fastdiff.sampling.features.tensor_rules;
docs/guidance.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fastdiff import _checks
from fastdiff.sampling.core.arguments import is_number
from fastdiff.sampling.features.guidance import register_rule
from fastdiff.sampling.features.tensor_rules import TensorRule
from fastdiff.sampling.features.thresholding import quantile_rows

MODES = ("Constant", "Linear Down", "Cosine Down", "Half Cosine Down", "Linear Up", "Cosine Up", "Half Cosine Up",
         "Power Up", "Power Down", "Linear Repeating", "Cosine Repeating", "Sawtooth")
STARTPOINTS = ("MEAN", "ZERO")
VARIABILITIES = ("AD", "STD")
HALF_PI, TWO_PI = 1.5707, 6.28318  # the extension's constants (not math.pi's: its schedules use these)


def schedule_factor(mode: str, frac: float, sched_val: float) -> float:
    """The extension's scheduler: the factor of (scale - minimum) at the fraction ``frac`` of the steps done."""
    if mode == "Constant":
        return 1.0
    if mode == "Linear Down":
        return 1.0 - frac
    if mode == "Half Cosine Down":
        return math.cos(frac)
    if mode == "Cosine Down":
        return math.cos(frac * HALF_PI)
    if mode == "Linear Up":
        return frac
    if mode == "Half Cosine Up":
        return 1.0 - math.cos(frac)
    if mode == "Cosine Up":
        return 1.0 - math.cos(frac * HALF_PI)
    if mode == "Power Up":
        return math.pow(frac, sched_val)
    if mode == "Power Down":
        return 1.0 - math.pow(frac, sched_val)
    if mode == "Linear Repeating":
        portion = (frac * sched_val) % 1.0
        return (0.5 - portion) * 2 if portion < 0.5 else (portion - 0.5) * 2
    if mode == "Cosine Repeating":
        return math.cos(frac * TWO_PI * sched_val) * 0.5 + 0.5
    return (frac * sched_val) % 1.0  # Sawtooth


def _choice(name: str, value, choices: tuple) -> str:
    """The peer's spelling of ``value`` (matched case-insensitively: its simple node passes "CONSTANT")."""
    if isinstance(value, str):
        for c in choices:
            if value.lower() == c.lower():
                return c
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 1 where den = 0 (the extension divides by zero there: its variability is 0, nothing to scale)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 1.0)


@register_rule
@dataclass(frozen=True)
class Mimic(TensorRule):
    """The extension's "mimic" CFG on the clean estimates (ComfyUI's node reads denoised): the CFG target
    t_cfg = u + w' (c - u) is renormalized to the variability of the mimic target t_mim = u + m' (c - u), per
    sample and (``separate_feature_channels``) per channel, over the positions: with centered values
    t - mean(t) and variabilities r ("AD": t_mim's max |.|, t_cfg's ``threshold_percentile`` quantile of |.|;
    "STD": the standard deviations),

        MEAN, AD:  clamp(t_cfg - mean, -R, R) / R · r_mim + mean,   R = max(r_mim, r_cfg)
        MEAN, STD: (t_cfg - mean) / r_cfg · r_mim + mean
        ZERO:      t_cfg · r_mim / r_cfg

    then blended with t_cfg by ``interpolate_phi``. m' and w' are ``mimic_scale`` and cfg scheduled by
    ``mimic_mode`` / ``cfg_mode`` between ``*_scale_min`` and the scale over the fraction step / (steps - 1)
    of the call's steps (``sched_val``: Power's exponent, the Repeating modes' count). cfg = mimic_scale is
    plain CFG (ComfyUI's node skips the rule there).

    Differences: the extension pools its whole batch where channels are not separate; fastdiff takes each
    sample alone (the same at batch 1). Where it divides by a zero variability (a constant channel) fastdiff
    leaves the values unscaled; one step has fraction 0 (the extension divides by zero). Cost per guided
    evaluation: ~15 elementwise passes, a selection (two with an interpolated quantile) per row of the
    quantile, and the x0 conversions (3)."""

    mimic_scale: float = 7.0
    threshold_percentile: float = 1.0
    mimic_mode: str = "Constant"
    mimic_scale_min: float = 0.0
    cfg_mode: str = "Constant"
    cfg_scale_min: float = 0.0
    sched_val: float = 1.0
    separate_feature_channels: bool = True
    scaling_startpoint: str = "MEAN"
    variability_measure: str = "AD"
    interpolate_phi: float = 1.0

    name: ClassVar[str] = "mimic"
    space: ClassVar[str] = "x0"

    def __post_init__(self):
        for name in ("mimic_scale", "mimic_scale_min", "cfg_scale_min", "sched_val"):
            v = getattr(self, name)
            if not is_number(v) or not math.isfinite(v):
                raise ValueError(f"Mimic {name} must be a finite number, got {v!r}")
        for name in ("threshold_percentile", "interpolate_phi"):
            v = getattr(self, name)
            if not is_number(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"Mimic {name} must be in [0, 1], got {v!r}")
        object.__setattr__(self, "mimic_mode", _choice("mimic_mode", self.mimic_mode, MODES))
        object.__setattr__(self, "cfg_mode", _choice("cfg_mode", self.cfg_mode, MODES))
        object.__setattr__(self, "scaling_startpoint", _choice("scaling_startpoint", self.scaling_startpoint,
                                                                STARTPOINTS))
        object.__setattr__(self, "variability_measure", _choice("variability_measure", self.variability_measure,
                                                                 VARIABILITIES))
        _checks.flag("separate_feature_channels", self.separate_feature_channels)

    def check_shape(self, shape: tuple) -> None:
        if len(shape) < 3:
            raise ValueError(f"guidance='mimic' centers each channel over its positions: predictions [B, C, ...] "
                             f"with at least one dim after the channels, got shape {list(shape)}")
        n = math.prod(shape[2:]) * (1 if self.separate_feature_channels else shape[1])
        if self.variability_measure == "STD" and n < 2:
            raise ValueError(f"Mimic variability_measure='STD' needs 2 or more values per standard deviation, got "
                             f"shape {list(shape)}")

    def scales(self, w: float, at) -> tuple[float, float]:
        """(mimic scale, cfg scale) at ``at``, scheduled."""
        frac = at.step / (at.steps - 1) if at.steps > 1 else 0.0
        mimic = (self.mimic_scale - self.mimic_scale_min) * schedule_factor(self.mimic_mode, frac, self.sched_val) \
            + self.mimic_scale_min
        cfg = (w - self.cfg_scale_min) * schedule_factor(self.cfg_mode, frac, self.sched_val) + self.cfg_scale_min
        return mimic, cfg

    def guide(self, u: torch.Tensor, c: torch.Tensor, w: float, at) -> torch.Tensor:
        u, c = u.float(), c.float()
        if float(w) == self.mimic_scale:
            return torch.lerp(u, c, float(w))
        mimic, cfg = self.scales(float(w), at)
        d = c - u
        B, C = u.shape[:2]
        t_mim = torch.add(u, d, alpha=mimic).view(B, C, -1)
        t_cfg = torch.add(u, d, alpha=cfg).view(B, C, -1)
        mean_cfg = t_cfg.mean(2, keepdim=True)
        c_mim = t_mim.sub_(t_mim.mean(2, keepdim=True))
        c_cfg = t_cfg - mean_cfg
        dims = (2,) if self.separate_feature_channels else (1, 2)
        if self.variability_measure == "STD":
            r_mim, r_cfg = c_mim.std(dim=dims, keepdim=True), c_cfg.std(dim=dims, keepdim=True)
        else:
            r_mim = c_mim.abs_().amax(dim=dims, keepdim=True)
            rows = c_cfg.abs().reshape(B * C if self.separate_feature_channels else B, -1)
            r_cfg = quantile_rows(rows, self.threshold_percentile).view_as(r_mim)
        if self.scaling_startpoint == "ZERO":
            out = t_cfg * _ratio(r_mim, r_cfg)
        elif self.variability_measure == "STD":
            out = c_cfg.mul_(_ratio(r_mim, r_cfg)).add_(mean_cfg)
        else:
            R = torch.maximum(r_mim, r_cfg)
            out = torch.minimum(torch.maximum(c_cfg, -R), R).mul_(_ratio(r_mim, R)).add_(mean_cfg)
        if self.interpolate_phi != 1.0:
            out = torch.lerp(t_cfg, out, self.interpolate_phi)
        return out.view(u.shape)


def mimic_reference(u: torch.Tensor, c: torch.Tensor, w: float, rule: Mimic, step: int = 0,
                    steps: int = 1) -> torch.Tensor:
    """The specification, float64, per sample (at step ``step`` of ``steps``)."""
    from fastdiff.sampling.features.tensor_rules import At

    u, c = u.double(), c.double()
    if w == rule.mimic_scale:
        return u + w * (c - u)
    mimic, cfg = rule.scales(w, At(step, steps, 0.0))
    out = []
    for ub, cb in zip(u, c):
        t_mim, t_cfg = ((ub + s * (cb - ub)).flatten(1) for s in (mimic, cfg))
        mean_cfg = t_cfg.mean(1, keepdim=True)
        c_mim, c_cfg = t_mim - t_mim.mean(1, keepdim=True), t_cfg - mean_cfg
        if not rule.separate_feature_channels:  # one row: the sample's channels together
            c_mim, c_cfg = c_mim.reshape(1, -1), c_cfg.reshape(1, -1)
        if rule.variability_measure == "STD":
            r_mim, r_cfg = c_mim.std(1, keepdim=True), c_cfg.std(1, keepdim=True)
        else:
            r_mim = c_mim.abs().amax(1, keepdim=True)
            r_cfg = torch.quantile(c_cfg.abs(), rule.threshold_percentile, dim=1, keepdim=True)
        c_cfg = c_cfg.view_as(t_cfg)
        if rule.scaling_startpoint == "ZERO":
            res = t_cfg * _ratio(r_mim, r_cfg)
        elif rule.variability_measure == "STD":
            res = c_cfg * _ratio(r_mim, r_cfg) + mean_cfg
        else:
            R = torch.maximum(r_mim, r_cfg)
            res = c_cfg.clamp(-R, R) * _ratio(r_mim, R) + mean_cfg
        res = rule.interpolate_phi * res + (1 - rule.interpolate_phi) * t_cfg
        out.append(res.view_as(ub))
    return torch.stack(out)
