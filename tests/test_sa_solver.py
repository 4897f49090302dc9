"""methods "sa_solver" and "sa_solver_pece" (fastdiff/sampling/methods/sa_solver.py): against diffusers'
SASolverScheduler and against a float64 reference loop of ComfyUI's sample_sa_solver written here (ComfyUI does not
install), on the same denoiser, sigma grid, initial state and noise; the measured convergence order at tau = 0; the
samples of a mixture at tau > 0; the backends; option errors. (The drop-in FastDiffScheduler.from_config of
SASolverScheduler on a UNet pipeline loop: tests/test_adapter_diffusers_sa_solver.py.)"""

import math

import pytest
import torch

import fastdiff
from fastdiff.adapters.k_diffusion import DenoiserModel
from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
from fastdiff.paths import get_path
from fastdiff.sampling.core.stage import draw_stream
from fastdiff.sampling.methods import get_method
from fastdiff.sampling.methods.sa_solver import adams_weights
from fastdiff.schedules import karras_sigmas, ve_grid
from conftest import BACKENDS
from test_adapter_k_diffusion import Denoiser
from convergence import flow_map_errors, slopes
from test_sample import N, _quadratic_grid, _zmax

SEEDS = [5, 6, 7]


def _fastdiff(den, x, sigmas, method="sa_solver", **options):
    model = DenoiserModel(den, sigmas)
    return fastdiff.sample(model, None, noise=x, path=model.path, prediction="x0", method=method,
                           timesteps=model.timesteps, seed=SEEDS, **options)


def _noise(i, shape):
    return fastdiff.ops.randn(SEEDS, draw_stream(i), shape[1:]).double()


# ---- (b) ComfyUI's sample_sa_solver, float64, written from its formulas (comfy/k_diffusion/sampling.py, sa_solver.py)
def _comfy_b(sigma_next, lambdas, lam_s, lam_t, tau, simple, corrector):
    """compute_stochastic_adams_b_coeffs: alpha_t (1 + tau^2) ∫ e^{(1+tau^2)(x - lam_t)} L_j(x) dx by its own route
    (moments of x^p in raw lambda by the integration-by-parts recursion, then a Vandermonde solve)."""
    c, h = 1 + tau ** 2, lam_t - lam_s
    alpha_t = sigma_next * math.exp(lam_t)
    n = len(lambdas)
    if simple and n == 2:
        if corrector:
            b1 = alpha_t * 0.5 * c * h
            return [alpha_t * -math.expm1(-c * h) - b1, b1]
        b2 = alpha_t * 0.5 * c * h * h / (lambdas[0] - lam_s)
        return [b2, alpha_t * -math.expm1(-c * h) - b2]
    m = []  # c ∫_s^t e^{c (x - t)} x^p dx
    for p in range(n):
        v = lam_t ** p - lam_s ** p * math.exp(-c * h)
        if p:
            v -= p / c * m[p - 1]
        m.append(v)
    vander = torch.tensor([[lam ** p for lam in lambdas] for p in range(n)], dtype=torch.float64)
    return (alpha_t * torch.linalg.solve(vander, torch.tensor(m, dtype=torch.float64))).tolist()


def _comfy_sa_solver(den, x, sigmas, tau_func, s_noise=1.0, predictor_order=3, corrector_order=4, use_pece=False,
                     simple_order_2=False):
    sigmas = sigmas.double()
    lambdas = [-math.log(s) if s > 0 else math.inf for s in sigmas.tolist()]
    D = lambda y, s: den(y.float(), s.float().expand(y.shape[0])).double()  # noqa: E731
    n, x_pred, x, h, tau, noise, preds = len(sigmas) - 1, x.double(), None, 0.0, 0.0, 0.0, []
    lower = sigmas[-1] == 0
    for i in range(n):
        d = D(x_pred, sigmas[i])
        preds = (preds + [d])[-max(predictor_order, corrector_order):]
        p_used = min(predictor_order, len(preds))
        c_used = 0 if i == 0 or (sigmas[i + 1] == 0 and not use_pece) else min(corrector_order, len(preds))
        if lower:
            p_used, c_used = min(p_used, n - 1 - i), min(c_used, n - i)
        if c_used == 0:
            x = x_pred
        else:
            b = _comfy_b(float(sigmas[i]), lambdas[i - c_used + 1:i + 1], lambdas[i - 1], lambdas[i], tau,
                         simple_order_2, True)
            x = float(sigmas[i] / sigmas[i - 1]) * math.exp(-tau ** 2 * h) * x + sum(
                bj * dj for bj, dj in zip(b, preds[-c_used:]))
            if tau > 0 and s_noise > 0:
                x = x + noise
            if use_pece:
                preds[-1] = d = D(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x_pred = d
        else:
            tau = tau_func(float(sigmas[i + 1]))
            b = _comfy_b(float(sigmas[i + 1]), lambdas[i - p_used + 1:i + 1], lambdas[i], lambdas[i + 1], tau,
                         simple_order_2, False)
            h = lambdas[i + 1] - lambdas[i]
            x_pred = float(sigmas[i + 1] / sigmas[i]) * math.exp(-tau ** 2 * h) * x + sum(
                bj * dj for bj, dj in zip(b, preds[-p_used:]))
            if tau > 0 and s_noise > 0:
                noise = _noise(i, x.shape) * float(sigmas[i + 1]) * math.sqrt(-math.expm1(-2 * tau ** 2 * h)) * s_noise
                x_pred = x_pred + noise
    return x_pred


@pytest.mark.parametrize("method,options", [
    ("sa_solver", {}),  # ComfyUI's defaults: predictor 3, corrector 4, eta 1 on t in [0.2, 0.8]
    ("sa_solver", dict(eta=0.0)),
    ("sa_solver", dict(predictor_order=2, corrector_order=2, simple_order_2=True, eta=0.7, s_noise=1.3)),
    ("sa_solver", dict(predictor_order=4, corrector_order=1, sde_start_percent=0.0, sde_end_percent=1.0)),
    ("sa_solver", dict(predictor_order=1, corrector_order=0, sde_start_percent=0.5)),
    ("sa_solver_pece", {}),
    ("sa_solver_pece", dict(predictor_order=2, corrector_order=3, simple_order_2=True, sde_end_percent=0.95)),
])
def test_matches_comfyui_reference_loop(method, options):
    """VE path, Karras sigmas to 0 (fastdiff.schedules.karras_sigmas + ve_grid); ComfyUI's tau interval
    [end_sigma, start_sigma] = the noise levels of t = sde_end_percent, sde_start_percent on that path."""
    den = Denoiser()
    sigmas = torch.tensor(karras_sigmas(12, 0.02, 30.0), dtype=torch.float64)
    path, grid = ve_grid(sigmas.tolist())
    assert grid == pytest.approx(list(DenoiserModel(den, sigmas.float()).timesteps), abs=1e-6)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * sigmas[0].float()
    ours = _fastdiff(den, x, sigmas.float(), method, **options)
    opts = {"eta": 1.0, "sde_start_percent": 0.2, "sde_end_percent": 0.8, **options}
    hi, lo = path.sigma(opts["sde_start_percent"]), path.sigma(opts["sde_end_percent"])
    eta = opts["eta"]
    theirs = _comfy_sa_solver(den, x, sigmas, lambda s: eta if hi >= s >= lo else 0.0, opts.get("s_noise", 1.0),
                              opts.get("predictor_order", 3), opts.get("corrector_order", 4),
                              method == "sa_solver_pece", opts.get("simple_order_2", False))
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())


# ---- (a) diffusers' SASolverScheduler on the same denoiser ("sample" prediction: its x0 is the denoiser's) ----------
def _diffusers_loop(den, sched, steps, x_ve, monkeypatch):
    from diffusers.schedulers import scheduling_sasolver

    state = {}
    monkeypatch.setattr(scheduling_sasolver, "randn_tensor",
                        lambda shape, **kw: fastdiff.ops.randn(SEEDS, draw_stream(state["k"]), shape[1:]))
    sched.set_timesteps(steps)
    sig = sched.sigmas.double()
    sample = x_ve.double() / (sig[0] ** 2 + 1).sqrt()
    for k, t in enumerate(sched.timesteps):
        state["k"] = k
        x = (sample * (sig[k] ** 2 + 1).sqrt()).float()
        out = den(x, sig[k].float().expand(x.shape[0]))
        sample = sched.step(out.double(), t, sample).prev_sample
    return sample * (sig[-1] ** 2 + 1).sqrt()


@pytest.mark.parametrize("config", [
    {},  # predictor 2, corrector 2, tau = 1 on timesteps [200, 800]
    dict(predictor_order=3, corrector_order=4),
    dict(predictor_order=1, corrector_order=3, lower_order_final=False),
    dict(predictor_order=4, corrector_order=1, tau_func=lambda t: 0),
])
def test_matches_diffusers_sasolver(config, monkeypatch):
    """diffusers steps from each training timestep's sigma to the next and ends at the sigma of timestep 0 (not 0);
    its tau is tau_func(the step's start timestep); its order-2 weights are simple_order_2's; its lower_order_final
    is option lower_order_final="diffusers". The fastdiff options: eta on the grid times ending those steps."""
    diffusers = pytest.importorskip("diffusers")
    den, steps = Denoiser(), 9
    sched = diffusers.SASolverScheduler(prediction_type="sample", **config)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.double()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * sigmas[0].float()
    tau = [float(sched.tau_func(int(t))) for t in sched.timesteps]
    model = DenoiserModel(den, sigmas.float())
    grid = list(model.timesteps)
    noisy = [i for i, v in enumerate(tau) if v > 0]
    assert all(v in (0.0, 1.0) for v in tau)
    lower = "diffusers" if config.get("lower_order_final", True) else False
    options = dict(predictor_order=config.get("predictor_order", 2), corrector_order=config.get("corrector_order", 2),
                   simple_order_2=True, lower_order_final=lower, eta=1.0 if noisy else 0.0)
    if noisy:
        options.update(sde_start_percent=grid[noisy[0] + 1], sde_end_percent=grid[noisy[-1] + 1])
    ours = fastdiff.sample(model, None, noise=x, path=model.path, prediction="x0", method="sa_solver",
                           timesteps=model.timesteps, seed=SEEDS, **options)
    theirs = _diffusers_loop(den, sched, steps, x, monkeypatch)
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())


# ---- (c) convergence order at tau = 0 -------------------------------------------------------------------------------
# (options, path, prediction, order, measured slopes over 24 -> 48 -> 96 steps, float32 sampling, one x86 CPU).
# PEC's order is min(corrector_order, predictor_order + 1); the warm-up's first predictor step (order 1) and its
# order-2 correction cap it at 3. Predictor-corrector pairs measure above that on this Gaussian.
CONVERGENCE = [
    (dict(predictor_order=1, corrector_order=0), "vp", "eps", 1.0),  # 0.98, 0.99
    (dict(predictor_order=2, corrector_order=0), "condot", "velocity", 2.0),  # 2.13, 2.09
    (dict(predictor_order=2, corrector_order=2), "vp", "eps", 2.0),  # 2.63, 3.24
    (dict(predictor_order=3, corrector_order=3), "condot", "velocity", 3.0),  # 3.62, 4.01
    (dict(predictor_order=3, corrector_order=4), "vp", "eps", 3.0),  # 3.19, 3.32
]


@pytest.mark.parametrize("options,path,prediction,order", CONVERGENCE)
def test_convergence_order(options, path, prediction, order):
    """eta = 0: a deterministic multistep ODE solver; its error against the exact flow map of a Gaussian on
    [0.05, 0.95] falls as the predictor's order (the PEC corrector of order p + 1 keeps it; lower_order_final off)."""
    errors = flow_map_errors("sa_solver", path, prediction, (24, 48, 96), eta=0.0, lower_order_final=False, **options)
    assert all(order - 0.35 < s < order + 1.3 for s in slopes(errors)), (errors, slopes(errors))


# ---- (d) the samples of a mixture with tau > 0 ----------------------------------------------------------------------
@pytest.mark.parametrize("method,path,prediction,options", [
    ("sa_solver", "vp", "eps", {}), ("sa_solver", "condot", "velocity", dict(sde_start_percent=0.0)),
    ("sa_solver_pece", "vp", "x0", dict(predictor_order=2, corrector_order=2, eta=0.8)),
])
def test_samples_the_mixture(method, path, prediction, options):
    """On an analytic mixture (exact predictions), eta > 0 on the interval: the samples have the mixture's mode
    weights, means and covariances (z-scores within statistical error). CondOT starts at t = 0 (alpha = 0: the
    first step's limit)."""
    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, prediction)
    grid = _quadratic_grid(30)
    if path == "vp":
        grid[0] = 1e-3
    x = fastdiff.sample(model, None, method=method, shape=(2,), seed=3, path=path, prediction=prediction,
                        batch_size=N, timesteps=grid, **options)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


# ---- (e) backends ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["sa_solver", "sa_solver_pece"])
def test_backends_agree(backend, method):
    """Orders 4 (four history terms, one of them the buffer the stage writes) and noise on every step. (From
    t = 1e-3 on VP an eps model's x0 is 151 x - 151 eps: float32 rounding then differs by ~1e-4 between backends, for
    dpmpp_3m_sde too; t = 0.05 is well conditioned.)"""
    name, device = backend
    model = MixtureModel(ring_mixture(), "vp", "eps")
    grid = _quadratic_grid(10)
    grid[0] = 0.05
    kw = dict(shape=(2,), seed=9, path="vp", prediction="eps", batch_size=32, timesteps=grid, method=method,
              sde_start_percent=0.0, sde_end_percent=1.0, predictor_order=4, corrector_order=4)
    ref = fastdiff.sample(model, None, backend="reference", **kw)
    got = fastdiff.sample(model, None, backend=name, device=device, **kw).cpu()
    torch.testing.assert_close(got, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


# ---- (f) the stage table and option errors --------------------------------------------------------------------------
def test_stage_layout_and_weights():
    """One stage per step (PECE: two after the first); orders 4 read four earlier x0 (one from the side buffer the
    stage writes); the closed-form weights integrate polynomials of degree < n exactly; the step to beta = 0 is
    alpha' D."""
    path, grid = get_path("vp"), _quadratic_grid(12)
    grid[0] = 1e-3
    st = get_method("sa_solver").stages(path, grid, "eps", predictor_order=4, corrector_order=4,
                                        lower_order_final=False)
    assert len(st) == 12 and all(s.final for s in st)
    assert len(st[6].history_buffers()) == 4 and st[6].side in st[6].history_buffers()
    assert st[-1].c_noise == 0.0 and not st[-1].history_buffers() and st[-1].side is None
    pece = get_method("sa_solver_pece").stages(path, grid, "eps")
    assert len(pece) == 23 and [s.out for s in pece[1:3]] == ["stage", "x"]
    nodes, lam_s, lam_t, tau = [0.3, 0.1, -0.2, -0.6], 0.3, 0.7, 0.8
    w = adams_weights(nodes, lam_s, lam_t, tau)
    c = 1 + tau * tau
    for p in range(4):  # c ∫ e^{c (l - lam_t)} l^p dl by a fine midpoint rule
        m = 20000
        ls = [lam_s + (k + 0.5) * (lam_t - lam_s) / m for k in range(m)]
        exact = c * sum(math.exp(c * (lv - lam_t)) * lv ** p for lv in ls) * (lam_t - lam_s) / m
        assert sum(wj * nj ** p for wj, nj in zip(w, nodes)) == pytest.approx(exact, rel=1e-7)
    # CondOT from t = 0: the first step's limit, alpha' D + beta' xi (tau > 0), no history before it
    st = get_method("sa_solver").stages(get_path("condot"), [0.0, 0.1, 0.3, 0.6, 1.0], "velocity",
                                        sde_start_percent=0.0)
    assert st[0].c_noise == pytest.approx(0.9) and not st[0].history_buffers()
    assert all(math.isfinite(v) for s in st for v in s.kernel_rows())


@pytest.mark.parametrize("options,match", [
    (dict(predictor_order=5), r"predictor_order must be an int in \[1, 4\] for method='sa_solver' \(the fused kernel"),
    (dict(predictor_order=0), r"predictor_order must be an int in \[1, 4\] for method='sa_solver'"),
    (dict(corrector_order=6), r"corrector_order must be an int in \[0, 4\] for method='sa_solver'"),
    (dict(corrector_order=2.0), r"corrector_order .* got 2.0"),
    (dict(eta=-1.0), r"eta must be a finite number >= 0 for method='sa_solver'"),
    (dict(sde_start_percent=1.5), r"sde_start_percent must be a number in \[0.0, 1.0\] for method='sa_solver'"),
    (dict(sde_end_percent="x"), r"sde_end_percent must be a number"),
    (dict(s_noise=-1.0), r"s_noise must be a finite number >= 0.*method='sa_solver'"),
    (dict(simple_order_2=1), r"simple_order_2 must be True or False for method='sa_solver'"),
    (dict(lower_order_final="comfy"), r"lower_order_final must be True .*'diffusers' or False for method='sa_solver'"),
])
def test_option_errors_name_option_and_method(options, match):
    with pytest.raises(ValueError, match=match):
        get_method("sa_solver").stages(get_path("vp"), _quadratic_grid(5), "eps", **options)
    with pytest.raises(ValueError, match=match.replace("'sa_solver'", "'sa_solver_pece'")):
        get_method("sa_solver_pece").stages(get_path("vp"), _quadratic_grid(5), "eps", **options)
