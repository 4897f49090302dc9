"""Per-step coefficient tables of the samplers (docs/design.md §2), computed on the host in float64.

Every method is a sequence of fused-kernel calls (:func:`fastdiff.ops.sampler_step`; a Stage is its
form with one draw and history buffers: ``extra`` and any further ones in ``history``)

    out  = c_x x + c_pred g + c_extra extra + c_noise noise(seeds, stream)
    side = s_x x + s_pred g + s_extra extra

where g is the (guided) model prediction at the stage's time. Conversions between prediction types
are affine in (x, g) (fastdiff.paths.affine_coefficients), so a method is fully described by these
scalars. Buffers: "x" is the sampler state; "stage" holds Heun's Euler predictor; "side0"/"side1"
hold Heun's partial sum or DPM-Solver++'s previous x0 prediction (ping-pong).

Methods (h = t' - t, all in flow time):
- euler: x' = x + h u                              (sigma = 0, probability-flow ODE)
         x' = x + h (u + sigma_t^2 / 2 s) + sigma_t sqrt(h) xi   (Euler–Maruyama, SDE extension trick)
- ddim:  x' = alpha' x0 + sqrt(beta'^2 - s^2) eps + s xi,  s = eta beta' sqrt(1 - (alpha beta' / (alpha' beta))^2)
         (eta = 0 deterministic DDIM; eta = 1 the DDPM posterior, i.e. ancestral sampling)
- heun:  predictor x_e = x + h u(x, t), corrector x' = x + h/2 (u(x, t) + u(x_e, t')); the last step is
         Euler where u at t' is singular (e.g. VP paths at t' = 1), as k-diffusion does at sigma = 0
- dpmpp_2m: DPM-Solver++(2M) in lambda = log(alpha / beta) with x0 predictions; first order on the
         first step and on a last step that ends at beta' = 0

Each builder is registered where it is written (@register_method, fastdiff.sampling.methods) with its
options, evaluations per step, needed conversions and description; a new method is one more of them.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fastdiff.paths import GaussianPath, affine_coefficients
from fastdiff.sampling.methods.registry import get_method, method_names, methods, register_method
from fastdiff.sampling.core.stage import Stage, draw_stream


def __getattr__(name):
    # METHODS (registered names, in registration order) and EVALS_PER_STEP are read from the registry
    # (fastdiff.sampling.methods) on access, so that they list methods registered later too.
    if name == "METHODS":
        return method_names()
    if name == "EVALS_PER_STEP":
        return {m.name: m.evals_per_step for m in methods()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _conv(path: GaussianPath, t: float, prediction: str, to: str) -> tuple[float, float]:
    return affine_coefficients(path, t, prediction, to)


def _singular(path: GaussianPath, t: float, prediction: str, to: str) -> bool:
    """Whether the `to` field is undefined at t: a singular conversion, or a path derivative that is
    infinite there (VP paths at t = 1), which makes even a velocity model's own output infinite."""
    if not all(math.isfinite(c) for c in path.coefficients(t)):
        return True
    try:
        a, b = _conv(path, t, prediction, to)
    except ValueError:
        return True
    return not (math.isfinite(a) and math.isfinite(b))


def clean_share(path, t: float, prediction: str, c_x: float, c_pred: float) -> float | None:
    """CFG++'s share of a step's prediction coefficient that goes through the clean estimate (Stage.cfg_pp): the
    step c_x x + c_pred g written as A x0(g) + K eps(g) (unique where x0 and eps are independent conversions),
    rho = A b_x0 / c_pred; None where that split does not exist (a singular conversion)."""
    if c_pred == 0.0:
        return 1.0
    try:
        a0, b0 = _conv(path, t, prediction, "x0")
        ae, be = _conv(path, t, prediction, "eps")
    except ValueError:
        return None
    det = a0 * be - ae * b0
    if not all(math.isfinite(v) for v in (a0, b0, ae, be)) or det == 0.0:
        return None
    return (c_x * be - ae * c_pred) / det * b0 / c_pred


@register_method("euler", options=("sigma",), evals_per_step=1, churn_options=True,
                 conversions=lambda sigma=None, **_: ("velocity", "score", "x0") if sigma else ("velocity", "x0"),
                 inverts=True, cfg_pp=True,
                 description="first order: the probability-flow ODE, Euler–Maruyama on the SDE when sigma > 0")
def _euler(path, grid, prediction, sigma=None) -> list[Stage]:
    sigma = sigma or (lambda t: 0.0)
    stages = []
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        h = t1 - t
        a_u, b_u = _conv(path, t, prediction, "velocity")
        s = sigma(t)
        c_x, c_p, c_n = 1.0 + h * a_u, h * b_u, 0.0
        if s > 0:
            a_s, b_s = _conv(path, t, prediction, "score")
            c_x += h * 0.5 * s * s * a_s
            c_p += h * 0.5 * s * s * b_s
            c_n = s * math.sqrt(h)
        # CFG++ (ComfyUI's euler_cfg_pp): x' = A x0(g) + K eps(p_null), the drift split into its clean estimate
        # and re-noising
        stages.append(Stage(i, t, "x", "x", c_x, c_p, c_noise=c_n, stream=draw_stream(i),
                            x0=_conv(path, t, prediction, "x0"), final=True,
                            cfg_pp=clean_share(path, t, prediction, c_x, c_p)))
    return stages


@register_method("heun", evals_per_step=2, conversions=("velocity", "x0"), churn_options=True,
                 inverts=True,
                 description="second-order ODE predictor-corrector (Euler on a last step to a singular t)")
def _heun(path, grid, prediction) -> list[Stage]:
    stages = []
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        h = t1 - t
        a_u, b_u = _conv(path, t, prediction, "velocity")
        x0 = _conv(path, t, prediction, "x0")
        if _singular(path, t1, prediction, "velocity"):
            stages.append(Stage(i, t, "x", "x", 1.0 + h * a_u, h * b_u, x0=x0, final=True))
            continue
        # predictor into "stage"; side = x + h/2 u(x, t) for the corrector
        stages.append(Stage(i, t, "x", "stage", 1.0 + h * a_u, h * b_u, side="side0",
                            s_x=1.0 + 0.5 * h * a_u, s_pred=0.5 * h * b_u, x0=x0))
        a1, b1 = _conv(path, t1, prediction, "velocity")
        stages.append(Stage(i, t1, "stage", "x", 0.5 * h * a1, 0.5 * h * b1, c_extra=1.0, extra="side0",
                            final=True))
    return stages


@register_method("ddim", options=("eta",), evals_per_step=1, conversions=("x0", "eps"),
                 inverts=True, cfg_pp=True,
                 description="deterministic at eta = 0, the DDPM posterior (ancestral sampling) at eta = 1")
def _ddim(path, grid, prediction, eta=0.0) -> list[Stage]:
    stages = []
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        al, be = path.coefficients(t)[:2]
        al1, be1 = path.coefficients(t1)[:2]
        a_z, b_z = _conv(path, t, prediction, "x0")
        a_e, b_e = _conv(path, t, prediction, "eps")
        s = 0.0
        if eta > 0 and be1 > 0:
            ratio = (al * be1) / (al1 * be)
            s = eta * be1 * math.sqrt(max(0.0, 1.0 - ratio * ratio))
        k = math.sqrt(max(0.0, be1 * be1 - s * s))
        c_pred = al1 * b_z + k * b_e
        # CFG++ (guidance="cfg_pp"): the share of c_pred that goes through the clean estimate alpha' x0; the
        # re-noising k eps takes the unconditional prediction alone
        clean = al1 * b_z / c_pred if c_pred != 0.0 else 1.0
        stages.append(Stage(i, t, "x", "x", al1 * a_z + k * a_e, c_pred, c_noise=s, stream=draw_stream(i),
                            x0=(a_z, b_z), final=True, cfg_pp=clean))
    return stages


DDPM_VARIANCES = ("fixed_small", "fixed_large")


@register_method("ddpm", options={"variance_type": "fixed_small"}, evals_per_step=1, conversions=("x0",),
                 description="DDPM ancestral sampling: the posterior of x0's estimate, variance fixed_small or "
                             "fixed_large (diffusers' DDPMScheduler)")
def _ddpm(path, grid, prediction, variance_type="fixed_small") -> list[Stage]:
    """The Gaussian posterior q(x_s | x_t, x0) of any path x_t = α_t x0 + β_t ε, from t to the next time s: with
    r = α_t / α_s and σ² = β_t² − r² β_s² (the transition's variance), mean (α_s σ² x0 + r β_s² x_t) / β_t² and
    variance σ² β_s² / β_t² (fixed_small: DDIM at eta = 1, the same numbers) or σ² (fixed_large, the DDPM paper's
    β_t). On a VP path these are diffusers' DDPMScheduler coefficients; as there, the last step adds no noise."""
    if variance_type not in DDPM_VARIANCES:
        raise ValueError(f"variance_type must be one of {', '.join(map(repr, DDPM_VARIANCES))} for method='ddpm' "
                         f"(a learned variance needs the model's variance output), got {variance_type!r}")
    stages = []
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        al, be = path.coefficients(t)[:2]
        al1, be1 = path.coefficients(t1)[:2]
        if al1 == 0.0 or be == 0.0:
            raise ValueError(f"method='ddpm' steps from a noisy time to a less noisy one; got t={t:g} -> {t1:g}")
        a_z, b_z = _conv(path, t, prediction, "x0")
        r = al / al1
        transition = max(0.0, be * be - r * r * be1 * be1)
        c_x0, c_x = al1 * transition / (be * be), r * be1 * be1 / (be * be)
        last = i == len(grid) - 2
        variance = transition * be1 * be1 / (be * be) if variance_type == "fixed_small" else transition
        std = 0.0 if last else math.sqrt(variance)
        stages.append(Stage(i, t, "x", "x", c_x + c_x0 * a_z, c_x0 * b_z, c_noise=std, stream=draw_stream(i),
                            x0=(a_z, b_z), final=True))
    return stages


def _lambda(al: float, be: float) -> float:
    if al == 0.0:
        return -math.inf
    if be == 0.0:
        return math.inf
    return math.log(al / be)


@register_method("dpmpp_2m", evals_per_step=1, conversions=("x0",),
                 inverts=True, cfg_pp=True,
                 description="DPM-Solver++(2M), a second-order multistep ODE solver on x0 predictions")
def _dpmpp_2m(path, grid, prediction) -> list[Stage]:
    stages = []
    h_prev = None
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        al, be = path.coefficients(t)[:2]
        al1, be1 = path.coefficients(t1)[:2]
        h = _lambda(al1, be1) - _lambda(al, be)
        a0, b0 = _conv(path, t, prediction, "x0")
        if be == 0.0:  # a step from the data (inversion to t = 1): no noise level to step in
            raise ValueError(f"method='dpmpp_2m' steps in the noise level sigma = beta / alpha, which is 0 at t={t:g}")
        A = be1 / be  # beta' / beta (0 at the last step to beta' = 0)
        Bc = al1 * -math.expm1(-h) if math.isfinite(h) else al1  # alpha' (1 - e^-h)
        # second-order weight 1 / (2r), r = h_prev / h; first order without a usable previous step
        w = 0.0
        if h_prev is not None and math.isfinite(h_prev) and math.isfinite(h) and be1 > 0 and h_prev > 0:
            w = 0.5 * h / h_prev
        side, prev = f"side{i % 2}", f"side{(i - 1) % 2}"
        # CFG++ (ComfyUI's sample_dpmpp_2m_cfg_pp): x' = D_g + e^-h (x - D_u) (scaled) + (1 - e^-h) w (D_g - D_u,prev),
        # the history the unconditional D_u (side_blend (1, 0)): D_g's share alpha' (1 + (1 - e^-h) w) of Bc (1 + w)
        total = Bc * (1 + w)
        share = (al1 + Bc * w) / total if total != 0.0 else 1.0
        stages.append(Stage(i, t, "x", "x", A + Bc * (1 + w) * a0, Bc * (1 + w) * b0,
                            c_extra=-Bc * w, extra=prev if w != 0.0 else None,
                            side=side, s_x=a0, s_pred=b0, x0=(a0, b0), final=True, cfg_pp=share,
                            side_blend=(1.0, 0.0)))
        h_prev = h
    return stages


def build_stages(method: str, path: GaussianPath, grid: list[float], prediction: str, *, sigma=None,
                 eta: float = 0.0) -> list[Stage]:
    """The kernel calls of ``method`` over ``grid`` (increasing flow times, len = steps + 1); the options
    the method does not take are ignored (see fastdiff.sampling.methods for the registry)."""
    m = get_method(method)
    options = {k: v for k, v in (("sigma", sigma), ("eta", eta)) if k in m.options}
    return m.build(path, grid, prediction, **options)


def needed_conversions(method: str, stochastic: bool) -> tuple[str, ...]:
    """Prediction types a method converts to at the grid's first point (stochastic: sigma > 0)."""
    return get_method(method).needed_conversions(sigma=(lambda t: 1.0) if stochastic else None)


@register_method("euler_ancestral", options={"eta": 1.0, "s_noise": 1.0}, evals_per_step=1, conversions=("x0", "eps"),
                 cfg_pp=True,
                 description="k-diffusion's Euler ancestral: a step to sigma_down plus s_noise x sigma_up fresh noise")
def _euler_ancestral(path, grid, prediction, eta=1.0, s_noise=1.0) -> list[Stage]:
    # In k-diffusion's sigma = beta / alpha, the step to sigma_down = sqrt(sigma'^2 - sigma_up^2) is DDIM's
    # deterministic part and sigma_up = eta sigma' sqrt(1 - sigma'^2 / sigma^2) its noise scale: DDIM(eta)
    # with the noise scaled by s_noise.
    s_noise = check_s_noise(s_noise)
    return [replace(st, c_noise=st.c_noise * s_noise) for st in _ddim(path, grid, prediction, eta)]


def check_s_noise(s_noise) -> float:
    """The noise scale of the methods that take s_noise (k-diffusion's name): a finite number >= 0."""
    if not isinstance(s_noise, (int, float)) or isinstance(s_noise, bool) or not 0.0 <= s_noise < math.inf:
        raise ValueError(f"s_noise must be a finite number >= 0, got {s_noise!r}")
    return float(s_noise)
