"""Guidance by a perturbed forward (docs/guidance.md, "Perturbed guidance"): the caller's second callable
``sample(..., perturbed_model=fn)``, fn(x, t, y) with the model's signature, gives one more prediction of the
conditional input, and the step blends it with the others, fused (fastdiff.ops.sampler_step's branch weights).

- PAG / SLG / SEG (diffusers' PerturbedAttentionGuidance, SkipLayerGuidance, SmoothedEnergyGuidance): fn is the
  same network with its attention scores, some layers or the attention energy perturbed (the caller's wrapper or
  ``functools.partial`` reading a flag: fastdiff never touches the network). With p_s the perturbed prediction,
  g = p_null + w (p_y - p_null) + s (p_y - p_s), s the rule's scale inside its window of steps
  (diffusers': step i of N is perturbed when int(start N) < i < int(stop N) and s != 0); where CFG is off (cfg = 1,
  outside guidance_interval) g = p_s + s (p_y - p_s), and where neither applies g = p_y (one call).
  ``use_original_formulation``: p_y instead of p_null (resp. p_s) as the base of the blend.
- AutoGuidance (Karras et al. 2024; diffusers' AutoGuidance): fn is a weaker model, and it takes the place of the
  unconditional branch, g = p_weak + w (p_y - p_weak) with w = cfg, both on the conditional labels (the paper's
  D_0(x | c); diffusers feeds its layer-dropped model the unconditional batch: a caller who wants that passes
  ``lambda x, t, y: weak(x, t, null)``); no null_y and no unconditional call.

Each blend is a fixed combination of the branches, so the kernel weights are host numbers per stage; with
guidance_rescale they are per sample from one reduction pass over the stage's predictions (diffusers rescales the
blend toward p_y's standard deviation). The perturbed call is its own call of B samples (another callable):
fastdiff.sampling.core.model_calls.ModelCalls makes it inside evaluate(), after the model's own call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fastdiff import _checks
from fastdiff.sampling.core.arguments import is_number
from fastdiff.sampling.features.guidance import CFG, branch_weights, register_rule
from fastdiff.sampling.features.guidance_weights import StageWeights


class _Window:
    """Shared by PAG, SLG and SEG: a scale s and diffusers' window (start, stop) of steps, as fractions of the
    steps; ``_options`` names the three in the peer's spelling."""

    _options: ClassVar[tuple[str, str, str]]
    needs_gram: ClassVar[bool] = False  # host weights (rescale: per sample, from the perturbed module's own pass)
    zero_init_steps: ClassVar[int] = 0
    replaces_null: ClassVar[bool] = False  # the perturbed prediction is a third branch

    def __post_init__(self):
        scale, start, stop = self._options
        s, a, b = (getattr(self, n) for n in self._options)
        if not is_number(s) or not math.isfinite(s):
            raise ValueError(f"{scale} must be a finite number, got {s!r}")
        if not is_number(a) or not 0.0 <= a < 1.0:
            raise ValueError(f"{start} must be a number in [0, 1), got {a!r}")
        if not is_number(b) or not a <= b <= 1.0:
            raise ValueError(f"{stop} must be a number in [{start}, 1], got {b!r}")
        _checks.flag("use_original_formulation", self.use_original_formulation)

    @property
    def scale(self) -> float:
        return float(getattr(self, self._options[0]))

    def active(self, i: int, n: int) -> bool:
        """Whether step i of n has the perturbed branch (diffusers' _is_slg_enabled: strict at both ends)."""
        _, a, b = (getattr(self, name) for name in self._options)
        return int(a * n) < i < int(b * n) and not math.isclose(self.scale, 0.0)

    def blend(self, gram: torch.Tensor, w: float):
        """CFG's (the stages' weights are :class:`PerturbedWeights`' own)."""
        return 1.0 - w, w

    def bind_call(self, guidance, a) -> None:
        bind_perturbed(self, guidance, a)

    def stage_weights(self, guidance, stages, B: int, device, merged=None) -> "PerturbedWeights":
        return PerturbedWeights(self, guidance, stages, B, device, merged)


@register_rule
@dataclass(frozen=True)
class PAG(_Window):
    """Perturbed-attention guidance (Ahn et al. 2024; diffusers' PerturbedAttentionGuidance): ``perturbed_model``
    is the network with identity attention maps in the chosen layers."""

    perturbed_guidance_scale: float = 2.8
    perturbed_guidance_start: float = 0.01
    perturbed_guidance_stop: float = 0.2
    use_original_formulation: bool = False

    name: ClassVar[str] = "pag"
    _options: ClassVar = ("perturbed_guidance_scale", "perturbed_guidance_start", "perturbed_guidance_stop")


@register_rule
@dataclass(frozen=True)
class SLG(_Window):
    """Skip-layer guidance (Stability AI's SD 3.5; diffusers' SkipLayerGuidance): ``perturbed_model`` is the
    network with some layers skipped (diffusers' defaults: SD 3.5 Medium's)."""

    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01
    skip_layer_guidance_stop: float = 0.2
    use_original_formulation: bool = False

    name: ClassVar[str] = "slg"
    _options: ClassVar = ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop")


@register_rule
@dataclass(frozen=True)
class SEG(_Window):
    """Smoothed-energy guidance (Hong 2024; diffusers' SmoothedEnergyGuidance): ``perturbed_model`` is the network
    with its attention queries blurred (the blur's sigma is the caller's model's business)."""

    seg_guidance_scale: float = 2.8
    seg_guidance_start: float = 0.0
    seg_guidance_stop: float = 1.0
    use_original_formulation: bool = False

    name: ClassVar[str] = "seg"
    _options: ClassVar = ("seg_guidance_scale", "seg_guidance_start", "seg_guidance_stop")


@register_rule
@dataclass(frozen=True)
class AutoGuidance:
    """AutoGuidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"; diffusers'
    AutoGuidance): ``perturbed_model`` is a weaker model, in place of the unconditional branch, with scale cfg."""

    use_original_formulation: bool = False

    name: ClassVar[str] = "autoguidance"
    needs_gram: ClassVar[bool] = False
    zero_init_steps: ClassVar[int] = 0
    replaces_null: ClassVar[bool] = True

    def __post_init__(self):
        _checks.flag("use_original_formulation", self.use_original_formulation)

    def blend(self, gram: torch.Tensor, w: float):
        return 1.0 - w, w

    def bind_call(self, guidance, a) -> None:
        bind_perturbed(self, guidance, a)

    def stage_weights(self, guidance, stages, B: int, device, merged=None) -> "PerturbedWeights":
        return PerturbedWeights(self, guidance, stages, B, device, merged)


PERTURBED_RULES = ("pag", "slg", "seg", "autoguidance")
# the most conditions with a perturbed rule, by replaces_null: 2K + 1 predictions (PAG, SLG, SEG) or 2K
# (AutoGuidance) within the step's 8
MAX_PERTURBED_CONDITIONS = {False: 3, True: 4}


@dataclass(frozen=True)
class PerturbedBranch:
    """A call's perturbed branch: the callable and whether cfg asked for guidance (AutoGuidance's scale)."""

    model: object
    guided: bool


def bind_perturbed(rule, guidance, a) -> None:
    """The checks of a perturbed rule on sample()'s arguments ``a``, and the branch on ``guidance``
    (fastdiff.sampling.features.conditions.Guidance). AutoGuidance has no unconditional branch: the call is unguided
    in CFG's sense (no null_y, one model call of B) and the weak model's prediction is its base."""
    model = getattr(a, "perturbed_model", None)
    if model is None:
        raise ValueError(f"guidance={rule.name!r} needs perturbed_model: a callable perturbed_model(x, t, y) with the "
                         "model's signature (the perturbed network, or a weaker model for 'autoguidance')")
    if not callable(model):
        raise TypeError(f"perturbed_model must be callable as perturbed_model(x, t, y), got {type(model).__name__}")
    K = len(guidance.conditions) if guidance.conditions is not None else 1
    if K > MAX_PERTURBED_CONDITIONS[rule.replaces_null]:
        most = MAX_PERTURBED_CONDITIONS[rule.replaces_null]
        raise ValueError(f"guidance={rule.name!r} with {K} conditions: at most {most} (each condition has its "
                         f"perturbed prediction: {'2K' if rule.replaces_null else '2K + 1'} predictions, the step's "
                         "limit is 8)")
    if rule.replaces_null and not guidance.guided and guidance.rescale:
        raise ValueError("guidance_rescale applies to guided sampling: give cfg != 1 (AutoGuidance's scale)")
    guidance.perturbed = PerturbedBranch(model, guidance.guided)
    if rule.replaces_null:
        guidance.guided = False


class _Fixed:
    """A blend of fixed branch coefficients v (g = Σ v_i p_i), for branch_weights' rescale."""

    def __init__(self, v: tuple):
        self.v = v

    def blend(self, gram, w):
        return self.v


def _condition_weights(guidance, t: float) -> tuple[tuple, tuple]:
    """(w_k, a_k) at time t: the conditions' weights and their shares a_k = w_k / W of the weighted mean p_c
    (fastdiff.sampling.features.conditions); one condition: ((w,), (1,))."""
    w = guidance.scale_at(t)
    if not isinstance(w, tuple):
        return (w,), (1.0,)
    W = sum(w)
    if not math.isfinite(W) or W == 0.0:
        raise ValueError(f"the condition weights {w} sum to {W} at t={t:.6g}: a perturbed rule acts on their weighted "
                         "mean p_c (its perturbed branch is p_c's), which needs a finite non-zero sum")
    return w, tuple(wk / W for wk in w)


def stage_layout(rule, guidance, st, i: int, n: int, t: float | None = None) -> tuple[tuple | None, bool, int]:
    """Stage ``st`` (step i of n): (its kernel weights over its predictions, or None for one; whether it calls the
    perturbed model; the index of its first condition's prediction); the weights at time ``t`` (a sample's own
    under per-sample churn; default the stage's), the layout (guided, perturbed) the stage's. Each blend is
    g = Σ c_j q_j over the predictions q in the stage's order, the kernel's weights (Σ c = 1, c_1, ...): with the
    conditions' weights w_k,
    a_k = w_k / W, p_c = Σ a_k p_k and p̃_c = Σ a_k p̃_k (the perturbed predictions of each condition, ComfyUI's
    combined conditioning through the perturbed forward), b = 1 with use_original_formulation (p_c the base), else 0:

    - CFG and the perturbed branch, (p_null, p_1..p_K, p̃_1..p̃_K): g = (1 − b) p_null + b p_c + Σ w_k (p_k − p_null)
      + s (p_c − p̃_c); one condition: (1, w + s, −s) over (p_null, p_y, p_s);
    - the perturbed branch alone, (p̃_1..p̃_K, p_1..p_K): g = (1 − b) p̃_c + b p_c + s (p_c − p̃_c); AutoGuidance,
      its weak model's p̃ in place of p_null: g = (1 − b) p̃_c + b p_c + Σ w_k (p_k − p̃_k);
    - CFG alone, (p_null, p_1..p_K); neither, (p_1..p_K): p_c (one condition: one prediction, None)."""
    w, a = _condition_weights(guidance, st.t if t is None else t)
    b = 1.0 if rule.use_original_formulation else 0.0
    K = len(w)
    if rule.replaces_null:
        s = None  # AutoGuidance: the weak model guides where CFG would
        perturbed = guidance.perturbed.guided and (guidance.interval is None or
                                                  guidance.interval[0] <= st.t <= guidance.interval[1])
        cfg_on = False
    else:
        s = rule.scale if rule.active(i, n) else None
        perturbed, cfg_on = s is not None, guidance.guided_at(st.t)
    if cfg_on:
        W = sum(w)
        c = [1.0 - b - W] + [b * ak + wk + (0.0 if s is None else s * ak) for wk, ak in zip(w, a)]
        c += [] if s is None else [-s * ak for ak in a]
        first = 1
    elif perturbed and rule.replaces_null:
        c = [(1.0 - b) * ak - wk for wk, ak in zip(w, a)] + [b * ak + wk for wk, ak in zip(w, a)]
        first = K
    elif perturbed:
        c = [(1.0 - b - s) * ak for ak in a] + [(b + s) * ak for ak in a]
        first = K
    else:
        c, first = list(a), 0
    return (None if len(c) == 1 else (1.0, *c[1:])), perturbed, first


def stage_rows(rule, guidance, stages) -> list:
    """Each stage's kernel weights over its predictions, or None for one prediction (:func:`stage_layout`)."""
    return [layout[0] for layout in _layouts(rule, guidance, stages)]


def _layouts(rule, guidance, stages, times=None) -> list:
    order = {s: i for i, s in enumerate(sorted({st.step for st in stages}))}
    return [stage_layout(rule, guidance, st, order[st.step], len(order), None if times is None else times[k])
            for k, st in enumerate(stages)]


def _target(layout, shares) -> list[float]:
    """The shares of p_c over a stage's predictions (zeros but at its conditions')."""
    row, _, first = layout
    return [0.0] * first + list(shares) + [0.0] * (len(row) - first - len(shares))


class PerturbedWeights(StageWeights):
    """The branch weights of a perturbed rule (:func:`stage_layout`): host numbers per stage, or with rescale one
    [B, n] buffer per prediction count n, rewritten before each stage's step from one reduction pass."""

    def __init__(self, rule, guidance, stages, B: int, device, merged=None):
        layouts = _layouts(rule, guidance, stages)
        self.rows = [lay[0] for lay in layouts]
        scales = [guidance.scale_at(st.t) for st in stages]
        super().__init__(CFG(), 0.0, scales, [False] * len(stages), guidance.guided, B, device,
                         guided_at=[guidance.guided_at(st.t) for st in stages])
        self.rule, self.phi = rule, guidance.rescale
        self.perturbed_at = [lay[1] for lay in layouts]
        self.layouts = ["one" if r is None else ("cfg" if g else "conditions") if not p else "cfg+p" if g else "p"
                        for r, p, g in zip(self.rows, self.perturbed_at, self.guided_at)]
        self.per_sample = bool(self.phi) and any(r is not None for r in self.rows)
        self.buffers = {len(r): torch.ones((B, len(r)), dtype=torch.float32, device=device)
                        for r in self.rows if r is not None} if self.per_sample else {}
        # each stage's blend g = Σ c_i p_i (c: [n] numbers, or [B, n] per sample), its rescale target p_c's shares
        full = [None if r is None else (r[0] - sum(r[1:]), *r[1:]) for r in self.rows]
        targets = [None if lay[0] is None else _target(lay, _condition_weights(guidance, st.t)[1])
                   for lay, st in zip(layouts, stages)]
        # churn per sample: the samples' own times give a schedule's scales per sample (the stage's layout kept)
        self.sample_rows = {}  # stage -> [B, n] float32 kernel weights
        if merged is not None:
            per_table = [_layouts(rule, guidance, stages, [st.t for st in table]) for table in merged.tables]
            index = torch.tensor(merged.index)
            for k, r in enumerate(self.rows):
                if r is None or all(lays[k][0] == r for lays in per_table):
                    continue
                rows = torch.tensor([lays[k][0] for lays in per_table], dtype=torch.float64)[index]
                self.sample_rows[k] = rows.float().to(device)
                full[k] = torch.cat([rows[:, :1] - rows[:, 1:].sum(1, keepdim=True), rows[:, 1:]], 1).to(device)
                targets[k] = torch.tensor([_target(lays[k], _condition_weights(guidance, table[k].t)[1])
                                           for lays, table in zip(per_table, merged.tables)],
                                          dtype=torch.float64)[index]
        self.blends = [None if c is None else _Fixed(tuple(c.unbind(1)) if isinstance(c, torch.Tensor) else c)
                       for c in full]
        # the rescale's target p_c (one condition: the second prediction, branch_weights' default)
        self.targets = [None if self.K == 1 or not self.per_sample or a is None else
                        torch.as_tensor(a, dtype=torch.float64).to(device) for a in targets]
        self.key = (tuple(self.rows), self.phi, rule, tuple(sorted(self.sample_rows)))

    def branched(self, k: int) -> bool:
        return self.rows[k] is not None

    def n_preds(self, k: int) -> int:
        return 1 if self.rows[k] is None else len(self.rows[k])

    def row(self, k: int, two_branch: bool):
        r = self.rows[k]
        if r is None or not two_branch:
            return None
        return self.buffers[len(r)] if self.per_sample else self.sample_rows.get(k, list(r))

    def update(self, k: int, preds: list, backend: str) -> list:
        if self.rows[k] is not None and len(preds) > 1:
            branch_weights(self._gram(preds, backend=backend), self.blends[k], 0.0, self.phi,
                           self.buffers[len(preds)], target=self.targets[k])
        return preds

    def host_blend(self, k: int, preds: list) -> bool:
        return self.rows[k] is None or (self.layouts[k] == "cfg" and not self.rule.use_original_formulation
                                        and not self.per_sample and self.K == 1 and k not in self.sample_rows)

    def blend(self, k: int, preds: list) -> torch.Tensor:
        if len(preds) == 1:
            return preds[0].float()
        per = (preds[0].shape[0], *([1] * (preds[0].dim() - 1)))
        r = self.rows[k]
        rows = self.buffers[len(r)] if self.per_sample else self.sample_rows.get(k)
        weights = r if rows is None else [rows[:, j].view(per) for j in range(len(r))]
        p0 = preds[0].float()
        g = weights[0] * p0
        for wj, p in zip(weights[1:], preds[1:]):
            g = g + wj * (p.float() - p0)
        return g


def perturbed_reference(p_uncond, p_cond, p_perturbed, w: float, s: float | None, original: bool = False,
                        cfg: bool = True) -> torch.Tensor:
    """The specification of the PAG / SLG / SEG blend, float64: ``cfg`` whether the unconditional branch is on, ``s``
    the perturbed scale (None: off); AutoGuidance is ``cfg=False`` with the weak prediction as ``p_perturbed`` and
    s = w."""
    c = p_cond.double()
    if s is None and not cfg:
        return c
    if not cfg:
        p = p_perturbed.double()
        return (c if original else p) + s * (c - p)
    u = p_uncond.double()
    g = (c if original else u) + w * (c - u)
    return g if s is None else g + s * (c - p_perturbed.double())
