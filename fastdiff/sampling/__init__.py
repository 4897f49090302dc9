"""Samplers: the plan of a sampling call and its executor (core/), the methods' coefficient tables (methods/, host
float64), the features that plug into the plan (features/), and the other entry points (invert, langevin,
likelihood)."""

from fastdiff.sampling import methods  # noqa: F401  (registers the methods)
from fastdiff.sampling.sampler import Sampler, sample
from fastdiff.sampling.invert import invert
from fastdiff.sampling.langevin import langevin
from fastdiff.sampling.likelihood import Likelihood, bits_per_dim, log_likelihood
from fastdiff.sampling.methods import Method, get_method, methods, register_method  # noqa: F811
from fastdiff.sampling.features.thresholding import DynamicThresholding, StaticClipping
from fastdiff.sampling.features.caching import AdaptiveCache, CacheIndicator, EasyCache, LazyCache

__all__ = ["METHODS", "AdaptiveCache", "CacheIndicator", "DynamicThresholding", "EasyCache", "LazyCache", "Likelihood",
           "Method", "Sampler", "StaticClipping", "bits_per_dim", "get_method", "invert", "langevin",
           "log_likelihood", "methods", "register_method", "sample"]


def __getattr__(name):
    if name == "METHODS":  # the registered method names, read on access (methods registered later included)
        from fastdiff.sampling.methods import method_names

        return method_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
