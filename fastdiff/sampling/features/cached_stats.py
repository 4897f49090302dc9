"""Step caching's statistics from the fused step's own pass (sampler_step's ``stats``, fastdiff.ops.step_stats):
the eager loop's decider reads them instead of the subsamples.

The kernel that writes a step's state (the step's last stage) adds mean |x − R| over the subsample, R the rule's
reference input (EasyCache: the input of the last computed evaluation; AdaptiveDiffusion: the last evaluation's),
and writes the new state's subsample into a spare buffer N; the decision at the next step reads that sum (the one
host read it made before), and moving R to the new input is swapping R and N. The kernel that reads a computed
evaluation's output (the step's first stage) adds mean |q − O| and mean |q| for EasyCache's rate and scale, q the
first condition's prediction (LazyCache: the blend g of the stage's CFG weights), and keeps q's subsample the same
way. So no subsample is read apart from the step: on the CPU each was a read of memory the step's pass had evicted
(10–15 µs at 2^20 elements); on a GPU ~10 kernel launches a step.

Where the plan writes the next model input otherwise (inpainting's repeats, a RePaint schedule, a stage whose
outputs are not the next call's input) or transforms the predictions before the step (thresholding, per-sample
weights, a callback), the decider reads the subsamples as before (fastdiff.sampling.features.caching); a captured
loop (cuda_graph=True) decides on the device with its own statistics (cached_graph).
"""

from __future__ import annotations

import ctypes

import torch

from fastdiff.ops.sampler_step import KERNEL_ARGS
from fastdiff.ops.step_call import replaced
from fastdiff.ops.step_stats import BLEND, NO_Q, StepStats, check_stats, picked, subsample_pick

_OUTS, _WEIGHTS, _SAMPLE_WEIGHTS = (KERNEL_ARGS.index(name) for name in ("outs", "weights", "sample_weights"))


class InStepStats:
    """The statistics of one eager cached plan from its kernels (module docstring). The deciders ask
    :meth:`input_change` and :meth:`rebase` at a step's first evaluation; :meth:`measure_output` asks the
    evaluation's own kernel for the output's statistics, which reach the decider after it (``after_stage``)."""

    def __init__(self, plan, calls):
        self.plan, self.calls = plan, calls
        self.rule = calls.rule
        # per stage: (x measured, q branch, O valid, buffer order) -> (the plan's call, its call with statistics)
        self.made: list[dict] = [{} for _ in calls.stages]
        self.sums = None
        self.reset()

    @staticmethod
    def possible(plan, calls) -> bool:
        """Whether the plan lets its kernels measure (one pass per stage, no repeats, no inpainting)."""
        return len(plan.calls) == 1 and not plan.points.after_repeat and calls.rule.name != "indicator"

    def prepare(self) -> None:
        """Per stage, what its kernel may measure, from the plan as built (called at the first run's start)."""
        calls, stages, plan = self.calls, self.calls.stages, self.plan
        x0 = calls._first(0)[0]
        self.B = x0.shape[0]
        self.pick = subsample_pick(tuple(x0.shape), self.rule.subsample_factor)
        self.S = picked(x0[0].numel(), self.pick)
        self.count = self.B * self.S
        device = x0.device
        self.sums = torch.zeros(self.B, 3, dtype=torch.float64, device=device)
        # on the CPU the sums' memory as Python floats (a ctypes view, made once): the column sums and the zeroing
        # in the interpreter's C loops, ~1 us, against ~5 us of torch or NumPy dispatch (more on cold caches)
        self.host = None
        if self.sums.is_cpu:
            words = (ctypes.c_double * (3 * self.B)).from_address(self.sums.data_ptr())
            self.host = (memoryview(words).cast("B").cast("d"), memoryview(words).cast("B"), bytes(24 * self.B))
        self.R, self.N = (torch.empty(self.B, self.S, device=device) for _ in range(2))
        # a last stage measures the state it writes where that is the next stage's model input (its first rows)
        self.measures_x = [False] * len(stages)
        for k, st in enumerate(stages[:-1]):
            if st.final and calls.first[k + 1]:
                x_next = calls._first(k + 1)[0]
                outs = plan.calls[0][k].args[_OUTS]
                self.measures_x[k] = x_next.is_contiguous() and any(
                    o.data_ptr() == x_next.data_ptr() and o.shape == x_next.shape for o in outs)
        # EasyCache's output statistics in the evaluation's own kernel, where the predictions reach it as the model
        # returned them
        self.q_branch = [None] * len(stages)
        self.O = self.P = None
        if hasattr(calls.decider, "record_output"):  # EasyCache's: O the last computed output's subsample
            self.O, self.P = (torch.empty(self.B, self.S, device=device) for _ in range(2))
            if not plan.points.predictions:
                self.q_branch = [self._branch(k) for k in range(len(stages))]

    def _branch(self, k: int):
        """The prediction of stage k's call that is the first condition's branch (or BLEND for LazyCache's guided
        prediction), or None where the kernel cannot give it."""
        calls = self.calls
        kind, _, n = calls.calls.plans[k]
        if calls.calls.perturbed_model is not None and calls.calls.perturbed[k] is not None:
            return None
        args = self.plan.calls[0][k].args
        K1 = len(args[KERNEL_ARGS.index("preds")])
        guided_split = kind in ("two", "batched") and n == calls.calls.branches  # [p_null, p_1, ...]
        if self.rule.on_guided and calls.guided_at(calls.stages[k].t):
            # LazyCache: the CFG blend p_null + w (p_1 - p_null) is the kernel's g for host weights (1, w)
            w = calls.scale_at(calls.stages[k].t)
            if isinstance(w, tuple) or not guided_split or K1 != 2 or args[_SAMPLE_WEIGHTS] is not None or \
                    list(args[_WEIGHTS]) != [1.0, float(w)]:
                return None
            return BLEND
        branch = 1 if guided_split else 0
        return branch if branch < K1 and (kind != "one" or K1 == 1) else None

    def reset(self) -> None:
        """A new run: no reference input, no kept output."""
        self.x_valid = False  # R holds a reference input's subsample
        self.o_valid = False  # O holds the last computed output's subsample
        self.measured = False  # the kernel that wrote the current state measured it against R (sum in x_change)
        self.x_change = None
        self.pending = None  # the stage whose kernel measures its output
        self.taking = None  # (stage, measured x, q branch) of the call about to run

    # the deciders' half
    def input_change(self, xs):
        """mean |x − R| of the input's subsample ``xs``: from the kernel that wrote x, else read (None before the
        first reference)."""
        if self.measured:
            return self.x_change
        if not self.x_valid:
            return None
        from fastdiff.sampling.features.caching import _mean_abs

        return _mean_abs(xs, self.R.view(xs.shape))

    def rebase(self, xs) -> None:
        """R = the input's subsample ``xs``: the kernel's copy (a swap), else a copy."""
        if self.measured:
            self.R, self.N = self.N, self.R
        else:
            from fastdiff.sampling.features.caching import _copy_into

            _copy_into(xs, self.R.view(xs.shape))
        self.x_valid = True

    def read_output(self, os_):
        """(mean |o − O| or None before the first, mean |o|) of an output's subsample read here (a stage whose
        kernel cannot measure it), O = o after."""
        from fastdiff.sampling.features.caching import _mean_abs

        change, norm = _mean_abs(os_, self.O.view(os_.shape), norm=True, keep=True)
        valid, self.o_valid = self.o_valid, True
        return (change if valid else None), norm

    def measure_output(self, k: int) -> bool:
        """Whether stage k's kernel measures its computed output (then the decider hears after the stage)."""
        if self.q_branch[k] is None:
            return False
        self.pending = k
        return True

    # the plan's half
    def before_step(self, k: int, preds, call):
        if self.sums is None:
            return call
        x = self.measures_x[k] and self.x_valid
        q = self.q_branch[k] if self.pending == k else None
        self.measured = False
        if not x and q is None:
            return call
        key = (x, q, self.o_valid, self.R.data_ptr(), self.O.data_ptr() if q is not None else 0)
        made = self.made[k].get(key)  # a few per stage: the buffers alternate
        if made is None or made[0] is not call:
            stats = StepStats(self.sums, self.pick[:4] + (NO_Q if q is None else q,),
                              x_ref=self.R if x else None, x_keep=self.N if x else None,
                              q_ref=self.O if q is not None and self.o_valid else None,
                              q_keep=self.P if q is not None else None)
            made = self.made[k][key] = (call, replaced(call, stats=check_stats(stats, call.args[0],
                                                                                  len(call.args[1]))))
        self.taking = (k, x, q)
        return made[1]

    def after_stage(self, k: int) -> None:
        if self.taking is None or self.taking[0] != k:
            return
        _, x, q = self.taking
        self.taking = None
        if self.host is not None:  # the step's one host read
            values, raw, zeros = self.host
            sums = (sum(values[0::3]), sum(values[1::3]), sum(values[2::3]))
            raw[:] = zeros
        else:
            sums = self.sums.sum(0).tolist()
            self.sums.zero_()
        if x:
            self.measured = True
            self.x_change = sums[0] / self.count
        if q is not None:
            self.pending = None
            self.calls.decider.record_output(sums[1] / self.count if self.o_valid else None, sums[2] / self.count)
            self.O, self.P = self.P, self.O
            self.o_valid = True


def add_hooks(plan, calls) -> None:
    """The statistics from the kernels where the plan allows (InStepStats.possible): at the first run's start, when
    every feature's hooks are in place, its before_step hook goes last (it adds the statistics to the call that
    runs)."""
    if not getattr(calls, "in_step_stats", False) or not InStepStats.possible(plan, calls):
        return
    stats = InStepStats(plan, calls)

    def start():
        if stats.sums is None:
            if not InStepStats.possible(plan, calls):  # hooks added after ours
                return
            stats.prepare()
            plan.add("before_step", stats.before_step)
            plan.add("after_stage", stats.after_stage)
            calls.decider.stats = stats
        stats.reset()
        calls.decider.stats = stats

    plan.add("start", start)
