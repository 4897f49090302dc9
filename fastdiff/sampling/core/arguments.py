"""Checks and normalization of ``fastdiff.sample``'s arguments: errors name the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from fastdiff import _checks
from fastdiff.paths import affine_coefficients
from fastdiff.sampling.core import labels
from fastdiff.sampling.core.stage import MAX_LANGEVIN_STEPS, Stage
from fastdiff.schedules import get_schedule

# First grid point where a prediction cannot be converted at t = 0 (e.g. eps or score models under
# CondOT, whose alpha_0 = 0 makes x0 = (x - beta eps) / alpha undefined).
T_MIN_SINGULAR = 1e-3
# Longest grid a call takes. The coefficient tables live on the host (about 0.6 kB per stage, so
# ~120 MB for Heun at this bound), and noise stream ids 1 + step must stay below 2^32; 10^5 steps is
# 100x DDPM's 1000-step ancestral sampler, the longest in common use.
MAX_STEPS = 100_000


def is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def time_grid(steps, timesteps, path, prediction, conversions, start_late: bool = False,
              schedule=None) -> list[float]:
    """The grid: ``timesteps`` checked, or ``steps`` steps to 1 from 0 (or from T_MIN_SINGULAR when one of the
    method's ``conversions`` (fastdiff.sampling.methods) is singular at t = 0 or ``start_late``): uniform, or the
    named ``schedule``'s (fastdiff.schedules) on ``path``."""
    if schedule is not None and timesteps is not None:
        raise ValueError("schedule and timesteps were both given: pass one (schedule makes the grid of steps "
                         "steps; timesteps is a grid already)")
    if schedule is not None:
        schedule = get_schedule(schedule)  # ValueError naming the choices, before the steps are checked
    if timesteps is not None:
        if isinstance(timesteps, torch.Tensor):
            if timesteps.dim() != 1:
                raise ValueError(f"timesteps must be 1-D (steps + 1 times), got shape {tuple(timesteps.shape)}")
            timesteps = timesteps.detach().double().cpu().tolist()
        if not isinstance(timesteps, Sequence) or isinstance(timesteps, (str, bytes)):
            raise TypeError(f"timesteps must be a 1-D tensor or a sequence of floats, got {type(timesteps).__name__}")
        for i, v in enumerate(timesteps):
            if not is_number(v):
                raise TypeError(f"timesteps[{i}] must be a float (timesteps is a 1-D grid), got {type(v).__name__}")
        grid = [float(v) for v in timesteps]
        if len(grid) < 2:
            raise ValueError(f"timesteps must hold at least 2 times (steps + 1), got {len(grid)}")
        if len(grid) > MAX_STEPS + 1:
            raise ValueError(f"timesteps holds {len(grid) - 1} steps; at most {MAX_STEPS} are supported")
        if steps is not None and len(grid) != steps + 1:
            raise ValueError(f"timesteps has {len(grid)} times but steps={steps} needs steps + 1 = {steps + 1}; "
                             "pass steps=None with explicit timesteps")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in grid):
            raise ValueError(f"timesteps must lie in [0, 1] (flow time: 0 noise, 1 data), got {grid}")
        if any(b <= a for a, b in zip(grid, grid[1:])) and any(b >= a for a, b in zip(grid, grid[1:])):
            raise ValueError("timesteps must be strictly increasing (flow time runs from noise at 0 to data at 1), "
                             "or strictly decreasing (inversion, data to noise)")
        return grid
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > MAX_STEPS:
        raise ValueError(f"steps={steps} is more than the {MAX_STEPS} steps supported")
    t0 = T_MIN_SINGULAR if start_late else 0.0
    for to in conversions:
        try:
            affine_coefficients(path, 0.0, prediction, to)
        except ValueError:
            t0 = T_MIN_SINGULAR
    if schedule is not None:
        grid = schedule.grid(int(steps), path, t_start=t0)
        if len(grid) > MAX_STEPS + 1:
            raise ValueError(f"schedule {schedule.name!r} gives {len(grid) - 1} steps; at most {MAX_STEPS} are "
                             "supported")
        return grid
    return [t0 + (1.0 - t0) * i / steps for i in range(steps + 1)]


# The SDE's diffusion coefficient in flow time: useful values are O(1); at 1e3 a 3-step chain already reaches
# |x| ~ 1e16, and at 2^31 the float32 state overflows to inf without any model output being non-finite.
MAX_SIGMA = 1e3


def sigma_function(sigma) -> Callable[[float], float]:
    if callable(sigma):
        def fn(t: float) -> float:
            s = sigma(t)
            if isinstance(s, torch.Tensor):
                if s.numel() != 1:
                    raise TypeError(f"sigma(t) must return one number per time (shared by the batch), got a tensor "
                                    f"of shape {tuple(s.shape)} for sigma({t})")
                s = s.item()
            if not is_number(s):
                raise TypeError(f"sigma(t) must return a float, got {type(s).__name__} for sigma({t})")
            s = float(s)
            if not math.isfinite(s) or not 0 <= s <= MAX_SIGMA:
                raise ValueError(f"sigma(t) must be in [0, {MAX_SIGMA:g}], got sigma({t}) = {s}")
            return s
        return fn
    if not is_number(sigma):
        raise TypeError(f"sigma must be a float or a callable t -> sigma_t, got {type(sigma).__name__}")
    if not math.isfinite(sigma) or not 0 <= sigma <= MAX_SIGMA:
        raise ValueError(f"sigma must be in [0, {MAX_SIGMA:g}], got {sigma}")
    return lambda t: float(sigma)


def sample_seeds(seed, batch: int, device) -> torch.Tensor:
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        if seed < 0 or seed + batch > 1 << 64:
            raise ValueError(f"seed must be in [0, 2^64 - batch_size], got {seed}")
        return _checks.seeds_tensor([seed + b for b in range(batch)], device)
    seeds = _checks.seeds_tensor(seed, device, name="seed")
    if seeds.shape[0] != batch:
        raise ValueError(f"seed holds {seeds.shape[0]} per-sample seeds but the batch has {batch} samples")
    return seeds


def batch_size_of(y, noise, batch_size, noise_name: str = "noise") -> int:
    """The batch size that y, the initial state ``noise`` (or init: ``noise_name``) and batch_size agree on."""
    sizes = {}
    if y is not None:
        if isinstance(y, torch.Tensor) and y.dim() == 0:
            raise ValueError("y must hold one label per sample (a batch [B, ...]), got a 0-d tensor; "
                             "write y.reshape(1) for one sample")
        if not isinstance(y, torch.Tensor) and not labels.is_tree(y) and \
                (not isinstance(y, Sequence) or isinstance(y, (str, bytes))):
            raise TypeError(f"y must be a tensor [B, ...], a sequence of B labels or a dict / tuple of label batches, "
                            f"got {type(y).__name__}")
        y_batch = labels.batch_of("y", y)
        if y_batch is not None:
            sizes["y"] = y_batch
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 1:
            raise TypeError(f"{noise_name} must be a floating-point tensor [B, *shape], got "
                            f"{_describe(noise)}")
        sizes[noise_name] = noise.shape[0]
    if batch_size is not None:
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__} {batch_size!r}")
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        sizes["batch_size"] = int(batch_size)
    if not sizes and y is not None:  # a tree whose leaves all have batch 1
        return 1
    if not sizes:
        raise ValueError("the batch size comes from y, noise or batch_size; pass one of them")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"inconsistent batch sizes: {sizes}")
    return next(iter(sizes.values()))


def batch_shape_device(y, noise, init, batch_size, shape, device) -> tuple:
    """(B, per-sample shape, device) of a sample() call: from the initial state ``noise`` or the data ``init``
    where given (shape and device too), else from y / batch_size, shape and device."""
    start = noise if noise is not None else init
    start_name = "noise" if noise is not None else "init"
    B = batch_size_of(y, start, batch_size, start_name)
    device = None if device is None else sampling_device(device)
    if start is not None:
        if shape is not None and tuple(start.shape[1:]) != tuple(_checks.shape_tuple(shape)):
            raise ValueError(f"{start_name} has per-sample shape {tuple(start.shape[1:])} but shape={tuple(shape)}")
        shape = tuple(start.shape[1:])
        if device is None:
            device = sampling_device(start.device, f"{start_name}'s device")
    if shape is None:
        raise ValueError("shape (the per-sample shape) is required unless noise or init is given")
    shape = _checks.shape_tuple(shape)
    if device is None:
        y_device = labels.device_of(y)
        device = sampling_device(y_device, "y's device") if y_device is not None else torch.device("cpu")
    if start is None:  # state, model input (two CFG branches), predictions, x0 and scratch: ~6 float32 copies
        # (a 10^9 x 2 batch peaked at 24 GB, 3x its state, before its first model output)
        _checks.check_memory(f"batch_size = {B} samples of shape = {shape}", 24 * B * math.prod(shape), device)
    return B, shape, device


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:80]


def sampling_device(device, name: str = "device") -> torch.device:
    """``device`` checked (_checks.device_arg: cpu, or an existing CUDA device; errors name ``name``), CUDA with
    its index."""
    device = _checks.device_arg(name, device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def loop_flags(model, cfg_batch, progress, check_finite, cuda_graph, callback) -> tuple[bool, bool, bool, bool]:
    """sample()'s bool arguments, True or False only (bool("no") is True), and its model and callback, checked up
    front (a callback that is not callable would fail only after the first step)."""
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, y), got {type(model).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be None or callable as callback(step, t, x, x0), got {type(callback).__name__}")
    return (_checks.flag("cfg_batch", cfg_batch), _checks.flag("progress", progress),
            _checks.flag("check_finite", check_finite), _checks.flag("cuda_graph", cuda_graph))


def check_guided_labels(guided: bool, y, null_y) -> None:
    if guided and null_y is None:
        raise ValueError("cfg != 1 needs null_y, the label of the unconditional branch")
    if guided and y is None:
        raise ValueError("cfg != 1 needs y, the conditioning of the conditional branch")


def null_labels(null_y, y, batch: int):
    """null_y for every sample: a tensor like y (a scalar label is broadcast), a list of B labels, or a tree
    like y's (fastdiff/sampling/core/labels.py)."""
    if labels.is_tree(y):
        return labels.null_like(null_y, y, batch)
    if isinstance(y, torch.Tensor):
        try:  # a string would reach torch as "new(): invalid data type 'str'"
            null = None if isinstance(null_y, (str, bytes)) else torch.as_tensor(null_y, device=y.device)
        except (TypeError, ValueError, RuntimeError):
            null = None
        if null is None:
            raise TypeError(f"null_y must be a label like y's ({y.dtype}): a number or a tensor; got "
                            f"{_describe(null_y)}")
        if null.is_floating_point() and not y.is_floating_point():
            raise TypeError(f"null_y must be a label of y's kind ({y.dtype}), got a float {null_y!r}")
        null = null.to(y.dtype)
        if null.dim() == 0 or null.shape == y.shape[1:] or (null.shape[:1] == (1,) and null.shape[1:] == y.shape[1:]):
            null = null.expand(y.shape).contiguous()  # one label, or one per-sample value of batch 1
        if null.shape != y.shape:
            raise ValueError(f"null_y must be one label or a batch like y {tuple(y.shape)}, got {tuple(null.shape)}")
        return null
    if isinstance(null_y, (list, tuple)):
        if len(null_y) != batch:
            raise ValueError(f"null_y holds {len(null_y)} labels but the batch has {batch} samples")
        return list(null_y)
    return [null_y] * batch


def guidance_interval_pair(guidance_interval):
    if guidance_interval is None:
        return None
    if not isinstance(guidance_interval, Sequence) or len(guidance_interval) != 2 or \
            not all(is_number(v) for v in guidance_interval):
        raise TypeError(f"guidance_interval must be a pair (t_lo, t_hi) of floats, got {guidance_interval!r}")
    lo, hi = (float(v) for v in guidance_interval)
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"guidance_interval must be (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1, got {guidance_interval}")
    return lo, hi


def concat_labels(y, null):
    return labels.concat(y, null)


def batched_labels(conds: list, null, device, batched: bool):
    """(the condition batches on ``device``, the labels of one batched guided call: the conditions in order,
    then the null labels — None when not ``batched``)."""
    conds = [labels.to_device(c, device) for c in conds]
    if not batched:
        return conds, None
    joined = conds[0]
    for c in conds[1:] + [null]:
        joined = concat_labels(joined, c)
    return conds, joined


def check_model_output(out, shape, device, stage: Stage):
    """Shape/device/dtype of a model output: metadata only, no synchronization."""
    def where():
        return f"at step {stage.step} (t={stage.t:.6g})"

    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model returned {type(out).__name__} {where()}; it must return a tensor")
    if out.shape != shape:
        raise ValueError(f"model output {where()} has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.device != device:
        raise ValueError(f"model output {where()} is on {out.device}, expected {device}")
    if out.dtype not in _checks.PRED_DTYPES:
        raise TypeError(f"model output {where()} has dtype {out.dtype}; expected float32, float16 or bfloat16")


def check_step_noise(noise, x: torch.Tensor, stage: Stage) -> torch.Tensor:
    """The caller's noise for a stage (sample(step_noise=...)): a floating tensor of the state's shape
    (copied into the kept buffer, so any device and floating dtype will do)."""
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"step_noise returned {type(noise).__name__ if not isinstance(noise, torch.Tensor) else noise.dtype}"
                        f" at step {stage.step}; it must return a floating-point tensor")
    if noise.shape != x.shape:
        raise ValueError(f"step_noise returned shape {tuple(noise.shape)} at step {stage.step}, expected {tuple(x.shape)}")
    return noise


def check_step_noise_kind(step_noise) -> bool:
    """Validates sample(step_noise=...): None, "brownian" or a callable; returns whether it is "brownian"."""
    if isinstance(step_noise, str):
        if step_noise != "brownian":
            raise ValueError(f"step_noise must be None, 'brownian' or a callable step_noise(step, j), got {step_noise!r}")
        return True
    if step_noise is not None and not callable(step_noise):
        raise TypeError(f"step_noise must be None, 'brownian' or a callable step_noise(step, j), got "
                        f"{type(step_noise).__name__}")
    return False


class FiniteFlags:
    """The finiteness check of the predictions, on the device. It rides in the step, which reads every
    prediction anyway: stage k clears flag [k % rows, b] when a prediction of sample b is inf/NaN. The table
    holds at most 2^20 flags and is reduced into ``first_bad`` (the first stage with a non-finite output, -1
    for none) whenever it is full and after the loop; nothing is read back until the caller reads first_bad."""

    def __init__(self, n_stages: int, B: int, device, enabled: bool, reduce_at_end: bool = True):
        self.enabled, self.reduce_at_end = enabled, reduce_at_end
        self.reduced = False  # whether a full table was reduced during this run (then first_bad may be set)
        self.rows = max(1, min(n_stages, (1 << 20) // max(B, 1))) if enabled else 0
        self.table = torch.ones((self.rows, B), dtype=torch.int32, device=device) if enabled else None
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self._row_ids = torch.arange(self.rows, device=device)
        self.dirty = False  # whether the table may hold cleared flags (a run began and was not settled)
        last = n_stages - 1
        # the stages after which the executor reduces (after_stage): a full table, and the end in a captured loop
        self.points = {k for k in range(n_stages) if enabled and ((k % self.rows == self.rows - 1 and k != last)
                                                                   or (k == last and reduce_at_end))}

    def after_stage(self, k: int) -> None:
        """The executor's hook (only where ``points`` is not empty)."""
        if k in self.points:
            self._reduce(k)
            self.reduced = True

    def row(self, k: int):
        """Stage k's flags [B] (None when the check is off)."""
        return self.table[k % self.rows] if self.enabled else None

    def reset(self) -> None:
        self.reduced = False
        if self.enabled and (self.dirty or self.reduce_at_end):  # a settled table is clean already
            self.table.fill_(1)
        self.dirty = True

    def after(self, k: int, last: int) -> None:
        """After stage k: reduce the table into first_bad when it is full, or at the loop's end when the host
        will not settle it (a captured loop: ``reduce_at_end``)."""
        if self.enabled and ((k % self.rows == self.rows - 1 and k != last) or (k == last and self.reduce_at_end)):
            self._reduce(k)
            self.reduced = True

    def settle(self, last: int) -> None:
        """After the loop, before first_bad is read: the last rows reduced, read once (a clean table, the common
        case, is one reduction and one read: ~2 us at batch 1 instead of the ~15 us of a device-side reduction)."""
        if not self.enabled or self.reduce_at_end:
            return
        if self.reduced or not bool(self.table.all()):  # rows not reached this run hold ones
            self._reduce(last)
            self.reduced = True  # first_bad may now be set: the caller reads it
        self.dirty = False

    def _reduce(self, k: int) -> None:
        first = k - k % self.rows
        bad = (self.table == 0).any(1)
        at = torch.where(bad, self._row_ids + first, torch.iinfo(torch.int64).max).min()
        self.first_bad.copy_(torch.where((self.first_bad < 0) & bad.any(), at, self.first_bad))
        self.table.fill_(1)

    @staticmethod
    def raise_first_bad(first_bad: torch.Tensor, stages, given: dict | None = None, step_noise=None) -> None:
        """FloatingPointError naming the step and time of the first stage with a non-finite output (reads
        ``first_bad`` back: once, after the loop); a ValueError naming the argument instead when one of the
        ``given`` tensors (name -> the caller's noise / init) holds inf/NaN (looked at only then)."""
        k = int(first_bad.item())
        if k >= 0:
            for name, value in (given or {}).items():
                if value is not None and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{name} holds inf or NaN (the model's output was then not finite from step "
                                     f"{stages[k].step})")
            st = stages[k]
            suspects = "the model, the path/prediction pair and the time grid"
            if callable(step_noise):  # its normals enter the state unchecked (reading them would sync every step)
                suspects += ", and step_noise (its normals are added to the state)"
            raise FloatingPointError(f"model output is not finite at step {st.step} (t={st.t:.6g}); check {suspects}")


def langevin_steps(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value <= MAX_LANGEVIN_STEPS:
        raise ValueError(f"{name} must be an int in [0, {MAX_LANGEVIN_STEPS}], got {value!r}")
    return int(value)


def positive_number(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):  # '0.1' would fail inside a comparison
        raise TypeError(f"{name} must be a finite number > 0, got {type(value).__name__} {value!r}")
    if not 0.0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
