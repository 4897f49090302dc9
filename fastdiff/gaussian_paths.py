"""Gaussian probability paths x_t = alpha_t z + beta_t eps (docs/design.md §1): the path classes and
``get_path``. fastdiff.paths re-exports them next to the prediction conversions; see its docstring for
how ``t`` is taken (a Python float in float64, or a tensor elementwise)."""

from __future__ import annotations

import math
import numbers
import re
import warnings
from typing import Callable, Optional, Tuple, Union

import torch

Time = Union[float, torch.Tensor]


def _check_t(t) -> Time:
    """Validate ``t``: numbers must be finite and in [0, 1]; tensors become floating."""
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        tf = float(t)
        if not 0.0 <= tf <= 1.0:  # also rejects NaN
            raise ValueError(f"t must be a flow time in [0, 1], got t={t!r}")
        return tf
    raise TypeError(f"t must be a float or a torch.Tensor, got {type(t).__name__}")


def _ops(t):
    """The math namespace for ``t``: :mod:`math` for floats, :mod:`torch` for tensors."""
    return torch if isinstance(t, torch.Tensor) else math


def _const(value: float, t: Time) -> Time:
    return torch.full_like(t, value) if isinstance(t, torch.Tensor) else float(value)


def _d_beta_from_alpha(alpha: Time, d_alpha: Time, beta: Time) -> Time:
    """d_beta for beta = sqrt(1 - alpha^2): -alpha * d_alpha / beta (-inf where beta = 0)."""
    if isinstance(beta, torch.Tensor):
        return -alpha * d_alpha / beta
    if beta == 0.0:
        num = alpha * d_alpha
        return -math.copysign(math.inf, num) if num != 0.0 else math.nan
    return -alpha * d_alpha / beta


class GaussianPath:
    """Base class of Gaussian paths ``x_t = alpha_t z + beta_t eps``.

    Subclasses implement ``_coefficients(t)`` for an already validated ``t`` (a float
    or a floating tensor) and return ``(alpha, beta, d_alpha, d_beta)``.
    """

    name = "gaussian"

    def _coefficients(self, t: Time) -> Tuple[Time, Time, Time, Time]:
        raise NotImplementedError

    def coefficients(self, t: Time) -> Tuple[Time, Time, Time, Time]:
        """``(alpha_t, beta_t, d alpha_t/dt, d beta_t/dt)`` at flow time ``t``."""
        return self._coefficients(_check_t(t))

    def kernel_path(self) -> Optional[Tuple[int, Tuple[float, ...]]]:
        """(code, parameters) of a built-in path, whose coefficients the kernels compute from t themselves
        (csrc/include/fastdiff/gaussian_path.h: the same float64 formulas); None for any other path, a
        subclass included, whose coefficients the caller computes."""
        if type(self) not in _KERNEL_CODES:
            return None
        return _KERNEL_CODES[type(self)], self._kernel_parameters()

    def _kernel_parameters(self) -> Tuple[float, ...]:
        return ()

    def alpha(self, t: Time) -> Time:
        """Signal coefficient alpha_t."""
        return self.coefficients(t)[0]

    def beta(self, t: Time) -> Time:
        """Noise coefficient beta_t."""
        return self.coefficients(t)[1]

    def d_alpha(self, t: Time) -> Time:
        """d alpha_t / dt."""
        return self.coefficients(t)[2]

    def d_beta(self, t: Time) -> Time:
        """d beta_t / dt."""
        return self.coefficients(t)[3]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CondOT(GaussianPath):
    """Conditional optimal transport (rectified flow): alpha_t = t, beta_t = 1 - t."""

    name = "condot"

    def _coefficients(self, t):
        return t, 1.0 - t, _const(1.0, t), _const(-1.0, t)


class VP(GaussianPath):
    """Variance-preserving path of the DDPM linear beta schedule.

    In diffusion time ``s = 1 - t`` with ``B(s) = beta_min s + (beta_max - beta_min) s^2 / 2``:
    ``alpha_t = exp(-B/2)`` and ``beta_t = sqrt(1 - alpha_t^2) = sqrt(-expm1(-B))`` (accurate
    for small B). Derivatives by the chain rule (ds/dt = -1): ``d_alpha = B'(s) alpha / 2`` and
    ``d_beta = -alpha d_alpha / beta``.

    Ends: at t = 1, alpha = 1 and beta = 0 exactly and d_beta = -inf (beta ~ sqrt(beta_min s));
    at t = 0, alpha = exp(-(beta_min + beta_max)/4) (~6.6e-3 by default), beta ~ 1 - 2e-5.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0.0 <= beta_min <= beta_max or beta_max <= 0.0:
            raise ValueError(
                f"VP needs 0 <= beta_min <= beta_max, beta_max > 0; got beta_min={beta_min}, "
                f"beta_max={beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def _coefficients(self, t):
        m = _ops(t)
        s = 1.0 - t
        slope = self.beta_max - self.beta_min
        big_b = self.beta_min * s + 0.5 * slope * s * s
        d_big_b = self.beta_min + slope * s  # dB/ds
        alpha = m.exp(-0.5 * big_b)
        beta = m.sqrt(-m.expm1(-big_b))
        d_alpha = 0.5 * d_big_b * alpha
        return alpha, beta, d_alpha, _d_beta_from_alpha(alpha, d_alpha, beta)

    def _kernel_parameters(self):
        return self.beta_min, self.beta_max

    def __repr__(self) -> str:
        return f"VP(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VPCosine(GaussianPath):
    """Nichol–Dhariwal cosine schedule in flow time (offset ``s``, default 0.008).

    ``alpha_t = cos(pi/2 (s_d + s)/(1 + s)) / cos(pi/2 s/(1 + s))`` with ``s_d = 1 - t``.
    It is evaluated in the equivalent form ``alpha_t = sin(w t) / sin(w)`` with
    ``w = pi / (2 (1 + s))``, and ``beta_t = sqrt(sin(w (1 - t)) sin(w (1 + t))) / sin(w)``
    (= sqrt(1 - alpha_t^2)), so alpha_0 = 0, beta_0 = 1, alpha_1 = 1, beta_1 = 0 hold
    exactly and no clipping is needed. (The discrete-time clipping of beta at 0.999 in
    the original paper does not apply to the continuous path.) d_beta(1) = -inf.
    """

    name = "vp-cosine"

    def __init__(self, s: float = 0.008):
        if not s > 0.0:
            raise ValueError(f"VPCosine offset s must be > 0, got s={s}")
        self.s = float(s)

    def _coefficients(self, t):
        m = _ops(t)
        w = 0.5 * math.pi / (1.0 + self.s)
        norm = math.sin(w)
        alpha = m.sin(w * t) / norm
        beta = m.sqrt(m.sin(w * (1.0 - t)) * m.sin(w * (1.0 + t))) / norm
        d_alpha = w * m.cos(w * t) / norm
        return alpha, beta, d_alpha, _d_beta_from_alpha(alpha, d_alpha, beta)

    def _kernel_parameters(self):
        return (self.s,)

    def __repr__(self) -> str:
        return f"VPCosine(s={self.s})"


class VE(GaussianPath):
    """Variance-exploding / EDM path: alpha_t = 1, beta_t = sigma_max (1 - t).

    beta is the noise level sigma of k-diffusion and EDM (x = z + sigma eps). Time runs linearly in
    sigma, so Euler and Heun steps in t are the same steps in sigma (the chain rule with a constant
    factor), DPM-Solver++'s lambda = log(alpha / beta) is k-diffusion's -log sigma, and any sigma
    schedule (e.g. Karras rho = 7, :mod:`fastdiff.schedules`) becomes the time grid
    t_i = 1 - sigma_i / sigma_max. At t = 0 the state is z + sigma_max eps; the sampler starts from
    sigma_max eps, as k-diffusion does (z is negligible next to sigma_max). At t = 1, sigma = 0.
    """

    name = "ve"

    def __init__(self, sigma_max: float = 80.0):
        if not (isinstance(sigma_max, numbers.Real) and math.isfinite(sigma_max) and sigma_max > 0):
            raise ValueError(f"VE needs a finite sigma_max > 0, got sigma_max={sigma_max!r}")
        self.sigma_max = float(sigma_max)

    def _coefficients(self, t):
        return _const(1.0, t), self.sigma_max * (1.0 - t), _const(0.0, t), _const(-self.sigma_max, t)

    def _kernel_parameters(self):
        return (self.sigma_max,)

    def sigma(self, t: Time) -> Time:
        """The noise level sigma_t = beta_t."""
        return self.beta(t)

    def time(self, sigma: Time) -> Time:
        """The flow time of noise level sigma in [0, sigma_max]: 1 - sigma / sigma_max."""
        if isinstance(sigma, torch.Tensor):
            return 1.0 - sigma / self.sigma_max
        s = float(sigma)
        if not 0.0 <= s <= self.sigma_max:
            raise ValueError(f"sigma must lie in [0, sigma_max = {self.sigma_max}], got {sigma!r}")
        return 1.0 - s / self.sigma_max

    def __repr__(self) -> str:
        return f"VE(sigma_max={self.sigma_max})"


class DiscreteVP(GaussianPath):
    """The VP path of a discrete training schedule (diffusers' / DDPM's ``alphas_cumprod`` over T steps).

    Flow time t maps to the training timestep tau = T (1 - t) - 1 in [-1, T - 1]: t = 0 is tau = T - 1
    (the noisiest), t = 1 is tau = -1, where alpha_bar = 1 (diffusers' ``set_alpha_to_one``), so the
    path ends at the data. Between integers log alpha_bar is linear in tau; alpha = sqrt(alpha_bar),
    beta = sqrt(1 - alpha_bar), derivatives by the chain rule (one-sided at the integers, where a
    sampler on the training timesteps evaluates the schedule exactly).
    """

    name = "discrete-vp"

    def __init__(self, alphas_cumprod):
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().reshape(-1)
        if a.numel() < 2 or not bool(((a > 0) & (a < 1)).all()) or not bool((a[1:] <= a[:-1]).all()):
            raise ValueError("alphas_cumprod must hold >= 2 values in (0, 1), non-increasing with the timestep")
        self.num_train_timesteps = a.numel()
        # knots tau = -1, 0, ..., T - 1 of log alpha_bar
        self._log_a = torch.cat([torch.zeros(1, dtype=torch.float64), a.log()])
        self._log_a_list = self._log_a.tolist()
        self._log_a_on = {}  # device -> the table there: one host-to-device copy per device, not per call

    def _table(self, device: torch.device) -> torch.Tensor:
        table = self._log_a_on.get(device)
        if table is None:
            table = self._log_a_on[device] = self._log_a.to(device)
        return table

    def tau(self, t: Time) -> Time:
        """The (fractional) training timestep of flow time t."""
        return self.num_train_timesteps * (1.0 - t) - 1.0

    def time(self, tau: Time) -> Time:
        """The flow time of training timestep tau in [-1, T - 1]."""
        return 1.0 - (tau + 1.0) / self.num_train_timesteps

    def _coefficients(self, t):
        T = self.num_train_timesteps
        if isinstance(t, torch.Tensor):
            log_a = self._table(t.device)
            pos = (self.tau(t.double()) + 1.0).clamp(0.0, float(T))  # knot coordinate in [0, T]
            k = pos.floor().clamp(max=T - 1).long()
            slope = log_a[k + 1] - log_a[k]
            la = log_a[k] + (pos - k) * slope
            alpha = (0.5 * la).exp()
            beta = ((-la.expm1()).clamp(min=0) + 0.0).sqrt()  # + 0.0: -0 at tau = -1 becomes +0
            d_alpha = alpha * 0.5 * slope * -T
            return (alpha.to(t.dtype), beta.to(t.dtype), d_alpha.to(t.dtype),
                    _d_beta_from_alpha(alpha, d_alpha, beta).to(t.dtype))
        pos = min(max(self.tau(t) + 1.0, 0.0), float(T))
        k = min(int(math.floor(pos)), T - 1)
        slope = self._log_a_list[k + 1] - self._log_a_list[k]
        la = self._log_a_list[k] + (pos - k) * slope
        alpha = math.exp(0.5 * la)
        beta = math.sqrt(max(-math.expm1(la), 0.0) + 0.0)
        d_alpha = alpha * 0.5 * slope * -T
        return alpha, beta, d_alpha, _d_beta_from_alpha(alpha, d_alpha, beta)

    def __repr__(self) -> str:
        return f"DiscreteVP(num_train_timesteps={self.num_train_timesteps})"


def _fn_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class UserPath(GaussianPath):
    """A path from user callables ``alpha(t)`` and ``beta(t)``.

    The callables are applied elementwise to a tensor ``t`` (or to a 0-dim float64 tensor
    when ``t`` is a Python float, so ``math``-based callables work too). A missing
    derivative is computed with :mod:`torch.autograd` in float64 (then cast back to
    ``t``'s dtype); for that the callable must use torch ops.
    """

    name = "user"

    def __init__(self, alpha: Callable, beta: Callable, d_alpha: Optional[Callable] = None,
                 d_beta: Optional[Callable] = None, name: str = "user"):
        for arg, fn in (("alpha", alpha), ("beta", beta), ("d_alpha", d_alpha), ("d_beta", d_beta)):
            if fn is not None and not callable(fn):
                raise TypeError(f"UserPath argument {arg} must be callable, got {type(fn).__name__}")
        self._alpha, self._beta = alpha, beta
        self._d_alpha, self._d_beta = d_alpha, d_beta
        self.name = name

    @staticmethod
    def _eval(fn: Callable, t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        out = torch.as_tensor(out, dtype=t.dtype, device=t.device)
        return out.expand(t.shape) if out.shape != t.shape else out

    @staticmethod
    def _grad(fn: Callable, t: torch.Tensor, arg: str) -> torch.Tensor:
        with torch.inference_mode(False), torch.enable_grad():
            t64 = t.detach().to(torch.float64).clone().requires_grad_(True)
            with warnings.catch_warnings():  # math-based callables: we raise a clear error below
                warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
                out = fn(t64)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"UserPath: cannot differentiate {arg}(t) with autograd because it did not "
                    f"return a tensor; use torch ops or pass d_{arg}")
            if not out.requires_grad:  # constant in t
                return torch.zeros_like(t)
            (grad,) = torch.autograd.grad(out.sum(), t64)
        return grad.to(t.dtype)

    def _coefficients(self, t):
        is_float = not isinstance(t, torch.Tensor)
        tt = torch.tensor(t, dtype=torch.float64) if is_float else t
        alpha = self._eval(self._alpha, tt)
        beta = self._eval(self._beta, tt)
        d_alpha = (self._eval(self._d_alpha, tt) if self._d_alpha is not None
                   else self._grad(self._alpha, tt, "alpha"))
        d_beta = (self._eval(self._d_beta, tt) if self._d_beta is not None
                  else self._grad(self._beta, tt, "beta"))
        res = (alpha, beta, d_alpha, d_beta)
        return tuple(float(r) for r in res) if is_float else res

    def __repr__(self) -> str:
        def d(fn):
            return "autograd" if fn is None else _fn_name(fn)
        return (f"UserPath(alpha={_fn_name(self._alpha)}, beta={_fn_name(self._beta)}, "
                f"d_alpha={d(self._d_alpha)}, d_beta={d(self._d_beta)}, name={self.name!r})")


_PATHS = {"condot": CondOT, "vp": VP, "vp-cosine": VPCosine, "ve": VE}
# The kernels' path codes (PathKind in csrc/include/fastdiff/gaussian_path.h).
_KERNEL_CODES = {CondOT: 0, VP: 1, VPCosine: 2, VE: 3}
PATH_NAMES = tuple(_PATHS)


def _from_repr(text: str) -> Optional[GaussianPath]:
    """A built-in path from its repr with numeric parameters, e.g. "VE(sigma_max=2.0)" (checkpoints record a
    named path with other parameters this way); None when ``text`` is not one."""
    match = re.fullmatch(r"\s*(\w+)\((.*)\)\s*", text)
    classes = {cls.__name__: cls for cls in _PATHS.values()}
    if match is None or match.group(1) not in classes:
        return None
    kwargs = {}
    for item in filter(None, (part.strip() for part in match.group(2).split(","))):
        key, _, value = item.partition("=")
        try:
            kwargs[key.strip()] = float(value)
        except ValueError:
            return None
    try:
        return classes[match.group(1)](**kwargs)
    except TypeError:
        return None


def path_from_kernel(code: int, params) -> GaussianPath:
    """The built-in path of a kernel path code and its parameters (the inverse of GaussianPath.kernel_path)."""
    cls = {value: key for key, value in _KERNEL_CODES.items()}[int(code)]
    return cls(*params)


def get_path(name_or_path: Union[str, GaussianPath]) -> GaussianPath:
    """A path by name (``"condot"``, ``"vp"``, ``"vp-cosine"``, ``"ve"`` with sigma_max = 80), a built-in path's
    repr (``"VE(sigma_max=2.0)"``) or a GaussianPath as is."""
    if isinstance(name_or_path, GaussianPath):
        return name_or_path
    if isinstance(name_or_path, str):
        key = name_or_path.strip().lower().replace("_", "-")
        if key in _PATHS:
            return _PATHS[key]()
        path = _from_repr(name_or_path)
        if path is not None:
            return path
    raise ValueError(
        f"unknown path name_or_path={name_or_path!r}; valid names: {', '.join(PATH_NAMES)} "
        f"(or a GaussianPath instance)")
