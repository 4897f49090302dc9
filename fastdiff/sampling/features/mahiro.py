"""Mahiro: ComfyUI's Mahiro node (comfy_extras/nodes_mahiro.py), a tensor rule (fastdiff.sampling.features.
tensor_rules; docs/guidance.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from fastdiff.sampling.features.guidance import register_rule
from fastdiff.sampling.features.tensor_rules import TensorRule


def _signed_sqrt(v: torch.Tensor) -> torch.Tensor:
    return v.abs().sqrt_().mul_(v.sign())


@register_rule
@dataclass(frozen=True)
class Mahiro(TensorRule):
    """ComfyUI's Mahiro on the clean estimates (its sampler_post_cfg hook), guidance toward the direction of the
    conditional estimate: with the CFG blend g = u + w (c - u), the "leap" l = w c and m = (l + g) / 2, the
    similarity s = mean cosine similarity over the channel dim 1 of ssqrt(w u) and ssqrt(m) (ssqrt(v) =
    sign(v) sqrt|v|), k = 2 (s + 1) in [0, 4], and

        g' = (k g + (4 - k) l) / 4.

    The node averages s over its whole batch; fastdiff per sample (over its positions), so that a sample does not
    depend on the others in the batch (the same at batch 1). No options: the node has none. Cost per guided
    evaluation: ~10 elementwise passes over the predictions, one reduction and the x0 conversions (3)."""

    name: ClassVar[str] = "mahiro"
    space: ClassVar[str] = "x0"

    def check_shape(self, shape: tuple) -> None:
        if len(shape) < 2:
            raise ValueError(f"guidance='mahiro' takes cosine similarities over the channel dim 1 of [B, C, ...] "
                             f"predictions, got shape {list(shape)}")

    def guide(self, u: torch.Tensor, c: torch.Tensor, w: float, at) -> torch.Tensor:
        u, c = u.float(), c.float()
        w = float(w)
        leap = c * w
        g = torch.lerp(u, c, w)
        merge = torch.add(leap, g).mul_(0.5)
        sim = F.cosine_similarity(_signed_sqrt(u * w), _signed_sqrt(merge), dim=1)  # [B, ...]
        k = sim.reshape(sim.shape[0], -1).mean(1).add_(1.0).mul_(2.0).view(-1, *([1] * (u.dim() - 1)))
        return g.mul_(k).add_(leap * (4.0 - k)).mul_(0.25)


def mahiro_reference(u: torch.Tensor, c: torch.Tensor, w: float) -> torch.Tensor:
    """The specification, float64 (the similarity per sample)."""
    u, c = u.double(), c.double()
    leap, g = w * c, u + w * (c - u)
    merge = (leap + g) / 2
    a, b = torch.sign(w * u) * (w * u).abs().sqrt(), torch.sign(merge) * merge.abs().sqrt()
    eps = 1e-8
    cos = (a * b).sum(1) / (a.norm(dim=1).clamp_min(eps) * b.norm(dim=1).clamp_min(eps))
    k = 2 * (cos.reshape(cos.shape[0], -1).mean(1) + 1)
    k = k.view(-1, *([1] * (u.dim() - 1)))
    return (k * g + (4 - k) * leap) / 4
