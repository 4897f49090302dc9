"""CFGNorm: ComfyUI's CFGNorm node (comfy_extras/nodes_cfg.py), a tensor rule (fastdiff.sampling.features.
tensor_rules; docs/guidance.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fastdiff.sampling.core.arguments import is_number
from fastdiff.sampling.features.guidance import register_rule
from fastdiff.sampling.features.tensor_rules import TensorRule

EPS = 1e-8  # the node's, added to the blend's norm


@register_rule
@dataclass(frozen=True)
class CFGNorm(TensorRule):
    """ComfyUI's CFGNorm on the clean estimates (its sampler_post_cfg hook reads ``denoised``): per position (every
    index but the channel dim 1), the CFG blend g = u + w (c - u) is scaled down to at most the conditional
    estimate's channel norm, then by ``strength``:

        g' = strength · clamp(|c|_ch / (|g|_ch + 1e-8), 0, 1) · g

    (strength multiplies the whole estimate, as the node does: 0 gives a zero x0). Cost per guided evaluation: the
    blend, two channel norms and the scale (~5 passes over the predictions) and the x0 conversions (3)."""

    strength: float = 1.0

    name: ClassVar[str] = "cfg_norm"
    space: ClassVar[str] = "x0"

    def __post_init__(self):
        if not is_number(self.strength) or not 0.0 <= self.strength < math.inf:
            raise ValueError(f"CFGNorm strength must be a finite number >= 0 (the node's range is [0, 100]), got "
                             f"{self.strength!r}")

    def check_shape(self, shape: tuple) -> None:
        if len(shape) < 2:
            raise ValueError(f"guidance='cfg_norm' takes norms over the channel dim 1 of [B, C, ...] predictions, got "
                             f"shape {list(shape)}")

    def guide(self, u: torch.Tensor, c: torch.Tensor, w: float, at) -> torch.Tensor:
        c = c.float()
        g = torch.lerp(u.float(), c, float(w))
        scale = torch.linalg.vector_norm(c, dim=1, keepdim=True)
        scale.div_(torch.linalg.vector_norm(g, dim=1, keepdim=True).add_(EPS)).clamp_(0.0, 1.0)
        if self.strength != 1.0:
            scale.mul_(self.strength)
        return g.mul_(scale)


def cfg_norm_reference(u: torch.Tensor, c: torch.Tensor, w: float, strength: float = 1.0) -> torch.Tensor:
    """The specification, float64: u, c the unconditional and conditional clean estimates."""
    u, c = u.double(), c.double()
    g = u + w * (c - u)
    scale = (c.norm(dim=1, keepdim=True) / (g.norm(dim=1, keepdim=True) + EPS)).clamp(0.0, 1.0)
    return g * scale * strength
