"""Importing the peer libraries that tests and benchmarks compare fastdiff with.

k-diffusion imports its whole package at ``import k_diffusion`` — models, evaluation and augmentation
code that needs torchvision, clip, kornia, wandb… — although its samplers need only torch, scipy,
torchdiffeq, torchsde and tqdm. torchvision wheels pin one torch build each, so beside a given torch
(e.g. the CPU build) it often cannot be installed. :func:`k_diffusion_sampling` returns
``k_diffusion.sampling`` the normal way when that works, and otherwise loads just ``sampling.py`` and
``utils.py`` from the installed distribution under a bare package, with a stand-in for
``torchvision.transforms.functional`` (imported by utils.py for image helpers the samplers never call).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def k_diffusion_sampling():
    """The ``k_diffusion.sampling`` module; ImportError when k-diffusion (or its sampler deps) is absent."""
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError as exc:
        first_error = exc
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion)") from first_error
    for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
        del sys.modules[name]  # the half-imported package
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    package.__doc__ = "k-diffusion's samplers only (loaded by fastdiff.bench.peers without the package __init__)"
    stand_ins = {}
    if importlib.util.find_spec("torchvision") is None:
        functional = types.ModuleType("torchvision.transforms.functional")
        transforms = types.ModuleType("torchvision.transforms")
        transforms.functional = functional
        torchvision = types.ModuleType("torchvision")
        torchvision.transforms = transforms
        stand_ins = {"torchvision": torchvision, "torchvision.transforms": transforms,
                     "torchvision.transforms.functional": functional}
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules["k_diffusion"] = package
    sys.modules.update(stand_ins)
    try:
        sampling = importlib.import_module("k_diffusion.sampling")
    except ImportError as exc:
        del sys.modules["k_diffusion"]
        raise ImportError(f"k-diffusion's samplers could not be loaded: {exc}") from first_error
    finally:
        for name, module in saved.items():  # the stand-ins never outlive the import
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return sampling
