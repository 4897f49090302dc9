"""FDG: frequency-decoupled guidance (Sadat et al. 2025, "Guidance in the Frequency Domain Enables High-Fidelity
Sampling at Low CFG Scales"; diffusers' FrequencyDecoupledGuidance), a tensor rule (fastdiff.sampling.features.
tensor_rules; docs/guidance.md). The Laplacian pyramid is kornia's build_laplacian_pyramid / pyrup (which diffusers
imports), written here with torch ops: no kornia needed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from fastdiff import _checks
from fastdiff.sampling.core.arguments import is_number
from fastdiff.sampling.features.guidance import register_rule
from fastdiff.sampling.features.tensor_rules import TensorRule

_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)  # kornia's pyramid kernel: their outer product / 256


_KERNELS: dict = {}  # (device, dtype) -> the 5 x 5 kernel: made once (a captured loop may not copy host data)


def _kernel(like: torch.Tensor) -> torch.Tensor:
    key = (like.device, like.dtype)
    if key not in _KERNELS:
        k = torch.tensor(_TAPS, dtype=torch.float64)
        _KERNELS[key] = (torch.outer(k, k) / 256.0).to(device=like.device, dtype=like.dtype)
    return _KERNELS[key]


def _blur(x: torch.Tensor) -> torch.Tensor:
    """kornia's filter2d with the pyramid kernel: reflect border, each channel alone."""
    C = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), _kernel(x).expand(C, 1, 5, 5), groups=C)


def pyrdown(x: torch.Tensor) -> torch.Tensor:
    """kornia's pyrdown: blur, then bilinear (align_corners=False) to half the size, rounded down."""
    h, w = x.shape[-2:]
    return F.interpolate(_blur(x), size=(h // 2, w // 2), mode="bilinear", align_corners=False)


def pyrup(x: torch.Tensor) -> torch.Tensor:
    """kornia's pyrup: bilinear (align_corners=False) to twice the size, then blur."""
    h, w = x.shape[-2:]
    return _blur(F.interpolate(x, size=(2 * h, 2 * w), mode="bilinear", align_corners=False))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def padded_size(h: int, w: int, levels: int) -> tuple[int, int]:
    """The size the pyramid is built at: kornia pads both sides (reflect, at the end) to the next power of two
    where neither is one; fastdiff also where a level would not come back to its size through pyrup (an odd size
    at a level but the last: kornia's subtraction fails there)."""
    def round_trips(n: int) -> bool:
        return all((n >> i) % 2 == 0 for i in range(levels - 1))

    if (not _pow2(h) and not _pow2(w)) or not (round_trips(h) and round_trips(w)):
        return 1 << (h - 1).bit_length(), 1 << (w - 1).bit_length()
    return h, w


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """kornia's build_laplacian_pyramid(x, levels) of [B, C, H, W] (at the padded size)."""
    h, w = x.shape[-2:]
    H, W = padded_size(h, w, levels)
    if (H, W) != (h, w):
        x = F.pad(x, (0, W - w, 0, H - h), mode="reflect")
    gauss = [x]
    for _ in range(levels - 1):
        gauss.append(pyrdown(gauss[-1]))
    return [g - pyrup(g_next) for g, g_next in zip(gauss, gauss[1:])] + [gauss[-1]]


def image_from_pyramid(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """The inverse: from the coarsest level, pyrup and add each finer one."""
    img = pyramid[-1]
    for level in reversed(pyramid[:-1]):
        img = pyrup(img) + level
    return img


def _per_level(name: str, value, levels: int, check) -> tuple:
    values = [value] * levels if is_number(value) else list(value) if isinstance(value, (list, tuple)) else None
    if values is None or len(values) != levels:
        raise ValueError(f"FDG {name} must be a number or one value per level ({levels}, as guidance_scales), got "
                         f"{value!r}")
    for v in values:
        if not is_number(v) or not check(v):
            raise ValueError(f"FDG {name} holds {v!r}: each must be a finite number"
                             + (" in [0, 1]" if name == "guidance_rescale" else ""))
    return tuple(float(v) for v in values)


def _rescale(g: torch.Tensor, c: torch.Tensor, phi: float) -> torch.Tensor:
    """diffusers' rescale_noise_cfg: g toward c's standard deviation per sample."""
    dims = list(range(1, g.dim()))
    return phi * (g * (c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))) + (1.0 - phi) * g


@register_rule
@dataclass(frozen=True)
class FDG(TensorRule):
    """Frequency-decoupled guidance on the predictions (diffusers' guider acts on the noise prediction): both
    branches split into a Laplacian pyramid of ``len(guidance_scales)`` levels (highest frequency first), each
    level guided with its own scale, u_i + s_i (c_i - u_i) (``use_original_formulation``: c_i + ...), the update
    c_i - u_i optionally with its part along c_i weighted by ``parallel_weights``, then the pyramid collapsed
    back. ``guidance_rescale`` (diffusers': in ``guidance_rescale_space`` "data", the first value on the result;
    "freq", each level's on that level). A level is guided at steps int(start_i N) <= step < int(stop_i N) of N
    and where its scale is not 1 (0 with the original formulation); elsewhere it is the conditional level (no
    level guided: g = c).

    The scales are the rule's: cfg stays 1 (two branches still run; with conditions, cfg's weights only mix
    them). Predictions [B, C, H, W]. Where kornia pads to a power of two fastdiff pads the same and returns the
    input's size (diffusers returns the padded one); a level that would not round-trip (kornia's shape error) is
    padded the same way. A disabled level beside guided ones is the conditional level (diffusers reuses another
    level's variable there and fails). Cost per guided evaluation: ~20 passes of the predictions' size (two
    pyramids, the guided levels, the collapse; each level a 5x5 blur and a bilinear resize), more where padded."""

    guidance_scales: tuple = (10.0, 5.0)
    guidance_rescale: float | tuple = 0.0
    parallel_weights: float | tuple | None = None
    use_original_formulation: bool = False
    start: float | tuple = 0.0
    stop: float | tuple = 1.0
    guidance_rescale_space: str = "data"
    upcast_to_double: bool = True

    name: ClassVar[str] = "fdg"
    space: ClassVar[str] = "prediction"
    own_scales: ClassVar[bool] = True

    def __post_init__(self):
        scales = self.guidance_scales
        if not isinstance(scales, (list, tuple)) or not scales or \
                not all(is_number(s) and math.isfinite(s) for s in scales):
            raise ValueError(f"FDG guidance_scales must be a non-empty list of finite numbers (one per level, "
                             f"highest frequency first), got {scales!r}")
        L = len(scales)
        finite = math.isfinite
        object.__setattr__(self, "guidance_scales", tuple(float(s) for s in scales))
        object.__setattr__(self, "guidance_rescale", _per_level("guidance_rescale", self.guidance_rescale, L,
                                                                lambda v: 0.0 <= v <= 1.0))
        object.__setattr__(self, "parallel_weights", _per_level(
            "parallel_weights", 1.0 if self.parallel_weights is None else self.parallel_weights, L, finite))
        object.__setattr__(self, "start", _per_level("start", self.start, L, finite))
        object.__setattr__(self, "stop", _per_level("stop", self.stop, L, finite))
        if self.guidance_rescale_space not in ("data", "freq"):
            raise ValueError(f"FDG guidance_rescale_space must be 'data' or 'freq', got "
                             f"{self.guidance_rescale_space!r}")
        _checks.flag("use_original_formulation", self.use_original_formulation)
        _checks.flag("upcast_to_double", self.upcast_to_double)

    @property
    def levels(self) -> int:
        return len(self.guidance_scales)

    def check_shape(self, shape: tuple) -> None:
        if len(shape) != 4:
            raise ValueError(f"guidance='fdg' splits [B, C, H, W] predictions into a Laplacian pyramid, got shape "
                             f"{list(shape)}")
        H, W = padded_size(shape[2], shape[3], self.levels)
        if self.levels > 1 and min(H, W) >> (self.levels - 2) < 3:  # the blur's reflect padding needs 3 or more
            raise ValueError(f"FDG with {self.levels} levels (len(guidance_scales)) needs H and W >= "
                             f"{3 << (self.levels - 2)} (the pyramid's size {H}x{W} halves per level), got "
                             f"shape {list(shape)}")

    def level_on(self, i: int, at) -> bool:
        """Whether level i is guided at ``at`` (diffusers' _is_fdg_enabled_for_level)."""
        N = at.steps
        if not int(self.start[i] * N) <= at.step < int(self.stop[i] * N):
            return False
        return not math.isclose(self.guidance_scales[i], 0.0 if self.use_original_formulation else 1.0)

    def guide(self, u: torch.Tensor, c: torch.Tensor, w: float, at) -> torch.Tensor:
        c = c.float()
        on = [self.level_on(i, at) for i in range(self.levels)]
        if not any(on):
            return c.clone()
        pc, pu = laplacian_pyramid(c, self.levels), laplacian_pyramid(u.float(), self.levels)
        out = []
        for i, (ci, ui) in enumerate(zip(pc, pu)):
            if not on[i]:
                out.append(ci)
                continue
            shift = ci - ui
            if not math.isclose(self.parallel_weights[i], 1.0):
                shift = self._weigh_parallel(shift, ci, self.parallel_weights[i])
            g = torch.add(ci if self.use_original_formulation else ui, shift, alpha=self.guidance_scales[i])
            if self.guidance_rescale_space == "freq" and self.guidance_rescale[i] > 0:
                g = _rescale(g, ci, self.guidance_rescale[i])
            out.append(g)
        h, w_ = c.shape[-2:]
        g = image_from_pyramid(out)[..., :h, :w_]
        if self.guidance_rescale_space == "data" and self.guidance_rescale[0] > 0:
            g = _rescale(g, c, self.guidance_rescale[0])
        return g.contiguous()

    def _weigh_parallel(self, shift: torch.Tensor, along: torch.Tensor, weight: float) -> torch.Tensor:
        """shift with its component along ``along`` (per sample) times ``weight`` (diffusers' project)."""
        dtype = torch.float64 if self.upcast_to_double else shift.dtype
        s, a = shift.to(dtype), along.to(dtype)
        dims = list(range(1, s.dim()))
        unit = F.normalize(a.flatten(1), dim=1).view_as(a)
        parallel = (s * unit).sum(dim=dims, keepdim=True) * unit
        return (s + (weight - 1.0) * parallel).to(shift.dtype)


# ---- the specification: the pyramid as float64 matrices (one per dim), the rule on it ------------------------------

def _reflect(i: int, n: int) -> int:
    return -i if i < 0 else 2 * (n - 1) - i if i >= n else i


def blur_matrix(n: int) -> torch.Tensor:
    """The 1-D factor of the pyramid blur (taps / 16, reflect border) on n samples, [n, n] float64."""
    M = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for o, tap in zip(range(-2, 3), _TAPS):
            M[i, _reflect(i + o, n)] += tap / 16.0
    return M


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Bilinear resizing with align_corners=False (source (i + 1/2) n_in / n_out - 1/2, clamped at 0), [n_out, n_in]."""
    M = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1, lam = min(i0 + 1, n_in - 1), src - i0
        M[i, i0] += 1.0 - lam
        M[i, i1] += lam
    return M


def _apply(rows: torch.Tensor, cols: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bcjk,lk->bcil", rows, x, cols)


def laplacian_pyramid_reference(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The specification of :func:`laplacian_pyramid`, float64 (the reflect pad, blurs and resizes as matrices)."""
    x = x.double()
    h, w = x.shape[-2:]
    H, W = padded_size(h, w, levels)
    pad = [torch.eye(n, dtype=torch.float64)[[_reflect(i, n) for i in range(N)]] for n, N in ((h, H), (w, W))]
    gauss = [_apply(pad[0], pad[1], x)]
    for _ in range(levels - 1):
        a, b = gauss[-1].shape[-2:]
        gauss.append(_apply(resize_matrix(a, a // 2) @ blur_matrix(a), resize_matrix(b, b // 2) @ blur_matrix(b),
                            gauss[-1]))
    return [g - _up_reference(g_next) for g, g_next in zip(gauss, gauss[1:])] + [gauss[-1]]


def _up_reference(x: torch.Tensor) -> torch.Tensor:
    a, b = x.shape[-2:]
    return _apply(blur_matrix(2 * a) @ resize_matrix(a, 2 * a), blur_matrix(2 * b) @ resize_matrix(b, 2 * b), x)


def fdg_reference(u: torch.Tensor, c: torch.Tensor, rule: FDG, step: int = 0, steps: int = 1) -> torch.Tensor:
    """The specification of the rule at step ``step`` of ``steps``, float64."""
    from fastdiff.sampling.features.tensor_rules import At

    u, c = u.double(), c.double()
    on = [rule.level_on(i, At(step, steps, 0.0)) for i in range(rule.levels)]
    if not any(on):
        return c
    pc, pu = laplacian_pyramid_reference(c, rule.levels), laplacian_pyramid_reference(u, rule.levels)
    out = []
    for i, (ci, ui) in enumerate(zip(pc, pu)):
        if not on[i]:
            out.append(ci)
            continue
        shift = ci - ui
        unit = ci / ci.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        parallel = (shift * unit).sum(dim=(1, 2, 3), keepdim=True) * unit
        shift = shift + (rule.parallel_weights[i] - 1.0) * parallel
        g = (ci if rule.use_original_formulation else ui) + rule.guidance_scales[i] * shift
        if rule.guidance_rescale_space == "freq" and rule.guidance_rescale[i] > 0:
            g = _rescale(g, ci, rule.guidance_rescale[i])
        out.append(g)
    img = out[-1]
    for level in reversed(out[:-1]):
        img = _up_reference(img) + level
    g = img[..., :c.shape[-2], :c.shape[-1]]
    if rule.guidance_rescale_space == "data" and rule.guidance_rescale[0] > 0:
        g = _rescale(g, c, rule.guidance_rescale[0])
    return g
