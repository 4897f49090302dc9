"""Stage tables of one method under several per-sample settings (EDM churn per sample) merged into one: the
calls' structure once, each sample's coefficient rows and model times its own table's (sampler_step's per-sample
rows, docs/design.md §2). The values are read once before the loop; the loop itself reads nothing back."""

from __future__ import annotations

from dataclasses import replace

import torch

from fastdiff.sampling.core.stage import Stage


def groups(values: dict, per_sample: dict, B: int) -> tuple[list[dict], list[int]]:
    """(the distinct option settings, each sample's index into them), in order of first appearance."""
    for name, v in per_sample.items():
        if len(v) != B:
            raise ValueError(f"{name} holds {len(v)} values; per-sample options need one per sample (B = {B})")
    settings, index, seen = [], [], {}
    for b in range(B):
        key = tuple((name, per_sample[name][b]) for name in per_sample)
        if key not in seen:
            seen[key] = len(settings)
            settings.append({**values, **dict(key)})
        index.append(seen[key])
    return settings, index


class Merged:
    """Stage tables of the same calls (one per setting) as one: ``stages`` carries the calls' structure and
    every draw any table makes; rows() and times() give each sample its own table's numbers."""

    def __init__(self, tables: list[list[Stage]], index: list[int], key):
        first = tables[0]
        for table in tables[1:]:
            if len(table) != len(first) or any(_layout(a) != _layout(b) for a, b in zip(first, table)):
                raise ValueError("per-sample options that change the method's calls (stage layout) are not supported")
        self.tables, self.index = tables, index
        self.stages = [self._union(k) for k in range(len(first))]
        self.key = key  # hashable: the settings and the index, what the rows depend on

    def _union(self, k: int) -> Stage:
        streams = []
        for table in self.tables:
            for s in table[k].streams():
                if s not in streams:
                    streams.append(s)
        starts = [table[k].start_churn for table in self.tables]
        start = (1.0, 0.0) if k == 0 and any(starts) else None  # the numbers: start_rows()
        return replace(self.tables[0][k], c_noise=1.0 if streams else 0.0, stream=streams[0] if streams else 0,
                       more_draws=tuple((s, 1.0) for s in streams[1:]), start_churn=start, brownian_terms=())

    def _per_sample(self, rows: list[list[float]], device) -> torch.Tensor:
        table = torch.tensor(rows, dtype=torch.float64)
        return table[torch.tensor(self.index)].float().contiguous().to(device)

    def rows(self, k: int, host_noise: bool, device) -> torch.Tensor:
        """Stage k's coefficient rows [B, 2M] in the merged layout (host_noise: the caller's or the Brownian
        noise buffer as a last history term, Stage.host_noise_rows)."""
        union = self.stages[k].streams()
        out = []
        for table in self.tables:
            st = table[k]
            if host_noise:
                out.append(st.host_noise_rows())
                continue
            draws = dict(st.draws())
            row = st.kernel_rows()
            M = len(row) // 2
            H = M - 2 - len(st.streams())
            zs = [draws.get(s, 0.0) for s in union]
            out.append(row[:2 + H] + zs + row[M:M + 2 + H] + [0.0] * len(zs))
        return self._per_sample(out, device)

    def times(self, k: int) -> list[float]:
        """Each sample's model time at stage k."""
        return [self.tables[g][k].t for g in self.index]

    def x0_rows(self, k: int, device) -> torch.Tensor:
        """Rows [B, 4] of x0 = a x + b g at stage k (callbacks)."""
        return self._per_sample([[*table[k].x0, 0.0, 0.0] for table in self.tables], device)

    def start_rows(self, beta0: float, noise_given: bool, device) -> torch.Tensor:
        """Rows [B, 6] of the initial write with churn: x = scale x_0 + coefficient xi (x_0 = the given noise
        or beta0 z; no churn: scale 1, coefficient 0)."""
        out = []
        for table in self.tables:
            scale, c = table[0].start_churn or (1.0, 0.0)
            out.append([scale * (1.0 if noise_given else beta0), 0.0, c, 0.0, 0.0, 0.0])
        return self._per_sample(out, device)


def _layout(st: Stage) -> tuple:
    """What must agree between the merged tables' stage k: its buffers and step."""
    return (st.step, st.input, st.out, st.side, st.history_buffers(), st.final)
