"""The guidance of a sampling call: its conditions (y, or several: ``conditions``), its scale or schedule, its
rule (fastdiff.sampling.features.guidance), rescale, dynamic thresholding and interval, as one record the plan
reads (:class:`Guidance`).

Several conditions blend as g = p_null + Σ_k w_k (p_k − p_null) (compositional guidance). With W = Σ_k w_k ≠ 0
that is plain CFG with scale W on the weighted mean of the conditions, p_c = Σ_k (w_k / W) p_k (ComfyUI's
combined conditioning), so every rule, rescale and the guidance interval apply to (p_null, p_c) with scale W;
outside the interval the step takes p_c alone (K model branches, no null one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastdiff.sampling.core import labels
from fastdiff.sampling.core.arguments import is_number
from fastdiff.sampling.features.guidance import check_rescale, get_rule, get_thresholding, scale_schedule
from fastdiff.sampling.features.guidance_weights import StageWeights
from fastdiff.sampling.features.tensor_rules import check_guidance as check_tensor_rule, is_tensor_rule


MAX_CONDITIONS = 7  # K + 1 branches <= 8 (the step's limit)


def condition_branches(y, conditions, cfg):
    """(y, cfg, multi) of sample(y=..., conditions=..., cfg=...): without conditions, or with one, y and cfg
    as given (one condition is y's path); with K > 1, multi = (the K condition batches, each one's weight)
    and cfg a stand-in. Several conditions blend as g = p_null + Σ_k w_k (p_k - p_null) (compositional
    conditions; a negative weight pushes away from its condition); ``cfg`` is one number for all or one
    per condition."""
    if conditions is None:
        return y, cfg, None
    if y is not None:
        raise ValueError("give the conditioning either as y (one condition) or as conditions=[y_1, ..., y_K], not both")
    if isinstance(conditions, (str, bytes, torch.Tensor)) or not hasattr(conditions, "__len__") or not conditions:
        raise TypeError("conditions must be a non-empty sequence of label batches [y_1, ..., y_K]")
    conditions = list(conditions)
    if len(conditions) > MAX_CONDITIONS:
        raise ValueError(f"conditions holds {len(conditions)} batches; at most {MAX_CONDITIONS} are supported")
    check_condition_batches(conditions)
    sizes = {labels.batch_of(f"conditions[{i}]", c) for i, c in enumerate(conditions)} - {None}
    if len(sizes) > 1:
        raise ValueError(f"every condition must hold one label per sample; got batches of sizes {sorted(sizes)}")
    if is_number(cfg) or callable(cfg):  # one weight (or schedule) for every condition
        weights = [cfg] * len(conditions)
    elif isinstance(cfg, (str, bytes)) or not hasattr(cfg, "__len__") or len(cfg) != len(conditions):
        raise ValueError(f"with conditions, cfg must be one number or schedule, or {len(conditions)} (one per "
                         f"condition), got {cfg!r}")
    else:
        weights = list(cfg)
    for i, w in enumerate(weights):
        if not callable(w) and (not is_number(w) or not math.isfinite(w)):
            raise ValueError(f"cfg[{i}] must be a finite number or a schedule t -> weight, got {w!r}")
    if len(conditions) == 1:
        return conditions[0], weights[0], None
    return conditions[0], None, (conditions, tuple(scale_schedule(w, f"cfg[{i}]")[0] for i, w in enumerate(weights)))


def check_condition_batches(conditions: list) -> None:
    """Each condition is a label batch like the first: a tensor [B, ...] of the same dtype and per-sample shape (the
    batched call concatenates them: torch.cat would silently promote int labels to float), or a list of B labels."""
    first = conditions[0]
    if labels.is_tree(first) or any(labels.is_tree(c) for c in conditions):
        signatures = [labels.structure(c) for c in conditions]
        for i, sig in enumerate(signatures):
            if sig != signatures[0]:
                raise ValueError(f"conditions[{i}] must have conditions[0]'s structure and leaf dtypes (they are one "
                                 f"model call's labels): {sig} vs {signatures[0]}")
        return
    for i, c in enumerate(conditions):
        if isinstance(c, torch.Tensor):
            if c.dim() == 0:
                raise ValueError(f"conditions[{i}] must hold one label per sample, got a 0-d tensor")
        elif not isinstance(c, Sequence) or isinstance(c, (str, bytes)):
            raise TypeError(f"conditions[{i}] must be a label batch (a tensor [B, ...] or a list of B labels), got "
                            f"{type(c).__name__}")
        if isinstance(c, torch.Tensor) != isinstance(first, torch.Tensor):
            raise TypeError(f"conditions[{i}] is a {type(c).__name__} but conditions[0] is a "
                            f"{type(first).__name__}: the conditions are one model call's labels, give all as tensors "
                            "or all as lists")
        if isinstance(c, torch.Tensor) and c.dtype != first.dtype:
            raise TypeError(f"conditions[{i}] has dtype {c.dtype} but conditions[0] has {first.dtype}: the "
                            "conditions are one model call's labels (give them one dtype, e.g. .long())")
        if isinstance(c, torch.Tensor) and c.shape[1:] != first.shape[1:]:
            raise ValueError(f"conditions[{i}] has per-sample shape {tuple(c.shape[1:])} but conditions[0] has "
                             f"{tuple(first.shape[1:])}")


class Guidance:
    """sample()'s guidance arguments, checked: ``y`` (the first condition), ``conditions`` (all K, or None for
    one), ``scale_at(t)`` (one weight, or a tuple of K), ``guided``, ``rule``, ``rescale``, ``thresholding``,
    ``interval`` and the model branches of a guided evaluation (K + 1)."""

    def __init__(self, a):
        y, cfg, multi = condition_branches(a.y, a.conditions, a.cfg)
        self.y, self.conditions = y, multi[0] if multi else None
        if multi:
            weights = multi[1]
            self.scale_at, self.guided = (lambda t: tuple(w(t) for w in weights)), True
        else:
            at, self.guided = scale_schedule(cfg)
            self.scale_at = at
        self.rescale = check_rescale(a.guidance_rescale)
        self.rule = get_rule(a.guidance)
        if is_tensor_rule(self.rule):  # a rule of torch ops (features/tensor_rules.py): its checks; own scales guide
            self.guided = check_tensor_rule(self.rule, cfg, self.guided, self.rescale, multi is not None)
        self.perturbed = None  # a perturbed forward's branch (features/perturbed.py), set by its rule's bind
        bind = getattr(self.rule, "bind_call", None)
        if bind is not None:  # a rule's own checks of the call (perp_neg's conditions, a perturbed model)
            bind(self, a)
        if getattr(a, "perturbed_model", None) is not None and self.perturbed is None:
            raise ValueError(f"perturbed_model is read by guidance='pag', 'slg', 'seg' and 'autoguidance'; with "
                             f"guidance={self.rule.name!r} it would be unused")
        if self.rescale and not self.guided and self.perturbed is None:
            raise ValueError("guidance_rescale applies to guided sampling: give cfg != 1 (or a schedule)")
        self.thresholding = get_thresholding(a.dynamic_thresholding, a.clip_sample)
        self.K = len(self.conditions) if multi else 1
        self.branches = 1 + self.K
        if self.K + 1 + int(getattr(self.rule, "running", False)) > 8:
            raise ValueError(f"guidance={self.rule.name!r} with momentum keeps its running average as one more branch: "
                             f"at most 6 conditions, got {self.K}")
        self.interval = None  # set by the planner (guidance_interval_pair)

    def guided_at(self, t: float) -> bool:
        """Whether the stage at time t is guided (one pass of each branch) or takes the condition(s) alone."""
        return self.guided and (self.interval is None or self.interval[0] <= t <= self.interval[1])

    def classifier_labels(self, classifier_y):
        """The classifier's target classes: ``classifier_y``, else y (one condition)."""
        if classifier_y is not None:
            return classifier_y
        if labels.is_tree(self.y):
            raise ValueError("classifier guidance with a dict / tuple y: give classifier_y, the classifier's target "
                             "class of each sample (y is the model's conditioning)")
        if self.conditions is not None:
            raise ValueError("classifier guidance with conditions=: give classifier_y, the classifier's target class "
                             "of each sample (the conditions are the model's)")
        return self.y

    def stage_weights(self, stages, B: int, device, merged=None) -> StageWeights:
        """Each stage's branch weights: its scale(s), CFG++'s share through the clean estimate, the rule's zero
        steps, per-sample weights (rescale, rules) from a reduction pass."""
        own = getattr(self.rule, "stage_weights", None)
        if own is not None:  # a rule with branches of its own (perp_neg, a perturbed forward) makes its weights
            return own(self, stages, B, device, merged)
        scales = [self.scale_at(st.t) for st in stages]
        if self.conditions is not None:
            for st, w in zip(stages, scales):
                if not math.isfinite(sum(w)) or (sum(w) == 0.0 and (self.rescale or self.rule.needs_gram
                                                                     or is_tensor_rule(self.rule)
                                                                     or not self.guided_at(st.t))):
                    raise ValueError(f"the condition weights {w} sum to 0 at t={st.t:.6g}: guidance_rescale, "
                                     f"guidance={self.rule.name!r} and guidance_interval act on their weighted mean, "
                                     "which needs a non-zero sum")
        step_scales, shares = scales, None
        if self.guided and self.rule.name == "cfg_pp":
            # the blend's weight times its share through the clean estimate (a corrector's stage: the whole score)
            shares = [None if st.corrector is not None else st.cfg_pp for st in stages]
            step_scales = [w if st.corrector is not None else self.rule.stage_scale(w, st)
                           for w, st in zip(scales, stages)]
        zero = [st.step < self.rule.zero_init_steps for st in stages]
        # a rule whose blend depends on the step (apg_mix: CFG, then APG) gives each stage's: stage_rule(step)
        stage_rule = getattr(self.rule, "stage_rule", None)
        return StageWeights(self.rule, self.rescale, step_scales, zero, self.guided, B, device, x0_scales=scales,
                            guided_at=[self.guided_at(st.t) for st in stages], shares=shares,
                            per_sample_values=self._per_sample(merged),
                            stage_rules=None if stage_rule is None else [stage_rule(st.step) for st in stages])

    def _per_sample(self, merged) -> dict | None:
        """With per-sample churn: the stages where the samples' own times give them other weights (a schedule's
        scale, CFG++'s share), {stage: (step scales, x0 scales, shares) per sample}."""
        if merged is None or not self.guided:
            return None
        cfg_pp = self.rule.name == "cfg_pp"
        out = {}
        for k in range(len(merged.tables[0])):
            per_table = []
            for table in merged.tables:
                st = table[k]
                w = self.scale_at(st.t)
                rho = st.cfg_pp if cfg_pp and st.corrector is None else None
                step = w if rho is None else (tuple(v * rho for v in w) if isinstance(w, tuple) else w * rho)
                per_table.append((step, w, rho))
            if len(set(per_table)) > 1:
                values = [per_table[g] for g in merged.index]
                out[k] = tuple(list(v) for v in zip(*values))
        return out or None


def guidance_arguments(a) -> Guidance:
    """The guidance record of sample()'s arguments ``a``."""
    return Guidance(a)
