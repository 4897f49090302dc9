"""``FastDiffDPMSolverMultistepScheduler``: diffusers' DPMSolverMultistepScheduler with a fused step.

A DPM-Solver step of order k is affine in the sample x, the model output g and the k - 1 previous
converted outputs m_1, m_2 (x0 for the "++" algorithms, eps for the others), plus a noise term for the
SDE variants:

    x' = c_s x + c_0 m_0 + c_1 m_1 + c_2 m_2 + c_n xi,    m_0 = a x + b g

so the whole update, the conversion m_0 (a side output, kept for the next steps as diffusers keeps
``model_outputs``) and the noise run in one ``fastdiff.ops.sampler_step`` pass with m_1, m_2 as history
buffers. The coefficients come from diffusers' formulas (its orders, lower-order warm-up and final
steps, solver types), computed on the host in float64.

With ``thresholding=True`` diffusers thresholds the x0 prediction inside ``convert_model_output`` (a
per-sample quantile and clamp: not affine), so that step is two passes: x0 = a' x + b' g first, thresholded
(:class:`fastdiff.sampling.features.thresholding.DynamicThresholding`, diffusers' ``_threshold_sample``),
then the update above with the thresholded x0 as one more history input; m_0 is that x0 for the "++"
algorithms, and for the others the eps that gives it, (x - alpha x0) / sigma (a side output of the second
pass), so the history holds thresholded predictions, as diffusers'.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from fastdiff.adapters.diffusers._fused import _FusedStep, checked_rows

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


def _first_order(algo: str, al: float, sg: float, al0: float, sg0: float):
    """(c_s, [k_0], c_n) of the first-order update from (al0, sg0) to (al, sg); exact where sg = 0
    (h = inf) through e^h = al sg0 / (sg al0)."""
    if algo == "dpmsolver++":
        return sg / sg0, [al - sg * al0 / sg0], 0.0  # -alpha_t (e^-h - 1)
    if algo == "sde-dpmsolver++":
        e = sg * al0 / (al * sg0)  # e^-h
        return sg / sg0 * e, [al * (1.0 - e * e)], sg * math.sqrt(max(0.0, 1.0 - e * e))
    grow = al * sg0 / al0 - sg  # sigma_t (e^h - 1)
    if algo == "dpmsolver":
        return al / al0, [-grow], 0.0
    return al / al0, [-2.0 * grow], math.sqrt(max(0.0, (al * sg0 / al0) ** 2 - sg * sg))  # sde-dpmsolver


def _weights(algo: str, solver_type: str, order: int, h: float, al: float, sg: float):
    """The coefficients (k_0, k_1[, k_2]) of D0, D1[, D2] in diffusers' second / third-order updates."""
    em = math.exp(-h)
    if algo == "dpmsolver++":
        k0 = -al * (em - 1.0)
        if order == 3:
            return [k0, al * ((em - 1.0) / h + 1.0), -al * ((em - 1.0 + h) / h ** 2 - 0.5)]
        return [k0, -0.5 * al * (em - 1.0) if solver_type == "midpoint" else al * ((em - 1.0) / h + 1.0)]
    if algo == "sde-dpmsolver++":
        k0 = al * (1.0 - em * em)
        heun = al * ((1.0 - em * em) / (-2.0 * h) + 1.0)
        if order == 3:
            return [k0, heun, al * ((1.0 - em * em - 2.0 * h) / (2.0 * h) ** 2 - 0.5)]
        return [k0, 0.5 * al * (1.0 - em * em) if solver_type == "midpoint" else heun]
    ep = math.exp(h)
    if algo == "dpmsolver":
        k0 = -sg * (ep - 1.0)
        if order == 3:
            return [k0, -sg * ((ep - 1.0) / h - 1.0), -sg * ((ep - 1.0 - h) / h ** 2 - 0.5)]
        return [k0, -0.5 * sg * (ep - 1.0) if solver_type == "midpoint" else -sg * ((ep - 1.0) / h - 1.0)]
    k0 = -2.0 * sg * (ep - 1.0)  # sde-dpmsolver (orders 1-2)
    return [k0, -sg * (ep - 1.0) if solver_type == "midpoint" else -2.0 * sg * ((ep - 1.0) / h - 1.0)]


def _check_noise(noise, sample: torch.Tensor) -> None:
    """variance_noise is one of the kernel's history inputs: checked here so that the error names it."""
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"variance_noise must be a tensor shaped like sample, got {type(noise).__name__}")
    if noise.shape != sample.shape:
        raise ValueError(f"variance_noise has shape {tuple(noise.shape)} but sample has {tuple(sample.shape)}")
    if not noise.is_floating_point():
        raise TypeError(f"variance_noise must be a floating-point tensor, got {noise.dtype}")


class FastDiffDPMSolverMultistepScheduler(_FusedStep, DPMSolverMultistepScheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` with a fused ``step``: every algorithm type (dpmsolver++,
    sde-dpmsolver++, dpmsolver, sde-dpmsolver), solver order 1-3, midpoint and heun solver types, its
    sigma options (Karras, exponential, beta, Lu lambdas, flow sigmas), ``final_sigmas_type``,
    ``lower_order_final``, ``euler_at_final`` and dynamic ``thresholding`` (``dynamic_thresholding_ratio``,
    ``sample_max_value``; two kernel passes a step, with the thresholding between them) are diffusers' own.
    One kernel pass a step without thresholding. The SDE variants' noise is fastdiff's per-sample stream
    (``set_seeds``; stream 1 + step index) unless ``variance_noise`` is given. Refused (errors naming the
    argument): other algorithm types (diffusers' deprecated ones), solver_order=3 with sde-dpmsolver (as
    diffusers), prediction types the algorithm type does not take, ``sample_max_value`` < 1."""

    def _conversion(self, al: float, sg: float, sigma: float) -> tuple[float, float]:
        """(a, b): the converted output m = a x + b g diffusers keeps (x0 for ++, else eps)."""
        ptype, plus = self.config.prediction_type, self.config.algorithm_type.endswith("++")
        if plus:
            ab = self._data_conversion(al, sg, sigma)
            takes = "epsilon, sample, v_prediction, flow_prediction"
        else:
            ab = {"epsilon": (0.0, 1.0), "sample": (1.0 / sg, -al / sg), "v_prediction": (sg, al)}.get(ptype)
            takes = "epsilon, sample, v_prediction"
        if ab is None:
            raise ValueError(f"prediction_type={ptype!r} is not supported with algorithm_type="
                             f"{self.config.algorithm_type!r}; take one of {takes}")
        return ab

    def _rows(self, i: int, n: int) -> tuple:
        """(order, the coefficient rows, whether they passed the kernel's check, whether the step adds noise, whether
        the model output's mean part is taken) of step i of n at this point of the warm-up, computed once per
        schedule."""
        schedule = self._sigma_schedule()
        key = (i, n, self.lower_order_nums)
        entry = schedule.rows.get(key)
        if entry is None:
            entry = schedule.rows[key] = self._step_rows(schedule, i, n)
        return entry

    def _step_rows(self, schedule, i: int, n: int) -> tuple:
        algo = self.config.algorithm_type
        lower_order_final = i == n - 1 and (self.config.euler_at_final or (self.config.lower_order_final and n < 15)
                                            or self.config.final_sigmas_type == "zero")
        lower_order_second = i == n - 2 and self.config.lower_order_final and n < 15
        if self.config.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            order = 1
        elif self.config.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            order = 2
        else:
            order = 3
        if order == 3 and algo == "sde-dpmsolver":
            raise ValueError("solver_order=3 is not defined for algorithm_type='sde-dpmsolver' (as in diffusers)")
        mean_part = self.config.variance_type in ("learned", "learned_range") and \
            self.config.prediction_type == "epsilon"
        alpha_sigma = schedule.__dict__.setdefault("alpha_sigma", {})

        def alpha_sigma_at(index: int) -> tuple[float, float]:  # diffusers' conversion of one float64 sigma
            if index not in alpha_sigma:
                a, s = self._sigma_to_alpha_sigma_t(self.sigmas[index].double())
                alpha_sigma[index] = float(a), float(s)
            return alpha_sigma[index]

        al, sg = alpha_sigma_at(i + 1)
        al0, sg0 = alpha_sigma_at(i)
        a, b = self._conversion(al0, sg0, schedule.sigmas[i])
        c_s, k, c_n = _first_order(algo, al, sg, al0, sg0)
        c = k  # weights of m_0, m_1, m_2
        if order > 1:
            lam = [math.log(u) - math.log(v) for u, v in (alpha_sigma_at(j) for j in range(i - order + 1, i + 1))]
            h = (math.log(al) - math.log(sg)) - lam[-1]
            ks = _weights(algo, self.config.solver_type, order, h, al, sg)
            r0 = (lam[-1] - lam[-2]) / h
            if order == 2:  # D1 = (m0 - m1) / r0
                c = [ks[0] + ks[1] / r0, -ks[1] / r0]
            else:  # D1 = (1 + q) D1_0 - q D1_1, D2 = (D1_0 - D1_1) / (r0 + r1), D1_j divided differences
                r1 = (lam[-2] - lam[-3]) / h
                q = r0 / (r0 + r1)
                u = ks[1] * (1.0 + q) + ks[2] / (r0 + r1)  # on D1_0 = (m0 - m1) / r0
                v = -ks[1] * q - ks[2] / (r0 + r1)  # on D1_1 = (m1 - m2) / r1
                c = [ks[0] + u / r0, -u / r0 + v / r1, -v / r1]
        noise = [c_n] if c_n != 0.0 else []
        if self.config.thresholding:
            rows = self._thresholded_rows(algo, al0, sg0, a, b, c_s, c, noise)
            return order, rows, all(checked_rows(r) for r in rows), c_n != 0.0, mean_part
        rows = [c_s + c[0] * a, c[0] * b, *c[1:], *noise]
        rows += [a, b] + [0.0] * (len(rows) - 2)  # the side row: m_0
        return order, rows, checked_rows(rows), c_n != 0.0, mean_part

    @staticmethod
    def _thresholded_rows(algo: str, al0: float, sg0: float, a: float, b: float, c_s: float, c: list,
                          noise: list) -> tuple:
        """The two passes of a thresholded step: x0 = ax x + ag g, then (after x0 is thresholded) the update with x0
        as the first history input. m_0 is the thresholded x0 for the ++ algorithms, else the eps that gives it,
        eps = (x - al0 x0) / sg0 (diffusers' order: eps -> x0 -> thresholded -> eps), a side output of pass 2."""
        if algo.endswith("++"):
            ax, ag = a, b
            update = [c_s, 0.0, c[0], *c[1:], *noise]
            side = [0.0] * len(update)  # (m_0 is the thresholded x0 itself)
        else:  # x0 = (x - sg0 eps) / al0 with eps = a x + b g
            ax, ag = (1.0 - sg0 * a) / al0, -sg0 * b / al0
            update = [c_s + c[0] / sg0, 0.0, -c[0] * al0 / sg0, *c[1:], *noise]
            side = [1.0 / sg0, 0.0, -al0 / sg0] + [0.0] * (len(update) - 3)
        return [ax, ag, 0.0, 0.0], update + side

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the "
                             "scheduler")
        algo = self.config.algorithm_type
        if algo not in ALGORITHMS:
            raise ValueError(f"algorithm_type={algo!r} is not supported by the fused step; take one of "
                             f"{', '.join(ALGORITHMS)}")
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        order, rows, checked, noisy, mean_part = self._rows(i, len(self.timesteps))
        if mean_part:
            model_output = model_output[:, :3]  # the mean part, as diffusers
        x, g = self._inputs(model_output, sample)
        history = [_float32(self.model_outputs[-1 - j]) for j in range(order - 1)]
        streams, seeds = [], None
        if noisy and variance_noise is not None:
            _check_noise(variance_noise, sample)
            history.append(variance_noise.to(device=x.device, dtype=torch.float32).contiguous())
        elif noisy:
            seeds, streams = self._seeds_for(x.shape[0], x.device), [1 + i]
        if self.config.thresholding:  # two passes: x0, thresholded (not affine), then the update from it
            x0 = self._thresholded(self._fused_step(x, g, rows[0], checked))
            m0 = x0 if algo.endswith("++") else torch.empty_like(x)
            prev = self._fused_step(x, g, rows[1], checked, history=[x0, *history], seeds=seeds, streams=streams,
                                    side=None if m0 is x0 else m0)
        else:
            m0 = torch.empty_like(x)
            prev = self._fused_step(x, g, rows, checked, history=history, seeds=seeds, streams=streams, side=m0)
        for j in range(self.config.solver_order - 1):
            self.model_outputs[j] = self.model_outputs[j + 1]
        self.model_outputs[-1] = m0
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        if prev.dtype is not model_output.dtype:
            prev = prev.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype is torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()
