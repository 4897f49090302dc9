"""Tensor rules: guidance rules that are not functions of the branches' per-sample Gram matrix (elementwise,
per-channel, frequency or quantile work on the predictions), applied with torch ops at the plan's ``predictions``
point; the stage's kernel then reads the guided prediction alone (weights 1).

A tensor rule is a frozen dataclass deriving from :class:`TensorRule`, registered with
fastdiff.sampling.features.guidance.register_rule. It gives ``guide(u, c, w, at)``: the guided tensor from the
unconditional and conditional tensors u, c (any float dtype; computed and returned in float32) with scale w at
``at`` (:class:`At`: the step, the call's number of steps, the time), in its ``space``:

- ``"prediction"``: u, c are the model's predictions (diffusers' guiders, which act on the noise prediction);
- ``"x0"``: u, c are the clean estimates x0 = a x + b p of the stage (ComfyUI's ``cond_denoised`` /
  ``uncond_denoised`` of its post-CFG hooks), and the result is mapped back to the prediction whose x0 it is,
  p = (x0 - a x) / b (fastdiff.paths.affine_coefficients). Where that conversion is singular (b = 0 or not
  finite: an eps model at t = 0 on CondOT) the stage takes the plain CFG blend, as thresholding skips it.

With K > 1 conditions the rule acts on (p_null, p_c) with scale W = Σ w_k, p_c = Σ (w_k / W) p_k, as every rule
does (fastdiff.sampling.features.conditions). A rule with ``own_scales`` (FDG: one scale per frequency level)
guides with cfg left at 1.

Cost: the rule's own passes over the predictions (each module says how many), plus for an x0 rule two
conversions to x0 and one back (3 elementwise passes) per guided evaluation; none of it fuses into the step or
the Gram pass. guidance_rescale rescales the rule's guided prediction toward the conditional one's deviation (torch
ops: two more reductions); with churn per sample each sample's x0 conversion is its own ([B] coefficients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fastdiff.sampling.features.thresholding import _conversion  # x0 = a x + b p at t, None where singular


@dataclass(frozen=True)
class At:
    """Where a guided evaluation is: its sampler step, the call's number of steps and its flow time."""

    step: int
    steps: int
    t: float


class TensorRule:
    """The base of a tensor rule (module docstring). Subclasses set ``name`` and ``space`` and give ``guide``."""

    tensor_rule: ClassVar[bool] = True
    needs_gram: ClassVar[bool] = False  # no reduction pass for the step's weights: the rule's ``guide`` replaces them
    zero_init_steps: ClassVar[int] = 0
    space: ClassVar[str] = "prediction"
    own_scales: ClassVar[bool] = False  # the rule carries its scales; cfg stays 1

    def blend(self, gram, w):
        """The plain CFG weights (register_rule's interface; the loop runs ``guide`` instead)."""
        return 1.0 - w, w

    def check_shape(self, shape: tuple) -> None:
        """Raises ValueError where the rule cannot act on predictions of this shape ([B, ...])."""

    def guide(self, u: torch.Tensor, c: torch.Tensor, w: float, at: At) -> torch.Tensor:
        raise NotImplementedError


def is_tensor_rule(rule) -> bool:
    return getattr(rule, "tensor_rule", False)


def check_guidance(rule, cfg, guided: bool, rescale: float, several: bool) -> bool:
    """sample()'s guidance arguments with a tensor rule: errors name both arguments; returns whether the call is
    guided (a rule with its own scales guides with cfg = 1)."""
    if rescale and rule.own_scales:  # two settings of one thing
        raise ValueError(f"guidance_rescale: guidance={rule.name!r} takes diffusers' guidance_rescale as its own "
                         f"option (per frequency level); give {type(rule).__name__}(guidance_rescale=...)")
    if rule.own_scales and not several:
        if callable(cfg) or cfg != 1.0:
            raise ValueError(f"guidance={rule.name!r} takes its scales from the rule ({type(rule).__name__}'s "
                             f"options); leave cfg at 1, got {cfg!r}")
        return True
    return guided


def prediction_from_x0(rule, u: torch.Tensor, c: torch.Tensor, w: float, at: At, x: torch.Tensor,
                       conversion: tuple | None) -> torch.Tensor:
    """The guided prediction of a rule in x0 space: its x0 from x0 = a x + b p of both branches, mapped back;
    ``conversion`` None (singular): the CFG blend. Per-sample conversions (churn per sample: each sample's own
    time) are (a, b, valid) [B] tensors; a sample whose conversion is singular takes the CFG blend."""
    u, c = u.float(), c.float()
    if conversion is None:
        return torch.lerp(u, c, float(w))
    if len(conversion) == 3:  # per sample
        view = (-1,) + (1,) * (u.dim() - 1)
        a, b, valid = (v.view(view) for v in conversion)
        b = torch.where(valid > 0, b, torch.ones_like(b))  # stand-ins where singular (replaced below)
        ax = x.float() * a
        g0 = rule.guide(ax + b * u, ax + b * c, w, at)
        return torch.where(valid > 0, (g0 - ax) / b, torch.lerp(u, c, float(w)))
    a, b = conversion
    ax = x.float() * a
    g0 = rule.guide(torch.add(ax, u, alpha=b), torch.add(ax, c, alpha=b), w, at)
    return (g0 - ax).div_(b)


def rescaled(g: torch.Tensor, c: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG rescale (diffusers' rescale_noise_cfg) of a tensor rule's guided prediction g toward the conditional
    prediction c's standard deviation per sample: phi (std(c) / std(g)) g + (1 - phi) g; a sample whose g has
    zero deviation keeps its scale (as the fused rules do)."""
    dims = list(range(1, g.dim()))
    sg = g.std(dim=dims, keepdim=True)
    ratio = torch.where(sg > 0, c.float().std(dim=dims, keepdim=True) / torch.where(sg > 0, sg, 1.0), 1.0)
    return g * (phi * ratio + (1.0 - phi))


class TensorGuidance:
    """The ``predictions`` hook of a call with a tensor rule: at each guided stage, [p_null, p_1..p_K] -> [g]."""

    def __init__(self, rule, stages, guided: list[bool], scales: list, conversions: list, buffers: dict,
                 phi: float = 0.0):
        self.rule, self.stages, self.guided, self.buffers, self.phi = rule, stages, guided, buffers, phi
        self.conversions = conversions
        steps = stages[-1].step + 1
        self.at = [At(st.step, steps, st.t) for st in stages]
        # per stage: the scale W and the conditions' mean weights a_k (None: one condition)
        self.scales = [_scale_and_mean(w) for w in scales]
        self.groups: dict = {}  # churn per sample with a cfg schedule: stage_groups()

    def __call__(self, k: int, preds: list) -> list:
        if not self.guided[k] or len(preds) < 2:
            return preds
        groups = self.groups.get(k)
        if groups is None:
            return [self._guided(k, preds, *self.scales[k], self.at[k], self.conversions[k], None)]
        out = torch.empty(preds[0].shape, dtype=torch.float32, device=preds[0].device)
        for members, W, mean, at, conversion in groups:
            out.index_copy_(0, members, self._guided(k, [p.index_select(0, members) for p in preds], W, mean, at,
                                                     conversion, members))
        return [out]

    def _guided(self, k: int, preds: list, W, mean, at, conversion, members) -> torch.Tensor:
        """The guided prediction of ``preds`` (the stage's samples, or those ``members``) at scale W."""
        u = preds[0]
        if mean is None:
            c = preds[1]
        else:  # p_c = Σ a_k p_k
            c = preds[1].float() * mean[0]
            for a_k, p in zip(mean[1:], preds[2:]):
                c.add_(p, alpha=a_k)
        if self.rule.space == "x0":
            x = self.buffers[self.stages[k].input]
            x = x if members is None else x.index_select(0, members)
            g = prediction_from_x0(self.rule, u, c, W, at, x, conversion)
        else:
            g = self.rule.guide(u, c, W, at)
        return rescaled(g, c, self.phi) if self.phi else g


def plan(guidance, stages, merged, path, prediction: str, buffers: dict, x_shape: tuple) -> TensorGuidance | None:
    """The hook of a guided call whose rule is a tensor rule (else None), its checks made: the shape, per-sample
    options; the x0 conversion of each guided stage."""
    rule = guidance.rule
    if not guidance.guided or not is_tensor_rule(rule):
        return None
    rule.check_shape(tuple(x_shape))
    guided = [guidance.guided_at(st.t) for st in stages]
    scales = [guidance.scale_at(st.t) for st in stages]
    if merged is None:
        conversions = [_conversion(path, st.t, prediction) if g and rule.space == "x0" else None
                       for st, g in zip(stages, guided)]
    else:  # churn per sample: each sample's own time, so its own conversion
        # a cfg schedule: the samples' own times give them their own scales, which the rule's torch ops take as one
        # number: at those stages the rule runs once per group of samples sharing a time (stage_groups)
        groups = stage_groups(guidance, stages, merged, guided, scales, path, prediction, buffers)
        conversions = []
        for k, g in enumerate(guided):
            if k in groups:
                conversions.append(None)
                continue
            per_table = [_conversion(path, table[k].t, prediction) for table in merged.tables] \
                if g and rule.space == "x0" else [None]
            if all(c is None for c in per_table):
                conversions.append(None)
                continue
            rows = [[*(c if c is not None else (0.0, 1.0)), float(c is not None)] for c in per_table]
            table = torch.tensor(rows, dtype=torch.float64)[torch.tensor(merged.index)].float()
            conversions.append(tuple(table[:, j].to(buffers["x"].device) for j in range(3)))
    out = TensorGuidance(rule, stages, guided, scales, conversions, buffers, guidance.rescale)
    if merged is not None:
        out.groups = groups
    return out


def stage_groups(guidance, stages, merged, guided, scales, path, prediction, buffers) -> dict:
    """{stage: [(the samples' indices, scale W, mean weights, At, conversion)] per group of samples sharing a time}
    at the guided stages where the samples' own times (churn per sample) give them their own cfg schedule's scale."""
    rule, device = guidance.rule, buffers["x"].device
    steps = stages[-1].step + 1
    groups = {}
    for k, g in enumerate(guided):
        if not g or all(guidance.scale_at(table[k].t) == scales[k] for table in merged.tables):
            continue
        groups[k] = []
        for i, table in enumerate(merged.tables):
            members = [b for b, j in enumerate(merged.index) if j == i]
            if not members:
                continue
            st = table[k]
            W, mean = _scale_and_mean(guidance.scale_at(st.t))
            conversion = _conversion(path, st.t, prediction) if rule.space == "x0" else None
            groups[k].append((torch.tensor(members, device=device), W, mean, At(st.step, steps, st.t), conversion))
    return groups


def _scale_and_mean(w) -> tuple:
    """(W, the conditions' mean weights a_k, or None for one condition) of a stage's scale(s)."""
    return (sum(w), [wk / sum(w) for wk in w]) if isinstance(w, tuple) else (w, None)
