"""method "deis" (fastdiff/sampling/methods/deis.py): ComfyUI's published DEIS ('tab': Lagrange weights in the VP
time of its fixed EDM fit, summed over 10 000 points) restated as a plain loop in sigma, on the same
denoiser, grid and initial state; 'rhoab' is Adams-Bashforth in sigma; 'logrho' (diffusers' DEIS, against
DEISMultistepScheduler in tests/test_adapter_diffusers_generic.py): its closed-form weights against quadrature,
lower_order_final and its convergence order on a Gaussian's exact flow map; the samples of a mixture."""

import math

import pytest
import torch

import fastdiff
from fastdiff.adapters.k_diffusion import DenoiserModel
from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
from fastdiff.paths import get_path
from fastdiff.sampling.methods import get_method
from fastdiff.sampling.methods.deis import _gauss_legendre, deis_weights
from fastdiff.sampling.methods.lms import lms_coefficients
from test_adapter_k_diffusion import _kd_case


def _published_tab_weights(sigmas, max_order, n=10_000):
    """The 'tab' weights as published: tau of each sigma from the VP fit (eps_s 1e-3, sigma 0.002 .. 80),
    the integrand d sigma / d tau, and sum(integrand * Lagrange) * (tau' - tau) / n over n points."""
    s = torch.tensor(sigmas, dtype=torch.float64)
    beta_d = 2 * (math.log(0.002 ** 2 + 1) / 1e-3 - math.log(80.0 ** 2 + 1)) / (1e-3 - 1)
    beta_min = math.log(80.0 ** 2 + 1) - 0.5 * beta_d
    taus = ((beta_min ** 2 + 2 * beta_d * (s ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    out = []
    for i in range(len(sigmas) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            out.append([])
            continue
        grid = torch.linspace(float(taus[i]), float(taus[i + 1]), n, dtype=torch.float64)
        dtau = (taus[i + 1] - taus[i]) / n
        log_a = -0.5 * grid ** 2 * beta_d - grid * beta_min
        a = log_a.exp()
        integrand = -0.5 * (-grid * beta_d - beta_min) / (a * (1 - a)).sqrt()
        prev = [taus[i - k] for k in range(order)]
        row = []
        for j in range(order):
            poly = torch.ones_like(grid)
            for k in range(order):
                if k != j:
                    poly = poly * (grid - prev[k]) / (prev[j] - prev[k])
            row.append(float((integrand * poly).sum() * dtau))
        out.append(row)
    return out


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("grid", ["karras", "vp"])
def test_matches_the_published_tab_loop(order, grid):
    kd, den, sigmas, x = _kd_case(grid, 12)
    model = DenoiserModel(den, sigmas)
    ours = fastdiff.sample(model, None, noise=x, path=model.path, prediction="x0", method="deis",
                           timesteps=model.timesteps, order=order)
    s = [float(v) for v in sigmas]
    weights = _published_tab_weights(s, order)
    buf = []
    with torch.no_grad():
        for i in range(len(s) - 1):
            d = (x - den(x, sigmas[i] * x.new_ones(x.shape[0]))) / s[i]
            k = 1 if s[i + 1] <= 0 else min(order, i + 1)
            if k == 1:
                x = x + (s[i + 1] - s[i]) * d
            else:
                c = weights[i]
                x = x + c[0] * d + sum(cj * bj for cj, bj in zip(c[1:], reversed(buf)))
            buf = (buf + [d])[-(order - 1):] if order > 1 else []
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-4 * x.abs().max().item())


def test_weights():
    s = [20.0, 9.0, 4.0, 1.5, 0.5, 0.1]
    assert deis_weights(s, 3, 3, "rhoab") == pytest.approx(lms_coefficients(s, 3, 3), rel=1e-12)
    for i, row in enumerate(_published_tab_weights(s, 3)):
        if row:  # 10 000-point sums against exact integrals
            assert deis_weights(s, i, len(row), "tab") == pytest.approx(row, rel=2e-3, abs=1e-6)
    # the weights integrate d sigma: they sum to the step in sigma
    assert sum(deis_weights(s, 4, 4, "tab")) == pytest.approx(s[5] - s[4], rel=1e-10)


@pytest.mark.parametrize("mode,path,prediction", [("tab", "vp", "eps"), ("rhoab", "vp", "x0"),
                                                  ("tab", "condot", "velocity"), ("logrho", "vp", "eps")])
def test_samples_the_mixture(mode, path, prediction):
    from test_sample import N, _quadratic_grid, _zmax

    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, prediction)
    grid = _quadratic_grid(40)
    if path == "vp":
        grid[0] = 1e-3
    x = fastdiff.sample(model, None, method="deis", shape=(2,), seed=3, path=path, prediction=prediction,
                        batch_size=N, timesteps=grid, mode=mode)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


def test_options_are_checked():
    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), batch_size=2, path="vp", prediction="eps", method="deis", timesteps=[0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match="order must be 1, 2, 3 or 4 for method='deis'"):
        fastdiff.sample(model, None, order=0, **kw)
    with pytest.raises(ValueError, match="mode must be 'tab', 'rhoab' or 'logrho'"):
        fastdiff.sample(model, None, mode="ab", **kw)


def test_logrho_weights_are_the_integrals_of_the_log_sigma_interpolant():
    """∫ L_j(log sigma) d sigma over the step, against 200-point Gauss-Legendre in sigma (deis.py's own: 64)."""
    s = [14.6, 6.0, 2.9, 1.1, 0.45, 0.2]
    gl = _gauss_legendre(200)
    for i in range(1, 5):
        for order in range(1, min(i + 1, 4) + 1):
            nodes = [math.log(s[i - k]) for k in range(order)]
            half, mid = 0.5 * (s[i + 1] - s[i]), 0.5 * (s[i] + s[i + 1])
            want = []
            for j in range(order):
                def basis(u):
                    return math.prod((u - nodes[k]) / (nodes[j] - nodes[k]) for k in range(order) if k != j)
                want.append(half * sum(w * basis(math.log(mid + half * x)) for x, w in gl))
            assert deis_weights(s, i, order, "logrho") == pytest.approx(want, rel=1e-11, abs=1e-13)
            assert sum(deis_weights(s, i, order, "logrho")) == pytest.approx(s[i + 1] - s[i], rel=1e-12)


def _weights_of(stages, i):
    st = stages[i]
    return [st.c_extra] + [c for _, c, _ in st.history] if st.extra else []


def test_logrho_lower_order_final_is_diffusers_rule():
    """lower_order_final: on fewer than 15 steps the last step is first order and the one before second (zero weights
    on the older d's); from 15 steps on it changes nothing, as in diffusers' DEISMultistepScheduler."""
    deis, vp = get_method("deis"), get_path("vp")
    for steps, lowered in ((10, True), (15, False)):
        grid = [0.02 + 0.9 * i / steps for i in range(steps + 1)]
        plain = deis.stages(vp, grid, "eps", order=3, mode="logrho", lower_order_final=False)
        lower = deis.stages(vp, grid, "eps", order=3, mode="logrho", lower_order_final=True)
        assert lower[:-2] == plain[:-2]
        if not lowered:
            assert lower == plain
            continue
        assert _weights_of(lower, -1) == [0.0, 0.0] and _weights_of(plain, -1)[1] != 0.0
        assert _weights_of(lower, -2)[1] == 0.0 and _weights_of(lower, -2)[0] != 0.0
        assert lower[-1].c_pred != plain[-1].c_pred


def test_logrho_convergence_order():
    """Error against the exact flow map of a Gaussian on [0.05, 0.95], VP path, eps model, order 3 without
    lower_order_final: slopes 2.32, 2.77, 3.01 over 16 -> 128 steps (the first-order first step's O(h^2) error shows
    on coarse grids), order 2: 2.36, 2.35, 2.24; order 1 (DDIM): 0.98."""
    from test_sample import _single_gaussian

    g = _single_gaussian()
    model = MixtureModel(g, "vp", "eps")
    t0, t1 = 0.05, 0.95
    al, be = get_path("vp").coefficients(t0)[:2]
    x0 = (be * torch.randn(256, 2, generator=torch.Generator().manual_seed(0)).double()
          + al * torch.tensor([1.0, -2.0], dtype=torch.float64))
    exact = g.flow_map(x0, t0, t1, "vp")

    def slopes(order, ns):
        errors = []
        for n in ns:
            grid = [t0 + (t1 - t0) * i / n for i in range(n + 1)]
            x = fastdiff.sample(model, None, noise=x0.float(), path="vp", prediction="eps", method="deis",
                                timesteps=grid, mode="logrho", order=order)
            errors.append(float((x.double() - exact).norm(dim=1).mean()))
        return [math.log2(errors[i] / errors[i + 1]) for i in range(len(ns) - 1)]

    third = slopes(3, (16, 32, 64, 128))
    assert all(s > 2.1 for s in third) and third[-1] > 2.8 and max(third) < 3.6, third
    second = slopes(2, (16, 32, 64))
    assert all(1.8 < s < 2.7 for s in second), second
    first = slopes(1, (16, 32))
    assert 0.85 < first[0] < 1.15, first
