"""The plan of a sampling call: everything a run needs, built once from the arguments, and the declared points
where features plug in (docs/design.md, "The plan and its points").

A plan holds the stage table, the buffers, one prepared kernel call per stage (per repeat), the model calls
with their inputs, and the hooks the features put at its points. The executor (fastdiff.sampling.core.executor)
runs it; a ``fastdiff.Sampler`` keeps it between calls and refills only the seeds, the noise and the labels.

The points, in the order a run meets them:

- ``start()``: the initial state is written (from noise, init, or with EDM churn at the first step);
- ``predictions(k, preds) -> preds``: after stage k's model call, transforms of its predictions (per-sample
  guidance weights from a reduction pass, thresholding, classifier gradients, a callback's x0);
- ``before_step(k, preds, call) -> call``: the stage's prepared kernel call for this run (fastdiff.ops.step_call;
  a corrector's per-sample rows via ``replaced``; the caller's or the Brownian noise into its buffer);
- ``after_stage(k)``: after stage k's kernel (the finiteness flags);
- ``after_repeat(k, repeat)``: after the last stage k of a step's repeat (inpainting, RePaint's way back);
- ``after_step(k)``: after the last stage k of a step and its repeats (a callback, a progress bar).

Stage-table transforms (corrector steps, classifier guidance) run before the plan exists: they change the
stages and so the calls (fastdiff.sampling.sampler).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# after_replay: a captured run (cuda_graph=True) has been replayed; host reads are allowed again (the cache's report)
POINTS = ("start", "predictions", "before_step", "after_stage", "after_repeat", "after_step", "after_replay")


class Points:
    """The hooks at each declared point, in the order they were added."""

    __slots__ = POINTS

    def __init__(self):
        for name in POINTS:
            setattr(self, name, [])


@dataclass
class Plan:
    """One sampling call's host work, done: the executor only calls the model, the hooks and the kernels."""

    stages: list  # the Stage table the calls come from
    grid: list[float]  # flow times t_0 .. t_steps
    kernel: object  # the backend's sampler_step op (the one-off writes: the initial state, churn)
    calls: list[list]  # per repeat (RePaint), per stage: its prepared kernel call (fastdiff.ops.step_call)
    spans: list[tuple[int, int]]  # per step, its stages [first, end)
    model_calls: object  # fastdiff.sampling.core.model_calls.ModelCalls
    times: object  # fastdiff.sampling.core.tables.ModelTimes: times(k, n), stage k's model times for n samples
    x: torch.Tensor  # the state buffer
    x_outs: list[torch.Tensor]  # the state and its guidance twins (the next model input's copies)
    result: torch.Tensor  # what the last stage writes: the returned samples
    seeds: torch.Tensor  # int64 [B], refilled per call
    finite: object  # fastdiff.sampling.core.arguments.FiniteFlags
    points: Points = field(default_factory=Points)
    keep: list = field(default_factory=list)  # what a captured graph reads, kept alive with the plan
    repeat: int = 0  # the repeat of the step being run (RePaint), set by the executor

    def add(self, point: str, hook) -> None:
        """Put ``hook`` at ``point`` (one of POINTS)."""
        getattr(self.points, point).append(hook)
