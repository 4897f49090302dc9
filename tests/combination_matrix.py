"""The sampler combination matrix: which sample() features combine with which methods and with each other.

Cells: every method with every feature (method × feature), and every pair of features on euler and on
euler_ancestral (feature × feature). Each cell calls fastdiff.sample once on a small analytic model and is
classified as

* ``ok``: a finite output of the right shape;
* ``nonfinite``: inf/NaN in the output, the model's output (FloatingPointError) or the callback's tensors;
* ``crash``: any other exception, or a ValueError/TypeError not raised by one of fastdiff's own checks;
* ``structural``: a refusal saying the pair is not supported yet (STRUCTURAL_PATTERNS);
* ``meaningful``: any other refusal (its message is kept for review);
* ``n/a``: not applicable by definition, decided without calling sample: a method option (sigma, per-sample
  churn) on a method that does not take it, or two features that set one setting to different values (two
  guidance rules).

Run ``python tests/combination_matrix.py [--json PATH] [--backend cpu|reference]`` for the summary and the
non-ok cells; tests/test_combination_matrix.py holds the matrix to its known refusals.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import linecache
import math
import re
import sys
import time
from pathlib import Path

import torch

import fastdiff
from fastdiff.sampling import EasyCache, get_method
from fastdiff.sampling.features.apg_mix import APGMix
from fastdiff.sampling.features.perturbed import PAG
from fastdiff.sampling.methods import OPTIONS as METHOD_OPTIONS

METHODS = ("euler", "heun", "ddim", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "unipc", "lms", "dpmpp_sde",
           "dpm_2")
PAIR_METHODS = ("euler", "euler_ancestral")  # one deterministic (with sigma and churn), one ancestral (cfg_pp)
B, SHAPE, STEPS = 3, (2, 8, 8), 6  # images: FDG splits [C, H, W] samples into a pyramid
LABELS = (0, 1, 2)  # y of the three samples
NULL_LABEL = 3  # the unconditional branch's label
STRUCTURAL_PATTERNS = re.compile(r"\(yet\)|for now|does not combine|not with|not supported")
FASTDIFF_DIR = Path(fastdiff.__file__).resolve().parent
CLASSES = ("ok", "nonfinite", "crash", "structural", "meaningful", "n/a")


# ---- the analytic model: class-conditional Gaussians under the condot path ---------------------------------
# z | y ~ N(mu_y, s_y^2 I) per element; x_t = t z + (1 - t) eps. The velocity, the x0 estimate and the class
# posterior are closed forms, finite on all of [0, 1], so every prediction conversion is meaningful.

def _class_parameters(y: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean offset and standard deviation of each label, shaped to broadcast over [n, *shape]."""
    mean = torch.tensor([-1.5, 0.0, 1.5, 0.0], dtype=torch.float64)[y]  # the null label: a broad Gaussian at 0
    std = torch.tensor([0.5, 0.5, 0.5, 2.0], dtype=torch.float64)[y]
    view = (-1,) + (1,) * ndim
    return mean.view(view), std.view(view)


def _pattern(shape, dtype=torch.float64) -> torch.Tensor:
    """A fixed per-element pattern (so samples differ per element, and dynamic thresholding has work to do)."""
    n = math.prod(shape)
    return (1.0 + 0.5 * torch.cos(torch.arange(n, dtype=dtype))).view(shape)


def _posterior_terms(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
    """(mu, s^2, c, t, residual) of x_t given each sample's label: c = Var x_t per element, residual = x - t mu
    (float64, t shaped to broadcast)."""
    x64 = x.double()
    offset, std = _class_parameters(labels.cpu(), x.dim() - 1)
    mu = offset.to(x.device) * _pattern(x.shape[1:]).to(x.device)
    tt = t.double().view((-1,) + (1,) * (x.dim() - 1))
    var = (std * std).to(x.device)
    c = tt * tt * var + (1 - tt) ** 2
    return mu, var, c, tt, x64 - tt * mu


def _as_labels(y, n: int) -> torch.Tensor:
    labels = torch.as_tensor(y if y is not None else NULL_LABEL).long().reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(n)
    if labels.numel() != n or not bool(((labels >= 0) & (labels <= NULL_LABEL)).all()):
        raise RuntimeError(f"the model got labels {labels.tolist()} for a batch of {n}")  # a crash, not a refusal
    return labels


def gaussian_velocity_model(x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
    """The exact condot velocity of the class-conditional Gaussians: E[z | x] - E[eps | x]."""
    mu, var, c, tt, residual = _posterior_terms(x, t, _as_labels(y, x.shape[0]))
    return (mu + (tt * var - (1 - tt)) * residual / c).to(x.dtype)


def gaussian_classifier(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact class log-posterior (uniform prior over the 3 classes) at x_t: logits [n, 3], differentiable."""
    n = x.shape[0]
    logits = []
    for label in LABELS:
        _, _, c, _, residual = _posterior_terms(x, t, torch.full((n,), label))
        d = residual[0].numel()
        logits.append(-(residual * residual / c).flatten(1).sum(1) / 2 - d / 2 * torch.log(c.flatten()))
    return torch.stack(logits, 1)


# ---- the features: each a function (B, shape, device) -> sample() kwargs ----------------------------------

def _labels(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _init(b, shape, device) -> torch.Tensor:
    return (torch.linspace(-1.0, 1.0, b * math.prod(shape)).view(b, *shape) * 1.5).to(device)


def _known_mask(b, shape, device) -> torch.Tensor:
    return (torch.arange(math.prod(shape)).view(shape) % 2 == 0).to(device)  # every other element known


def _checking_callback(step, t, x, x0):
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(x0).all())):
        raise FloatingPointError(f"callback: x or x0 not finite after step {step} (t={t:.4g})")


def _cfg_schedule(t: float) -> float:
    return 1.0 + 2.0 * t


def _cfg(**more):
    return lambda b, shape, device: {"cfg": 2.0, "null_y": NULL_LABEL, **more}


FEATURES = {
    "cfg": _cfg(),
    "cfg_schedule": lambda b, shape, device: {"cfg": _cfg_schedule, "null_y": NULL_LABEL},
    "apg": _cfg(guidance="apg"),
    "cfg_zero_star": _cfg(guidance="cfg_zero_star"),
    "cfg_pp": lambda b, shape, device: {"cfg": 0.8, "null_y": NULL_LABEL, "guidance": "cfg_pp"},  # CFG++: w <= 1
    "guidance_rescale": _cfg(guidance_rescale=0.7),
    "two_conditions": lambda b, shape, device: {
        "conditions": [_labels([i % 3 for i in range(b)], device), _labels([(i + 2) % 3 for i in range(b)], device)],
        "cfg": (2.0, 1.5), "null_y": NULL_LABEL},
    "dynamic_thresholding": lambda b, shape, device: {"dynamic_thresholding": True},
    "classifier": lambda b, shape, device: {"classifier": gaussian_classifier, "classifier_scale": 1.0},
    "img2img": lambda b, shape, device: {"init": _init(b, shape, device), "strength": 0.6},
    "inpainting": lambda b, shape, device: {"init": _init(b, shape, device),
                                            "known_mask": _known_mask(b, shape, device)},
    "repaint": lambda b, shape, device: {"init": _init(b, shape, device), "known_mask": _known_mask(b, shape, device),
                                         "resample": 3},
    "corrector": lambda b, shape, device: {"corrector_steps": 1},
    "brownian": lambda b, shape, device: {"step_noise": "brownian"},
    "per_sample_churn": lambda b, shape, device: {"s_churn": [0.5 + i for i in range(b)]},
    "callback": lambda b, shape, device: {"callback": _checking_callback},
    "guidance_interval": _cfg(guidance_interval=(0.2, 0.8)),
    "cfg_batch_false": _cfg(cfg_batch=False),
    "sde_sigma": lambda b, shape, device: {"sigma": 0.5},
    # issue 34: the guidance frontier, a perturbed branch and step caching
    "tcfg": _cfg(guidance="tcfg"),
    "mambo_g": _cfg(guidance="mambo_g"),
    "apg_mix": _cfg(guidance=APGMix(adaptive_projected_guidance_start_step=2)),
    "epsilon_scaling": lambda b, shape, device: {"guidance": "epsilon_scaling"},
    "cfg_norm": _cfg(guidance="cfg_norm"),
    "mahiro": _cfg(guidance="mahiro"),
    "mimic": _cfg(guidance="mimic"),
    "fdg": lambda b, shape, device: {"cfg": 1.0, "null_y": NULL_LABEL, "guidance": "fdg"},  # its own scales
    "perp_neg": lambda b, shape, device: {
        "conditions": [_labels([i % 3 for i in range(b)], device), _labels([(i + 1) % 3 for i in range(b)], device)],
        "cfg": 2.0, "null_y": NULL_LABEL, "guidance": "perp_neg"},
    "pag": _cfg(guidance=PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0),
                perturbed_model=lambda x, t, y=None: 0.9 * gaussian_velocity_model(x, t, y)),
    "cache": lambda b, shape, device: {"cache": EasyCache(reuse_threshold=1.0, start_percent=0.0)},
}


def base_kwargs(backend: str, device) -> dict:
    return {"shape": SHAPE, "y": _labels([LABELS[i % 3] for i in range(B)], device), "seed": 0, "path": "condot",
            "prediction": "velocity", "backend": backend, "device": device}


def _cfg_rank(cfg) -> tuple:
    """Which cfg wins a merge: a schedule over a per-condition tuple over one number (the more specific one);
    of two numbers the smaller (CFG++'s w <= 1 stays in its range)."""
    return (2, 0) if callable(cfg) else (1, 0) if isinstance(cfg, (tuple, list)) else (0, -cfg)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # conditions: lists of label tensors
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or a == b


def merge(first: dict, second: dict) -> dict | str:
    """The sample() kwargs of two features together, or a reason the pair is n/a (one setting given two values)."""
    out = dict(first)
    for key, value in second.items():
        if key not in out or _same(out[key], value):
            out[key] = value
        elif key == "cfg":  # cfg + schedule: the schedule; cfg + conditions: the per-condition weights
            out[key] = max(out[key], value, key=_cfg_rank)
        else:
            return f"both set {key}: {out[key]!r} and {value!r}"
    return out


def not_applicable(method: str, kwargs: dict) -> str | None:
    """Why a cell is n/a from the method record alone: a method option the method does not take."""
    record = get_method(method)
    for key in kwargs:
        if key in METHOD_OPTIONS and key not in record.options:
            return f"method={method!r} does not take {key} (it takes {', '.join(record.options) or 'no options'})"
    return None


# ---- running and classifying one cell ----------------------------------------------------------------------

def _message(error: BaseException) -> str:
    """The exception as one stable line (object addresses dropped, so equal refusals group together)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(error).__name__}: {error}")


def _raised_by_fastdiff_check(error: BaseException) -> bool:
    """Whether the innermost frame is a ``raise`` statement in fastdiff's own Python code (an argument check),
    not a ValueError/TypeError from torch or from the model that fastdiff let through."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename).resolve()
    if FASTDIFF_DIR not in filename.parents:
        return False
    return linecache.getline(str(filename), tb.tb_lineno).lstrip().startswith("raise")


def run_cell(method: str, features: tuple[str, ...], backend: str = "cpu", device="cpu",
             model=gaussian_velocity_model) -> dict:
    """One cell: {"method", "features", "class", "message"}."""
    cell = {"method": method, "features": list(features), "class": "ok", "message": ""}
    device = torch.device(device)
    kwargs = base_kwargs(backend, device)
    for name in features:
        kwargs = merge(kwargs, FEATURES[name](B, SHAPE, device))
        if isinstance(kwargs, str):
            return {**cell, "class": "n/a", "message": kwargs}
    if "conditions" in kwargs:  # the conditions replace y; a classifier's targets are then classifier_y
        y = kwargs.pop("y")
        if "classifier" in kwargs:
            kwargs["classifier_y"] = y
    reason = not_applicable(method, kwargs)
    if reason is not None:
        return {**cell, "class": "n/a", "message": reason}
    try:
        out = fastdiff.sample(model, STEPS, method=method, **kwargs)
    except FloatingPointError as error:
        return {**cell, "class": "nonfinite", "message": _message(error)}
    except (ValueError, TypeError) as error:
        message = _message(error)
        if not _raised_by_fastdiff_check(error):
            return {**cell, "class": "crash", "message": message}
        return {**cell, "class": "structural" if STRUCTURAL_PATTERNS.search(str(error)) else "meaningful",
                "message": message}
    except Exception as error:  # noqa: BLE001  (any other exception type is a crash, kept with its message)
        return {**cell, "class": "crash", "message": _message(error)}
    if tuple(out.shape) != (B, *SHAPE):
        return {**cell, "class": "crash", "message": f"output shape {tuple(out.shape)}, expected {(B, *SHAPE)}"}
    if not bool(torch.isfinite(out).all()):
        return {**cell, "class": "nonfinite", "message": "the output holds inf or NaN"}
    return cell


def cell_key(cell: dict) -> tuple:
    """("euler", "classifier") for method × feature, ("euler", "classifier", "dynamic_thresholding") for a pair."""
    return (cell["method"], *cell["features"])


def matrix_cells() -> list[tuple[str, tuple[str, ...]]]:
    """Every (method, features) cell: 10 × 19 method × feature, and 19·18/2 feature pairs on each PAIR_METHODS."""
    names = sorted(FEATURES)
    single = [(m, (f,)) for m in METHODS for f in FEATURES]
    pairs = [(m, pair) for m in PAIR_METHODS for pair in itertools.combinations(names, 2)]
    return single + pairs


def run_matrix(backend: str = "cpu", device="cpu") -> list[dict]:
    # one thread: the tensors are tiny, and idle OpenMP workers spinning on a busy 2-core machine made it 5x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [run_cell(method, features, backend, device) for method, features in matrix_cells()]
    finally:
        torch.set_num_threads(threads)


# ---- report ------------------------------------------------------------------------------------------------

def summary_table(cells: list[dict]) -> str:
    """Markdown counts per class: method × feature, feature × feature, and all."""
    groups = {"method × feature": [c for c in cells if len(c["features"]) == 1],
              "feature × feature": [c for c in cells if len(c["features"]) == 2], "total": cells}
    rows = ["| cells | " + " | ".join(CLASSES) + " | all |", "|---" * (len(CLASSES) + 2) + "|"]
    for name, group in groups.items():
        counts = collections.Counter(c["class"] for c in group)
        rows.append(f"| {name} | " + " | ".join(str(counts[k]) for k in CLASSES) + f" | {len(group)} |")
    return "\n".join(rows)


def non_ok_list(cells: list[dict], classes=("crash", "nonfinite", "structural", "meaningful")) -> str:
    """The non-ok cells, grouped by class then by message (one line per message, its cells listed)."""
    lines = []
    for klass in classes:
        by_message = collections.defaultdict(list)
        for c in cells:
            if c["class"] == klass:
                by_message[c["message"]].append(" × ".join(cell_key(c)))
        count = sum(len(v) for v in by_message.values())
        lines.append(f"\n### {klass} ({count})\n")
        for message, keys in sorted(by_message.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- {message!r} ({len(keys)}): " + "; ".join(keys))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write every cell here")
    parser.add_argument("--backend", default="cpu", help="the fused step's backend (cpu, reference, ...)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cells = run_matrix(args.backend, args.device)
    seconds = time.perf_counter() - start
    print(f"{len(cells)} cells, backend={args.backend}, {seconds:.1f} s\n")
    print(summary_table(cells))
    print(non_ok_list(cells))
    if args.json is not None:
        args.json.write_text(json.dumps(cells, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
