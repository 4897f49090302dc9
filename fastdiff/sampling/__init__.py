"""Samplers: coefficient tables (host, float64) and the sampling loop around the fused step."""

from fastdiff.sampling.coefficients import METHODS
from fastdiff.sampling.loop import sample

__all__ = ["METHODS", "sample"]
