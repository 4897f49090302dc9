"""A Stage: one model evaluation and one fused-kernel call of a sampler (docs/design.md §2), and the
noise stream ids of the draws (docs/design.md §3).

A method's stage table is a list of these; ``fastdiff.sampling.sampler`` runs it. The algebra of one
stage (fastdiff.ops.sampler_step with one draw and the history buffers ``extra`` + ``history``):

    out  = c_x x + c_pred g + c_extra extra + Σ c_h h + c_noise noise(seeds, stream) + Σ c_d noise(seeds, stream_d)
    side = s_x x + s_pred g + s_extra extra + Σ s_h h
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DRAW_STRIDE = 1 << 24  # stream ids of draw d of step i: 1 + i + d * 2^24 (steps < 2^24, draws < 4)


def draw_stream(step: int, draw: int = 0) -> int:
    """The noise stream id of draw ``draw`` of sampler step ``step`` (docs/design.md §3): a pure function
    of (step, draw); stream 0 is the initial noise."""
    if not 0 <= step < DRAW_STRIDE - 1 or not 0 <= draw < 4:
        raise ValueError(f"draw_stream: step must be in [0, 2^24 - 1) and draw in [0, 4), got step={step}, draw={draw}")
    return 1 + step + draw * DRAW_STRIDE


@dataclass
class Stage:
    """One model evaluation and one fused-kernel call."""

    step: int  # sampler step index i (t_i -> t_{i+1})
    t: float  # time at which the model is evaluated
    input: str  # buffer fed to the model and used as `x` in the kernel
    out: str  # buffer written with `out`
    c_x: float
    c_pred: float
    c_extra: float = 0.0
    c_noise: float = 0.0
    extra: str | None = None  # buffer read as `extra`
    side: str | None = None  # buffer written with `side`
    s_x: float = 0.0
    s_pred: float = 0.0
    s_extra: float = 0.0
    stream: int = 0  # noise stream id: draw_stream(step)
    x0: tuple[float, float] = field(default=(0.0, 0.0))  # x0 = a x + b g of a step's first stage (callbacks)
    final: bool = False  # last stage of its step: the state buffer "x" holds x_{i+1}
    # further history terms after extra (multistep methods): (buffer, out coefficient, side coefficient)
    history: tuple[tuple[str, float, float], ...] = ()
    # further noise draws after (stream, c_noise): (stream, out coefficient), e.g. a draw shared with an
    # earlier stage of the step (Brownian increments over nested intervals)
    more_draws: tuple[tuple[int, float], ...] = ()
    # first stage only: the initial state becomes scale x + coefficient noise(seeds, draw_stream(0)) before
    # the model sees it (EDM churn at the first step; later steps' churn rides in the previous final stage)
    start_churn: tuple[float, float] | None = None
    # step_noise="brownian" (fastdiff.sampling.features.brownian): the noise term as ((c, a, b), ...), c times the
    # path's normalized increment over flow times [a, b]; empty: each draw is the increment over its step
    brownian_terms: tuple[tuple[float, float, float], ...] = ()
    # guidance="cfg_pp" (fastdiff.sampling.features.guidance.CFGPP): the share of c_pred that reaches the output through
    # the clean estimate (x0); the rest re-noises and takes the unconditional prediction. None: the method
    # does not split its step that way
    cfg_pp: float | None = None
    # guidance="cfg_pp": the side row's prediction is a p_null + b g (g the guided blend) instead of the out row's,
    # written by a kernel call of its own before the stage's (fastdiff.sampling.features.guidance.SideCalls): (1, 0)
    # keeps the unconditional prediction's history, as ComfyUI's multistep *_cfg_pp samplers do. None: the out row's
    side_blend: tuple[float, float] | None = None
    # guidance="cfg_pp": this stage's CFG++ form where it differs beyond its share (buffers, history), e.g. a
    # two-stage step that carries its first evaluation's guidance vector to the second; None: this stage
    cfg_pp_form: "Stage | None" = None
    # corrector_steps (fastdiff.sampling.features.corrector): a Langevin corrector step, (snr, a, b, h) with the
    # score s = a x + b g + Σ h_j history_j; its coefficient rows are per sample, from the norms of s and its draw
    corrector: tuple | None = None

    def history_buffers(self) -> tuple[str, ...]:
        """The buffers the kernel reads as history, in order: extra, then ``history``."""
        return ((self.extra,) if self.extra else ()) + tuple(h[0] for h in self.history)

    def streams(self) -> list[int]:
        """The noise streams the kernel draws, in order: ``stream`` where c_noise != 0, then ``more_draws``."""
        return ([self.stream] if self.c_noise != 0 else []) + [d[0] for d in self.more_draws]

    def draws(self) -> list[tuple[int, float]]:
        """The noise draws as (stream, out coefficient), in the order of streams()."""
        return ([(self.stream, self.c_noise)] if self.c_noise != 0 else []) + list(self.more_draws)

    def noise_scale(self) -> float:
        """The scale of the stage's whole noise term: its draws together are one standard normal times this
        (sqrt of the squared coefficients' sum), which a caller's own noise replaces (host_noise_rows)."""
        return math.sqrt(self.c_noise ** 2 + sum(c * c for _, c in self.more_draws))

    def host_noise_rows(self) -> list[float]:
        """kernel_rows with the draws replaced by one more history term, a buffer holding a standard normal
        made by the caller (k-diffusion's noise_sampler): coefficient noise_scale() in the out row, 0 in side."""
        extra = [(self.c_extra, self.s_extra)] if self.extra else []
        terms = extra + [(c, s) for _, c, s in self.history] + [(self.noise_scale(), 0.0)]
        return [self.c_x, self.c_pred, *(c for c, _ in terms), self.s_x, self.s_pred, *(s for _, s in terms)]

    def kernel_rows(self) -> list[float]:
        """sampler_step's coefficient rows (fastdiff.ops.sampler_step): (c_x, c_pred, history..., draws...)
        then the side row (s_x, s_pred, history..., zeros)."""
        extra = [(self.c_extra, self.s_extra)] if self.extra else []
        terms = extra + [(c, s) for _, c, s in self.history]
        draws = ([self.c_noise] if self.c_noise != 0 else []) + [c for _, c in self.more_draws]
        row = [self.c_x, self.c_pred, *(c for c, _ in terms), *draws]
        side = [self.s_x, self.s_pred, *(s for _, s in terms), *([0.0] * len(draws))]
        return row + side


LANGEVIN_BASE, LANGEVIN_STEP_BITS, MAX_LANGEVIN_STEPS = 1 << 29, 20, 1 << 9


def langevin_stream(step: int, j: int) -> int:
    """The stream id of Langevin step j at grid point ``step`` (annealed Langevin's steps at a level, the
    corrector's before a step): 2^29 + (j << 20) + step (docs/design.md §3)."""
    if not 0 <= step < 1 << LANGEVIN_STEP_BITS or not 0 <= j < MAX_LANGEVIN_STEPS:
        raise ValueError(f"langevin_stream: step must be in [0, 2^20) and j in [0, 512), got step={step}, j={j}")
    return LANGEVIN_BASE + (j << LANGEVIN_STEP_BITS) + step
