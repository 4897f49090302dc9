"""Dynamic thresholding (Imagen; diffusers' ``thresholding=True``) of each evaluation's x0 estimate: a quantile
and a clamp per sample, and static clipping (diffusers' ``clip_sample``): a clamp. Neither is a coefficient of the
fused step: the loop hands the step the prediction whose x0 is the thresholded one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastdiff._checks import FLOAT32_MAX
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


@dataclass(frozen=True)
class StaticClipping:
    """diffusers' ``clip_sample`` (DDPM, DDIM): each evaluation's x0 estimate clamped elementwise to
    [-max_value, max_value]. As diffusers' DDIM step by default (``use_clipped_model_output=False``), the step
    takes the clamped x0 and the unclipped eps: a step A x0 + K eps (Stage.cfg_pp = the share through x0) reads
    the prediction rho p_clipped + (1 - rho) p, p_clipped the prediction whose x0 is the clamped one;
    ``use_clipped_model_output=True`` reads p_clipped alone (eps recomputed from the clamped x0). DDPM's update
    reads only x0 and x (rho = 1): diffusers' step either way. A few elementwise passes per evaluation (no
    quantile: DynamicThresholding's selection cost ~110 us a step at batch 1)."""

    max_value: float = 1.0
    use_clipped_model_output: bool = False

    def __post_init__(self):
        if not is_number(self.max_value):
            raise TypeError(f"clip_sample must be a number c > 0 (x0 is clamped to [-c, c]) or True (c = 1), got "
                            f"{type(self.max_value).__name__} {self.max_value!r}")
        try:
            ok = 0.0 < float(self.max_value) <= FLOAT32_MAX  # the clamp's bound is a float32 scalar
        except OverflowError:  # an int past float64
            ok = False
        if not ok:
            raise ValueError(f"clip_sample must be a finite number in (0, 3.4e38] (x0 is clamped to [-clip_sample, "
                             f"clip_sample] in float32), got {self.max_value!r}")

    def prediction(self, conversion: tuple, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a, b = conversion
        return (self.apply(a * x + b * g) - a * x) / b

    def apply(self, x0: torch.Tensor) -> torch.Tensor:
        c = float(self.max_value)
        return x0.clamp(-c, c)

    @property
    def unclipped_eps(self) -> bool:
        return not self.use_clipped_model_output


@dataclass(frozen=True)
class ThresholdedThenClipped:
    """dynamic_thresholding and clip_sample together: x0 thresholded per sample, then clamped to [-c, c] (with
    c >= max_value / max_value the clamp changes nothing: the thresholded x0 already lies in [-1, 1])."""

    thresholding: DynamicThresholding
    clipping: StaticClipping

    def prediction(self, conversion: tuple, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a, b = conversion
        return (self.apply(a * x + b * g) - a * x) / b

    def apply(self, x0: torch.Tensor) -> torch.Tensor:
        return self.clipping.apply(self.thresholding.apply(x0))

    @property
    def unclipped_eps(self) -> bool:
        return self.clipping.unclipped_eps


def get_thresholding(value, clip_sample=None):
    """sample()'s ``dynamic_thresholding`` (None / False: off, True: the defaults, a ratio, or the record) and
    ``clip_sample`` (None, or the bound c of a static clamp of x0 to [-c, c]); both: thresholded, then clamped."""
    clipping = None
    if isinstance(clip_sample, StaticClipping):
        clipping = clip_sample
    elif clip_sample is not None and clip_sample is not False:
        clipping = StaticClipping(1.0 if clip_sample is True else clip_sample)
    thresholding = _dynamic(value)
    if thresholding is None or clipping is None:
        return thresholding or clipping
    return ThresholdedThenClipped(thresholding, clipping)


def _dynamic(value):
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


class Thresholds:
    """Dynamic thresholding in one sampling call: per stage, the x0 conversion (a, b) of its evaluation
    (x0 = a input + b g; numbers, or per-sample [B, 1, ...] tensors with churn per sample), None where it does not
    apply (b = 0 or not finite there). The stage's kernel then reads one prediction: the one whose x0 is the
    thresholded estimate of the guided prediction (with classifier guidance, its gradient term included; with
    CFG++, only the share through the clean estimate: (1 - rho) p_null + rho g_thresholded)."""

    def __init__(self, thresholding, conversions: list, stages, rule):
        self.thresholding, self.conversions, self.stages, self.rule = thresholding, conversions, stages, rule
        self.unclipped_eps = getattr(thresholding, "unclipped_eps", False)  # static clipping's diffusers semantics
        self.clips = {}  # stage -> (sampler_step's clip [c, d], the x0 conversion (a, b)): the clamp in the kernel
        self.per_sample = any(isinstance(c, tuple) and isinstance(c[0], torch.Tensor) for c in conversions)
        self.key = (thresholding, tuple(None if c is None else "per-sample" if self.per_sample else c
                                        for c in conversions))

    @classmethod
    def plan(cls, thresholding, stages, merged, path, prediction: str, rule, weights, device) -> "Thresholds | None":
        if thresholding is None:
            return None
        if merged is None:
            return cls(thresholding, [_conversion(path, st.t, prediction) for st in stages], stages, rule)
        conversions = []
        for k in range(len(stages)):
            per_table = [_conversion(path, table[k].t, prediction) for table in merged.tables]
            if all(c is None for c in per_table):
                conversions.append(None)
                continue
            rows = [[*(c if c is not None else (0.0, 0.0)), float(c is not None)] for c in per_table]
            table = torch.tensor(rows, dtype=torch.float64)[torch.tensor(merged.index)].float().to(device)
            conversions.append(tuple(table[:, j] for j in range(3)))
        return cls(thresholding, conversions, stages, rule)

    def at(self, k: int) -> bool:
        """Whether stage k's kernel reads the transformed prediction alone (a clamp in the kernel needs no hook)."""
        return self.conversions[k] is not None and k not in self.clips

    def fuse_clamps(self, classifier) -> None:
        """Static clipping in the step kernel (sampler_step's ``clip``: its side row the x0 estimate, clamped, and
        d (clamped - x0) added to the step) where a stage has host coefficients, no side output of its own and no
        classifier term or CFG++ split to fold in: 1 pass instead of ~5 torch ops before it (lerobot's DDPM
        step at batch 1 on the CPU: 26 -> 16 us). d = c_pred rho / b, rho the step's share through x0 (the unclipped
        eps, diffusers' default) or 1 (use_clipped_model_output: the prediction of the clamped x0)."""
        if type(self.thresholding) is not StaticClipping or classifier is not None or self.per_sample or \
                self.rule.name == "cfg_pp":
            return
        c = float(self.thresholding.max_value)
        for k, (st, conv) in enumerate(zip(self.stages, self.conversions)):
            if conv is None or st.side is not None or st.corrector is not None:
                continue
            a, b = conv
            rho = st.cfg_pp if self.unclipped_eps and st.cfg_pp is not None else 1.0
            self.clips[k] = ([c, st.c_pred * rho / b], (a, b))
        self.key = (*self.key, "fused", tuple(sorted(self.clips)))

    def rows_with_x0(self, k: int, rows: list) -> list:
        """Stage k's coefficient rows with its side row replaced by the x0 conversion (what the clip clamps)."""
        M, (a, b) = len(rows) // 2, self.clips[k][1]
        return rows[:M] + [a, b] + [0.0] * (M - 2)

    def hook(self, buffers: dict, weights, classifier):
        """The prediction transform: stage k's predictions → [the thresholded one]."""
        def threshold(k: int, preds: list) -> list:
            conv = self.conversions[k]
            if conv is None or k in self.clips:
                return preds
            st = self.stages[k]
            x = buffers[st.input]
            g = weights.blend(k, preds)
            if classifier is not None:  # the guided prediction includes the classifier's term: threshold it whole
                g = classifier.add_to(g, k)
            unclipped_eps = self.unclipped_eps and st.cfg_pp is not None and st.cfg_pp != 1.0 and not (
                self.rule.name == "cfg_pp" and len(preds) > 1 and weights.guided_at[k])
            if len(conv) == 3:  # per sample: (a, b, valid) [B]
                shape = (x.shape[0],) + (1,) * (x.dim() - 1)
                a, b, valid = (c.view(shape) for c in conv)
                conv = (a, torch.where(valid > 0, b, 1.0))
                change = self._change(conv, x, g, unclipped_eps, weights.share(k, st, g) if unclipped_eps else None)
                out = torch.where(valid > 0, change, g)
            else:
                out = self._change(conv, x, g, unclipped_eps, weights.share(k, st, g) if unclipped_eps else None)
            if self.rule.name == "cfg_pp" and st.cfg_pp is not None and len(preds) > 1 and weights.guided_at[k]:
                rho = weights.share(k, st, out)
                out = (1.0 - rho) * preds[0].float() + rho * out  # CFG++: the re-noising stays p_null's
            return [out]

        return threshold

    def _change(self, conv, x, g, unclipped_eps: bool, rho):
        """The prediction the step reads: the one whose x0 is the thresholded / clamped estimate, or (static
        clipping's diffusers semantics) g + rho (x0_clamped - x0) / b: the clamped x0 through the step's clean share
        rho, the unclipped eps elsewhere. (Not rho p_clamped + (1 - rho) g: rho = alpha' b / c_pred reaches ~1e3 at a
        DDIM step from low SNR, and the cancellation cost 1e-3 of max |x|.)"""
        if not unclipped_eps:
            return self.thresholding.prediction(conv, x, g)
        a, b = conv
        if isinstance(a, float) and isinstance(b, float) and isinstance(rho, float):  # 5 ops, 3 tensors at batch 1
            x0 = torch.mul(x, a).add_(g, alpha=b)
            return torch.add(g, self.thresholding.apply(x0).sub_(x0), alpha=rho / b)
        x0 = a * x + b * g
        return g + (rho / b) * (self.thresholding.apply(x0) - x0)


def _conversion(path, t: float, prediction: str):
    """(a, b) of x0 = a x + b p at time t, None where singular (also the tensor rules', features/tensor_rules.py)."""
    from fastdiff.paths import affine_coefficients

    try:
        a, b = affine_coefficients(path, t, prediction, "x0")
    except ValueError:
        return None
    return (a, b) if math.isfinite(a) and math.isfinite(b) and b != 0.0 else None
