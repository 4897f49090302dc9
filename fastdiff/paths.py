"""Gaussian probability paths and prediction conversions (docs/design.md §1). The path classes live in
fastdiff.gaussian_paths and are re-exported here.

Flow time ``t`` runs from 0 (noise) to 1 (data) and a path is
``x_t = alpha_t * z + beta_t * eps`` with ``eps ~ N(0, I)``.

Every path method accepts ``t`` either as

* a Python number: validated to lie in [0, 1] and evaluated in float64 with the
  :mod:`math` module; the result is a Python float (this is what the sampler's
  host-side coefficient tables use), or
* a torch tensor: evaluated elementwise with torch ops in ``t``'s dtype and on its
  device (integer tensors are promoted to the default float dtype). Tensors are not
  range-checked (that would need a host sync); values outside [0, 1] give NaN for the
  VP paths.

Model predictions are one of ``"velocity"`` (u), ``"eps"`` (noise), ``"score"``
(grad log p_t), ``"x0"`` (clean data) or ``"v"`` (Salimans & Ho's v = alpha eps - beta x0,
diffusers' ``v_prediction``; ``"epsilon"``, ``"v_prediction"`` and ``"sample"`` are accepted as
diffusers' names). All five are affine in (x, prediction);
:func:`affine_coefficients` gives ``(a, b)`` with ``to = a * x + b * pred`` and
:func:`convert` applies it. The stable forms of docs/design.md §1 are used, with
``Delta = beta * d_alpha - d_beta * alpha``:

* from velocity: ``x0 = (beta u - d_beta x) / Delta``, ``eps = (d_alpha x - alpha u) / Delta``
* from eps: ``x0 = (x - beta eps) / alpha``; from x0: ``eps = (x - alpha x0) / beta``;
  from score: ``eps = -beta s``
* ``u = d_alpha x0 + d_beta eps`` and ``s = -eps / beta``.
* from v: ``x0 = (alpha x - beta v) / (alpha^2 + beta^2)``, ``eps = (beta x + alpha v) / (alpha^2 + beta^2)``
  (on VP paths alpha^2 + beta^2 = 1), and ``v = alpha eps - beta x0``.

No conversion divides by ``alpha`` unless the formula above does, so velocity models
are finite at t = 0 (CondOT: ``s = (t u - x) / (1 - t)``, ``x0 = x + u``). A conversion
that is singular at ``t`` (``eps``/``score`` -> ``x0``/``velocity`` where alpha = 0;
anything except ``score`` itself -> ``score``, and ``x0`` -> ``eps``/``velocity``, where
beta = 0; anything at a point where the path's derivatives are infinite, such as VP paths
at t = 1) raises :class:`ValueError`; samplers start or end their grids accordingly.
Converting a prediction to its own type is always the identity.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch

from fastdiff import _checks
from fastdiff.gaussian_paths import (PATH_NAMES, VE, VP, CondOT, DiscreteVP, GaussianPath, Time, UserPath,  # noqa: F401
                                     VPCosine, _check_t, get_path)

__all__ = [
    "GaussianPath",
    "CondOT",
    "VP",
    "VPCosine",
    "VE",
    "DiscreteVP",
    "UserPath",
    "get_path",
    "PATH_NAMES",
    "PREDICTIONS",
    "check_prediction",
    "affine_coefficients",
    "convert",
]

PREDICTIONS = ("velocity", "eps", "score", "x0", "v")
# diffusers' names (prediction_type): "v_prediction" is Salimans & Ho's v, "sample" the clean data
_PREDICTION_ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def check_prediction(prediction: str, arg: str = "prediction") -> str:
    """Validate a prediction type name and return its canonical form."""
    if isinstance(prediction, str):
        key = _PREDICTION_ALIASES.get(prediction.lower(), prediction.lower())
        if key in PREDICTIONS:
            return key
    raise ValueError(f"unknown {arg}={prediction!r}; valid prediction types: {', '.join(PREDICTIONS)}")


class _Singular(Exception):
    pass


def _div(num, den, why: str):
    """num / den; for a host (float) denominator of 0, signal a singular conversion."""
    if not isinstance(den, torch.Tensor) and den == 0.0:
        raise _Singular(why)
    return num / den


def _eps_pair(src, al, be, dal, dbe):
    """(a, b) with eps_hat = a x + b pred."""
    if src == "eps":
        return 0.0, 1.0
    if src == "x0":
        return _div(1.0, be, "beta_t = 0"), _div(-al, be, "beta_t = 0")
    if src == "score":
        return 0.0, -be
    if src == "v":  # eps = (beta x + alpha v) / (alpha^2 + beta^2)
        norm = _div(1.0, al * al + be * be, "alpha_t = beta_t = 0")
        return be * norm, al * norm
    delta = be * dal - dbe * al
    why = "Delta_t = beta_t*d_alpha_t - d_beta_t*alpha_t = 0"
    return _div(dal, delta, why), _div(-al, delta, why)


def _x0_pair(src, al, be, dal, dbe):
    """(a, b) with x0_hat = a x + b pred."""
    if src == "x0":
        return 0.0, 1.0
    if src == "eps":
        return _div(1.0, al, "alpha_t = 0"), _div(-be, al, "alpha_t = 0")
    if src == "score":
        return _div(1.0, al, "alpha_t = 0"), _div(be * be, al, "alpha_t = 0")
    if src == "v":  # x0 = (alpha x - beta v) / (alpha^2 + beta^2)
        norm = _div(1.0, al * al + be * be, "alpha_t = beta_t = 0")
        return al * norm, -be * norm
    delta = be * dal - dbe * al
    why = "Delta_t = beta_t*d_alpha_t - d_beta_t*alpha_t = 0"
    return _div(-dbe, delta, why), _div(be, delta, why)


def _affine(path: GaussianPath, t: Time, src: str, dst: str, check: bool = True):
    t = _check_t(t)
    coeffs = path.coefficients(t)
    tensor = isinstance(t, torch.Tensor)
    if src == dst:
        return (torch.zeros_like(t), torch.ones_like(t)) if tensor else (0.0, 1.0)

    def fail(why, tval):
        raise ValueError(
            f"cannot convert prediction type {src!r} to {dst!r} at t={tval!r} on path {path!r}: "
            f"the conversion is singular there ({why})") from None

    if not tensor and not all(math.isfinite(c) for c in coeffs):
        fail("the path's alpha, beta or derivatives are not finite", t)
    try:
        if dst == "eps":
            a, b = _eps_pair(src, *coeffs)
        elif dst == "x0":
            a, b = _x0_pair(src, *coeffs)
        elif dst == "score":
            ea, eb = _eps_pair(src, *coeffs)
            a, b = _div(-ea, coeffs[1], "beta_t = 0"), _div(-eb, coeffs[1], "beta_t = 0")
        elif dst == "v":  # v = alpha eps - beta x0
            za, zb = _x0_pair(src, *coeffs)
            ea, eb = _eps_pair(src, *coeffs)
            al, be = coeffs[0], coeffs[1]
            a, b = al * ea - be * za, al * eb - be * zb
        else:  # velocity = d_alpha * x0 + d_beta * eps
            za, zb = _x0_pair(src, *coeffs)
            ea, eb = _eps_pair(src, *coeffs)
            dal, dbe = coeffs[2], coeffs[3]
            a, b = dal * za + dbe * ea, dal * zb + dbe * eb
    except _Singular as exc:
        fail(str(exc), t)
    if tensor:
        a, b = a + torch.zeros_like(t), b + torch.zeros_like(t)
        if check:
            ok = torch.isfinite(a) & torch.isfinite(b)
            for c in coeffs:
                ok = ok & torch.isfinite(c)
            if not bool(ok.all()):
                bad = t.detach().expand(ok.shape).reshape(-1)[~ok.reshape(-1)][0].item()
                _affine(path, bad, src, dst)  # raises the precise message where it can
                fail("non-finite coefficient", bad)
    elif not (math.isfinite(a) and math.isfinite(b)):
        fail("non-finite coefficient", t)
    return a, b


def affine_coefficients(path: Union[str, GaussianPath], t: Time, from_type: str,
                        to_type: str) -> Tuple[Time, Time]:
    """``(a, b)`` such that ``to = a * x + b * pred`` converts a ``from_type`` prediction.

    For a Python float ``t`` the coefficients are Python floats computed in float64; for a
    tensor ``t`` they are tensors of ``t``'s shape and dtype. Raises ValueError where the
    conversion is singular (see the module docstring).
    """
    src = check_prediction(from_type, "from_type")
    dst = check_prediction(to_type, "to_type")
    return _affine(get_path(path), t, src, dst)


def convert(pred: torch.Tensor, x: torch.Tensor, t: Time, path: Union[str, GaussianPath],
            from_type: str, to_type: str, *, check: bool = True) -> torch.Tensor:
    """Convert a model prediction at state ``x`` and time ``t`` from one type to another.

    ``t`` is a float or a tensor: 0-dim, shape ``[B]`` (broadcast over the trailing dims of
    ``x`` of shape ``[B, ...]``), or already broadcastable to ``x``. For a tensor ``t`` the
    coefficients are computed in float64 and cast to the result dtype
    (``promote_types(x.dtype, pred.dtype)``). ``check=False`` skips the singularity check
    for tensor ``t`` (which needs a host sync); singular points then give inf/NaN.
    """
    src = check_prediction(from_type, "from_type")
    dst = check_prediction(to_type, "to_type")
    check = _checks.flag("check", check)  # check='no' would be truthy
    path = get_path(path)
    dtype = torch.promote_types(x.dtype, pred.dtype)
    if src == dst:
        _check_t(t)
        return pred.to(dtype, copy=True)
    if isinstance(t, torch.Tensor):
        t = t.to(device=x.device, dtype=torch.float64)
        if t.dim() == 1 and x.dim() >= 1 and t.shape[0] == x.shape[0]:
            t = t.reshape((-1,) + (1,) * (x.dim() - 1))
        elif t.dim() not in (0, x.dim()):
            raise ValueError(
                f"t of shape {tuple(t.shape)} does not match x of shape {tuple(x.shape)}: "
                f"pass a float, a 0-dim tensor, a [B] tensor or one broadcastable to x")
        a, b = _affine(path, t, src, dst, check)
        a, b = a.to(dtype), b.to(dtype)
    else:
        a, b = _affine(path, t, src, dst)
    return a * x + b * pred
