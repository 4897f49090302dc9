"""TCFG: tangential classifier-free guidance (Kwon et al. 2025, "TCFG: Tangential Damping Classifier-free
Guidance"; diffusers' TangentialClassifierFreeGuidance), a guidance rule of per-sample weights from the reduction
pass (fastdiff.sampling.features.guidance, docs/guidance.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fastdiff import _checks
from fastdiff.sampling.features.guidance import register_rule


@register_rule
@dataclass(frozen=True)
class TCFG:
    """Tangential CFG: per sample, the unconditional prediction u = p_null loses its component off the first right
    singular vector v1 of the 2 x N matrix A = [c; u] (c = p_y, flattened), u' = <u, v1> v1, and the blend is
    g = u' + w (c - u') (``use_original_formulation``: g = c + w (c - u')).

    Everything is a function of the Gram matrix M = A A^T = [[<c,c>, <c,u>], [<u,c>, <u,u>]] = U S^2 U^T: the right
    singular vectors are v_i = (u_i^T A) / s_i, so with e = u_1 = (e0, e1), v1 = (e0 c + e1 u) / s1 and
    <u, v1> = (M e)[1] / s1 = s1 e1, whence

        u' = <u, v1> v1 = e1 (e0 c + e1 u) = alpha c + beta u,   alpha = e0 e1,  beta = e1^2

    (no s1 left, and no sign ambiguity: the projector e e^T). For the symmetric 2 x 2 M, with d = (<c,c> - <u,u>)/2
    and D = hypot(d, <c,u>) (= (s1^2 - s2^2)/2), e e^T = (M - s2^2 I) / (2D): alpha = <c,u> / 2D,
    beta = (1 - d / D) / 2. So g = (1 - w) beta p_null + (w + (1 - w) alpha) p_y (original: -w beta, 1 + w - w alpha).

    Degenerate samples: c parallel to u (s2 = 0) gives u' = u, the CFG blend, as the SVD does; c = 0 or u = 0
    alone is regular (D > 0). D = 0 (<c,u> = 0 and |c| = |u|, zero predictions included) has no first singular
    direction: LAPACK's pick there depends on the elements' layout (c = (3, 0), u = (0, 3) gives v1 = c, the
    swapped pair v1 = u), so TCFG keeps u' = u there: the CFG blend (for zero predictions every pick gives 0).

    As for every rule, cfg = 1 is unguided sampling (one branch); diffusers' use_original_formulation would
    still apply c + (c - u') there."""

    use_original_formulation: bool = False

    name: ClassVar[str] = "tcfg"
    needs_gram: ClassVar[bool] = True
    zero_init_steps: ClassVar[int] = 0

    def __post_init__(self):
        _checks.flag("use_original_formulation", self.use_original_formulation)

    def blend(self, gram: torch.Tensor, w: float):
        cc, uu, cu = gram[:, 2, 2], gram[:, 1, 1], gram[:, 1, 2]
        d = 0.5 * (cc - uu)
        D = torch.hypot(d, cu)
        regular = D > 0
        D = torch.where(regular, D, 1.0)
        alpha = torch.where(regular, 0.5 * cu / D, 0.0)
        beta = torch.where(regular, 0.5 * (1.0 - d / D), 1.0)
        if self.use_original_formulation:
            return -w * beta, 1.0 + w - w * alpha
        return (1.0 - w) * beta, w + (1.0 - w) * alpha


def tcfg_reference(p_null: torch.Tensor, p_y: torch.Tensor, w: float, rule: TCFG) -> torch.Tensor:
    """The specification (diffusers' normalized_guidance: the SVD of the stacked predictions), float64."""
    p_null, p_y = p_null.double(), p_y.double()
    A = torch.stack([p_y.flatten(1), p_null.flatten(1)], dim=1)  # [B, 2, N]
    _, _, Vh = torch.linalg.svd(A, full_matrices=False)
    v1 = Vh[:, :1]  # [B, 1, N]
    uncond = (torch.matmul(p_null.flatten(1)[:, None], v1.transpose(1, 2)) * v1).view_as(p_null)
    base = p_y if rule.use_original_formulation else uncond
    return base + w * (p_y - uncond)
