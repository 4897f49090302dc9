"""Perp-Neg (Armandpour et al. 2023, "Re-imagine the Negative Prompt Algorithm"; ComfyUI's PerpNegGuider): a
negative prompt that only removes what is perpendicular to the positive one (docs/guidance.md, "Perp-Neg").

With e the empty prompt's prediction (null_y), p the positive's and n the negative's,

    g = e + w ((p - e) - neg_scale · perp(n - e, p - e)),   perp(a, b) = a - (<a, b> / <b, b>) b   per sample,

called as ``sample(..., conditions=[positive, negative], null_y=empty, cfg=w, guidance=PerpNeg(neg_scale=1.0))``:
the K = 2 conditions machinery already makes the three branches one batched model call of 3B (or three calls of B
with cfg_batch=False), and its reduction pass the Gram matrix of (1, e, p, n). With c = <n - e, p - e> / |p - e|^2,
g = (1 - w + w s - w s c) e + (w + w s c) p - w s n (s = neg_scale): per-sample branch weights, no host sync.
The weights sum to 1, and c is a ratio of differences of predictions, so the blend is the same in every
prediction type (ComfyUI blends denoised x0; fastdiff the model's own prediction).

Differences from ComfyUI: the projection is per sample (ComfyUI's sums run over the whole batch tensor, which for a
batch of one is the same); p = e in a sample (|p - e| = 0, ComfyUI's 0 / 0) takes c = 0, perp(n - e, 0) = n - e.
Outside guidance_interval the step takes p alone. cfg is one scale (ComfyUI's cfg), not one per condition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fastdiff.sampling.core.arguments import is_number
from fastdiff.sampling.features.guidance import branch_weights, register_rule
from fastdiff.sampling.features.guidance_weights import StageWeights


@register_rule
@dataclass(frozen=True)
class PerpNeg:
    """Perp-Neg's rule: ``neg_scale`` (ComfyUI's, default 1.0) scales the negative's perpendicular part."""

    neg_scale: float = 1.0

    name: ClassVar[str] = "perp_neg"
    needs_gram: ClassVar[bool] = True
    zero_init_steps: ClassVar[int] = 0

    def __post_init__(self):
        if not is_number(self.neg_scale) or not 0.0 <= self.neg_scale < math.inf:
            raise ValueError(f"neg_scale must be a finite number >= 0, got {self.neg_scale!r}")

    def blend(self, gram: torch.Tensor, w):
        """Weights over (e, p, n) from the Gram matrices [B, 4, 4] of (1, e, p, n)."""
        ee, pp, ep = gram[:, 1, 1], gram[:, 2, 2], gram[:, 1, 2]
        d2 = pp - 2.0 * ep + ee  # |p - e|^2
        dot = gram[:, 2, 3] - ep - gram[:, 1, 3] + ee  # <n - e, p - e>
        regular = d2 > 0
        c = torch.where(regular, dot / torch.where(regular, d2, 1.0), 0.0)
        ws = w * self.neg_scale
        return 1.0 - w + ws - ws * c, w + ws * c, -ws

    def bind_call(self, guidance, a) -> None:
        """The call's checks: two conditions (positive, negative) and one scale."""
        if guidance.conditions is None or len(guidance.conditions) != 2:
            raise ValueError("guidance='perp_neg' blends a positive and a negative condition with the empty prompt: "
                             "give conditions=[positive, negative] and null_y (the empty prompt), not y")
        if not (is_number(a.cfg) or callable(a.cfg)):
            raise ValueError(f"with guidance='perp_neg', cfg is one scale (ComfyUI's cfg) or a schedule, not one per "
                             f"condition: got {a.cfg!r}")

    def stage_weights(self, guidance, stages, B: int, device, merged=None) -> "PerpNegWeights":
        return PerpNegWeights(self, guidance, stages, B, device, merged)


class PerpNegWeights(StageWeights):
    """StageWeights over the branches (e, p, n), the rule on the whole Gram matrix (no weighted mean of the
    conditions); outside the guidance interval, p alone (weights (1, 0) over (p, n))."""

    def __init__(self, rule, guidance, stages, B: int, device, merged=None):
        w = [guidance.scale_at(st.t)[0] for st in stages]
        super().__init__(rule, guidance.rescale, [(v, 0.0) for v in w], [False] * len(stages), True, B, device,
                         x0_scales=[(1.0, 0.0)] * len(stages), guided_at=[guidance.guided_at(st.t) for st in stages])
        # churn per sample with a cfg schedule: each sample's scale at its own time, a [B] tensor the blend reads
        # elementwise
        per_sample = guidance._per_sample(merged) or {}
        self.sample_scales = {k: torch.tensor([v[0] for v in values[0]], dtype=torch.float64, device=device)
                              for k, values in per_sample.items()}

    def update(self, k: int, preds: list, backend: str) -> list:
        if self.guided_at[k]:
            w = self.sample_scales.get(k, self.scales[k][0])
            branch_weights(self._gram(preds, backend=backend), self.rule, w, self.phi, self.buffer)
        return preds


def perp_neg_reference(p_empty, p_pos, p_neg, w: float, neg_scale: float) -> torch.Tensor:
    """The specification, float64: Perp-Neg per sample (p = e: the projection is 0)."""
    e, p, n = p_empty.double(), p_pos.double(), p_neg.double()
    pos, neg = (p - e).flatten(1), (n - e).flatten(1)
    norm2 = (pos * pos).sum(1, keepdim=True)
    coef = torch.where(norm2 > 0, (neg * pos).sum(1, keepdim=True) / torch.where(norm2 > 0, norm2, 1.0), 0.0)
    perp = (neg - coef * pos).view_as(e)
    return e + w * ((p - e) - neg_scale * perp)
