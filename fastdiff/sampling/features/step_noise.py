"""``sample(step_noise=...)``: the noise of the steps from somewhere other than the kernel's own draws. A noisy
stage then reads a kept buffer as its last history term, with the stage's whole noise scale (Stage.host_noise_rows):
the caller's standard normal (a callable ``step_noise(step, j)``, k-diffusion's noise_sampler) copied in, or, with
"brownian", the path's Brownian increments summed in by kernel calls (fastdiff.sampling.features.brownian).

Corrector stages keep their own in-kernel draws (their Langevin noise is not the step's SDE noise), and a RePaint
repeat after the first draws fresh in-kernel noise on the editing streams (the Brownian path, or the caller's
noise for (step, j), would repeat the first pass's increment)."""

from __future__ import annotations

from fastdiff.sampling.core import calls as _calls
from fastdiff.sampling.core.arguments import check_step_noise
from fastdiff.sampling.features import brownian as _brownian


class StepNoise:
    """Which stages read the noise buffer (``host[k]``: the stage's index among the noisy stages of its step, None
    for none) and the hooks that fill it."""

    def __init__(self, step_noise, is_brownian: bool, stages: list, grid: list[float]):
        self.step_noise, self.brownian, self.stages, self.grid = step_noise, is_brownian, stages, grid
        self.host = [None] * len(stages)
        if step_noise is not None:
            noisy_in_step = {}
            for k, st in enumerate(stages):
                if st.streams() and st.corrector is None:
                    self.host[k] = noisy_in_step[st.step] = noisy_in_step.get(st.step, -1) + 1
        start = stages[0].start_churn
        self.needs_buffer = any(j is not None for j in self.host) or (is_brownian and start is not None)
        self.key = (step_noise is not None, is_brownian)

    def reads_buffer(self, k: int) -> bool:
        return self.host[k] is not None

    def kernel_calls(self, buffer, seeds, key, backend: str, native: bool):
        """With "brownian": per noisy stage (then the churn draw of step 0), the calls that sum its draws."""
        if not self.brownian:
            return None
        return _brownian.kernel_calls(self.stages, self.host, self.grid, buffer, seeds, _calls.ROW_CACHE, key,
                                      backend, native)

    def add_hooks(self, plan, buffers: dict, noise_calls, x) -> None:
        if self.step_noise is None:
            return
        host, stages, step_noise = self.host, self.stages, self.step_noise
        if noise_calls is not None:
            buffer = [buffers.get("noise")]  # None where no stage draws (no calls)

            def sum_brownian(k: int, preds: list, call):
                if plan.repeat == 0:
                    for noise_call in noise_calls[k]:
                        noise_call(buffer)
                return call

            plan.add("before_step", sum_brownian)
        else:
            def copy_callers(k: int, preds: list, call):
                if host[k] is not None and plan.repeat == 0:
                    buffers["noise"].copy_(check_step_noise(step_noise(stages[k].step, host[k]), x, stages[k]))
                return call

            plan.add("before_step", copy_callers)


def plan(step_noise, is_brownian: bool, stages: list, grid: list[float]) -> StepNoise:
    return StepNoise(step_noise, is_brownian, stages, grid)
