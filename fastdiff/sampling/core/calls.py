"""The kernel calls of a plan: one prepared sampler_step call per stage (fastdiff.ops.step_call: its tensors
checked once, its coefficient rows cached by the stage table; a run passes the predictions), and the initial
state's write."""

from __future__ import annotations

import operator

import torch

from fastdiff import dispatch as _dispatch
from fastdiff.ops.randn import randn
from fastdiff.ops.sampler_step import KERNEL_ARGS, ROW_ARGS, prepare, prepare_tensors, with_rows
from fastdiff.ops.step_call import replaced, step_call
from fastdiff.sampling.core.scratch import StageCache
from fastdiff.sampling.core.stage import draw_stream

kernel_args = operator.itemgetter(*KERNEL_ARGS)  # a prepared call's dict → the kernel's positional arguments
STREAMS = KERNEL_ARGS.index("streams")
# Per stage, the checked coefficient rows of its sampler_step call (with_rows' host half: weights,
# coefficients, streams), keyed by the stage table and the guidance: ~30 us of checks per stage.
ROW_CACHE = StageCache()


class StageCalls:
    """Builds each stage's call: ``tensors(k)`` names its buffers, ``rows(k)`` its coefficient rows (host lists
    or per-sample tensors), both decided by the features when the plan is built."""

    def __init__(self, buffers: dict, pairs: dict, result, seeds, finite, branches: int, backend: str, native: bool):
        self.buffers, self.pairs, self.result, self.seeds = buffers, pairs, result, seeds
        self.finite, self.branches, self.backend, self.native = finite, branches, backend, native
        self.checked = {}  # the tensor half of a call, checked once per distinct set of buffers

    def tensors(self, st, n_preds: int, history: tuple, last: bool, side: bool = True) -> dict:
        """The checked tensor half of a stage's call: its input, ``n_preds`` predictions (stand-ins: the run
        passes the model's), its history buffers and its outputs (the returned samples for the last stage).
        ``side=False``: without the side buffer, which a call of its own writes (:meth:`side_call`)."""
        result = last and self.result is not None
        side = st.side if side else None
        key = (st.input, n_preds, history, result or st.out, side)
        if key not in self.checked:
            buffers = self.buffers
            outs = [self.result] if result else list(self.pairs[st.out]) if st.out in self.pairs else \
                [buffers[st.out]]
            self.checked[key] = prepare_tensors(buffers[st.input], [buffers[st.input]] * n_preds,
                                                [buffers[h] for h in history], self.seeds, outs,
                                                buffers[side] if side else None, self.finite.row(0))
        return self.checked[key]

    def side_call(self, k: int, st, n_preds: int, weights):
        """The call that writes stage k's side buffer alone, before the stage's own call (which then has none): the
        stage's side row as the out row, over the same input, ``n_preds`` predictions and history, with branch
        ``weights`` of its own (CFG++'s unconditional history: fastdiff.sampling.features.guidance.SideCalls). The
        side row has no draws; the run passes the predictions one by one (parts: None)."""
        history = st.history_buffers()
        key = ("side", st.input, n_preds, history, st.side)
        if key not in self.checked:
            buffers = self.buffers
            self.checked[key] = prepare_tensors(buffers[st.input], [buffers[st.input]] * n_preds,
                                                [buffers[h] for h in history], self.seeds, [buffers[st.side]], None,
                                                self.finite.row(0))
        rows = st.kernel_rows()
        M = len(rows) // 2
        side_row = rows[M:M + 2 + len(history)]  # (s_x, s_pred, s_h...) without the draws' zeros
        return self.call(k, self.checked[key], weights, side_row + [0.0] * len(side_row), [], None, None)

    def call(self, k: int, tensors: dict, weights, rows, streams, cached: dict | None, parts, clip=None):
        """The prepared call of stage k: the rows checked (or taken from ``cached``), its finiteness row, and
        ``parts`` (fastdiff.ops.step_call: which part of the model's batched output is each prediction); ``clip``:
        sampler_step's fused clamp of the side row."""
        call = dict(tensors, **cached) if cached is not None else with_rows(tensors, weights, rows, streams, clip)
        if self.finite.enabled:  # the stage's own row of the table (rows are alike: checked with row 0)
            call["finite"] = self.finite.row(k)
        return step_call(self.backend, kernel_args(call), parts, self.native)


def with_streams(call, streams: list):
    """A call with other noise streams (RePaint's repeats draw on the editing streams)."""
    return replaced(call, streams=streams)


def with_outs(call, outs: list):
    """A call writing other outputs (a reused plan's last stage writes each call's fresh samples)."""
    return replaced(call, outs=outs)


def cached_rows(call) -> dict:
    """What ROW_CACHE keeps of a call: its checked rows."""
    return {name: call.args[KERNEL_ARGS.index(name)] for name in ROW_ARGS}


def initial_write(kernel, seeds, x_outs, beta0: float, z) -> None:
    """x = beta0 z into the state and its twins in one pass (out = beta0 z + 0 g); ``z`` the initial noise."""
    kernel(z, [z], [], seeds, [], [1.0], [beta0, 0.0, 0.0, 0.0], None, None, x_outs, None, None)


def initial_draw(backend: str, zeros, seeds, x_outs, beta0: float, native: bool):
    """The call x = beta0 xi(stream 0), drawn in the write itself (0 x + 0 g + beta0 xi over a kept zero buffer;
    run as ``call([zeros])``): the initial noise without a randn op and its tensor, bit for bit the same values
    (one rounding of beta0 xi either way)."""
    return step_call(backend, (zeros, [zeros], [], seeds, [0], [1.0], [0.0, 0.0, beta0, 0.0, 0.0, 0.0], None, None,
                               x_outs, None, None), None, native)


def direct_kernel(backend: str, op: str):
    """The backend's kernel of ``op`` as the plan calls it: the torch op overload itself for the native backends
    (no Python wrapper and no overload resolution per call: ~1.5 us a call at batch 1)."""
    kernel = _dispatch.kernel(backend, op)
    direct = getattr(kernel, "direct", None)
    return direct() if direct is not None else kernel


def initial_noise(seeds, shape: tuple, device, backend: str):
    """A drawer of the initial noise (stream 0) of ``seeds``, its arguments checked once (fastdiff.ops.randn)."""
    randn(seeds, 0, (0,), device=device, backend=backend)  # the checks, on an empty draw
    kernel, shape = _dispatch.kernel(backend, "randn"), tuple(shape)
    return lambda: kernel(seeds, 0, shape, 0, torch.float32)


def churn_write(kernel, x_0, c_0: float, start, start_rows, seeds, x_outs, history: list) -> None:
    """EDM churn at the first step: x = scale x_0 + c xi_0 in one pass (the initial state and the draw; with
    Brownian step noise the draw is the path's, summed into ``history``)."""
    row = [c_0, 0.0, start[1], 0.0, 0.0, 0.0] if start_rows is None else start_rows
    streams = [] if history else [draw_stream(0)]
    kernel(*kernel_args(prepare(x_0, [x_0], [1.0], history, row, seeds, streams, x_outs, None, None)))
