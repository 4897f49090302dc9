"""The Schedule base class: a schedule's levels (fastdiff.schedules.formulas) mapped to a flow-time grid on a
path (fastdiff.schedules.levels), and the checks of its options (errors name the option and the schedule)."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Sequence

from fastdiff.gaussian_paths import GaussianPath, get_path
from fastdiff.schedules.levels import Levels, level, time_of


def _number(schedule: str, name: str, value, low: float = -math.inf, low_open: bool = False,
            optional: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or \
            value < low or (low_open and value == low):
        bound = f" {'>' if low_open else '>='} {low:g}" if low > -math.inf else ""
        raise ValueError(f"{name} of schedule {schedule!r} must be a finite number{bound}, got {value!r}")
    return float(value)


def _count(schedule: str, name: str, value, low: int, optional: bool = False) -> Optional[int]:
    if value is None and optional:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} of schedule {schedule!r} must be an int >= {low}, got {value!r}")
    return int(value)


class Schedule:
    """A named schedule with its options. ``sigmas(steps, levels)``: its levels (decreasing, in ``native``
    coordinate or the path's); ``grid(steps, path)``: the flow-time grid. The options are fixed once made (a
    schedule is a value: equal options, equal schedules; sample()'s plan cache keys on it)."""

    name = "schedule"
    native: Optional[str] = None  # None: the path's own coordinate; "sigma" / "flow": absolute levels

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:  # options are set inside the constructors only
            @functools.wraps(init)
            def constructor(self, *args, _init=init, **kw):
                object.__setattr__(self, "_building", getattr(self, "_building", 0) + 1)
                try:
                    _init(self, *args, **kw)
                finally:
                    object.__setattr__(self, "_building", self._building - 1)

            cls.__init__ = constructor

    def __setattr__(self, name, value):
        if not getattr(self, "_building", 0):
            raise AttributeError(f"the options of {type(self).__name__} are fixed: make a new one "
                                 f"({type(self).__name__}(..., {name}=...))")
        object.__setattr__(self, name, value)

    def options(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.options() == other.options()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted((k, repr(v)) for k, v in self.options().items()))))

    def levels(self, path: GaussianPath, table: Optional[Sequence[float]] = None) -> Levels:
        return Levels(path, getattr(self, "num_train_timesteps", 1000), table)

    def sigmas(self, steps: int, levels: Levels) -> list[float]:
        raise NotImplementedError

    def grid(self, steps: int, path="condot", t_start: float = 0.0,
             levels: Optional[Sequence[float]] = None) -> list[float]:
        """The flow-time grid of ``steps`` steps on ``path`` (its first time at least ``t_start``). ``levels``:
        the training levels sigma_0 < ... < sigma_{N-1} to use instead of the path's (a DDPM network sampled on
        the VE path: fastdiff.adapters.diffusers.Denoiser.timesteps)."""
        if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an int >= 1 for schedule {self.name!r}, got {steps!r}")
        path = get_path(path)
        lv = self.levels(path, levels)
        values = self.sigmas(int(steps), lv)
        if self.native is not None and self.native != lv.coord:
            values = [_convert(v, self.native, lv.coord) for v in values]
        # a repeated level is a step of length 0 (a no-op in the peers' loops, e.g. laplace clamped at sigma_max)
        values = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
        top = level(path, 0.0, lv.coord)
        times = []
        for i, v in enumerate(values):
            if i == 0 and v > top and len(values) > 1 and values[1] < top:
                times.append(0.0)  # more noise than the path holds: its start
                continue
            try:
                times.append(time_of(path, v, lv.coord))
            except ValueError as exc:
                raise ValueError(f"schedule {self.name!r}: level {i} of {len(values)} does not fit the path: {exc}") \
                    from None
        if times[0] < t_start < times[1]:
            times[0] = t_start  # the method cannot start where alpha = 0 (e.g. an eps model on CondOT)
        if any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError(f"schedule {self.name!r} gives a grid that is not strictly increasing on {path!r}: "
                             f"{times} (levels {values})")
        return times


def _convert(v: float, frm: str, to: str) -> float:
    """A level between sigma = beta / alpha and the noise fraction s of CondOT at the same SNR."""
    if frm == "sigma":
        return 1.0 if math.isinf(v) else v / (1.0 + v)
    return math.inf if v >= 1.0 else v / (1.0 - v)
