"""What the fused schedulers share: per-sample seeds, the step's noise stream, the step's inputs."""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from fastdiff import _checks

Seeds = Union[int, Sequence[int], torch.Tensor]


class _FusedStep:
    """Per-sample seeds and the fused affine update shared by the schedulers."""

    _fd_seed: Seeds = 0

    def set_seeds(self, seeds: Seeds) -> None:
        """Per-sample noise seeds: an int (sample b uses seeds + b) or one seed per sample."""
        self._fd_seed = seeds

    def _seeds_for(self, batch: int, device) -> torch.Tensor:
        s = self._fd_seed
        if isinstance(s, int) and not isinstance(s, bool):
            s = [s + b for b in range(batch)]  # as fastdiff.sample's seed=int
        t = _checks.seeds_tensor(s, device, name="seeds")
        if t.shape[0] != batch:
            raise ValueError(f"seeds holds {t.shape[0]} per-sample seeds but the batch has {batch} samples")
        return t

    def _stream(self, timestep) -> int:
        """1 + the index of ``timestep`` in ``self.timesteps`` (the step's noise stream)."""
        if getattr(self, "_fd_timesteps", None) is None:
            self._fd_timesteps = [float(v) for v in self.timesteps.tolist()]
        t = float(timestep)
        try:
            return 1 + self._fd_timesteps.index(t)
        except ValueError:
            raise ValueError(f"timestep {timestep} is not one of scheduler.timesteps (call set_timesteps first)") from None

    @staticmethod
    def _inputs(model_output, sample):
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample has {tuple(sample.shape)}")
        x = sample.to(torch.float32).contiguous()
        g = model_output.contiguous()
        if g.dtype not in _checks.PRED_DTYPES:
            g = g.to(torch.float32)
        return x, g

    def _x0_coefficients(self, sigma: float, step: str, sample_ok: bool = True) -> tuple[float, float]:
        """(a, b) with x0 = a x + b model_output on diffusers' sigma-scaled sample x = z + sigma eps, for the
        scheduler's prediction_type (``step`` names the step in the error)."""
        ptype = self.config.prediction_type
        if ptype in ("original_sample", "sample") and sample_ok:
            return 0.0, 1.0
        if ptype == "epsilon":
            return 1.0, -sigma
        if ptype == "v_prediction":
            return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
        takes = "epsilon, v_prediction or sample" if sample_ok else "epsilon or v_prediction"
        raise ValueError(f"prediction_type={ptype!r} is not supported; {step} takes {takes}")

    def _step_sigmas(self, timestep) -> tuple[float, float]:
        """(sigma, sigma_next) of this step of a sigma-indexed diffusers scheduler (Euler-type): diffusers'
        refusal of integer indices as timesteps, its step index, the two sigmas in float64."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):  # as diffusers' own check
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to step() is "
                             "not supported; pass one of scheduler.timesteps")
        if self.step_index is None:
            self._init_step_index(timestep)
        return float(self.sigmas[self.step_index].double()), float(self.sigmas[self.step_index + 1].double())

    def _data_conversion(self, al: float, sg: float, sigma: float) -> tuple[float, float] | None:
        """(a, b) with x0 = a x + b model_output on a VP-scaled sample (alpha, sigma_t = al, sg; sigma: the raw
        sigma, for flow predictions), for the scheduler's prediction_type; None for an unknown one."""
        return {"epsilon": (1.0 / al, -sg / al), "sample": (0.0, 1.0), "v_prediction": (al, -sg),
                "flow_prediction": (1.0, -sigma)}.get(self.config.prediction_type)
