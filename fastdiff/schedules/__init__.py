"""Noise schedules: named flow-time grids for ``fastdiff.sample(schedule=...)`` and the helpers of
``sample(timesteps=...)`` (docs/schedules.md).

    x = fastdiff.sample(model, 30, schedule="karras", path="vp", prediction="eps", ...)
    x = fastdiff.sample(model, 28, schedule=fastdiff.schedules.Shifted(image_seq_len=4096), ...)
    grid = fastdiff.schedules.schedule_grid("beta", 20, path="vp")      # the grid itself
    levels = fastdiff.schedules.sigmas("karras", 20, path="vp")         # in the peer's own coordinate

Modules: grid (the Schedule classes and names), base (the Schedule base class), formulas (the formulas in the
peers' coordinates), levels (a path's coordinate, training levels and the map back to flow time), tables (Align
Your Steps), gits_table (GITS), basic (karras_sigmas, exponential_sigmas, ve_timesteps, ve_grid, shifted_timesteps,
shift_time).
"""

from fastdiff.schedules.basic import (exponential_sigmas, karras_sigmas, shift_time, shifted_timesteps, ve_grid,
                                      ve_timesteps)
from fastdiff.schedules.base import Schedule
from fastdiff.schedules.grid import (GITS, SCHEDULE_NAMES, SCHEDULES, SPACINGS, AlignYourSteps, Beta, DDIMUniform,
                                     Exponential, Karras, KLOptimal, Laplace, LinearQuadratic, Normal, PolyExponential,
                                     SGMUniform, Shifted, Simple, TimestepSpacing, VPSchedule, get_schedule,
                                     schedule_grid, sigmas)
from fastdiff.schedules.levels import Levels, coordinate, time_of
from fastdiff.schedules.formulas import dynamic_shift_mu

__all__ = ["karras_sigmas", "exponential_sigmas", "ve_timesteps", "ve_grid", "shifted_timesteps", "shift_time",
           "Schedule", "Karras", "Exponential", "PolyExponential", "Laplace", "KLOptimal", "LinearQuadratic",
           "VPSchedule", "Normal", "SGMUniform", "Simple", "DDIMUniform", "Beta", "TimestepSpacing", "AlignYourSteps",
           "GITS", "Shifted", "SCHEDULES", "SCHEDULE_NAMES", "SPACINGS", "get_schedule", "schedule_grid", "sigmas",
           "dynamic_shift_mu", "Levels", "coordinate", "time_of"]
