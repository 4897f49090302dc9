"""Each registered method's fused step per model evaluation, next to Euler's: the kernel calls of its stage
table (50 steps on CondOT, one branch, a kept prediction, no model) exactly as the loop makes them. More
history buffers, side outputs and draws cost bandwidth; a case's bytes are what its calls must move
(reads of x, the prediction and the history, writes of the outputs, 4 bytes an element each), so the
report's GB/s and its ratio to Euler's time say what each extra buffer costs.

Next to each, "<method> loop": a reused fastdiff.Sampler running the same 50 evaluations with a free model (it
returns a kept tensor), i.e. the whole loop around the model; its time over the fused calls' time is the loop's own
cost per step relative to the fused step (issue 33's bound: within 1.2x). dpm_adaptive, which chooses its steps
while it samples, has no stage table and no case. For euler, heun and dpmpp_2m, "<method> loop fresh" (the loop
with a model returning 8 buffers in turn, as a real model's new outputs are cold) and "<method> loop cached o0 /
o2" (the same with step caching reusing every other step: plain reuse / second-order extrapolation), each
next to "... calls": the kernel calls that loop makes (its reused steps' fused replays reading the kept outputs
included), recorded from one run and replayed alone, so that the loop's time over theirs is the loop's own cost
per step (issue 34's bound: within 1.2x).
"""

from __future__ import annotations

from typing import Callable

import torch

from fastdiff.bench.case import Case

STEPS, BATCH = 50, 16


def _calls(method, n: int, device) -> tuple[list, int]:
    """The first 50 prepared sampler_step calls of ``method``'s 50-step table and the bytes they move."""
    from fastdiff.ops.sampler_step import prepare
    from fastdiff.paths import get_path
    from fastdiff.sampling.core.calls import kernel_args as _kernel_args

    path = get_path("condot")
    grid, options = _grid_and_options(method)
    stages = method.stages(path, grid, "velocity", **options)
    g = torch.Generator().manual_seed(0)
    per = n // BATCH
    buffers: dict[str, torch.Tensor] = {}

    def buffer(name):
        if name not in buffers:
            buffers[name] = torch.randn(BATCH, per, generator=g).to(device)
        return buffers[name]

    pred = torch.randn(BATCH, per, generator=g).to(device)
    seeds = torch.arange(BATCH, device=device)
    calls, elements = [], 0
    for st in (stages * 2)[:STEPS]:  # 50 evaluations: the first 50 of the table (two-evaluation methods: 25 steps)
        history = [buffer(h) for h in st.history_buffers()]
        side = buffer(st.side) if st.side else None
        call = prepare(buffer(st.input), [pred], None, history, st.kernel_rows(), seeds, st.streams(),
                       [buffer(st.out)], side, None)
        calls.append(_kernel_args(call))
        elements += per * BATCH * (2 + len(history) + 1 + (side is not None))
    return calls, 4 * elements


def _grid_and_options(method) -> tuple[list[float], dict]:
    """50 steps on CondOT from t = 0, or from t = 1e-3 for a method that steps in log sigma from its first time
    (dpm_fast), and the method's default options (sigma: the ODE form, Euler's row being the baseline)."""
    options = {k: v for k, v in method.option_values().items() if k in method.options}
    if "sigma" in options:
        options["sigma"] = None
    t0 = 1e-3 if method.step_grid is not None else 0.0
    return [t0 + (1 - t0) * i / STEPS for i in range(STEPS + 1)], options


class _FreeModel:
    """A model that costs nothing: returns one of ``rotation`` kept tensors of x's shape, equal (not x itself, which
    would let the step read its prediction from the state's cache lines: the fused calls above read a buffer of
    their own). A cached loop keeps up to three outputs per call, which span up to six calls (Heun's same-time entries
    replaced): eight in turn are never one it keeps, as a real model's new tensors are not (a buffer it still keeps
    would make it copy each output, as for a model that writes one buffer)."""

    def __init__(self, rotation: int = 1):
        self.outs, self.rotation, self.i = [], rotation, 0

    def __call__(self, x, t, y=None):
        if not self.outs or self.outs[0].shape != x.shape or self.outs[0].device != x.device:
            out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
            self.outs = [out] + [out.clone() for _ in range(self.rotation - 1)]
        self.i = (self.i + 1) % self.rotation
        return self.outs[self.i]


ROTATION = 8  # buffers the free model of the fresh and cached loops returns in turn
CACHED = ("euler", "heun", "dpmpp_2m")  # the methods with cached loop cases (issue 34's)


def _alternate(order: int):
    """Step caching that reuses every other step with the free model (its outputs are equal, so EasyCache's
    estimated change is 0 and max_skips=1 forces the computed steps between), extrapolating to ``order``."""
    from fastdiff.sampling.features.caching import EasyCache

    return EasyCache(max_skips=1, order=order, start_percent=0.0, end_percent=1.0)


def _loop(method, n: int, device, cache=None, rotation: int = 1):
    """A reused Sampler of ``method`` whose table has about STEPS stages, with the free model; (run, stages)."""
    import fastdiff

    grid, options = _grid_and_options(method)
    steps = STEPS if method.step_grid is not None else max(1, STEPS // method.evals(**options))
    grid = [grid[0] + (1 - grid[0]) * i / steps for i in range(steps + 1)]
    options.pop("sigma", None)
    sampler = fastdiff.Sampler(_FreeModel(rotation), None, shape=(n // BATCH,), batch_size=BATCH, path="condot",
                               prediction="velocity", method=method.name, timesteps=grid, device=device,
                               cache=cache, **options)
    stages = len(method.stages(fastdiff.paths.get_path("condot"), grid, "velocity",
                               **({"sigma": None} if "sigma" in method.options else {}), **options))
    return sampler, stages


def _recorded_calls(sampler) -> Callable[[], None]:
    """The kernel calls one run of ``sampler`` makes, each with the predictions it reads, in order, after the run's
    start (its initial draw): the loop's fused work without the loop (a reused step's fused replay reading its kept
    outputs included), so that the loop's time over theirs is its own cost per step."""
    sampler(seed=0)  # the plan
    record = []

    def keep(k, preds, call):
        record.append((call, preds if isinstance(preds, torch.Tensor) else list(preds)))
        return call

    hooks = sampler._plan.points.before_step
    hooks.append(keep)  # after the plan's own hooks: the call that runs
    try:
        sampler(seed=0)
    finally:
        hooks.remove(keep)

    starts = list(sampler._plan.points.start)  # the initial draw (one fused pass) and the features' resets

    def run():
        for hook in starts:
            hook()
        for call, preds in record:
            call(preds)

    return run


def method_cases(n: int, device="cpu", impls=None) -> list[Case]:
    """One case per registered method: the first 50 kernel calls of its 50-step table, i.e. 50 model
    evaluations' fused steps (median / 50 = the time per evaluation), the baseline being Euler's."""
    from fastdiff import dispatch
    from fastdiff.sampling.methods import methods

    kernel = dispatch.kernel(dispatch.resolve(torch.device(device)), "sampler_step")
    out = []
    for method in methods():
        if impls is not None and not any(i == method.name or i.startswith(f"{method.name} loop") for i in impls):
            continue
        if method.run is not None:  # steps chosen while sampling: no table of kernel calls to time
            continue
        calls, nbytes = _calls(method, n, device)

        def run(calls=calls):
            for args in calls:
                kernel(*args)

        if impls is None or method.name in impls:
            out.append(Case("methods", method.name, n, "fp32", run, nbytes,
                            f"{STEPS} evaluations' steps, {nbytes / STEPS / n:.1f} bytes per element and evaluation"))
        if impls is None or f"{method.name} loop" in impls:
            sampler, stages = _loop(method, n, device)
            out.append(Case("methods", f"{method.name} loop", n, "fp32", lambda s=sampler: s(seed=0),
                            nbytes * stages // STEPS,
                            f"a reused Sampler, {stages} stages with a free model (per stage: divide by {stages}; "
                            f"the fused calls above: by {STEPS})"))
        for name, cache in ((f"{method.name} loop fresh", None), (f"{method.name} loop cached o0", _alternate(0)),
                            (f"{method.name} loop cached o2", _alternate(2))):
            if method.name not in CACHED:
                continue
            what = ("the loop with a model returning 8 buffers in turn (a real model's outputs are new tensors)"
                    + ("" if cache is None else f", cache=EasyCache(max_skips=1, order={cache.order}): every other "
                                                "step reused"))
            if impls is None or name in impls or f"{name} calls" in impls:
                sampler, stages = _loop(method, n, device, cache=cache, rotation=ROTATION)
            if impls is None or name in impls:
                out.append(Case("methods", name, n, "fp32", lambda s=sampler: s(seed=0), nbytes * stages // STEPS,
                                f"{what}; per stage: divide by {stages}"))
            if impls is None or f"{name} calls" in impls:
                out.append(Case("methods", f"{name} calls", n, "fp32", _recorded_calls(sampler),
                                nbytes * stages // STEPS,
                                f"the kernel calls that loop makes, alone (the loop's own time: the loop's over "
                                f"these); per stage: divide by {stages}"))
    if impls is None or "brownian_noise" in impls:
        calls, nbytes = _brownian_calls(n, device)

        def run_noise(calls=calls):
            for args in calls:
                kernel(*args)

        out.append(Case("methods", "brownian_noise", n, "fp32", run_noise, nbytes,
                        f"step_noise='brownian': the noise sums of {STEPS} Euler–Maruyama steps alone "
                        f"({len(calls)} calls of <= 4 draws)"))
    return out


def _brownian_calls(n: int, device) -> tuple[list, int]:
    """The kernel calls that sum the Brownian draws of a 50-step Euler–Maruyama table (step_noise="brownian",
    fastdiff.sampling.features.brownian) and the bytes they move (each reads its buffer twice and writes it)."""
    from fastdiff.paths import get_path
    from fastdiff.sampling.features.brownian import kernel_calls
    from fastdiff.sampling.methods import get_method
    from fastdiff.sampling.core.scratch import StageCache

    grid = [i / STEPS for i in range(STEPS + 1)]
    stages = get_method("euler").stages(get_path("condot"), grid, "velocity", sigma=lambda t: 1.0)
    buffer = torch.zeros(BATCH, n // BATCH, device=device)
    seeds = torch.arange(BATCH, device=device)
    per_stage = kernel_calls(stages, [0] * len(stages), grid, buffer, seeds, StageCache(), "bench", "reference",
                             False)
    calls = [call.args for stage_calls in per_stage for call in stage_calls]  # run through the op, as the others
    return calls, 12 * buffer.numel() * len(calls)
