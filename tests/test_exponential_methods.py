"""methods "res_multistep", "res_multistep_ancestral", "exp_heun_2_x0", "exp_heun_2_x0_sde", "seeds_2", "seeds_3"
(fastdiff/sampling/methods/exponential.py). ComfyUI does not install here: each is checked against a short float64
torch loop of ComfyUI's formulas (comfy/k_diffusion/sampling.py res_multistep, sample_seeds_2, sample_seeds_3, the
exp_heun_2_x0 forms) written below, on the same exact mixture model, grid (a VE path from Karras sigmas: ComfyUI's EPS
form; CondOT: its CONST form in half-log-SNR) and noise (fastdiff's streams, a caller's step_noise, or the Brownian
path's increments as ComfyUI's noise_sampler); the convergence order of the deterministic ones against a Gaussian's
exact flow map; the mixture's samples; the backends; the option errors."""

import math

import pytest
import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
from fastdiff.paths import get_path
from fastdiff.sampling.core.stage import draw_stream
from fastdiff.sampling.methods import get_method
from fastdiff.sampling.features.brownian import brownian_increment
from fastdiff.schedules import karras_sigmas, ve_grid
from conftest import BACKENDS
import convergence
from convergence import flow_map_errors
from test_sample import N, _quadratic_grid, _zmax

SEEDS = {"seeds_2": dict(r=0.5, solver_type="phi_1"),
         "exp_heun_2_x0": dict(eta=0.0, s_noise=0.0, r=1.0, solver_type="phi_2"),
         "exp_heun_2_x0_sde": dict(r=1.0, solver_type="phi_2"), "seeds_3": dict(r_1=1 / 3, r_2=2 / 3)}


# ---- ComfyUI's formulas, float64 -------------------------------------------------------------------------------

class _Comfy:
    """ComfyUI's view of a fastdiff path: "eps" on the VE path (sigma = beta, alpha = 1, lambda = -log sigma) or
    "const" on CondOT (sigma = beta = 1 - t, lambda = log((1 - sigma) / sigma))."""

    def __init__(self, path, prediction, model):
        self.path, self.prediction, self.model = path, prediction, model
        self.const = path.name == "condot"

    def time(self, sigma):
        return 1.0 - sigma if self.const else self.path.time(sigma)

    def lam(self, sigma):
        return math.log((1 - sigma) / sigma) if self.const else -math.log(sigma)

    def sigma(self, lam):
        return 1 / (1 + math.exp(lam)) if self.const else math.exp(-lam)

    def alpha(self, sigma):
        return sigma * math.exp(self.lam(sigma))

    def x0(self, x, t):
        """The model's x0 prediction at state x (ComfyUI's state: the path's), float64."""
        out = self.model(x, t, None)
        al, be = self.path.coefficients(t)[:2]
        return out if self.prediction == "x0" else (x - be * out) / al


def _ancestral(s, s1, eta):
    if not eta:
        return s1, 0.0
    up = min(s1, eta * (s1 ** 2 * (s ** 2 - s1 ** 2) / s ** 2) ** 0.5)
    return (s1 ** 2 - up ** 2) ** 0.5, up


def _res_multistep(c, x, ts, eta, s_noise, noise):
    """ComfyUI's res_multistep in k-diffusion's sigma = beta / alpha on y = x / alpha (on the VE path: itself)."""
    al = [c.path.coefficients(t)[0] for t in ts]
    sig = [c.path.coefficients(t)[1] / a for a, t in zip(al, ts)]
    y, old_d, old_down = x / al[0], None, None
    for i in range(len(ts) - 1):
        d = c.x0(al[i] * y, ts[i])
        down, up = _ancestral(sig[i], sig[i + 1], eta)
        if down == 0 or old_d is None:
            y = y + (y - d) / sig[i] * (down - sig[i])
        else:
            t, t_old, t_next, t_prev = (-math.log(s) for s in (sig[i], old_down, down, sig[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            y = math.exp(-h) * y + h * ((phi1 - phi2 / c2) * d + phi2 / c2 * old_d)
        if sig[i + 1] > 0:
            y = y + noise(i, 0, ts[i], ts[i + 1]) * s_noise * up
        old_d, old_down = d, down
    return al[-1] * y


def _ei1(h):
    return math.expm1(h)


def _ei2(h):
    return (math.expm1(h) - h) / h


def _seeds(c, x, ts, noise, eta=1.0, s_noise=1.0, r=None, solver_type=None, r_1=None, r_2=None):
    """ComfyUI's sample_seeds_2 (r, solver_type) or sample_seeds_3 (r_1, r_2), in ComfyUI's sigma of the path."""
    sigmas = [c.path.coefficients(t)[1] for t in ts]
    inject = eta > 0 and s_noise > 0
    for i in range(len(ts) - 1):
        s, s1 = sigmas[i], sigmas[i + 1]
        d = c.x0(x, ts[i])
        if s1 == 0:
            x = d
            continue
        lam_s, lam_t = c.lam(s), c.lam(s1)
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        alpha_t = c.alpha(s1)
        ra = r if r_1 is None else r_1
        lam_1 = lam_s + ra * (lam_t - lam_s)
        sig_1 = c.sigma(lam_1)
        x_2 = sig_1 / s * math.exp(-ra * h * eta) * x - sig_1 * math.exp(lam_1) * _ei1(-ra * h_eta) * d
        if inject:
            sde = math.sqrt(-math.expm1(-2 * ra * h * eta)) * noise(i, 0, ts[i], c.time(sig_1))
            x_2 = x_2 + sde * sig_1 * s_noise
        d_2 = c.x0(x_2, c.time(sig_1))
        if r_1 is None:  # SEEDS-2
            if solver_type == "phi_1":
                fac = 1 / (2 * r)
                x = s1 / s * math.exp(-h * eta) * x - alpha_t * _ei1(-h_eta) * ((1 - fac) * d + fac * d_2)
            else:
                b2 = _ei2(-h_eta) / r
                x = s1 / s * math.exp(-h * eta) * x - alpha_t * ((_ei1(-h_eta) - b2) * d + b2 * d_2)
            last, sig_last = r, sig_1
        else:  # SEEDS-3
            lam_2 = lam_s + r_2 * (lam_t - lam_s)
            sig_2 = c.sigma(lam_2)
            a2 = r_2 / r_1 * _ei2(-r_2 * h_eta)
            a1 = _ei1(-r_2 * h_eta) - a2
            x_3 = sig_2 / s * math.exp(-r_2 * h * eta) * x - sig_2 * math.exp(lam_2) * (a1 * d + a2 * d_2)
            if inject:
                f = (r_1 - r_2) * h * eta
                sde = sde * math.exp(f) + math.sqrt(-math.expm1(2 * f)) * noise(i, 1, c.time(sig_1), c.time(sig_2))
                x_3 = x_3 + sde * sig_2 * s_noise
            d_3 = c.x0(x_3, c.time(sig_2))
            b3 = _ei2(-h_eta) / r_2
            x = s1 / s * math.exp(-h * eta) * x - alpha_t * ((_ei1(-h_eta) - b3) * d + b3 * d_3)
            last, sig_last = r_2, sig_2
        if inject:
            f = (last - 1) * h * eta
            sde = sde * math.exp(f)
            if f != 0:  # (r = 1: nothing left of the step; ComfyUI's draw is multiplied by 0)
                sde = sde + math.sqrt(-math.expm1(2 * f)) * noise(i, 2 if r_1 else 1, c.time(sig_last), ts[i + 1])
            x = x + sde * s1 * s_noise
    return x


def _reference(method, c, x, ts, noise, **options):
    if method.startswith("res_multistep"):
        eta = options.get("eta", 1.0) if method.endswith("ancestral") else 0.0
        return _res_multistep(c, x, ts, eta, options.get("s_noise", 1.0), noise)
    return _seeds(c, x, ts, noise, **{**SEEDS[method], **options})


# ---- the same model, grid and noise ----------------------------------------------------------------------------

def _setup(grid, prediction, steps=10):
    if grid == "ve":
        path, ts = ve_grid(karras_sigmas(steps, 0.02, 40.0))
    else:
        path, ts = get_path("condot"), [0.02 + 0.98 * (i / steps) ** 1.3 for i in range(steps + 1)]
    model = MixtureModel(ring_mixture(std=0.8), path, prediction)  # (tighter modes amplify fp32 rounding: ~3e-5)
    al, be = path.coefficients(ts[0])[:2]
    g = torch.Generator().manual_seed(1)
    x = al * 4.0 * torch.randn(64, 2, generator=g, dtype=torch.float64) + be * torch.randn(64, 2, generator=g,
                                                                                            dtype=torch.float64)
    return path, ts, model, x


def _streams(seeds, shape):
    """fastdiff's in-kernel draws: xi_{d + 1} of step i is stream draw_stream(i, d)."""
    return lambda i, d, a, b: fastdiff.ops.randn(seeds, draw_stream(i, d), shape).double()


CASES = [("res_multistep", {}), ("res_multistep_ancestral", {}),
         ("res_multistep_ancestral", dict(eta=0.5, s_noise=0.8)),
         ("exp_heun_2_x0", {}), ("exp_heun_2_x0", dict(solver_type="phi_1")), ("exp_heun_2_x0_sde", {}),
         ("exp_heun_2_x0_sde", dict(eta=0.6, s_noise=1.1, solver_type="phi_1")), ("seeds_2", {}),
         ("seeds_2", dict(eta=0.5, r=0.3, solver_type="phi_2")), ("seeds_2", dict(eta=0.0, r=0.7)), ("seeds_3", {}),
         ("seeds_3", dict(eta=0.4, s_noise=0.9, r_1=0.25, r_2=0.8))]


@pytest.mark.parametrize("grid,prediction", [("ve", "x0"), ("ve", "eps"), ("condot", "x0"), ("condot", "eps")])
@pytest.mark.parametrize("method,options", CASES)
def test_matches_comfyui_on_the_same_noise(grid, prediction, method, options):
    """fastdiff's in-kernel draws fed to ComfyUI's loop (SEEDS' correlated noise within a step included): the same
    samples to fp32 rounding, 1e-5 of max |x| (measured: <= 1e-6 on the reference and cpu backends)."""
    path, ts, model, x = _setup(grid, prediction)
    seeds = list(range(64))
    ours = fastdiff.sample(model, None, noise=x.float(), seed=seeds, path=path, prediction=prediction, method=method,
                           timesteps=ts, **options)
    theirs = _reference(method, _Comfy(path, prediction, model), x, ts, _streams(seeds, (2,)), **options)
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())


def test_a_callers_step_noise_is_comfyuis_noise_sampler():
    """res_multistep_ancestral draws once per step: step_noise(i, 0) is ComfyUI's noise_sampler(sigma_i, sigma_i+1)."""
    path, ts, model, x = _setup("ve", "eps")
    g = torch.Generator().manual_seed(7)
    drawn = [torch.randn(64, 2, generator=g) for _ in ts]
    ours = fastdiff.sample(model, None, noise=x.float(), path=path, prediction="eps", method="res_multistep_ancestral",
                           timesteps=ts, step_noise=lambda i, j: drawn[i], eta=0.8)  # (j = 0 only)
    theirs = _res_multistep(_Comfy(path, "eps", model), x, ts, 0.8, 1.0, lambda i, d, a, b: drawn[i].double())
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("method,options", [("res_multistep_ancestral", {}), ("seeds_2", {}), ("exp_heun_2_x0_sde", {}),
                                            ("seeds_3", dict(r_1=0.25, r_2=0.8))])
@pytest.mark.parametrize("grid", ["ve", "condot"])
def test_brownian_noise_is_comfyuis_brownian_tree(method, options, grid):
    """step_noise="brownian": ComfyUI's loop with noise_sampler(sigma, sigma') = the path's normalized increment between
    their flow times (ComfyUI's BrownianTreeNoiseSampler in flow time) gives the same samples; a sample's noise does not
    depend on its batch."""
    path, ts, model, x = _setup(grid, "x0")
    seeds = list(range(64))
    ours = fastdiff.sample(model, None, noise=x.float(), seed=seeds, path=path, prediction="x0", method=method,
                           timesteps=ts, step_noise="brownian", **options)
    theirs = _reference(method, _Comfy(path, "x0", model), x, ts,
                        lambda i, d, a, b: brownian_increment(seeds, (2,), a, b).double(), **options)
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())
    alone = fastdiff.sample(model, None, noise=x[5:6].float(), seed=[5], path=path, prediction="x0", method=method,
                            timesteps=ts, step_noise="brownian", **options)
    torch.testing.assert_close(alone[0], ours[5], rtol=0, atol=1e-6 * theirs.abs().max().item())


def test_brownian_samples_converge_as_steps_grow():
    """seeds_2 with the Brownian path: a seed's samples approach a finer grid's as steps grow (strong convergence;
    measured mean distances 0.73, 0.38, 0.14 at 4, 16, 64 steps from 256 steps'), while two runs with independent
    draws stay ~3.3 apart. (The Brownian sums cost ~16 host-prepared kernel calls per draw: kept small.)"""
    model = MixtureModel(ring_mixture(), "condot", "velocity")
    kw = dict(shape=(2,), seed=0, batch_size=64, method="seeds_2", path="condot", prediction="velocity")

    def run(n, step_noise):
        return fastdiff.sample(model, None, timesteps=[0.02 + 0.96 * i / n for i in range(n + 1)],
                               step_noise=step_noise, **kw).double()

    fine = run(128, "brownian")
    errors = [(run(n, "brownian") - fine).norm(dim=1).mean().item() for n in (4, 16, 64)]
    independent = (run(64, None) - run(128, None)).norm(dim=1).mean().item()
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.25 * independent, (errors, independent)


# ---- oracles -----------------------------------------------------------------------------------------------------

# (method, options, path, prediction, order, step counts): measured slopes in the comments (errors of 4..128 steps:
# order 2 is reached from ~16 steps, seeds_3's order 3 meets the fp32 floor, ~5e-7, beyond ~32 steps)
CONVERGENCE = [
    ("res_multistep", {}, "vp", "eps", 2.0, (32, 64, 128)),  # 1.91, 1.98
    ("res_multistep", {}, "condot", "velocity", 2.0, (32, 64, 128)),  # 2.12, 2.07
    ("exp_heun_2_x0", {}, "vp", "eps", 2.0, (32, 64, 128)),  # 1.94, 1.97
    ("exp_heun_2_x0", dict(solver_type="phi_1"), "condot", "velocity", 2.0, (32, 64, 128)),  # 1.93, 1.96
    ("seeds_2", dict(eta=0.0), "condot", "velocity", 2.0, (32, 64, 128)),  # 1.99, 1.99
    ("seeds_3", dict(eta=0.0), "vp", "eps", 3.0, (16, 32, 64)),  # 2.77, 2.90
    ("seeds_3", dict(eta=0.0), "condot", "velocity", 3.0, (8, 16, 32)),  # 3.21, 2.98
]


@pytest.mark.parametrize("method,options,path,prediction,order,steps", CONVERGENCE)
def test_convergence_order(method, options, path, prediction, order, steps):
    """Error against a single Gaussian's exact flow map on [0.05, 0.95]: the slopes of log error are the order."""
    errors = flow_map_errors(method, path, prediction, steps, **options)
    slopes = convergence.slopes(errors)
    assert all(order - 0.35 < s < order + 0.6 for s in slopes), (errors, slopes)


# (method, options, path, prediction, steps): max |z| measured 3.3, 1.9, 2.9, 2.7, 1.9, 2.4 (res_multistep_ancestral:
# 10 at 30 steps, its mode covariances too wide: the ancestral step's bias)
@pytest.mark.parametrize("method,options,path,prediction,steps", [
    ("res_multistep_ancestral", {}, "vp", "eps", 80), ("res_multistep", {}, "condot", "velocity", 80),
    ("seeds_2", {}, "vp", "x0", 30), ("exp_heun_2_x0_sde", {}, "condot", "velocity", 30),
    ("seeds_3", {}, "condot", "velocity", 30), ("seeds_2", dict(eta=0.5, solver_type="phi_2"), "vp", "eps", 30)])
def test_samples_the_mixture(method, options, path, prediction, steps):
    """The mixture's modes (weights, means, covariances) within statistical error; CondOT grids start at t = 0
    (alpha = 0: the first step's first-order limit)."""
    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, prediction)
    grid = _quadratic_grid(steps)
    if path == "vp":
        grid[0] = 1e-3
    x = fastdiff.sample(model, None, method=method, shape=(2,), seed=3, path=path, prediction=prediction,
                        batch_size=N, timesteps=grid, **options)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,options", [("res_multistep_ancestral", {}), ("seeds_2", dict(solver_type="phi_2")),
                                            ("seeds_3", {})])
def test_backends_agree(backend, method, options):
    """The reference, cpu and triton backends run the same table (triton's interpreter: 3 steps, 16 samples)."""
    name, device = backend
    path, ts, model, x = _setup("ve", "eps", steps=3)
    x = x[:16]
    kw = dict(seed=list(range(16)), path=path, prediction="eps", method=method, timesteps=ts, **options)
    ref = fastdiff.sample(model, None, noise=x.float(), backend="reference", **kw)
    ours = fastdiff.sample(model.to(device), None, noise=x.float().to(device), backend=name, device=device, **kw)
    torch.testing.assert_close(ours.cpu(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_options_are_checked():
    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), batch_size=2, path="vp", prediction="eps", timesteps=[0.1, 0.5, 1.0])
    errors = [("seeds_2", dict(solver_type="midpoint"), "solver_type must be 'phi_1' or 'phi_2' for method='seeds_2'"),
              ("exp_heun_2_x0_sde", dict(solver_type="x"), "solver_type must be .* for method='exp_heun_2_x0_sde'"),
              ("seeds_2", dict(r=0.0), r"r must be a finite number in \(0, 1\] for method='seeds_2', got 0.0"),
              ("seeds_3", dict(r_1=0.7), "r_1 must be below r_2 for method='seeds_3'"),
              ("seeds_3", dict(r_2=1.5), "r_2 must be a finite number in .* for method='seeds_3'"),
              ("seeds_3", dict(s_noise=math.nan), "s_noise must be a finite number >= 0 for method='seeds_3'")]
    for method, options, message in errors:
        with pytest.raises(ValueError, match=message):
            fastdiff.sample(model, None, method=method, **kw, **options)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0 for method='res_multistep_ancestral'"):
        get_method("res_multistep_ancestral").stages(get_path("vp"), [0.1, 1.0], "eps", eta=-1.0)  # (sample(): [0, 1])
    with pytest.raises(ValueError, match="eta applies to method="):
        fastdiff.sample(model, None, method="res_multistep", eta=0.5, **kw)
