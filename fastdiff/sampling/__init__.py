"""Samplers: coefficient tables (host, float64) and the sampling loop around the fused step."""

from fastdiff.sampling import deis, dpmpp_sde, ipndm, lms, two_stage, unipc  # noqa: F401  (register their methods)
from fastdiff.sampling import predictor_corrector  # noqa: F401,I001  (registers its methods after the solvers)
from fastdiff.sampling.loop import sample
from fastdiff.sampling.editing import invert
from fastdiff.sampling.langevin import langevin
from fastdiff.sampling.likelihood import Likelihood, bits_per_dim, log_likelihood
from fastdiff.sampling.methods import Method, get_method, methods, register_method

__all__ = ["METHODS", "Likelihood", "Method", "bits_per_dim", "get_method", "invert", "langevin", "log_likelihood", "methods", "register_method", "sample"]


def __getattr__(name):
    if name == "METHODS":  # the registered method names, read on access (methods registered later included)
        from fastdiff.sampling.methods import method_names

        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
