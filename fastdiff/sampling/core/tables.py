"""The stage tables of a sample() call: built on the host once per (method, path, prediction, grid, options)
and cached; with per-sample options (churn per sample) one per distinct setting, merged into per-sample rows
and times (fastdiff.sampling.core.merged)."""

from __future__ import annotations

from fastdiff.sampling.core.merged import Merged, groups
from fastdiff.sampling.core.scratch import StageCache
from fastdiff.sampling.core.stage import Stage

STAGE_CACHE = StageCache()  # stage tables: ~1 ms to build for 50 steps (150 path conversions)


def stage_tables(record, path, path_arg, prediction: str, grid: list[float], values: dict, per_sample_values: dict,
                 B: int, sigma_at: dict | None, transforms=()) -> tuple[list[Stage], Merged | None, tuple]:
    """(the stages the loop runs, the per-sample merge or None, a hashable key of both). ``values``: the
    method's options (sigma as the tuple of its values on the grid, or None); ``sigma_at``: {t: sigma_t};
    ``transforms``: the features' stage-table transforms (each ``transform(stages) -> stages`` with a ``key``),
    applied to each setting's table before the tables merge."""
    path_key = path_arg if isinstance(path_arg, str) else path

    def build(settings: dict) -> list[Stage]:
        key = (record.name, record.build, path_key, prediction, tuple(grid), tuple(settings.items()))
        table = STAGE_CACHE.get(key)
        if table is None:
            try:
                taken = {k: v for k, v in settings.items() if k in record.options}
                if sigma_at is not None:
                    taken["sigma"] = sigma_at.__getitem__  # the builders' form of sigma
                table = record.stages(path, grid, prediction, **taken)
            except ValueError as exc:
                if "singular" not in str(exc) and " at t=" not in str(exc):  # an option's own error (s_noise=nan):
                    raise  # no grid hint
                hint = "end the sampling grid (timesteps) before the singular point: inversion runs it backwards" \
                    if grid[0] > grid[-1] else "start the grid after the singular point"
                raise ValueError(f"{exc} (method={record.name!r}, prediction={prediction!r}, path={path!r}); "
                                 f"{hint}") from None
            STAGE_CACHE.put(key, table)
        return table

    # an empty batch has no per-sample values to group: one table of the method's values
    settings, index = groups(values, per_sample_values, B) if per_sample_values and B else ([values], [])
    tables = [build(v) for v in settings]
    for transform in transforms:
        tables = [transform(table) for table in tables]
    merged = None
    if len(tables) > 1:
        merged = Merged(tables, index, key=(tuple(tuple(v.items()) for v in settings), tuple(index)))
    key = (record.name, record.build, path_key, prediction, tuple(grid), tuple(values.items()),
           merged.key if merged else None, tuple(t.key for t in transforms))
    return (merged.stages if merged else tables[0]), merged, key


class ModelTimes:
    """The model's time inputs: one [rows, branches B] float32 table made in one go on the device (the first B
    entries of a row serve the one-pass stages, all of it the batched guided ones), not a torch.full per stage. Rows are
    the stages' distinct times, or one per stage with per-sample times (churn per sample)."""

    def __init__(self, stages: list[Stage], merged, B: int, device, branches: int = 2):
        import torch

        if merged is None:
            times = sorted({st.t for st in stages})
            self.row = [times.index(st.t) for st in stages]
            self.table = torch.tensor(times, dtype=torch.float32).view(-1, 1).expand(-1, branches * B).contiguous() \
                .to(device)
        else:
            self.row = list(range(len(stages)))
            self.table = torch.tensor([merged.times(k) * branches for k in self.row], dtype=torch.float32).to(device)
        self.views = {}  # (row, n) -> the view handed to the model (kept: a CUDA graph reads them)

    def __call__(self, k: int, n: int):
        """Stage k's times for a model call of n samples (n = B or branches B)."""
        key = (self.row[k], n)
        if key not in self.views:
            self.views[key] = self.table[self.row[k], :n]
        return self.views[key]
