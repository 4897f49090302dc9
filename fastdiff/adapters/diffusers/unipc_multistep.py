"""``FastDiffUniPCMultistepScheduler``: diffusers' UniPCMultistepScheduler with a fused step.

diffusers' UniPC step runs the corrector on the previous state (kept as ``last_sample``), then the
predictor from the corrected state. Both are linear in the step's sample, its model output and the
previous x0 predictions, and the corrected state can be recovered from the predicted one
(fastdiff.sampling.methods.unipc.unipc_plan), so a step here is one ``sampler_step`` pass: the next sample out,
this step's x0 prediction as the side output (kept for the next three steps), the earlier ones as
history. The coefficient plan is made once per ``set_timesteps`` from the scheduler's own sigmas, from the
step the run starts at (img2img pipelines start mid-schedule): like diffusers' history, its orders warm up
from the first step called.

``predict_x0=False`` (diffusers' noise-prediction UniPC: the kept predictions are eps) is the same plan
mirrored: lambda -> -lambda and alpha <-> sigma turn diffusers' x0-form updates into its noise-form ones, so
it is one pass as well, eps as the side output. With ``thresholding=True`` (x0 form only, as diffusers: its
noise form ignores the flag) the x0 prediction is thresholded before it enters the corrector, the predictor
and the history, and that is not affine: a step is two passes, x0 first, thresholded as diffusers'
``_threshold_sample`` (fastdiff.sampling.features.thresholding.DynamicThresholding), then the step with the
thresholded x0 as a history input (the plan made on the x0 buffer itself).
"""

from __future__ import annotations

import math

import torch
from diffusers import UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep, checked_rows
from fastdiff.sampling.methods.unipc import unipc_plan

# the forms of a step (compared by identity): diffusers' predict_x0=True on x0 predictions (one pass), the same with
# thresholding (two passes: the thresholded x0 is a history input), predict_x0=False on eps predictions (one pass)
X0, X0_THRESHOLDED, EPS = "x0", "x0-thresholded", "eps"


class FastDiffUniPCMultistepScheduler(_FusedStep, UniPCMultistepScheduler):
    """diffusers' ``UniPCMultistepScheduler`` with a fused ``step``: predict_x0 True and False, bh1 / bh2,
    solver_order 1-3, lower_order_final, disable_corrector, dynamic ``thresholding`` (with predict_x0; two
    kernel passes a step, one otherwise), its sigma options and final_sigmas_type. One difference: with
    predict_x0=False the step to sigma = 0 (final_sigmas_type="zero", the default) is its first-order limit,
    alpha'/alpha (x - sigma eps), where diffusers' own step computes 0 * inf = NaN. Refused (errors naming the
    argument): ``solver_p`` (another scheduler's step as the predictor: not a row of this kernel),
    flow_prediction with predict_x0=False (as diffusers), ``sample_max_value`` < 1."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._fd_start, self._fd_m = None, {}

    def _plan(self, start: int, form: str = X0) -> list[dict]:
        """The plan of a run whose first step is ``start`` (img2img starts mid-schedule): its orders warm up from
        there and its first step is not corrected, as diffusers' history starts at its first ``step`` call. Kept
        with the schedule (~5 ms to make at 50 steps; a pipeline's set_timesteps makes the same schedule anew).
        ``form``: see X0, X0_THRESHOLDED, EPS."""
        schedule = self._sigma_schedule()
        key = ("plan", start) if form is X0 else ("plan", start, form)
        plan = schedule.rows.get(key)
        if plan is None:
            sigmas = self.sigmas.double()
            alpha, beta = (v.tolist() for v in self._sigma_to_alpha_sigma_t(sigmas))
            lam = [math.log(a) - math.log(b) if b > 0 else math.inf for a, b in zip(alpha, beta)]
            conv = [self._conversion(a, b, float(s), form) for a, b, s in zip(alpha[:-1], beta[:-1], sigmas.tolist())]
            no_corrector = frozenset(j - start for j in self.config.disable_corrector if j >= start)
            if form is EPS:
                # diffusers' noise-prediction form is its x0 form with lambda -> -lambda and alpha <-> sigma
                # (hh = h, x' = alpha'/alpha x - sigma' (e^h - 1) eps - sigma' B(h) ...): the same plan, mirrored
                plan = unipc_plan([-v for v in lam[start:]], beta[start:], alpha[start:], conv[start:],
                                  self.config.solver_order, self.config.solver_type, self.config.lower_order_final,
                                  no_corrector)
                for k, out in enumerate(plan):
                    if beta[start + k + 1] == 0.0:
                        # to sigma = 0 (final_sigmas_type="zero"), h = inf: the mirrored plan's infinite step ends
                        # at alpha'/alpha x^c; the step's limit is first order, alpha'/alpha (x^c - sigma eps) (the
                        # x0 form's step there; diffusers' own noise-form step gives 0 * inf = NaN)
                        w = -alpha[start + k + 1] * beta[start + k] / alpha[start + k]
                        a, b = conv[start + k]
                        out["X"], out["g"] = out.get("X", 0.0) + w * a, out.get("g", 0.0) + w * b
            else:
                plan = unipc_plan(lam[start:], alpha[start:], beta[start:], conv[start:], self.config.solver_order,
                                  self.config.solver_type, self.config.lower_order_final, no_corrector)
            schedule.rows[key] = plan
        return plan

    def _conversion(self, al: float, sg: float, sigma: float, form: str = X0) -> tuple[float, float]:
        """(a, b): the converted output m = a x + b g the form's plan keeps (x0, or eps for EPS); X0_THRESHOLDED
        plans on the thresholded x0 itself, a history buffer (m = 1 * that buffer, in the g slot)."""
        ptype = self.config.prediction_type
        if form is X0_THRESHOLDED:
            return 0.0, 1.0
        if form is EPS:
            ab = {"epsilon": (0.0, 1.0), "sample": (1.0 / sg, -al / sg), "v_prediction": (sg, al)}.get(ptype)
            takes = "epsilon, sample, v_prediction (predict_x0=False)"
        else:
            ab = self._data_conversion(al, sg, sigma)
            takes = "epsilon, sample, v_prediction, flow_prediction"
        if ab is None:
            raise ValueError(f"prediction_type={ptype!r} is not supported; take one of {takes}")
        return ab

    def _rows(self, i: int, start: int, form: str = X0) -> tuple[list, list | tuple, bool]:
        """(the plan indices of the earlier predictions step i reads, its coefficient rows, whether they passed
        the kernel's check), once per schedule. X0_THRESHOLDED: two passes' rows (x0 = a x + b g; then the update
        with the thresholded x0 as the first history input)."""
        schedule = self._sigma_schedule()
        kept = (start, i) if form is X0 else (start, i, form)
        entry = schedule.rows.get(kept)
        if entry is None:
            out = self._plan(start, form)[i - start]
            previous = sorted((key[1] for key in out if isinstance(key, tuple)), reverse=True)  # plan indices
            a, b = self._plan_conversion(i, X0 if form is X0_THRESHOLDED else form)
            rows = [out.get("X", 0.0), out.get("g", 0.0), *(out[("m", j)] for j in previous)]
            if form is X0_THRESHOLDED:  # the plan's "g" is the coefficient of the (thresholded) x0 buffer
                update = [rows[0], 0.0, *rows[1:]]
                rows = ([a, b, 0.0, 0.0], update + [0.0] * len(update))
                entry = (previous, rows, all(checked_rows(r) for r in rows))
            else:
                rows += [a, b] + [0.0] * len(previous)
                entry = (previous, rows, checked_rows(rows))
            schedule.rows[kept] = entry
        return entry

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the "
                             "scheduler")
        if self.solver_p is not None:
            raise NotImplementedError("solver_p (another scheduler's step as UniPC's predictor) is not supported by "
                                      "fastdiff's fused UniPC step; use diffusers' UniPCMultistepScheduler with it")
        # diffusers thresholds only the x0 form's predictions (predict_x0=False ignores thresholding)
        form = (X0_THRESHOLDED if self.config.thresholding else X0) if self.predict_x0 else EPS
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        if self.__dict__.get("_fd_start") is None:
            self._fd_start, self._fd_m = i, {}  # the run's first step (set_timesteps starts a new run)
        start = self._fd_start
        if i < start:
            raise ValueError(f"step {i} comes before this run's first step {start}: call set_timesteps to start again")
        previous, rows, checked = self._rows(i, start, form)
        x, g = self._inputs(model_output, sample)
        missing = [start + j for j in previous if start + j not in self._fd_m]
        if missing:
            raise ValueError(f"step {i} needs the predictions of steps {missing}: run the steps in order from this "
                             f"run's first step {start} (set_timesteps starts a new run)")
        history = [self._fd_m[start + j] for j in previous]
        if form is X0_THRESHOLDED:  # two passes: x0, thresholded (not affine), then the step from it
            m_i = self._thresholded(self._fused_step(x, g, rows[0], checked))
            prev = self._fused_step(x, g, rows[1], checked, history=[m_i, *history])
        else:
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

    def _plan_conversion(self, i: int, form: str = X0) -> tuple[float, float]:
        sigma = self.sigmas[i].double()
        al, sg = (float(v) for v in self._sigma_to_alpha_sigma_t(sigma))
        return self._conversion(al, sg, float(sigma), form)
