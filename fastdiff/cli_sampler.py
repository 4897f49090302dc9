"""What the sampling commands of the ``fastdiff`` command line share (``sample``, ``generate``): the argument
types (each names its option through argparse, "argument --steps: ..."), the sampler's options, and a
checkpoint's model with the path, prediction and per-sample shape it was trained with."""

from __future__ import annotations

import argparse
import math


def int_at_least(least: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {v}")
        return v

    parse.__name__ = "int"  # argparse's "invalid int value" wording for non-numbers
    return parse


def float_in(low=None, high=None, *, low_open=False, high_open=True):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if low is not None and (v <= low if low_open else v < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {v:g}")
        if high is not None and (v >= high if high_open else v > high):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high:g}, got {v:g}")
        return v

    parse.__name__ = "float"
    return parse


POSITIVE_INT, NON_NEGATIVE_INT = int_at_least(1), int_at_least(0)
SEED = int_at_least(0)  # the upper bound (2^23) is the Trainer's, which names seed


def method_option(text: str) -> tuple:
    """--option NAME=VALUE: a method option, its value an int, a float or else a string."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier() or not value:
        raise argparse.ArgumentTypeError(f"must be NAME=VALUE (e.g. eta=0.5), got {text!r}")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def method_options(pairs) -> dict:
    options = {}
    for name, value in pairs:
        if name in options or name == "sigma":
            raise ValueError(f"--option {name} is given twice" if name in options else "give sigma as --sigma")
        options[name] = value
    return options


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint and the sampler's settings, as ``sample`` and ``generate`` take them."""
    from fastdiff.sampling.guidance import RULES
    from fastdiff.sampling.methods import methods  # the registry: built-in and registered samplers

    p.add_argument("--checkpoint", required=True, help="a checkpoint .json/.safetensors or a run's checkpoints "
                                                       "folder (newest valid one)")
    p.add_argument("--cfg", type=float_in(), default=1.0, help="classifier-free guidance scale")
    p.add_argument("--guidance", choices=list(RULES), default="cfg",
                   help="guidance rule (default: %(default)s; cfg_zero_star: CFG-Zero*, docs/guidance.md)")
    p.add_argument("--dynamic-thresholding", type=float_in(0.0, 1.0, low_open=True, high_open=False),
                   default=None, metavar="RATIO", help="Imagen's dynamic thresholding of the x0 estimates at "
                   "this quantile (e.g. 0.995; diffusers' thresholding=True)")
    p.add_argument("--guidance-rescale", type=float_in(0.0, 1.0, high_open=False), default=0.0, metavar="PHI",
                   help="CFG rescale phi in [0, 1] (diffusers' guidance_rescale; with --cfg != 1)")
    p.add_argument("--steps", type=POSITIVE_INT, default=50)
    p.add_argument("--method", default="heun", choices=[m.name for m in methods()],
                   help="sampler (default: %(default)s). " + "; ".join(
                       f"{m.name}: {m.description}" for m in methods()).replace("%", "%%"))
    p.add_argument("--sigma", type=float_in(0.0), default=0.0, help="SDE noise level ("
                   + ", ".join(m.name for m in methods() if "sigma" in m.options) + ")")
    p.add_argument("--option", action="append", type=method_option, default=[], metavar="NAME=VALUE",
                   help="a further option of the method, repeatable (e.g. eta=0.5, s_noise=1.003, s_churn=10, "
                        "order=3, solver_type=heun, r=0.4; which method takes which: docs/sampling.md)")
    p.add_argument("--corrector-steps", type=NON_NEGATIVE_INT, default=0, metavar="N",
                   help="Langevin corrector steps before each step (score_sde's predictor-corrector; --snr)")
    p.add_argument("--snr", type=float_in(0.0, low_open=True), default=0.16,
                   help="the correctors' signal-to-noise ratio (default: %(default)s)")
    p.add_argument("--step-noise", choices=["independent", "brownian"], default="independent",
                   help="the steps' noise: independent draws (default) or one Brownian path per sample, step-count "
                        "stable like k-diffusion's Brownian tree (~25 normals per element and step instead of 1)")
    p.add_argument("--size", type=POSITIVE_INT, default=8, help="image side for UNet checkpoints")
    p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--no-progress", action="store_true")


def sampler_settings(args: argparse.Namespace, state: dict) -> dict:
    """fastdiff.sample's settings from the arguments and the checkpoint's objective (path, prediction)."""
    obj = state.get("objective", {})
    return dict(steps=args.steps, cfg=args.cfg, path=obj.get("path", "condot"),
                prediction=obj.get("prediction", "velocity"), method=args.method, sigma=args.sigma,
                step_noise="brownian" if args.step_noise == "brownian" else None, guidance=args.guidance,
                guidance_rescale=args.guidance_rescale, dynamic_thresholding=args.dynamic_thresholding,
                corrector_steps=args.corrector_steps, snr=args.snr, **method_options(args.option))


def sample_shape(state: dict, size: int) -> tuple:
    """A checkpoint model's per-sample shape: [channels, size, size] for a UNet, [dim] for an MLP."""
    config = state["model_config"]
    return (config["channels"], size, size) if config["type"] == "UNet" else (config["dim"],)
