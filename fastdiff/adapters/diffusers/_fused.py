"""What the fused schedulers share: per-sample seeds, the step's noise stream, the step's inputs, and the direct call
of the step kernel.

``step`` runs once per model call. Through the general entry points (``fastdiff.ops.guided_step`` /
``sampler_step``) a pipeline loop's step cost 92-430 us at batch 1 against diffusers' 82-290 (Euler 170 vs 85;
bench/results/amd-epyc-20261206-latency-before.md), of which the kernel is ~5 us: the rest was the entry points'
per-call checks (each coefficient; each tensor's shape, dtype, device, overlap), the backend resolved through
os.environ, a torch.zeros of seeds, and the schedule read from tensors (``float(self.sigmas[i].double())``: 3
torch ops per number). So the schedule's numbers are read once per schedule (:meth:`_FusedStep._sigma_schedule`),
each step's coefficient rows computed and checked once per schedule and kept with it, the kernel resolved once
per run (fastdiff.sampling.core.calls.direct_kernel), and a step whose inputs are what the kernel takes (a few
metadata comparisons) calls it directly with the rows (bench/results/amd-epyc-20261206-latency-adapters.md).
Anything else takes the general path, whose checks name the problem. The results are the general path's bit for
bit (the same kernel, the same coefficients; tests/test_adapter_diffusers.py).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from types import SimpleNamespace
from typing import Sequence, Union

import torch

from fastdiff import _checks
from fastdiff import dispatch as _dispatch
from fastdiff.ops.sampler_step import round_f32, sampler_step
from fastdiff.sampling.core.calls import direct_kernel
from fastdiff.sampling.features.thresholding import DynamicThresholding

Seeds = Union[int, Sequence[int], torch.Tensor]
F32_MAX = _checks.FLOAT32_MAX
ONE_BRANCH = [1.0]  # the branch weights of a step on one model output
MAX_SCHEDULES = 2  # schedules whose rows a scheduler keeps (a pipeline re-runs the same one: set_timesteps each run)


def checked_rows(rows: list) -> bool:
    """Whether every coefficient passes sampler_step's check (a finite float within float32's range); if not, the
    step takes the general path, whose error names the coefficient."""
    for c in rows:
        if c.__class__ is not float or not -F32_MAX <= c <= F32_MAX:
            return False
    return True


class _FusedStep:
    """Per-sample seeds and the fused affine update shared by the schedulers."""

    _fd_seed: Seeds = 0

    def set_seeds(self, seeds: Seeds) -> None:
        """Per-sample noise seeds: an int (sample b uses seeds + b) or one seed per sample."""
        self._fd_seed = seeds

    def _seeds_for(self, batch: int, device) -> torch.Tensor:
        s = self._fd_seed
        memo = self.__dict__.get("_fd_seeds_memo")
        state = _seeds_state(s)
        if memo is not None and memo[0] is s and memo[1] == batch and memo[2] == device and memo[3] == state:
            return memo[4]
        if isinstance(s, int) and not isinstance(s, bool):
            s = [s + b for b in range(batch)]  # as fastdiff.sample's seed=int
        t = _checks.seeds_tensor(s, device, name="seeds")
        if t.shape[0] != batch:
            raise ValueError(f"seeds holds {t.shape[0]} per-sample seeds but the batch has {batch} samples")
        self._fd_seeds_memo = (self._fd_seed, batch, device, state, t)
        return t

    def _stream(self, timestep) -> int:
        """1 + the index of ``timestep`` in ``self.timesteps`` (the step's noise stream)."""
        streams = self.__dict__.get("_fd_timesteps")  # (not getattr: diffusers' __getattr__ costs ~1 us a miss)
        if streams is None:
            streams = self._fd_timesteps = {}
            for i, v in enumerate(self.timesteps.tolist()):
                streams.setdefault(float(v), 1 + i)  # (the first, as list.index)
        stream = streams.get(float(timestep))
        if stream is None:
            raise ValueError(f"timestep {timestep} is not one of scheduler.timesteps (call set_timesteps first)")
        return stream

    @staticmethod
    def _inputs(model_output, sample):
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample has {tuple(sample.shape)}")
        x = sample if sample.dtype is torch.float32 and sample.is_contiguous() else \
            sample.to(torch.float32).contiguous()
        g = model_output if model_output.is_contiguous() else model_output.contiguous()
        if g.dtype not in _checks.PRED_DTYPES:
            g = g.to(torch.float32)
        return x, g

    def _sigma_schedule(self) -> SimpleNamespace:
        """self.sigmas as float64 host numbers (``schedule.sigmas``) and what the steps compute once per schedule
        (``schedule.rows``: each step's coefficient rows), read once per schedule: float(self.sigmas[i].double())
        per step costs 3 torch ops per number. The rows stay with the schedule's values (a pipeline's
        set_timesteps makes new tensors of the same values each run) and the config."""
        sigmas, config = self.sigmas, self.config
        last = self.__dict__.get("_fd_last_schedule")  # (not getattr: diffusers' __getattr__ costs ~1 us a miss)
        if last is not None and last[0] is sigmas and last[1] == sigmas._version and last[2] is config:
            return last[3]
        values = tuple(sigmas.double().tolist())
        kept = self.__dict__.setdefault("_fd_schedules", OrderedDict())
        schedule = kept.pop(values, None)
        if schedule is None or schedule.config is not config:
            schedule = SimpleNamespace(sigmas=list(values), rows={}, config=config)
        kept[values] = schedule
        while len(kept) > MAX_SCHEDULES:
            kept.popitem(last=False)
        self._fd_last_schedule = (sigmas, sigmas._version, config, schedule)
        return schedule

    def _fused_step(self, x, g, rows: list, checked: bool, history=(), seeds=None, streams=(), side=None, clip=None):
        """sampler_step(x, [g], history=history, coeffs=rows, seeds=seeds, streams=streams, side=side, clip=clip) into
        a new tensor, returned. ``checked``: the rows (and the clip) passed the kernel's checks (:func:`checked_rows`,
        :func:`clip_of`; else the general path checks them)."""
        out = torch.empty_like(x)
        device = x.device
        if checked and g.device == device and (not history or _like(history, x)) and not (
                torch.is_grad_enabled() and (x.requires_grad or g.requires_grad)):
            run = self.__dict__.get("_fd_run")
            if run is None or run[0] is not self.timesteps or run[1] != device or run[4] != x.shape[0]:
                run = self._resolve(x)
            if run[2] is not None:
                if clip is None:
                    run[2](x, [g], history, run[3] if seeds is None else seeds, streams, ONE_BRANCH, rows, None, None,
                           [out], side, None)
                else:
                    run[2](x, [g], history, run[3] if seeds is None else seeds, streams, ONE_BRANCH, rows, None, None,
                           [out], side, None, clip)
                return out
        sampler_step(x, [g], history=list(history), coeffs=rows, seeds=seeds, streams=list(streams), outs=[out],
                     side=side, clip=clip)
        return out

    def _x0_step(self, model_output, timestep, sample, std: float, rows: tuple, checked: bool, clip=None) -> tuple:
        """(prev, x0) of a DDIM / DDPM step from its rows, with noise of ``std`` from the step's stream: one pass (x0
        a side output; with clip_sample alone, ``clip`` = [c, d] clamps it in the same pass: the kernel's clip), or
        with thresholding (or a clip_sample_range the kernel's clip refuses) two, x0 first, thresholded or clamped
        as diffusers does, then the step from it (history)."""
        x, g = self._inputs(model_output, sample)
        seeds = self._seeds_for(x.shape[0], x.device) if std > 0 else None
        streams = [self._stream(timestep)] if std > 0 else []
        prev, x0 = self._x0_and_step(x, g, rows, checked, seeds, streams, clip)
        return (prev if prev.dtype is sample.dtype else prev.to(sample.dtype)), x0

    def _x0_and_step(self, x, g, rows: tuple, checked: bool, seeds, streams, clip=None) -> tuple:
        if len(rows) == 2:
            x0 = self._fused_step(x, g, rows[0], checked)
            if self.config.thresholding:
                x0.copy_(DynamicThresholding(self.config.dynamic_thresholding_ratio,
                                             self.config.sample_max_value).apply(x0))
            else:
                x0.clamp_(-self.config.clip_sample_range, self.config.clip_sample_range)
            return self._fused_step(x, g, rows[1], checked, history=[x0], seeds=seeds, streams=streams), x0
        x0 = torch.empty_like(x)
        return self._fused_step(x, g, rows[0], checked, seeds=seeds, streams=streams, side=x0, clip=clip), x0

    def _thresholded(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (float32 [B, ...]) thresholded per sample as diffusers' ``_threshold_sample`` does with the config's
        dynamic_thresholding_ratio and sample_max_value; a new float32 contiguous tensor (the next pass's history
        input). The rule is made once per config (its checks name the config's arguments)."""
        config = self.config
        memo = self.__dict__.get("_fd_thresholding")
        if memo is None or memo[0] is not config:
            ratio, max_value = config.dynamic_thresholding_ratio, config.sample_max_value
            try:
                DynamicThresholding(ratio)
            except ValueError:
                raise ValueError(f"dynamic_thresholding_ratio must be a number in (0, 1] with thresholding=True, got "
                                 f"{ratio!r}") from None
            try:
                rule = DynamicThresholding(ratio, max_value)
            except ValueError:
                raise ValueError(f"sample_max_value must be a finite number >= 1 with thresholding=True (the "
                                 f"per-sample threshold is clamped to [1, sample_max_value]), got "
                                 f"{max_value!r}") from None
            memo = self._fd_thresholding = (config, rule)
        return memo[1].apply(x0)

    def _resolve(self, x) -> tuple:
        """(this run's timesteps, x's device, the step kernel or None for the reference backend (the general path
        runs it), zero seeds for x's batch, the batch, the backend's key). The backend is the one in force at a
        run's first step (set_timesteps starts a run), as a fastdiff.Sampler resolves it when planned:
        dispatch.current() reads os.environ (~1 us), once per step otherwise. A step without noise reads no
        seeds; the kernel still takes a tensor of B (the general path makes a torch.zeros per step)."""
        device, batch, last = x.device, x.shape[0], self.__dict__.get("_fd_run")
        backend = (device, _dispatch.current())
        if last is None or last[5] != backend:
            name = _dispatch.resolve(device)
            kernel = None if name == "reference" else direct_kernel(name, "sampler_step")
            # the op overload's builtin: OpOverload.__call__ only forwards to it (0.7 of a 5 us call at batch 1)
            kernel = getattr(kernel, "_op", kernel)
        else:
            kernel = last[2]
        zeros = last[3] if last is not None and last[4] == batch and last[3].device == device else \
            torch.zeros(batch, dtype=torch.int64, device=device)
        run = self._fd_run = (self.timesteps, device, kernel, zeros, batch, backend)
        return run

    def _x0_coefficients(self, sigma: float, step: str, sample_ok: bool = True) -> tuple[float, float]:
        """(a, b) with x0 = a x + b model_output on diffusers' sigma-scaled sample x = z + sigma eps, for the
        scheduler's prediction_type (``step`` names the step in the error)."""
        ptype = self.config.prediction_type
        if ptype in ("original_sample", "sample") and sample_ok:
            return 0.0, 1.0
        if ptype == "epsilon":
            return 1.0, -sigma
        if ptype == "v_prediction":
            return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
        takes = "epsilon, v_prediction or sample" if sample_ok else "epsilon or v_prediction"
        raise ValueError(f"prediction_type={ptype!r} is not supported; {step} takes {takes}")

    def _step_position(self, timestep) -> int:
        """This step's index in a sigma-indexed diffusers scheduler (Euler-type), with diffusers' refusal of
        integer indices as timesteps."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):  # as diffusers' own check
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to step() is "
                             "not supported; pass one of scheduler.timesteps")
        if self.step_index is None:
            self._init_step_index(timestep)
        return self.step_index

    def _data_conversion(self, al: float, sg: float, sigma: float) -> tuple[float, float] | None:
        """(a, b) with x0 = a x + b model_output on a VP-scaled sample (alpha, sigma_t = al, sg; sigma: the raw
        sigma, for flow predictions), for the scheduler's prediction_type; None for an unknown one."""
        return {"epsilon": (1.0 / al, -sg / al), "sample": (0.0, 1.0), "v_prediction": (al, -sg),
                "flow_prediction": (1.0, -sigma)}.get(self.config.prediction_type)


def clip_of(config, d: float):
    """The kernel's clip [c, d] of diffusers' clip_sample alone (c = clip_sample_range; d: the coefficient of the
    clamped x0 in the step), or None where the step takes two passes: thresholding, no clip_sample, or a range
    the kernel refuses (not finite > 0 in float32) or a d beyond float32's range (the two passes clamp as
    diffusers does)."""
    if config.thresholding or not config.clip_sample:
        return None
    c = config.clip_sample_range
    if isinstance(c, bool) or not isinstance(c, (int, float)):
        return None
    c = float(c)
    if not (0.0 < c <= F32_MAX and round_f32(c) > 0.0) or not checked_rows([d]):
        return None
    return [c, d]


def _seeds_state(s):
    """What an in-place change of the seeds changes (the memo of _seeds_for compares it)."""
    if isinstance(s, torch.Tensor):
        return s._version
    if isinstance(s, list):
        return list(s)
    return None


def _like(history, x) -> bool:
    """Whether every history buffer is what the kernel reads alongside x (else the general path names it)."""
    for h in history:
        if h.dtype is not torch.float32 or h.shape != x.shape or h.device != x.device or not h.is_contiguous() or (
                torch.is_grad_enabled() and h.requires_grad):
            return False
    return True
