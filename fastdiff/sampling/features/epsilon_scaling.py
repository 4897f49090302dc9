"""Epsilon scaling (Ning et al. 2024, "Elucidating the Exposure Bias in Diffusion Models", uniform schedule;
ComfyUI's "Epsilon Scaling" node, comfy_extras/nodes_eps.py): the guided prediction's noise divided by a constant,
a change of each stage's coefficients on the host (fastdiff.sampling.features.guidance, docs/guidance.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from fastdiff.paths import affine_coefficients, convert
from fastdiff.sampling.core.arguments import is_number
from fastdiff.sampling.features.guidance import CFG, register_rule


SPACES = ("eps", "state")  # the state whose noise part is scaled: x / alpha (k-diffusion's), or x itself


@register_rule
@dataclass(frozen=True)
class EpsilonScaling(CFG):
    """CFG's blend g, whose noise estimate then becomes eps' = eps(g) / ``scaling_factor`` with the same state x: in
    k-diffusion's variables (x / alpha = x0 + sigma eps) ComfyUI's post-CFG formula denoised' = x - (x - denoised) / s,
    which is what the node does for ComfyUI's eps and v-prediction models (their sampler state is x / alpha).
    ``space="state"``: the formula in the path's own state, x0' = x - (x - x0) / s, what the node does for ComfyUI's
    flow models (model_sampling CONST: the state is x, and x - x0 is sigma times the velocity): on condot the
    velocity / s. On VE (alpha = 1) both are one.

    Every conversion is affine in (x, g), so the new prediction is g' = g / s + (1 - 1/s) q(t) x, q(t) x the
    prediction of the state x with eps = 0 (``space="state"``: with x0 = x), and a step linear in g takes it by its
    coefficients alone: c_x += c_pred (1 - 1/s) q, c_pred /= s, likewise the side row, the x0 estimate (callbacks)
    and a corrector's score. Host numbers per stage (a stage-table transform, after corrector steps and before
    classifier guidance, whose term it scales too): no pass, no weight, guided or not (cfg = 1 scales the
    conditional prediction alone). Thresholding and clipping act on the blend before it, as ComfyUI's CFG functions
    run before its post-CFG ones. Where alpha = 0 (t = 0 of condot, vp) eps' has no x0 (q = 1/alpha): the default
    grid then starts at 1e-3 (as for classifier guidance), and an explicit grid through it is refused; from there
    the first steps cross a large range of sigma = beta/alpha, and their change, (1 - 1/s) times the step in sigma,
    is large too (space="state" has no such factor)."""

    scaling_factor: float = 1.005
    space: str = "eps"

    name: ClassVar[str] = "epsilon_scaling"

    def __post_init__(self):
        # ComfyUI's widget takes [0.5, 1.5]; any positive factor is well defined (0 would divide by zero)
        if not is_number(self.scaling_factor) or not 0.0 < self.scaling_factor < math.inf:
            raise ValueError(f"scaling_factor must be a finite number > 0, got {self.scaling_factor!r}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(map(repr, SPACES))}, got {self.space!r}")

    def table_transform(self, path, prediction: str) -> "ScaledStages":
        """The planner's hook: this rule's stage-table transform."""
        return ScaledStages(float(self.scaling_factor), self.space, path, prediction)


class ScaledStages:
    """The stage-table transform of guidance="epsilon_scaling": each stage's rows on g' = k_x x + k_g g."""

    def __init__(self, s: float, space: str, path, prediction: str):
        self.s, self.space, self.path, self.prediction = s, space, path, prediction
        self.key = ("epsilon_scaling", s, space)
        try:  # the default grid starts after t = 0 where the new prediction is not defined there
            self.coefficients(0.0)
            self.start_late = False
        except ValueError:
            self.start_late = True

    def coefficients(self, t: float) -> tuple[float, float]:
        """(k_x, k_g) of g' = k_x x + k_g g at time t."""
        source = "eps" if self.space == "eps" else "x0"
        try:
            a, b = affine_coefficients(self.path, t, source, self.prediction)
        except ValueError:
            raise ValueError(f"guidance='epsilon_scaling' needs the {source} -> {self.prediction} conversion, which "
                             f"is singular at t={t:.6g} on path {self.path!r}: start the grid after it") from None
        q = a if self.space == "eps" else a + b  # the prediction of x with eps = 0, or with x0 = x
        return (1.0 - 1.0 / self.s) * q, 1.0 / self.s

    def __call__(self, stages: list) -> list:
        out = []
        for st in stages:
            kx, kg = self.coefficients(st.t)
            a, b = st.x0
            more = {}
            if st.corrector is not None:  # the score a x + b g + Σ h_j buffer_j
                snr, ca, cb, h = st.corrector
                more["corrector"] = (snr, ca + cb * kx, cb * kg, h)
            out.append(replace(st, c_x=st.c_x + st.c_pred * kx, c_pred=st.c_pred * kg, s_x=st.s_x + st.s_pred * kx,
                               s_pred=st.s_pred * kg, x0=(a + b * kx, b * kg), **more))
        return out


def epsilon_scaling_reference(g: torch.Tensor, x: torch.Tensor, t: float, path, prediction: str,
                              scaling_factor: float, space: str = "eps") -> torch.Tensor:
    """The specification, float64: the prediction whose eps is eps(g) / scaling_factor at the state x, or
    (space="state") whose x0 is x - (x - x0(g)) / scaling_factor."""
    g, x = g.double(), x.double()
    if space == "eps":
        return convert(convert(g, x, t, path, prediction, "eps") / scaling_factor, x, t, path, "eps", prediction)
    x0 = convert(g, x, t, path, prediction, "x0")
    return convert(x - (x - x0) / scaling_factor, x, t, path, "x0", prediction)
