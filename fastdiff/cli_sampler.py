"""What the sampling commands of the ``fastdiff`` command line share (``sample``, ``generate``): the argument
types (each names its option through argparse, "argument --steps: ..."), the sampler's options, and a
checkpoint's model with the path, prediction and per-sample shape it was trained with."""

from __future__ import annotations

import argparse
import math


def _bound(v) -> str:
    """A bound as the message shows it: powers of two as 2^k (2^40 reads better than 1099511627776)."""
    if isinstance(v, int) and v >= 1 << 16 and v & (v - 1) == 0:
        return f"2^{v.bit_length() - 1}"
    if isinstance(v, int) and v >= 1 << 16 and (v + 1) & v == 0:
        return f"2^{v.bit_length()} - 1"
    return f"{v:g}" if isinstance(v, float) else str(v)


def int_in(least: int, most: int | None = None):
    """An int in [least, most]: absurd counts (--steps 10^12) stop here, not hours or terabytes later."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if v < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {v}")
        if most is not None and v > most:
            raise argparse.ArgumentTypeError(f"must be <= {_bound(most)}, got {v}")
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
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {_bound(low)}, got {v:g}")
        if high is not None and (v >= high if high_open else v > high):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {_bound(high)}, got {v:g}")
        return v

    parse.__name__ = "float"
    return parse


POSITIVE_INT, NON_NEGATIVE_INT = int_in(1), int_in(0)
MAX_TRAIN_STEPS = 1 << 32  # 50 days at 1000 steps/s, thousands of times the longest runs: beyond it, a typo
TRAIN_STEPS, TRAIN_COUNT = int_in(1, MAX_TRAIN_STEPS), int_in(0, MAX_TRAIN_STEPS)
SEED = int_in(0, (1 << 23) - 1)  # the Trainer's seed range, named as --seed here
SAMPLE_SEED = int_in(0, (1 << 63) - 1)  # sample b uses seed + b: 2^63 leaves room for any batch
SCALE = 1e4  # bound of |cfg|, sigma, snr: far past any useful value (1e300 overflowed the steps' coefficients)
FLOAT32_MAX = 3.4028234663852886e38
MAX_SIZE = 4096  # a UNet sample of 4096^2 pixels is 64 MiB per channel: larger sides are typos


def device_option(text: str) -> str:
    """--device: cpu, or cuda when this torch has CUDA and that GPU exists (fastdiff._checks.device_arg); meta and
    other types are refused here rather than deep inside torch."""
    from fastdiff._checks import device_arg

    try:
        return str(device_arg("device", text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


device_option.__name__ = "device"


# sample() settings the commands set themselves: an --option of the same name would reach sample() twice
OWN_FLAGS = {"steps": "--steps", "cfg": "--cfg", "seed": "--seed", "method": "--method", "sigma": "--sigma",
             "guidance": "--guidance", "guidance_rescale": "--guidance-rescale", "snr": "--snr",
             "dynamic_thresholding": "--dynamic-thresholding", "corrector_steps": "--corrector-steps",
             "step_noise": "--step-noise", "cache": "--cache",
             "schedule": "--schedule", "device": "--device", "progress": "--no-progress", "shape": "--size",
             "batch_size": "--batch-size (generate) or --per-class (sample)", "labels": "--labels (generate)"}
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _option_value(name: str, value: str, neutral):
    """An option's text as the type of its neutral value (OPTIONS): bool("False") is True, so bools are read
    word by word; an int option refuses 2.5."""
    if isinstance(neutral, bool):
        if value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise argparse.ArgumentTypeError(f"{name} must be true or false (or yes/no, 1/0), got {value!r}")
    kinds = {int: (int, "an integer"), float: (float, "a number")}
    for kind, (parse, what) in kinds.items():
        if isinstance(neutral, kind):
            try:
                return parse(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{name} must be {what}, got {value!r}") from None
    if isinstance(neutral, str):
        return value
    for parse in (int, float):  # an option without a typed neutral value (a plugin's None)
        try:
            return parse(value)
        except ValueError:
            pass
    return value


def method_option(text: str) -> tuple:
    """--option NAME=VALUE: an option of a sampling method (fastdiff.sampling.methods.OPTIONS), its value of that
    option's type."""
    from fastdiff.sampling.methods import OPTIONS

    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier() or not value:
        raise argparse.ArgumentTypeError(f"must be NAME=VALUE (e.g. eta=0.5), got {text!r}")
    if name in OWN_FLAGS:
        raise argparse.ArgumentTypeError(f"{name} is not a method option: give it as {OWN_FLAGS[name]}")
    if name not in OPTIONS:
        raise argparse.ArgumentTypeError(f"{name} is not an option of any sampling method (they take "
                                         f"{', '.join(o for o in OPTIONS if o not in OWN_FLAGS)}; the checkpoint "
                                         f"sets y, path and prediction)")
    return name, _option_value(name, value, OPTIONS[name])


def method_options(pairs) -> dict:
    options = {}
    for name, value in pairs:
        if name in options:
            raise ValueError(f"--option {name} is given twice")
        options[name] = value
    return options


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint and the sampler's settings, as ``sample`` and ``generate`` take them."""
    from fastdiff.sampling.core.arguments import MAX_STEPS
    from fastdiff.sampling.features.guidance import RULES
    from fastdiff.sampling.methods import methods  # the registry: built-in and registered samplers
    from fastdiff.sampling.core.stage import MAX_LANGEVIN_STEPS
    from fastdiff.schedules import SCHEDULE_NAMES

    p.add_argument("--checkpoint", required=True, help="a checkpoint .json/.safetensors or a run's checkpoints "
                                                       "folder (newest valid one)")
    p.add_argument("--cfg", type=float_in(-SCALE, SCALE, high_open=False), default=1.0,
                   help=f"classifier-free guidance scale (|cfg| <= {SCALE:g})")
    p.add_argument("--guidance", choices=list(RULES), default="cfg",
                   help="guidance rule (default: %(default)s; cfg_zero_star: CFG-Zero*, docs/guidance.md)")
    p.add_argument("--dynamic-thresholding", type=float_in(0.0, 1.0, low_open=True, high_open=False),
                   default=None, metavar="RATIO", help="Imagen's dynamic thresholding of the x0 estimates at "
                   "this quantile (e.g. 0.995; diffusers' thresholding=True)")
    p.add_argument("--guidance-rescale", type=float_in(0.0, 1.0, high_open=False), default=0.0, metavar="PHI",
                   help="CFG rescale phi in [0, 1] (diffusers' guidance_rescale; with --cfg != 1)")
    p.add_argument("--cache", default=None, choices=["easycache", "lazycache", "adaptive"],
                   help="step caching with the rule's defaults: reuse the model's outputs where its input has "
                        "barely changed (fewer model calls; docs/guidance.md, \"Step caching\")")
    p.add_argument("--steps", type=int_in(1, MAX_STEPS), default=50, help=f"sampling steps (at most {MAX_STEPS})")
    p.add_argument("--schedule", default=None, choices=list(SCHEDULE_NAMES), metavar="NAME",
                   help="the grid's noise schedule with its defaults (default: uniform in flow time): "
                        + ", ".join(SCHEDULE_NAMES) + " (docs/schedules.md)")
    p.add_argument("--method", default="heun", choices=[m.name for m in methods()],
                   help="sampler (default: %(default)s). " + "; ".join(
                       f"{m.name}: {m.description}" for m in methods()).replace("%", "%%"))
    p.add_argument("--sigma", type=float_in(0.0, SCALE, high_open=False), default=0.0, help="SDE noise level ("
                   + ", ".join(m.name for m in methods() if "sigma" in m.options) + ")")
    p.add_argument("--option", action="append", type=method_option, default=[], metavar="NAME=VALUE",
                   help="a further option of the method, repeatable (e.g. eta=0.5, s_noise=1.003, s_churn=10, "
                        "order=3, solver_type=heun, r=0.4; which method takes which: docs/sampling.md)")
    p.add_argument("--corrector-steps", type=int_in(0, MAX_LANGEVIN_STEPS), default=0, metavar="N",
                   help="Langevin corrector steps before each step (score_sde's predictor-corrector; --snr)")
    p.add_argument("--snr", type=float_in(0.0, SCALE, low_open=True, high_open=False), default=0.16,
                   help="the correctors' signal-to-noise ratio (default: %(default)s)")
    p.add_argument("--step-noise", choices=["independent", "brownian"], default="independent",
                   help="the steps' noise: independent draws (default) or one Brownian path per sample, step-count "
                        "stable like k-diffusion's Brownian tree (~25 normals per element and step instead of 1)")
    p.add_argument("--size", type=int_in(1, MAX_SIZE), default=8, help="image side for UNet checkpoints")
    p.add_argument("--seed", type=SAMPLE_SEED, default=0, help="sample i uses seed + i")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--no-progress", action="store_true")


def sampler_settings(args: argparse.Namespace, state: dict) -> dict:
    """fastdiff.sample's settings from the arguments and the checkpoint's objective (path, prediction)."""
    obj = state.get("objective", {})
    return dict(steps=args.steps, cfg=args.cfg, path=obj.get("path", "condot"), schedule=args.schedule,
                prediction=obj.get("prediction", "velocity"), method=args.method, sigma=args.sigma,
                step_noise="brownian" if args.step_noise == "brownian" else None, guidance=args.guidance,
                guidance_rescale=args.guidance_rescale, dynamic_thresholding=args.dynamic_thresholding,
                corrector_steps=args.corrector_steps, snr=args.snr, **({"cache": args.cache} if args.cache else {}),
                **method_options(args.option))


def sample_shape(state: dict, size: int) -> tuple:
    """A checkpoint model's per-sample shape: [channels, size, size] for a UNet, [dim] for an MLP."""
    config = state["model_config"]
    return (config["channels"], size, size) if config["type"] == "UNet" else (config["dim"],)
