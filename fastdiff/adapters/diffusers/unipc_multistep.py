"""``FastDiffUniPCMultistepScheduler``: diffusers' UniPCMultistepScheduler with a fused step.

diffusers' UniPC step runs the corrector on the previous state (kept as ``last_sample``), then the
predictor from the corrected state. Both are linear in the step's sample, its model output and the
previous x0 predictions, and the corrected state can be recovered from the predicted one
(fastdiff.sampling.methods.unipc.unipc_plan), so a step here is one ``sampler_step`` pass: the next sample out,
this step's x0 prediction as the side output (kept for the next three steps), the earlier ones as
history. The coefficient plan is made once per ``set_timesteps`` from the scheduler's own sigmas, from the
step the run starts at (img2img pipelines start mid-schedule): like diffusers' history, its orders warm up
from the first step called.
"""

from __future__ import annotations

import math

import torch
from diffusers import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep, checked_rows
from fastdiff.sampling.methods.unipc import unipc_plan


class FastDiffUniPCMultistepScheduler(_FusedStep, UniPCMultistepScheduler):
    """diffusers' ``UniPCMultistepScheduler`` with a fused ``step`` (predict_x0, bh1 / bh2, solver_order
    1-3, lower_order_final, disable_corrector, its sigma options and final_sigmas_type). Not supported
    (clear errors): ``predict_x0=False``, ``solver_p``, ``thresholding``."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._fd_start, self._fd_m = None, {}

    def _plan(self, start: int) -> list[dict]:
        """The plan of a run whose first step is ``start`` (img2img starts mid-schedule): its orders warm up from
        there and its first step is not corrected, as diffusers' history starts at its first ``step`` call. Kept
        with the schedule (~5 ms to make at 50 steps; a pipeline's set_timesteps makes the same schedule anew)."""
        schedule = self._sigma_schedule()
        plan = schedule.rows.get(("plan", start))
        if plan is None:
            sigmas = self.sigmas.double()
            alpha, beta = (v.tolist() for v in self._sigma_to_alpha_sigma_t(sigmas))
            lam = [math.log(a) - math.log(b) if b > 0 else math.inf for a, b in zip(alpha, beta)]
            conv = [self._x0_conversion(a, b, float(s)) for a, b, s in zip(alpha, beta, sigmas.tolist())][:-1]
            no_corrector = frozenset(j - start for j in self.config.disable_corrector if j >= start)
            plan = schedule.rows[("plan", start)] = unipc_plan(
                lam[start:], alpha[start:], beta[start:], conv[start:], self.config.solver_order,
                self.config.solver_type, self.config.lower_order_final, no_corrector)
        return plan

    def _x0_conversion(self, al: float, sg: float, sigma: float) -> tuple[float, float]:
        ab = self._data_conversion(al, sg, sigma)
        if ab is None:
            raise ValueError(f"prediction_type={self.config.prediction_type!r} is not supported; take one of "
                             "epsilon, sample, v_prediction, flow_prediction")
        return ab

    def _rows(self, i: int, start: int) -> tuple[list, list, bool]:
        """(the plan indices of the earlier x0 predictions step i reads, its coefficient rows, whether they passed
        the kernel's check), once per schedule."""
        schedule = self._sigma_schedule()
        entry = schedule.rows.get((start, i))
        if entry is None:
            out = self._plan(start)[i - start]
            previous = sorted((key[1] for key in out if isinstance(key, tuple)), reverse=True)  # plan indices
            a, b = self._plan_conversion(i)
            rows = [out.get("X", 0.0), out.get("g", 0.0), *(out[("m", j)] for j in previous)]
            rows += [a, b] + [0.0] * len(previous)
            entry = schedule.rows[(start, i)] = (previous, rows, checked_rows(rows))
        return entry

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the "
                             "scheduler")
        if not self.predict_x0 or self.solver_p is not None or self.config.thresholding:
            raise NotImplementedError("fastdiff's fused UniPC step takes predict_x0=True without solver_p or "
                                      "thresholding; use diffusers' UniPCMultistepScheduler for those")
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        if self.__dict__.get("_fd_start") is None:
            self._fd_start, self._fd_m = i, {}  # the run's first step (set_timesteps starts a new run)
        start = self._fd_start
        if i < start:
            raise ValueError(f"step {i} comes before this run's first step {start}: call set_timesteps to start again")
        previous, rows, checked = self._rows(i, start)
        x, g = self._inputs(model_output, sample)
        missing = [start + j for j in previous if start + j not in self._fd_m]
        if missing:
            raise ValueError(f"step {i} needs the x0 predictions of steps {missing}: run the steps in order from this "
                             f"run's first step {start} (set_timesteps starts a new run)")
        history = [self._fd_m[start + j] for j in previous]
        m_i = torch.empty_like(x)
        prev = self._fused_step(x, g, rows, checked, history=history, side=m_i)
        self._fd_m = {j: t for j, t in self._fd_m.items() if j > i - 3}
        self._fd_m[i] = m_i
        if prev.dtype is not model_output.dtype:
            prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _plan_conversion(self, i: int) -> tuple[float, float]:
        sigma = self.sigmas[i].double()
        al, sg = (float(v) for v in self._sigma_to_alpha_sigma_t(sigma))
        return self._x0_conversion(al, sg, float(sigma))
