"""What every benchmark case module shares: the Case record, the guided SDE step's constants and its
coefficients."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

CFG, T, DT, SIGMA, BATCH = 4.0, 0.4, 0.02, 1.0, 16


@dataclass
class Case:
    op: str
    impl: str                 # fastdiff | eager | compile | reference | torch
    n: int
    dtype: str                # prediction dtype (state is fp32)
    fn: Callable[[], object]
    bytes: int                # bytes the op must move at minimum (for GB/s)
    note: str = ""
    extra: dict = field(default_factory=dict)


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _sde_coefficients(t=T, dt=DT, sigma=SIGMA):
    """x' = x + dt (u + σ²/2 s) + σ √dt ξ with the CondOT score s = (t u − x)/(1 − t), as c_x x + c_p u + c_n ξ."""
    k = 0.5 * sigma * sigma / (1.0 - t)
    return 1.0 - dt * k, dt * (1.0 + k * t), sigma * math.sqrt(dt)
