"""Editing with the sampler (docs/guidance.md, "Editing"): starting from data instead of noise.

- img2img / SDEdit (Meng et al. 2022; diffusers' ``strength``): ``sample(init=x, strength=s)`` runs the last
  ``int(steps * s)`` steps of the grid, from the data noised to the first of them through the path,
  x = alpha_t init + beta_t z, z the sample's initial noise (stream 0): one fused sampler_step call.
- Inpainting (``sample(init=x, known_mask=m)``): after every step the known region (m true) is re-imposed at the
  step's end time t', x <- alpha_t' init + beta_t' xi_i there (a fresh draw per step), so at t = 1 it is the
  known data exactly. Plain replacement conditions the unknown region only loosely (the score_sde imputation
  bias); ``resample=r`` (RePaint, Lugmayr et al. 2022, jump length 1) repeats each step r times, going back to
  its start time through the path's forward transition, x_t = (alpha_t / alpha_t') x_t' + sqrt(beta_t^2 -
  (alpha_t beta_t' / alpha_t')^2) xi, which lets the unknown region agree with the known one.
- Inversion (``fastdiff.invert``): a decreasing grid integrates the probability-flow ODE from data to noise with
  any method registered with ``inverts=True`` (DDIM inversion is method="ddim").

Noise: every draw is a pure function of (seed, stream); the editing draws use stream ids
2^31 + ((repeat * 8 + slot) << 17) + step (docs/design.md §3): slots 0-3 the method's own draws in repeats >= 1,
slot 4 the known region's noise, slot 5 RePaint's way back.
"""

from __future__ import annotations

import math

import torch

from fastdiff import _checks

from fastdiff.ops.sampler_step import sampler_step
from fastdiff.sampling.core.arguments import is_number

STREAM_BASE = 1 << 31
MAX_RESAMPLE = 1024  # repeats * 8 + slot < 2^14 keeps the ids below 2^32 for steps < 2^17 (MAX_STEPS = 10^5)
KNOWN_SLOT, BACK_SLOT = 4, 5


def edit_stream(step: int, repeat: int, slot: int) -> int:
    """The stream id of an editing draw: ``slot`` of repeat ``repeat`` of step ``step`` (module docstring)."""
    if not 0 <= step < 1 << 17 or not 0 <= repeat < MAX_RESAMPLE or not 0 <= slot < 8:
        raise ValueError(f"edit_stream: step < 2^17, repeat < {MAX_RESAMPLE}, slot < 8; got {step}, {repeat}, {slot}")
    return STREAM_BASE + ((repeat * 8 + slot) << 17) + step


def strength_grid(grid: list[float], strength) -> list[float]:
    """The grid's last int(steps * strength) steps (diffusers' img2img rule), ``grid`` itself for None."""
    if strength is None:
        return grid
    if not is_number(strength) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    steps = len(grid) - 1
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(f"strength={strength} runs int({steps} * {strength}) = 0 of the {steps} steps: raise steps or "
                         "strength")
    return grid[steps - run:]


def check_direction(grid: list[float], record, values: dict, step_noise, stages=None) -> None:
    """A decreasing grid (inversion) needs a method registered with inverts=True and no noise: checked on the
    options before the stage table is built (``stages`` None), and on the table after."""
    if grid[0] < grid[-1]:
        return
    if not record.inverts:
        from fastdiff.sampling.methods.registry import methods

        takers = ", ".join(m.name for m in methods() if m.inverts)
        raise ValueError(f"a decreasing grid (inversion) needs a method that inverts ({takers}); got "
                         f"method={record.name!r}")
    if stages is None:
        noisy = any(values.get("sigma") or ()) or bool(values.get("eta")) or bool(values.get("s_churn"))
    else:
        noisy = any(st.streams() or st.start_churn for st in stages)
    if noisy or step_noise is not None:
        raise ValueError("a decreasing grid (inversion) integrates the probability-flow ODE: the method must be "
                         "deterministic (no sigma, eta, churn or step_noise)")


def _mask(known_mask, x_shape: tuple, device) -> torch.Tensor:
    if not isinstance(known_mask, torch.Tensor):
        raise TypeError(f"known_mask must be a tensor (true where init is known), got {type(known_mask).__name__}")
    m = known_mask.to(device)
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("known_mask must be bool, or hold only 0 and 1 (1: known)")
        m = m == 1
    try:
        shape = torch.broadcast_shapes(m.shape, x_shape)
    except RuntimeError:
        shape = None
    if shape != torch.Size(x_shape):  # it must broadcast to the samples without growing them
        raise ValueError(f"known_mask of shape {tuple(m.shape)} does not broadcast to the samples {x_shape}")
    return m


def editing(init, strength, known_mask, resample: int, noise, x_shape: tuple, device) -> "Editing | None":
    """sample()'s editing arguments as an Editing, or None (no init)."""
    resample = _checks.count("resample", resample, least=1, most=MAX_RESAMPLE)
    if init is None:
        if strength is not None or known_mask is not None:
            raise ValueError("strength and known_mask edit init: give init (the data to start from)")
        if resample != 1:
            raise ValueError("resample (RePaint) applies to inpainting: give init and known_mask")
        return None
    if strength is None and known_mask is None:
        raise ValueError("init needs strength (img2img / SDEdit: how much of the grid to run from init noised) or "
                         "known_mask (inpainting: where init is kept); to start from a given state, pass it as noise")
    return Editing(init, strength, known_mask, resample, noise, x_shape, device)


class Editing:
    """The editing part of one sample() call: the initial state from ``init``, the known region's re-imposition
    and RePaint's repeats."""

    def __init__(self, init, strength, known_mask, resample: int, noise, x_shape: tuple, device):
        if not isinstance(init, torch.Tensor) or not init.is_floating_point():
            raise TypeError("init must be a floating-point tensor [B, *shape] (the data to start from)")
        if tuple(init.shape) != tuple(x_shape):
            raise ValueError(f"init has shape {tuple(init.shape)}, expected the samples' {tuple(x_shape)}")
        if noise is not None:
            raise ValueError("give init (editing: the start is init noised through the path) or noise, not both")
        if resample > 1 and known_mask is None:
            raise ValueError("resample (RePaint) applies to inpainting: give known_mask")
        self.init = init.to(device=device, dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(self.init).all()):
            raise ValueError("init holds inf or NaN")
        self.strength, self.resample = strength, resample
        self.mask = None if known_mask is None else _mask(known_mask, tuple(x_shape), device)
        self.known = torch.empty_like(self.init) if self.mask is not None else None  # the known region at t'

    def own(self) -> None:
        """init and the mask as tensors of this call's own (a captured loop reads them by address: the caller's
        tensors may die, and a later call's are copied into these)."""
        self.init = self.init.clone()
        if self.mask is not None:
            self.mask = self.mask.clone()

    def check(self, grid: list[float], stages) -> None:
        if grid[0] > grid[-1]:
            raise ValueError("init edits a sampling run (increasing grid); to invert data, use fastdiff.invert")
        if self.resample > 1 and multistep(stages):
            raise ValueError("resample (RePaint) repeats each step from its start, but a multistep method (dpmpp_2m, "
                             "unipc, lms, ...) also reads the earlier steps' predictions, which a repeat would mix "
                             "with its own: use a method whose steps stand alone (euler, heun, ddim, dpm_2, "
                             "euler_ancestral, dpmpp_sde, ...)")

    def _noised(self, t: float, path, seeds, stream: int, out: torch.Tensor, backend: str) -> torch.Tensor:
        """out = alpha_t init + beta_t xi(stream): one fused pass (init itself where beta_t = 0)."""
        alpha, beta = path.coefficients(t)[:2]
        sampler_step(self.init, [self.init], weights=[1.0], coeffs=[alpha, 0.0, beta, 0.0, 0.0, 0.0], seeds=seeds,
                     streams=[stream], outs=[out], backend=backend)
        return out

    def start(self, path, t0: float, seeds, backend: str) -> torch.Tensor:
        """The initial state: init noised to t0 with the sample's initial noise (stream 0); without strength
        (inpainting from noise) that only in the known region, beta_t0 z elsewhere."""
        x = self._noised(t0, path, seeds, 0, torch.empty_like(self.init), backend)
        if self.strength is None:
            beta0 = path.coefficients(t0)[1]
            z = sampler_step(self.init, [self.init], weights=[1.0], coeffs=[0.0, 0.0, beta0, 0.0, 0.0, 0.0],
                             seeds=seeds, streams=[0], outs=[torch.empty_like(self.init)], backend=backend)
            x = torch.where(self.mask, x, z)
        return x

    def repeat_calls(self, calls: list, free: list, stages) -> list:
        """Per repeat r (>= 1) of a step, its stages' prepared calls (``free``: without a step-noise buffer)
        with their draws on the editing streams."""
        from fastdiff.sampling.core.calls import STREAMS, with_streams

        out = [calls]
        for r in range(1, self.resample):
            out.append([with_streams(call, [edit_stream(st.step, r, d) for d in range(len(call.args[STREAMS]))])
                        for call, st in zip(free, stages)])
        return out

    def plan(self, plan, path, backend: str, free_calls=None) -> None:
        """RePaint's repeated calls, and the after-repeat hook: the known region re-imposed, the way back."""
        stages, grid, last = plan.stages, plan.grid, len(plan.stages) - 1
        if self.resample > 1:
            plan.calls = self.repeat_calls(plan.calls[0], free_calls or plan.calls[0], stages)

        def after_repeat(k: int, repeat: int) -> None:
            i = stages[k].step
            self.after_step(i, repeat, grid[i], grid[i + 1], path, plan.seeds, plan.result if k == last else plan.x,
                            plan.x_outs, backend)

        plan.add("after_repeat", after_repeat)

    def after_step(self, step: int, repeat: int, t: float, t1: float, path, seeds, src, x_outs, backend: str):
        """After step ``step`` (t -> t1) wrote ``src``: the known region re-imposed at t1 in every output, then,
        before a further repeat, the way back to t (RePaint)."""
        if self.mask is not None:
            known = self._noised(t1, path, seeds, edit_stream(step, repeat, KNOWN_SLOT), self.known, backend)
            for o in x_outs[1:] + [src]:  # the twins first: they read src before it is overwritten
                torch.where(self.mask, known, src, out=o)
        if repeat + 1 < self.resample:
            (a, b), (a1, b1) = path.coefficients(t)[:2], path.coefficients(t1)[:2]
            scale = a / a1
            sd = math.sqrt(max(b * b - (scale * b1) ** 2, 0.0))
            sampler_step(src, [src], weights=[1.0], coeffs=[scale, 0.0, sd, 0.0, 0.0, 0.0], seeds=seeds,
                         streams=[edit_stream(step, repeat, BACK_SLOT)], outs=list(x_outs), backend=backend)


def multistep(stages) -> bool:
    """Whether a stage reads a buffer that no earlier stage of its own step wrote: a multistep history (the
    buffers a feature refills at every stage, the classifier's gradient and the step noise, are not)."""
    from fastdiff.sampling.features.classifier import BUFFER

    written, step = set(), None
    for st in stages:
        if st.step != step:
            written, step = set(), st.step
        if any(h not in written and h not in ("x", BUFFER, "noise") for h in st.history_buffers()):
            return True
        written.update(b for b in (st.out, st.side) if b is not None)
    return False


__all__ = ["Editing", "edit_stream", "editing", "multistep", "strength_grid"]
