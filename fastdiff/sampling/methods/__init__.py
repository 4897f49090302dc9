"""Sampling methods: the registry (registry.py) and one module per family, each registering its stage builders
(fastdiff.sampling.methods.registry.register_method). Importing this package registers them all."""

from fastdiff.sampling.methods.registry import (OPTIONS, Method, check_options, get_method, method_names,  # noqa: F401
                                                methods, methods_table, register_method, unregister_method)
from fastdiff.sampling.methods import coefficients, dpmpp_sde, ipndm, lms, pndm, two_stage, unipc  # noqa: F401,I001
# after unipc: an option's first registrant sets its neutral value (lower_order_final: unipc's True, not deis' False)
from fastdiff.sampling.methods import deis, dpm_singlestep  # noqa: F401,I001
# issue 33's samplers: ComfyUI's exponential integrators and SDE solvers, diffusers' few-step schedulers
from fastdiff.sampling.methods import exponential, er_sde, rf_ancestral, heunpp2, gradient_estimation  # noqa: F401,I001
from fastdiff.sampling.methods import few_step, sa_solver, dpm_fast, dpm_adaptive  # noqa: F401,I001
from fastdiff.sampling.methods import score_based  # noqa: F401,I001  (its methods after the solvers: registry order)
