"""method="er_sde" (fastdiff/sampling/methods/er_sde.py): ComfyUI's sample_er_sde with the SamplerER_SDE node's noise
scalers, against a float64 torch loop of ComfyUI's formulas written here (ComfyUI does not install) on the same
mixture model, grid (VE Karras levels; a CondOT grid, ComfyUI's CONST sigma = 1 - t) and noise; the ODE mode's
convergence order; mixture samples; backends; option errors. The helpers are shared by the tests of issue 33's other
ComfyUI methods (test_rf_ancestral.py, test_heunpp2_gradient_estimation.py)."""

import math

import pytest
import torch

import fastdiff
from fastdiff import schedules
from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
from fastdiff.paths import VE, get_path
from fastdiff.sampling.methods import get_method
from conftest import BACKENDS

B = 6  # samples of the peer comparisons


def ve_case(steps=12):
    """(path, grid, ComfyUI's sigmas) of a VE path on Karras levels (EPS-model sigma = beta / alpha)."""
    sigmas = schedules.karras_sigmas(steps, 0.02, 40.0)
    path, grid = schedules.ve_grid(sigmas)
    return path, grid, sigmas


def condot_case(steps=12, t0=0.02):
    """(path, grid, ComfyUI's CONST sigmas = 1 - t) of a uniform CondOT grid from t0."""
    grid = [t0 + (1.0 - t0) * i / steps for i in range(steps + 1)]
    grid[-1] = 1.0
    return get_path("condot"), grid, [1.0 - t for t in grid]


def denoiser(path):
    """ComfyUI's model(x, sigma): the mixture's exact x0 prediction in float64 at the time of ComfyUI's sigma."""
    model = MixtureModel(ring_mixture(heterogeneous=True), path, "x0")
    to_t = path.time if isinstance(path, VE) else (lambda s: 1.0 - s)
    return lambda x, sigma: model(x.double(), to_t(float(sigma)))


def draws(steps, seed=0):
    """Pre-drawn standard normals per step (fastdiff's step_noise and the references' noise_sampler)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 2, generator=g) for _ in range(steps)]


def start(path, grid, seed=1):
    al, be = path.coefficients(grid[0])[:2]
    g = torch.Generator().manual_seed(seed)
    return (be * torch.randn(B, 2, generator=g) + al * torch.tensor([3.0, -1.0])).float()


def ours(method, path, grid, prediction, x, noises, **options):
    model = MixtureModel(ring_mixture(heterogeneous=True), path, prediction)
    return fastdiff.sample(model, None, noise=x, path=path, prediction=prediction, method=method, timesteps=grid,
                           step_noise=lambda i, j: noises[i], **options).double()


def assert_close(a, b):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * scale, (err, scale)
    return err / scale


# ---- ComfyUI's sample_er_sde, float64 -------------------------------------------------------------------------

def comfy_er_sde(den, x, sigmas, const, noises, s_noise=1.0, noise_scaler=None, max_stage=3):
    sigmas = torch.tensor(sigmas, dtype=torch.float64)
    x = x.double()
    phi = noise_scaler or (lambda v: v * ((v ** 0.3).exp() + 10.0))
    points = torch.arange(0, 200.0, dtype=torch.float64)
    half_log_snrs = -torch.logit(sigmas) if const else -sigmas.log()
    lams = half_log_snrs.neg().exp()
    old, old_d = None, None
    for i in range(len(sigmas) - 1):
        denoised = den(x, sigmas[i])
        used = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            ls, lt = lams[i], lams[i + 1]
            alpha_s, alpha_t = sigmas[i] / ls, sigmas[i + 1] / lt
            r = phi(lt) / phi(ls)
            x = alpha_t / alpha_s * r * x + alpha_t * (1 - r) * denoised
            if used >= 2:
                dt = lt - ls
                step = -dt / 200.0
                pos = lt + points * step
                s = torch.sum(1 / phi(pos)) * step
                dd = (denoised - old) / (ls - lams[i - 1])
                x = x + alpha_t * (dt + s * phi(lt)) * dd
                if used >= 3:
                    s_u = torch.sum((pos - ls) / phi(pos)) * step
                    du = (dd - old_d) / ((ls - lams[i - 2]) / 2)
                    x = x + alpha_t * (dt ** 2 / 2 + s_u * phi(lt)) * du
                old_d = dd
            if s_noise > 0:
                x = x + alpha_t * noises[i].double() * s_noise * (lt ** 2 - ls ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
        old = denoised
    return x


def node_scaler(solver_type, eta):
    """The SamplerER_SDE node (ComfyUI@36c0b0a): (noise_scaler, s_noise factor) of a solver type; None is
    sample_er_sde's default scaler (the node's ER-SDE one at eta = 1)."""
    if solver_type == "ODE" or eta == 0:
        return (lambda v: v), 0.0
    if solver_type == "ER-SDE":
        return (None if eta == 1.0 else (lambda v: v * ((v ** 0.3).exp() + 10.0) ** eta)), 1.0
    return (lambda v: v ** (eta + 1)), 1.0


@pytest.mark.parametrize("case", ["ve", "condot"])
@pytest.mark.parametrize("prediction", ["x0", "eps"])
@pytest.mark.parametrize("options", [{}, dict(solver_type="Reverse-time SDE", eta=0.5, s_noise=0.8), dict(eta=0.3),
                                     dict(solver_type="ODE"), dict(eta=0.0), dict(max_stage=2),
                                     dict(max_stage=1, s_noise=1.3)])
def test_matches_comfyui_on_the_same_noise(case, prediction, options):
    path, grid, sigmas = ve_case() if case == "ve" else condot_case()
    x, noises = start(path, grid), draws(len(grid) - 1)
    got = ours("er_sde", path, grid, prediction, x, noises, **options)
    scaler, factor = node_scaler(options.get("solver_type", "ER-SDE"), options.get("eta", 1.0))
    want = comfy_er_sde(denoiser(path), x, sigmas, case == "condot", noises, options.get("s_noise", 1.0) * factor,
                        scaler, options.get("max_stage", 3))
    assert_close(got, want)  # measured: at most 3.8e-7 of max |x| over these cases (float32 state)


def test_ode_mode_convergence_order():
    """ODE mode against the exact flow map of a Gaussian on CondOT [0.05, 0.95], 8 -> 16 -> 32 -> 64 steps. Measured
    slopes of log error: max_stage=3 2.31, 1.90, 1.78; max_stage=2 2.44, 1.96, 1.78; max_stage=1 (DDIM) 0.95, 0.98,
    0.99. Stages 2 and 3 make it second order, not third: D_d = (D - D_1) / (lambda - lambda_1) is a first-order
    estimate of dD/dlambda at lambda, and its O(h) error meets an O(h^2) weight (with exact integrals: 2.0 for both,
    8 -> 256 steps). ComfyUI's 200-point left Riemann sums put a fixed ~1/200 relative error on the stage-2 weight,
    which makes the method first order in the limit (slopes 1.6, 1.4 at 64 -> 128 -> 256 steps)."""
    from test_sample import _single_gaussian

    g = _single_gaussian()
    model = MixtureModel(g, "condot", "velocity")
    t0, t1 = 0.05, 0.95
    x0 = (0.95 * torch.randn(256, 2, generator=torch.Generator().manual_seed(0)).double()
          + 0.05 * torch.tensor([1.0, -2.0], dtype=torch.float64))
    exact = g.flow_map(x0, t0, t1, "condot")
    for max_stage, order in ((3, 2.0), (2, 2.0), (1, 1.0)):
        errors = []
        for n in (8, 16, 32, 64):
            grid = [t0 + (t1 - t0) * i / n for i in range(n + 1)]
            x = fastdiff.sample(model, None, noise=x0.float(), method="er_sde", timesteps=grid, solver_type="ODE",
                                max_stage=max_stage)
            errors.append(float((x.double() - exact).norm(dim=1).mean()))
        slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(3)]
        assert all(order - 0.3 < s < order + 0.5 for s in slopes), (max_stage, errors, slopes)


@pytest.mark.parametrize("options,path,prediction,grid", [
    ({}, "condot", "velocity", "quadratic"), ({}, "vp", "eps", "quadratic"),
    (dict(solver_type="Reverse-time SDE", eta=1.0), "condot", "x0", "quadratic"), ({}, "ve", "x0", "karras")])
def test_samples_the_mixture(options, path, prediction, grid):
    """The SDE modes on an analytic mixture (exact predictions), 40 steps: mode weights, means and covariances
    within statistical error; CondOT from t = 0 takes the step's limit from lambda = inf."""
    from test_sample import N, _quadratic_grid, _zmax

    mixture = ring_mixture(heterogeneous=True)
    if grid == "karras":
        path, timesteps = schedules.ve_grid(schedules.karras_sigmas(40, 0.002, 400.0))
    else:
        timesteps = _quadratic_grid(40)
        if path == "vp":
            timesteps[0] = 1e-3
    model = MixtureModel(mixture, path, prediction)
    x = fastdiff.sample(model, None, method="er_sde", shape=(2,), seed=3, path=path, prediction=prediction,
                        batch_size=N, timesteps=timesteps, **options)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


@pytest.mark.parametrize("solver_type,eta", [("ER-SDE", 1.0), ("ER-SDE", 0.5), ("Reverse-time SDE", 0.5), ("ODE", 1.0)])
def test_the_step_from_pure_noise_is_the_limit(solver_type, eta):
    """From CondOT's t = 0 (lambda = inf): alpha' D + beta' xi for the SDE scalers, alpha' D + (beta' / beta) x for ODE,
    the limit of the steps from t -> 0 (within 1e-3 at t = 1e-9, where the ER-SDE scaler's ratio is ~e^-500)."""
    path = get_path("condot")
    m = get_method("er_sde")
    first = m.stages(path, [0.0, 0.3, 0.6, 0.8, 1.0], "velocity", solver_type=solver_type, eta=eta)
    near = m.stages(path, [1e-9, 0.3, 0.6, 0.8, 1.0], "velocity", solver_type=solver_type, eta=eta)
    sde = solver_type != "ODE"
    assert first[0].c_x == pytest.approx(0.3 * 1.0 + (0.0 if sde else 0.7), abs=1e-12)  # x0 = x + v at t = 0
    assert first[0].c_noise == pytest.approx(0.7 if sde else 0.0)
    for a, b in zip(first, near):
        tol = 2e-3 if eta < 1 else 1e-6
        assert (a.c_x, a.c_pred, a.c_noise) == pytest.approx((b.c_x, b.c_pred, b.c_noise), abs=tol)
    # the history restarts after it: step 1 is stage 1 only (no history), step 2 reads step 1's D
    assert first[1].history_buffers() == () and first[2].history_buffers() == ("side1",)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree(backend):
    name, device = backend
    model = MixtureModel(ring_mixture(), "condot", "velocity")
    kw = dict(shape=(2,), batch_size=32, seed=9, method="er_sde", timesteps=condot_case(10)[1])
    ref = fastdiff.sample(model, None, backend="reference", **kw)
    got = fastdiff.sample(model, None, backend=name, device=device, **kw).cpu()
    torch.testing.assert_close(got, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


def test_options_are_checked():
    model = MixtureModel(ring_mixture(), "condot", "velocity")
    kw = dict(shape=(2,), batch_size=2, method="er_sde", timesteps=[0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"solver_type must be one of 'ER-SDE', .* for method='er_sde', got 'SDE'"):
        fastdiff.sample(model, None, solver_type="SDE", **kw)
    with pytest.raises(ValueError, match="max_stage must be 1, 2 or 3 for method='er_sde', got 4"):
        fastdiff.sample(model, None, max_stage=4, **kw)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):  # sample()'s own check of eta
        fastdiff.sample(model, None, eta=-1.0, solver_type="Reverse-time SDE", **kw)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0 for method='er_sde'"):
        get_method("er_sde").stages(get_path("condot"), [0.1, 0.5, 1.0], "x0", eta=-1.0)
    with pytest.raises(ValueError, match="s_noise must be a finite number"):
        fastdiff.sample(model, None, s_noise=-1.0, **kw)
    with pytest.raises(ValueError, match=r"max_stage applies to method=.*'er_sde'.*; method='euler' does not take it"):
        fastdiff.sample(model, None, method="euler", max_stage=2, **{k: v for k, v in kw.items() if k != "method"})
