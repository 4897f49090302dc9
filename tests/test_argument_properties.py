"""Property-based checks of the public API's argument handling (hypothesis, derandomized).

For each argument of ``sample``, ``invert``, ``langevin``, ``log_likelihood``, ``generate``, the ops and the
``Trainer``, a valid call gets that one argument replaced by values drawn from a hostile pool (bools for numbers,
numeric strings, NaN/inf, huge and negative ints, wrong containers, wrong-shape tensors, arbitrary objects). The
outcome must be a result whose floating tensors are finite, or a ValueError/TypeError whose message names the
argument — never another exception type (KeyError, ZeroDivisionError, torch's internals) and never a silent NaN.

The budget is fixed: ``derandomize=True`` and EXAMPLES draws per argument, so CI runs the same cases every time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tempfile

import pytest
import torch

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastdiff
from fastdiff import ops
from fastdiff.training import CheckpointError

EXAMPLES = 40  # per argument (161 arguments): ~20 s in all on 2 CPU cores


class _Opaque:
    def __repr__(self):
        return "<opaque>"


_SPECIAL = [None, True, False, 0, 1, -1, 2, 7, 2 ** 31, 2 ** 64, -(2 ** 63), 0.0, -0.0, 0.5, -0.5, 1.0, 1.5, 1e6,
            -1e6, 1e300, math.nan, math.inf, -math.inf, "no", "false", "0.5", "1", "", "cpu", "cuda", "euler",
            [], [1], [0.5, 0.5], (2,), (0, 1), {}, {"a": 1}, _Opaque(), print]


def _tensors():
    return st.sampled_from([
        lambda: torch.tensor(math.nan), lambda: torch.tensor(0.5), lambda: torch.zeros(3), lambda: torch.zeros(2, 3),
        lambda: torch.full((2, 3), math.inf), lambda: torch.ones(2, 2, dtype=torch.int64), lambda: torch.empty(0),
        lambda: torch.zeros(2, 3, dtype=torch.bool), lambda: torch.zeros(2, 3, dtype=torch.float64),
        lambda: torch.zeros(5, 7, 2),
    ]).map(lambda make: make())


HOSTILE = st.one_of(st.sampled_from(_SPECIAL), st.integers(-(2 ** 65), 2 ** 65),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), _tensors())


def _velocity(x, t, y=None):  # condot velocity of N(0, I) data: finite everywhere
    return -x * 0.5


def _score(x):
    return -x


@dataclasses.dataclass
class Target:
    call: object  # kwargs -> result
    base: dict  # a valid call
    args: tuple  # the arguments probed
    costly: tuple = ()  # ints above 64 are skipped here (valid but slow: step counts); huge ones stay


def _sample(kw):
    return fastdiff.sample(**kw)


def _invert(kw):
    return fastdiff.invert(**kw)


@contextlib.contextmanager
def _in_temporary_folder():
    """A drawn out_dir (any text) is a folder relative to the working directory: keep it out of the checkout."""
    before = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fastdiff-props-") as folder:
        os.chdir(folder)
        try:
            yield folder
        finally:
            os.chdir(before)


def _generate(kw):
    kw = dict(kw)
    with _in_temporary_folder() as folder:
        if isinstance(kw["out_dir"], str) and kw["out_dir"] == "<tmp>":
            kw["out_dir"] = os.path.join(folder, "set")
        return fastdiff.generate(**kw)


def _trainer(kw):
    from fastdiff.training import Trainer

    fit_steps = kw.pop("_fit", True)
    with _in_temporary_folder():
        trainer = Trainer(**kw)
        return trainer.fit() if fit_steps else None


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


class ModelRefused(Exception):
    """The caller's own model refusing its input: its exceptions pass through fastdiff unchanged."""


class _Net(torch.nn.Module):  # model(x, t) for the Trainer: x [B, 2], t [B]
    def __init__(self):
        super().__init__()
        self.net = _tiny_model()

    def forward(self, x, t, y=None):
        if x.dim() != 2 or x.shape[1] != 2:
            raise ModelRefused(f"x of shape {tuple(x.shape)}")
        return self.net(torch.cat([x, t[:, None]], 1))


TARGETS = {
    "sample": Target(_sample, dict(model=_velocity, steps=3, cfg=2.0, shape=(3,), y=torch.tensor([0, 1]),
                                   null_y=torch.tensor(5)),
                     ("model", "steps", "cfg", "shape", "y", "null_y", "seed", "noise", "path", "prediction",
                      "method", "sigma", "eta", "timesteps", "guidance_interval", "cfg_batch", "batch_size",
                      "backend", "progress", "callback", "device", "check_finite", "cuda_graph", "step_noise",
                      "guidance", "guidance_rescale", "conditions", "dynamic_thresholding", "clip_sample", "classifier",
                      "classifier_scale", "init", "strength", "known_mask", "resample", "corrector_steps", "snr",
                      "s_churn", "s_noise"),
                     costly=("steps", "resample", "corrector_steps")),
    "invert": Target(_invert, dict(model=_velocity, x=torch.randn(2, 3, generator=torch.Generator().manual_seed(0)),
                                   steps=3),
                     ("model", "x", "steps", "cfg", "timesteps", "path", "prediction", "method"), costly=("steps",)),
    "langevin": Target(lambda kw: fastdiff.langevin(**kw), dict(score=_score, steps=3, step_size=0.1, shape=(2,),
                                                               batch_size=2),
                       ("score", "x0", "steps", "step_size", "shape", "batch_size", "log_prob", "metropolis", "seed",
                        "burn_in", "thin", "return_acceptance", "progress", "backend", "device", "check_finite"),
                       costly=("steps", "burn_in", "thin", "batch_size")),
    "log_likelihood": Target(lambda kw: fastdiff.log_likelihood(**kw),
                             dict(model=_velocity, x=torch.randn(2, 2, generator=torch.Generator().manual_seed(1)),
                                  steps=3),
                             ("model", "x", "steps", "path", "prediction", "y", "method", "divergence", "probes",
                              "probe_kind", "seed", "t_data", "t_noise", "timesteps", "prior", "backend", "progress"),
                             costly=("steps", "probes")),
    "generate": Target(_generate, dict(model=_velocity, n=2, out_dir="<tmp>", shape=(2,), steps=2, progress=False),
                       ("model", "n", "out_dir", "shape", "seed", "batch_size", "shard_size", "labels", "num_classes",
                        "checkpoint", "checkpoint_sha256", "png", "progress", "device", "steps", "cfg"),
                       costly=("n", "steps", "batch_size", "shard_size")),
    "randn": Target(lambda kw: ops.randn(**kw), dict(seeds=[1, 2], stream=0, shape=(2, 5)),
                    ("seeds", "stream", "shape", "device", "dtype", "offset", "backend"), costly=("shape",)),
    "add_noise": Target(lambda kw: ops.add_noise(**kw), dict(z=torch.ones(2, 5), t=torch.tensor([0.3, 0.7]),
                                                            seeds=[1, 2], stream=0),
                        ("z", "t", "seeds", "stream", "path", "backend")),
    "diffusion_loss": Target(lambda kw: ops.diffusion_loss(**kw),
                             dict(pred=torch.zeros(2, 5), z=torch.ones(2, 5), t=torch.tensor([0.3, 0.7]),
                                  seeds=[1, 2], stream=0),
                             ("pred", "z", "t", "seeds", "stream", "path", "prediction", "weight", "reduction",
                              "backend")),
    "guided_step": Target(lambda kw: ops.guided_step(**kw), dict(x=torch.ones(2, 5), pred=torch.zeros(2, 5),
                                                                pred_uncond=torch.ones(2, 5), cfg=2.0),
                          ("x", "pred", "pred_uncond", "cfg", "extra", "seeds", "stream", "c_x", "c_pred", "c_extra",
                           "c_noise", "s_x", "s_pred", "s_extra", "backend")),
    "philox4x32_10": Target(lambda kw: ops.philox4x32_10(**kw),
                            dict(counter=torch.zeros(3, 4, dtype=torch.int64),
                                 key=torch.zeros(3, 2, dtype=torch.int64)),
                            ("counter", "key", "backend")),
    "Trainer": Target(_trainer, dict(model=_Net(), data=torch.randn(16, 2, generator=torch.Generator().manual_seed(2)),
                                     steps=2, batch_size=4, progress=False),
                      ("model", "data", "objective", "steps", "batch_size", "lr", "betas", "weight_decay", "warmup",
                       "lr_schedule", "lr_min", "grad_clip", "ema_decay", "amp", "seed", "out_dir",
                       "checkpoint_every", "keep", "resume", "progress", "log_every", "callback", "device",
                       "on_nonfinite", "max_consecutive_skips"),
                      costly=("steps", "batch_size")),
}

_PATHS = ("checkpoint", "out_dir", "resume")  # arguments that name files
_SIZES = ("shape", "batch_size", "n", "shard_size", "num_classes")
CASES = [(name, arg) for name, target in TARGETS.items() for arg in target.args]


def _floating_tensors(result):
    if isinstance(result, torch.Tensor):
        if result.is_floating_point():
            yield result
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        for f in dataclasses.fields(result):
            yield from _floating_tensors(getattr(result, f.name))
    elif isinstance(result, (tuple, list)):
        for r in result:
            yield from _floating_tensors(r)
    elif isinstance(result, dict):
        for r in result.values():
            yield from _floating_tensors(r)


def _names(message: str, arg: str) -> bool:
    # the argument's own name (sample's method options too: s_churn), as a word; "out_dir" also as its path
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", message) is not None


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}-{a}" for n, a in CASES])
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(value=HOSTILE)
def test_argument_outcomes(name, arg, value):
    target = TARGETS[name]
    if arg in target.costly + _SIZES and isinstance(value, int) and not isinstance(value, bool):
        assume(value <= 64 or value >= 2 ** 40)  # valid but slow or large; absurd sizes must still be refused
    kw = dict(target.base)
    if name == "Trainer":
        kw["model"] = _Net()  # a fresh model (fit trains it)
        if arg == "steps":
            kw["_fit"] = False  # a valid huge step count is only constructed
    kw[arg] = value
    try:
        result = target.call(kw)
    except (ValueError, TypeError) as e:
        assert _names(str(e), arg), f"{name}({arg}={value!r}) raised {type(e).__name__} not naming {arg!r}: {e}"
        return
    except ModelRefused:
        return
    except FloatingPointError as e:  # finite arguments that overflow the computation (a huge step_size): named
        assert _names(str(e), arg), f"{name}({arg}={value!r}) raised FloatingPointError not naming {arg!r}: {e}"
        return
    except (OSError, CheckpointError) as e:  # a path argument naming a missing or unusable file: a file error
        assert arg in _PATHS and _names(str(e), arg), f"{name}({arg}={value!r}) raised {type(e).__name__}: {e}"
        return
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
        return  # inf/NaN data in, inf/NaN out (the ops do not read their inputs back to check)
    for t in _floating_tensors(result):
        assert torch.isfinite(t).all(), f"{name}({arg}={value!r}) returned a non-finite result"
