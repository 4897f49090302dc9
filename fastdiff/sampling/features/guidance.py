"""Guidance in the fused loop beyond one fixed CFG scale (docs/guidance.md).

- A schedule: ``cfg`` may be a callable t -> w, evaluated at each stage's time on the host (its rows are
  host numbers like the fixed scale's).
- Dynamic thresholding: fastdiff.sampling.features.thresholding.
- Rules (``guidance=``): ``"cfg"`` (the default), ``"cfg_zero_star"`` (CFG-Zero*: the unconditional
  branch scaled by a per-sample optimal factor, zero-init steps) and ``"cfg_pp"`` (CFG++: the guided
  prediction in the clean estimate only) and ``"apg"`` (adaptive projected guidance), each a record
  here; a rule with per-sample weights reads the same reduction pass.
- CFG rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed";
  diffusers' ``guidance_rescale``): the blend g = p_null + w (p_y - p_null) is pulled toward the standard
  deviation of the conditional prediction, per sample b (over its elements):

      g' = phi (std(p_y) / std(g)) g + (1 - phi) g

  Fused: one sample_gram pass over (p_null, p_y) gives both deviations as quadratic forms of the
  per-sample Gram matrix, a few [B] ops on the device make the per-sample branch weights (c, c w),
  c = phi std(p_y)/std(g) + 1 - phi, and the step blends with them: no host synchronization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fastdiff import _checks
from fastdiff._checks import FLOAT32_MAX
from fastdiff.sampling.core.arguments import is_number
from fastdiff.sampling.features.thresholding import DynamicThresholding, get_thresholding, quantile_rows  # noqa: F401


def scale_schedule(cfg, name: str = "cfg"):
    """(t -> w, whether any guidance applies) for sample()'s ``cfg`` (or another scale, ``name``): a finite
    number, or a callable returning one at each stage's time."""
    if callable(cfg):
        def at(t: float) -> float:
            w = cfg(t)
            if not is_number(w) or not abs(w) <= FLOAT32_MAX:  # NaN fails too; beyond float32 the kernel sees inf
                raise ValueError(f"{name}(t) must return a finite number, got {w!r} at t={t:.6g} (float32's range)")
            return float(w)

        return at, True
    if not is_number(cfg) or not abs(cfg) <= FLOAT32_MAX:  # NaN fails too; beyond float32 the kernel sees inf
        raise ValueError(f"{name} must be a finite number or a callable t -> scale (in float32's range), got {cfg!r}")
    return (lambda t: float(cfg)), cfg != 1.0


def check_rescale(phi) -> float:
    if not is_number(phi) or not 0.0 <= phi <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {phi!r}")
    return float(phi)


@dataclass(frozen=True)
class CFG:
    """Classifier-free guidance: g = p_null + w (p_y - p_null)."""

    name: ClassVar[str] = "cfg"
    needs_gram: ClassVar[bool] = False  # the blend's weights are host numbers
    zero_init_steps: ClassVar[int] = 0

    def blend(self, gram: torch.Tensor, w: float):
        """(a, b) of g = a p_null + b p_y, numbers or per-sample [B] float64 tensors."""
        return 1.0 - w, w


@dataclass(frozen=True)
class CFGZeroStar:
    """CFG-Zero* (Fan et al. 2025; diffusers' ClassifierFreeZeroStarGuidance): the unconditional prediction
    scaled by the per-sample optimal alpha = <p_y, p_null> / (|p_null|^2 + eps) before the blend,
    g = alpha p_null + w (p_y - alpha p_null), and a zero prediction at the first ``zero_init_steps`` steps."""

    zero_init_steps: int = 1
    eps: float = 1e-8

    name: ClassVar[str] = "cfg_zero_star"
    needs_gram: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.zero_init_steps, int) or isinstance(self.zero_init_steps, bool) or self.zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be an int >= 0, got {self.zero_init_steps!r}")
        if not is_number(self.eps) or not self.eps >= 0:
            raise ValueError(f"eps must be a number >= 0, got {self.eps!r}")

    def blend(self, gram: torch.Tensor, w: float):
        alpha = gram[:, 1, 2] / (gram[:, 1, 1] + self.eps)
        return (1.0 - w) * alpha, w


@dataclass(frozen=True)
class CFGPP(CFG):
    """CFG++ (Chung et al. 2024; ComfyUI's euler_cfg_pp / euler_ancestral_cfg_pp): the guided prediction enters
    the step's clean estimate only, and the re-noising uses the unconditional one,
    x' = alpha' x0(g) + k eps(p_null) [+ s xi]. For a step whose prediction coefficient c_pred has the share
    rho through x0 (Stage.cfg_pp), that is c_pred (p_null + rho w (p_y - p_null)): the blend's weight scaled
    by rho, host numbers per stage. Methods that split their step so: euler, ddim, euler_ancestral.

    ComfyUI's multistep and two-stage forms (dpmpp_2m_cfg_pp, res_multistep[_ancestral]_cfg_pp,
    gradient_estimation_cfg_pp, dpmpp_2s_ancestral_cfg_pp) keep the unconditional prediction's x0 (or slope) as
    their history, or carry a stage's guidance vector to the next: their side rows read a blend of their own
    (Stage.side_blend, written by :class:`SideCalls`), and a stage whose CFG++ step has other buffers gives its
    form (Stage.cfg_pp_form, put in by :func:`cfg_pp_forms`)."""

    name: ClassVar[str] = "cfg_pp"  # CFG's blend, per-stage weights (stage_scale)

    def stage_scale(self, w: float, stage) -> float:
        if stage.cfg_pp is None:
            one, multi = _takers()
            raise ValueError(f"guidance='cfg_pp' is defined for methods whose step is a clean estimate plus its "
                             f"re-noising, as its peers define it ({', '.join(one)}), and for ComfyUI's multistep and "
                             f"two-stage *_cfg_pp forms ({', '.join(multi)}); this method's step is not")
        return tuple(v * stage.cfg_pp for v in w) if isinstance(w, tuple) else w * stage.cfg_pp


def _takers() -> tuple[list[str], list[str]]:
    """The methods that take guidance="cfg_pp": (one-stage splits, those with a side blend or CFG++ forms), told
    apart by their tables on a small grid (an error message's: not the hot path)."""
    from fastdiff.paths import get_path
    from fastdiff.sampling.methods.registry import methods

    one, multi = [], []
    for m in methods():
        if not m.cfg_pp:
            continue
        try:
            table = m.stages(get_path("condot"), [0.1, 0.4, 0.7, 0.9], "velocity")
        except (TypeError, ValueError):
            table = []
        own = any(st.side_blend is not None or st.cfg_pp_form is not None for st in table)
        (multi if own else one).append(m.name)
    return one, multi


class CFGPPForms:
    """The stage-table transform of guidance="cfg_pp" (fastdiff.sampling.core.tables): each stage replaced by its
    CFG++ form where it gives one (Stage.cfg_pp_form)."""

    key = "cfg_pp_forms"

    def __call__(self, stages: list) -> list:
        if all(st.cfg_pp_form is None for st in stages):
            return stages
        return [st if st.cfg_pp_form is None else st.cfg_pp_form for st in stages]


def cfg_pp_forms(guidance) -> CFGPPForms | None:
    """The transform of a guided call with guidance="cfg_pp" (``guidance``: the call's record,
    fastdiff.sampling.features.conditions.Guidance), else None."""
    return CFGPPForms() if guidance.guided and guidance.rule.name == "cfg_pp" else None


class SideCalls:
    """CFG++'s side rows on a blend of their own, at the point ``predictions`` (ComfyUI's post-CFG hook that keeps
    ``uncond_denoised``): before stage k's call, a call writes its side buffer from a p_null + b g (Stage.side_blend,
    g the guided blend: the rule's, rescaled where it is), and the stage's own call writes no side. With per-sample
    weights (rescale) the side's weights a e_0 + b w_g are made here from the step's reduction pass, on the device."""

    def __init__(self, stages, weights, stage_calls, blends: dict):
        """``blends``: {stage: (a, b, guided)} of the stages with a side call."""
        self.calls, self.fills = {}, {}
        for k, (a, b, guided) in blends.items():
            row = weights.side_weights(k, a, b, guided)
            if isinstance(row, torch.Tensor):  # filled per run from the per-sample weights (capture-safe: in place)
                self.fills[k] = (row, a, b)
            n_preds = weights.n_preds(k) if guided else weights.K
            self.calls[k] = stage_calls.side_call(k, stages[k], n_preds, row)
        self.weights = weights
        self.stages = frozenset(self.calls)  # whose own calls drop their side

    def __call__(self, k: int, preds: list) -> list:
        call = self.calls.get(k)
        if call is not None:
            fill = self.fills.get(k)
            if fill is not None:
                row, a, b = fill
                torch.mul(self.weights.buffer, b, out=row)
                row[:, 0].add_(a)
            call(preds)
        return preds


def side_calls(guidance, stages, weights, stage_calls, merged, thresholds) -> SideCalls | None:
    """The side calls of a plan (None where no stage needs one): the stages with a side buffer and a side blend
    under guidance="cfg_pp". Outside the guidance interval g = p_null = the conditions' mean, and the side blend is
    (a + b) times it: no call of its own where that is the out row's (a + b = 1)."""
    if not guidance.guided or guidance.rule.name != "cfg_pp":
        return None
    blends = {}
    for k, st in enumerate(stages):
        if st.side is None or st.side_blend is None or st.corrector is not None:
            continue
        a, b = st.side_blend
        guided = guidance.guided_at(st.t)
        if guided or a + b != 1.0:
            blends[k] = (a, b, guided)
    if not blends:
        return None
    if merged is not None:  # (no method with per-sample rows has a side blend)
        raise ValueError("guidance='cfg_pp' with per-sample options: this method's CFG++ history is not per sample")
    if thresholds is not None and any(b != 0.0 for _, b, _ in blends.values()):
        raise ValueError("guidance='cfg_pp' on this method carries a guidance vector between its stages, which "
                         "dynamic thresholding / clip_sample would leave unthresholded: not supported together")
    return SideCalls(stages, weights, stage_calls, blends)


@dataclass(frozen=True)
class APG:
    """Adaptive projected guidance (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High
    Guidance Scales in Diffusion Models"; diffusers' AdaptiveProjectedGuidance): the update d = p_y - p_null,
    with ``momentum`` m its running average r = d + m r over the guided evaluations (diffusers'
    MomentumBuffer; None: r = d), scaled down per sample to norm at most ``norm_threshold`` (diffusers'
    adaptive_projected_guidance_rescale; 0: no limit), loses the part parallel to p_y but a fraction ``eta``:
    g = p_null + w (u - (1 - eta) proj_{p_y} u), u the scaled r (``original``: p_y + w (...)). Every norm and
    projection is a quadratic form of the Gram matrix of (p_null, p_y[, r]): per-sample weights; the running
    average is one more branch of the step, updated in place per guided evaluation."""

    eta: float = 1.0
    norm_threshold: float = 15.0
    momentum: float | None = None
    original: bool = False

    name: ClassVar[str] = "apg"
    needs_gram: ClassVar[bool] = True
    zero_init_steps: ClassVar[int] = 0

    def __post_init__(self):
        if not is_number(self.eta) or not math.isfinite(self.eta):
            raise ValueError(f"eta must be a finite number, got {self.eta!r}")
        if not is_number(self.norm_threshold) or not 0.0 <= self.norm_threshold < math.inf:
            raise ValueError(f"norm_threshold must be a finite number >= 0, got {self.norm_threshold!r}")
        if self.momentum is not None and (not is_number(self.momentum) or not math.isfinite(self.momentum)):
            raise ValueError(f"momentum must be None or a finite number, got {self.momentum!r}")
        _checks.flag("original", self.original)

    @property
    def running(self) -> bool:
        """Whether the update is a running average (one more branch: r)."""
        return self.momentum is not None

    def blend(self, gram: torch.Tensor, w: float):
        i = 3 if self.running else 2  # the update's index in the Gram matrix: r, or p_y - p_null
        q11 = gram[:, 2, 2]
        if self.running:
            norm2, along = gram[:, 3, 3], gram[:, 2, 3]
        else:
            norm2, along = gram[:, 1, 1] - 2.0 * gram[:, 1, 2] + q11, q11 - gram[:, 1, 2]
        if self.norm_threshold > 0:  # min(1, threshold / |u|); |u| = 0 gives inf, so 1
            s = torch.clamp(self.norm_threshold / norm2.clamp_min(0.0).sqrt(), max=1.0)
        else:
            s = torch.ones_like(q11)
        c = s * along / q11.clamp_min(1e-24)  # the scaled update's component along p_y / |p_y|^2
        a0, b0 = (0.0, 1.0) if self.original else (1.0, 0.0)
        if i == 3:  # g = a0 p_null + b0 p_y + w (s r - (1 - eta) c p_y)
            return a0, b0 - w * (1.0 - self.eta) * c, w * s
        return a0 - w * s, b0 + w * s - w * (1.0 - self.eta) * c


RULES = {rule.name: rule for rule in (CFG, CFGZeroStar, CFGPP, APG)}


def register_rule(rule):
    """Class decorator: a guidance rule usable as ``sample(guidance=rule.name)`` or as an object. A rule is a frozen
    dataclass with ``name``; ``needs_gram`` (whether its blend reads the branches' per-sample Gram matrix, one
    fused reduction pass per guided evaluation); ``zero_init_steps``; and ``blend(gram, w)`` -> the weights
    (a, b[, c]) of g = a p_null + b p_y [+ c r], numbers or per-sample [B] float64 tensors, from the Gram matrices
    [B, n+1, n+1] of (1, p_null, p_y[, r]) (docs/design.md, "Adding a guidance rule"). Optional: ``stage_rule(step)``
    -> the blend of a sampler step's evaluations (apg_mix); ``table_transform(path, prediction)`` -> a stage-table
    transform of its own, applied guided or not (epsilon_scaling)."""
    if not isinstance(getattr(rule, "name", None), str) or rule.name in RULES:
        raise ValueError(f"a guidance rule needs a new name, got {getattr(rule, 'name', None)!r}")
    if not callable(getattr(rule, "blend", None)):
        raise TypeError(f"guidance rule {rule.name!r} needs blend(gram, w)")
    RULES[rule.name] = rule
    return rule


def get_rule(guidance):
    """sample()'s ``guidance``: None (plain CFG), a rule's name (its defaults) or a rule object."""
    if guidance is None:
        return CFG()
    if isinstance(guidance, str):
        if guidance not in RULES:
            raise ValueError(f"guidance must be one of {', '.join(map(repr, RULES))} or a rule object, got {guidance!r}")
        return RULES[guidance]()
    if not isinstance(guidance, tuple(RULES.values())):
        raise TypeError(f"guidance must be a rule name or object (fastdiff.sampling.features.guidance.RULES), got "
                        f"{type(guidance).__name__}")
    return guidance


def branch_weights(gram: torch.Tensor, rule, w: float, phi: float, out: torch.Tensor,
                   target: torch.Tensor | None = None) -> torch.Tensor:
    """Writes the per-sample branch weights (w_0, w_1[, w_2]) of the step's blend w_0 p_null + Σ_j w_j (p_j - p_null)
    into ``out`` [B, n] float32, from the Gram matrices [B, n+1, n+1] of (1, p_null, p_y[, r]) (fastdiff.ops.sample_gram):
    the rule's blend g = Σ_i v_i p_i, then CFG rescale by phi (0: none) toward the standard deviation of p_y, or of
    Σ_i target_i p_i (a perturbed rule's p_c over several conditions; target [n] or [B, n]). A sample whose blend has
    zero variance keeps its scale."""
    # numbers become [B] tensors by fills (capture-safe under a CUDA graph, unlike a host-made tensor)
    v = torch.stack([c if isinstance(c, torch.Tensor) else torch.full_like(gram[:, 0, 0], c)
                     for c in rule.blend(gram, w)], dim=1)  # [B, n]
    if phi:
        n, sums, quad = gram[:, 0, 0], gram[:, 0, 1:], gram[:, 1:, 1:]
        if target is None:
            var_y = gram[:, 2, 2] - gram[:, 0, 2] * gram[:, 0, 2] / n
        else:
            # [n], or [B, n] per sample, on the device (made with the plan: a captured loop copies no host data)
            a = target.to(quad.dtype).expand(quad.shape[0], -1)
            sum_y = (a * sums).sum(1)
            var_y = torch.einsum("bi,bij,bj->b", a, quad, a) - sum_y * sum_y / n
        sum_g = (v * sums).sum(1)
        var_g = torch.einsum("bi,bij,bj->b", v, quad, v) - sum_g * sum_g / n
        ok = var_g > 0
        ratio = torch.where(ok, (var_y.clamp_min(0.0) / torch.where(ok, var_g, 1.0)).sqrt(), 1.0)
        v = v * (phi * ratio + (1.0 - phi))[:, None]
    out[:, 0].copy_(v.sum(1))
    out[:, 1:].copy_(v[:, 1:])
    return out


def rescale_reference(p_null: torch.Tensor, p_y: torch.Tensor, w: float, phi: float, g=None) -> torch.Tensor:
    """The specification (diffusers' rescale_noise_cfg of the blend ``g``, by default the CFG blend), float64."""
    p_null, p_y = p_null.double(), p_y.double()
    g = p_null + w * (p_y - p_null) if g is None else g.double()
    dims = list(range(1, g.dim()))
    rescaled = g * (p_y.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * g


def apg_reference(p_null: torch.Tensor, p_y: torch.Tensor, w: float, rule: "APG", update=None) -> torch.Tensor:
    """The specification of APG's blend (diffusers' normalized_guidance), float64; ``update``: the running
    average r (momentum), else p_y - p_null."""
    p_null, p_y = p_null.double(), p_y.double()
    dims = list(range(1, p_y.dim()))
    u = p_y - p_null if update is None else update.double()
    if rule.norm_threshold > 0:
        u = u * torch.clamp(rule.norm_threshold / u.norm(p=2, dim=dims, keepdim=True), max=1.0)
    unit = p_y / p_y.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)
    parallel = (u * unit).sum(dim=dims, keepdim=True) * unit
    update = (u - parallel) + rule.eta * parallel
    return (p_y if rule.original else p_null) + w * update


def zero_star_reference(p_null: torch.Tensor, p_y: torch.Tensor, w: float, eps: float = 1e-8) -> torch.Tensor:
    """The specification of CFG-Zero*'s blend (diffusers' cfg_zero_star_scale and forward), float64."""
    p_null, p_y = p_null.double(), p_y.double()
    flat_null, flat_y = p_null.flatten(1), p_y.flatten(1)
    alpha = (flat_y * flat_null).sum(1) / ((flat_null * flat_null).sum(1) + eps)
    scaled = p_null * alpha.view(-1, *([1] * (p_null.dim() - 1)))
    return scaled + w * (p_y - scaled)
