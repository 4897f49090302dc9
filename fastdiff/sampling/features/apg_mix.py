"""APG mix: classifier-free guidance for the first steps, adaptive projected guidance after them (diffusers'
AdaptiveProjectedMixGuidance, the guider of HunyuanImage 2.1), a guidance rule whose blend depends on the step
(fastdiff.sampling.features.guidance, docs/guidance.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fastdiff import _checks
from fastdiff.sampling.core.arguments import is_number
from fastdiff.sampling.features.guidance import APG, register_rule, apg_reference


@register_rule
@dataclass(frozen=True)
class APGMix:
    """CFG with sample()'s ``cfg`` at the steps i <= ``adaptive_projected_guidance_start_step``, then APG
    (fastdiff.sampling.features.guidance.APG) with its own scale ``adaptive_projected_guidance_scale``, norm
    threshold ``adaptive_projected_guidance_rescale`` and ``eta``. With ``adaptive_projected_guidance_momentum`` m
    (None: none) the running average r = (p_y - p_null) + m r is updated at every guided evaluation of both phases,
    so APG's first step already reads the CFG steps' history, as diffusers' guider does (its CFG branch updates the
    MomentumBuffer too). ``use_original_formulation``: both phases start from p_y instead of p_null.

    The switch: diffusers counts its guider calls (one per denoising step; APG where step > start_step); fastdiff
    counts sampler steps (Stage.step, as CFGZeroStar's zero_init_steps do), so with a method of several model
    evaluations per step (heun, dpmpp_2s, ...) all evaluations of steps 0..start_step are CFG (not the first
    start_step + 1 evaluations), and each of them updates the running average. An APG scale of 1 (original: 0) is
    diffusers' "APG off": CFG at every step. With several conditions both phases act on their weighted mean
    (docs/guidance.md); a schedule cfg(t) sets the CFG phase's scale. As for every rule, cfg = 1 is unguided
    sampling (diffusers' guider also turns APG off there)."""

    adaptive_projected_guidance_scale: float = 10.0
    adaptive_projected_guidance_momentum: float | None = -0.5
    adaptive_projected_guidance_rescale: float = 10.0
    eta: float = 0.0
    use_original_formulation: bool = False
    adaptive_projected_guidance_start_step: int = 5

    name: ClassVar[str] = "apg_mix"
    needs_gram: ClassVar[bool] = True
    zero_init_steps: ClassVar[int] = 0

    def __post_init__(self):
        if not is_number(self.adaptive_projected_guidance_scale) or \
                not math.isfinite(self.adaptive_projected_guidance_scale):
            raise ValueError(f"adaptive_projected_guidance_scale must be a finite number, got "
                             f"{self.adaptive_projected_guidance_scale!r}")
        m = self.adaptive_projected_guidance_momentum
        if m is not None and (not is_number(m) or not math.isfinite(m)):
            raise ValueError(f"adaptive_projected_guidance_momentum must be None or a finite number, got {m!r}")
        r = self.adaptive_projected_guidance_rescale
        if not is_number(r) or not 0.0 <= r < math.inf:
            raise ValueError(f"adaptive_projected_guidance_rescale must be a finite number >= 0 (0: no limit), "
                             f"got {r!r}")
        if not is_number(self.eta) or not math.isfinite(self.eta):
            raise ValueError(f"eta must be a finite number, got {self.eta!r}")
        _checks.flag("use_original_formulation", self.use_original_formulation)
        s = self.adaptive_projected_guidance_start_step
        if not isinstance(s, int) or isinstance(s, bool) or s < -1:
            raise ValueError(f"adaptive_projected_guidance_start_step must be an int >= -1 (-1: APG from the first "
                             f"step), got {s!r}")

    # the running average: StageWeights keeps it as one more branch (as APG's), reading these two
    @property
    def momentum(self) -> float | None:
        return self.adaptive_projected_guidance_momentum

    @property
    def running(self) -> bool:
        return self.momentum is not None

    @property
    def apg(self) -> APG:
        """The APG phase's rule."""
        return APG(eta=self.eta, norm_threshold=self.adaptive_projected_guidance_rescale, momentum=self.momentum,
                   original=self.use_original_formulation)

    def apg_at(self, step: int) -> bool:
        """Whether sampler step ``step`` is in the APG phase (diffusers' _is_apg_enabled for a guided step)."""
        off = 0.0 if self.use_original_formulation else 1.0
        return step > self.adaptive_projected_guidance_start_step and \
            not math.isclose(self.adaptive_projected_guidance_scale, off)

    def stage_rule(self, step: int):
        """The blend of sampler step ``step``'s guided evaluations (Guidance.stage_weights' hook)."""
        if self.apg_at(step):
            return _APGPhase(self.apg, float(self.adaptive_projected_guidance_scale))
        return _CFGPhase(self.use_original_formulation, self.running)

    def blend(self, gram: torch.Tensor, w):
        """The CFG phase's blend (the rule's at a step before the switch; the loop asks stage_rule)."""
        return _CFGPhase(self.use_original_formulation, self.running).blend(gram, w)


@dataclass(frozen=True)
class _CFGPhase:
    """g = p_null + w (p_y - p_null) (original: p_y + w (...)), over (p_null, p_y[, r]): r's weight 0."""

    original: bool
    running: bool
    needs_gram: ClassVar[bool] = False

    def blend(self, gram: torch.Tensor, w):
        a, b = (-w, 1.0 + w) if self.original else (1.0 - w, w)
        return (a, b, 0.0) if self.running else (a, b)


@dataclass(frozen=True)
class _APGPhase:
    """APG's blend with its own scale: sample()'s cfg does not enter."""

    apg: APG
    scale: float
    needs_gram: ClassVar[bool] = True

    def blend(self, gram: torch.Tensor, w):
        return self.apg.blend(gram, self.scale)


def apg_mix_reference(p_null: torch.Tensor, p_y: torch.Tensor, w: float, rule: APGMix, step: int,
                      running: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The specification of one guided evaluation at sampler step ``step``, float64: (g, the running average after
    it). ``running``: the average before it (None: 0, the first evaluation)."""
    p_null, p_y = p_null.double(), p_y.double()
    if rule.momentum is not None:
        running = (p_y - p_null) + rule.momentum * (0.0 if running is None else running.double())
    if not rule.apg_at(step):
        base = p_y if rule.use_original_formulation else p_null
        return base + w * (p_y - p_null), running
    return apg_reference(p_null, p_y, rule.adaptive_projected_guidance_scale, rule.apg, update=running), running
