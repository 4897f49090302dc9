"""MAMBO-G: magnitude-aware mitigation for boosted guidance (arXiv 2508.03442; diffusers' MagnitudeAwareGuidance), a
guidance rule of per-sample weights from the reduction pass (fastdiff.sampling.features.guidance, docs/guidance.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fastdiff import _checks
from fastdiff.sampling.core.arguments import is_number
from fastdiff.sampling.features.guidance import register_rule


@register_rule
@dataclass(frozen=True)
class MamboG:
    """MAMBO-G: the guidance scale damped per sample by the relative size of the update d = p_y - p_null,

        ratio = |d| / |p_null|,   w' = 1 + (w - 1) exp(-alpha ratio),   g = p_null + w' d

    (``use_original_formulation``: w' = w exp(-alpha ratio), g = p_y + w' d), norms over each sample's elements.
    Both norms are quadratic forms of the Gram matrix of (p_null, p_y): |d|^2 = <y,y> - 2 <y,u> + <u,u>, so the
    rule is per-sample branch weights (1 - w', w') (original: (-w', 1 + w')) from the same pass as rescale.

    A sample with p_null = 0 has an unbounded ratio: w' is its limit 1 (original: 0), i.e. g = p_y, where
    diffusers divides by zero (NaN when p_y = 0 too). As for every rule, cfg = 1 is unguided sampling;
    diffusers' use_original_formulation would still apply exp(-alpha ratio) d there."""

    alpha: float = 8.0
    use_original_formulation: bool = False

    name: ClassVar[str] = "mambo_g"
    needs_gram: ClassVar[bool] = True
    zero_init_steps: ClassVar[int] = 0

    def __post_init__(self):
        # alpha < 0 would raise the scale without bound as the update grows: the rule damps, it does not boost
        if not is_number(self.alpha) or not 0.0 <= self.alpha < math.inf:
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        _checks.flag("use_original_formulation", self.use_original_formulation)

    def damping(self, gram: torch.Tensor) -> torch.Tensor:
        """exp(-alpha |p_y - p_null| / |p_null|) per sample [B] (0 where p_null = 0 and alpha > 0)."""
        uu, yy, uy = gram[:, 1, 1], gram[:, 2, 2], gram[:, 1, 2]
        d2 = (yy - 2.0 * uy + uu).clamp_min(0.0)
        regular = uu > 0
        ratio = (d2 / torch.where(regular, uu, 1.0)).sqrt()
        return torch.where(regular, torch.exp(-self.alpha * ratio), 1.0 if self.alpha == 0 else 0.0)

    def blend(self, gram: torch.Tensor, w):
        e = self.damping(gram)
        if self.use_original_formulation:
            s = w * e
            return -s, 1.0 + s
        s = 1.0 + (w - 1.0) * e
        return 1.0 - s, s


def mambo_g_reference(p_null: torch.Tensor, p_y: torch.Tensor, w: float, rule: MamboG) -> torch.Tensor:
    """The specification (diffusers' mambo_guidance, the norms taken directly), float64. (diffusers' own takes
    torch.norm over dims 1.., which torch 2.x refuses beyond 3-D predictions: the norms here are of the flattened
    samples.)"""
    p_null, p_y = p_null.double(), p_y.double()
    d = p_y - p_null
    ratio = d.flatten(1).norm(dim=1) / p_null.flatten(1).norm(dim=1)
    e = torch.exp(-rule.alpha * ratio).view(-1, *([1] * (p_y.dim() - 1)))
    if rule.use_original_formulation:
        return p_y + w * e * d
    return p_null + (1.0 + (w - 1.0) * e) * d
