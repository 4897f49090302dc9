"""Epsilon scaling (fastdiff.sampling.features.epsilon_scaling): ComfyUI's Epsilon Scaling node
(comfy_extras/nodes_eps.py, a post-CFG function: denoised' = x - (x - denoised) / scaling_factor in its sampler's
state) written here as a float64 denoiser wrapper around k-diffusion's own samplers (euler, dpmpp_2m), against
fastdiff's stage-coefficient form on a Gaussian mixture with exact predictions, on every backend here: VE, VP and
CondOT paths, x0 / eps / v / velocity models, guided and unguided, both spaces (the sampler state x / alpha of
ComfyUI's eps / v models, or x itself of its flow models); the transform against a hand-written Euler loop of the
reference (rescale, classifier guidance), callbacks' x0, a captured loop; bad options and the singular start."""

import pytest
import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, class_conditional_mixture
from fastdiff.ops.randn import randn
from fastdiff.paths import convert, get_path
from fastdiff.sampling.features.epsilon_scaling import EpsilonScaling, epsilon_scaling_reference
from fastdiff.sampling.features.guidance import RULES, get_rule, rescale_reference

from combination_matrix import gaussian_velocity_model
from gram_rule_testing import assert_cli_accepts, device_ops_model

BACKENDS = [b for b in ("cpu", "reference", "triton") if fastdiff.backends()[b]]
MIXTURE = class_conditional_mixture(num_classes=3, modes_per_class=2, radius=2.0, std=0.5)
NULL, B = 3, 4
Y, Y2 = torch.tensor([0, 1, 2, 1]), torch.tensor([2, 0, 1, 0])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _kd():
    from fastdiff.bench.peers import k_diffusion_sampling

    try:
        return k_diffusion_sampling()
    except ImportError as exc:
        pytest.skip(f"k-diffusion not installed: {exc}")


def _grid(path, steps):
    if path == "ve":  # k-diffusion's Karras sigmas on VE, down to sigma = 0 (t = 1)
        from fastdiff import schedules

        p = get_path("ve")
        return [p.time(s) for s in schedules.karras_sigmas(steps, 0.02, 40.0)]
    return [1e-3 + (1.0 - 1e-3) * i / steps for i in range(steps + 1)]  # after alpha = 0


def _comfy(method, path, prediction, grid, x_init, w, s, space, a=(1.0,)):
    """ComfyUI's sampling with the node, float64: k-diffusion's sampler on its state x_s = x / c(t) at
    sigma = beta / c(t), c = alpha (eps / v models) or 1 (flow models: model_sampling CONST, alpha + beta = 1); the
    denoiser is CFG's blend of the model's x0 (the conditions' weighted mean with several), then the post-CFG
    formula. The result is at t = 1, where c = 1."""
    P, kd = get_path(path), _kd()
    model = MixtureModel(MIXTURE, path, prediction, null_label=NULL)
    c = (lambda t: P.coefficients(t)[0]) if space == "eps" else (lambda t: 1.0)
    sigmas = torch.tensor([P.coefficients(t)[1] / c(t) for t in grid], dtype=torch.float64)
    times = dict(zip(sigmas.tolist(), grid))

    def denoiser(x_s, sigma):
        t = times[sigma[0].item()]
        x = c(t) * x_s
        null = model(x, t, torch.full((B,), NULL))
        cond = sum(ak * model(x, t, yk) for ak, yk in zip(a, (Y, Y2)))
        g = null + w * (cond - null)
        denoised = convert(g, x, t, path, prediction, "x0")
        return x_s - (x_s - denoised) / s  # the node (k-diffusion's x0 is the sampler state's: x / c)

    return getattr(kd, f"sample_{method}")(denoiser, x_init.double() / c(grid[0]), sigmas, disable=True)


CASES = [  # (path, prediction, space)
    ("ve", "x0", "eps"), ("ve", "eps", "state"), ("vp", "eps", "eps"), ("vp", "v", "eps"),
    ("condot", "velocity", "eps"), ("condot", "velocity", "state"), ("condot", "x0", "state"),
]
CASE_IDS = ["-".join(c) for c in CASES]


@pytest.mark.parametrize("method,kd_method", [("ddim", "euler"), ("dpmpp_2m", "dpmpp_2m")])
@pytest.mark.parametrize("path,prediction,space", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("w,s", [(3.0, 1.005), (1.0, 0.9), (2.0, 1.3)])
def test_is_comfyui_node_in_k_diffusion(backend, method, kd_method, path, prediction, space, w, s):
    """fastdiff's ddim is k-diffusion's Euler in its sigma on every path (fastdiff's euler is that only on condot)."""
    if backend == "triton" and (w, s) != (2.0, 1.3):
        pytest.skip("the triton interpreter pays per launch: one scale of each case")
    if space == "state" and path != "ve" and method == "dpmpp_2m":
        pytest.skip("ComfyUI's dpmpp_2m on its flow models is not fastdiff's dpmpp_2m on condot (its sigma is beta)")
    grid = _grid(path, 8)
    x_init = (1.0 if path != "ve" else 40.0) * torch.randn(B, 2, generator=torch.Generator().manual_seed(5))
    model = MixtureModel(MIXTURE, path, prediction, null_label=NULL)
    rule = EpsilonScaling(scaling_factor=s, space=space)
    ours = fastdiff.sample(model, None, w, y=Y, null_y=NULL, noise=x_init, path=path, prediction=prediction,
                           method=method, timesteps=grid, guidance=rule, backend=backend)
    theirs = _comfy(kd_method, path, prediction, grid, x_init, w, s, space)
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())
    plain = _comfy(kd_method, path, prediction, grid, x_init, w, 1.0, space)
    assert (plain - theirs).abs().max() > 1e-3  # the scaling changes the result (the check can tell)


def test_two_conditions_are_comfyui_on_their_weighted_mean(backend):
    w = (2.0, 1.5)
    grid, x_init = _grid("condot", 8), torch.randn(B, 2, generator=torch.Generator().manual_seed(6))
    model = MixtureModel(MIXTURE, "condot", "velocity", null_label=NULL)
    ours = fastdiff.sample(model, None, w, conditions=[Y, Y2], null_y=NULL, noise=x_init, method="dpmpp_2m",
                           timesteps=grid, guidance=EpsilonScaling(1.01), backend=backend)
    theirs = _comfy("dpmpp_2m", "condot", "velocity", grid, x_init, sum(w), 1.01, "eps", a=[v / sum(w) for v in w])
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())


def test_callback_x0_is_the_scaled_denoised():
    """callback's x0 is ComfyUI's denoised' (k-diffusion's callback 'denoised' under the node), mapped to x."""
    kd = _kd()
    grid, s, w = _grid("ve", 6), 1.2, 2.5
    x_init = 40.0 * torch.randn(B, 2, generator=torch.Generator().manual_seed(7))
    model = MixtureModel(MIXTURE, "ve", "x0", null_label=NULL)
    ours, theirs = [], []
    fastdiff.sample(model, None, w, y=Y, null_y=NULL, noise=x_init, path="ve", prediction="x0", timesteps=grid,
                    method="ddim", guidance=EpsilonScaling(s), callback=lambda i, t, x, x0: ours.append(x0.clone()))
    P = get_path("ve")
    sigmas = torch.tensor([P.coefficients(t)[1] for t in grid], dtype=torch.float64)

    def denoiser(x, sigma):
        t = P.time(sigma[0].item())
        g = model(x, t, torch.full((B,), NULL)) * (1 - w) + w * model(x, t, Y)
        return x - (x - g) / s

    kd.sample_euler(denoiser, x_init.double(), sigmas, disable=True, callback=lambda d: theirs.append(d["denoised"]))
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-5 * b.abs().max().item())


# ---- against the reference in a hand-written loop --------------------------------------------------------------

SHAPE, STEPS = (2, 3), 6
LY, LY2 = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])


def _hand_euler(blend, grid, seed=3):
    """Euler on CondOT's velocity from the sampler's own initial noise, float64 (the model in float32)."""
    x = randn(torch.arange(seed, seed + 3), 0, SHAPE).double() * get_path("condot").coefficients(grid[0])[1]
    for t, t1 in zip(grid, grid[1:]):
        x = x + (t1 - t) * blend(x, t)
    return x.float()


@pytest.mark.parametrize("space", ["eps", "state"])
@pytest.mark.parametrize("w,phi", [(3.5, 0.0), (3.5, 0.6), (1.0, 0.0)])
def test_sample_is_the_hand_loop(backend, space, w, phi):
    """The default grid (from 1e-3 where the eps space needs it), CFG's blend (rescaled), then the reference."""
    rule = EpsilonScaling(1.02, space)
    grid = _grid("condot", STEPS) if space == "eps" else [i / STEPS for i in range(STEPS + 1)]

    def blend(x, t):
        tt = torch.full((3,), t)
        p_null = gaussian_velocity_model(x.float(), tt, torch.full((3,), NULL)).double()
        p_y = gaussian_velocity_model(x.float(), tt, LY).double()
        g = p_null + w * (p_y - p_null)
        g = rescale_reference(p_null, p_y, w, phi, g) if phi else g
        return epsilon_scaling_reference(g, x, t, "condot", "velocity", 1.02, space)

    got = fastdiff.sample(gaussian_velocity_model, STEPS, w, y=LY, null_y=NULL, guidance=rule, guidance_rescale=phi,
                          shape=SHAPE, seed=3, backend=backend)
    want = _hand_euler(blend, grid)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())
    plain = fastdiff.sample(gaussian_velocity_model, None, w, y=LY, null_y=NULL, guidance_rescale=phi, shape=SHAPE,
                            seed=3, backend=backend, timesteps=grid)
    assert (got - plain).abs().max() > 1e-3  # the scaling changes the result (the check can tell)


def test_scales_the_classifier_term_too(backend):
    """With classifier guidance the whole guided prediction g + lambda s grad log p(y | x) is scaled (the transform
    runs before the classifier's), as the node sees the whole denoised."""
    from combination_matrix import gaussian_classifier
    from fastdiff.paths import affine_coefficients

    grid, scale = _grid("condot", STEPS), 0.7

    def blend(x, t):
        tt = torch.full((3,), t)
        xg = x.float().requires_grad_(True)
        logp = torch.log_softmax(gaussian_classifier(xg, tt).float(), -1).gather(1, LY.view(-1, 1)).sum()
        grad = torch.autograd.grad(logp, xg)[0].double()
        lam = affine_coefficients("condot", t, "score", "velocity")[1]
        g = gaussian_velocity_model(x.float(), tt, LY).double() + lam * scale * grad
        return epsilon_scaling_reference(g, x, t, "condot", "velocity", 1.05)

    got = fastdiff.sample(gaussian_velocity_model, STEPS, 1.0, y=LY, shape=SHAPE, seed=3, backend=backend,
                          classifier=gaussian_classifier, classifier_scale=scale, guidance=EpsilonScaling(1.05))
    want = _hand_euler(blend, grid)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())


def test_runs_in_a_captured_loop(recorder):
    """Host numbers only: the loop captures once and replays."""
    rec, m = recorder, device_ops_model()
    for seed in (1, 2):
        args = dict(y=LY, null_y=NULL, guidance="epsilon_scaling", shape=SHAPE, seed=seed, backend=BACKENDS[0],
                    method="dpmpp_2m")
        torch.testing.assert_close(fastdiff.sample(m, STEPS, 3.0, cuda_graph=True, **args),
                                   fastdiff.sample(m, STEPS, 3.0, **args), rtol=0, atol=0)
    assert rec.captures == 1 and rec.replays == 2


# ---- options and errors ----------------------------------------------------------------------------------------

def test_the_rule_is_registered_and_checked():
    assert RULES["epsilon_scaling"] is EpsilonScaling and get_rule("epsilon_scaling") == EpsilonScaling()
    assert EpsilonScaling().scaling_factor == 1.005 and EpsilonScaling().space == "eps"  # the node's default
    for bad in (0.0, -1.0, float("inf"), float("nan"), "1.005", None):
        with pytest.raises(ValueError, match="scaling_factor"):
            EpsilonScaling(scaling_factor=bad)
    with pytest.raises(ValueError, match="space must be one of 'eps', 'state'"):
        EpsilonScaling(space="x0")
    assert_cli_accepts("epsilon_scaling")


def test_the_singular_start():
    """eps' has no x0 where alpha = 0: the default grid starts after it, an explicit one through it is refused; the
    state space and eps models have no such point."""
    kw = dict(y=LY, null_y=NULL, shape=SHAPE, seed=1)
    grid = [i / STEPS for i in range(STEPS + 1)]
    with pytest.raises(ValueError, match=r"epsilon_scaling.*eps -> velocity.*singular at t=0.*start the grid"):
        fastdiff.sample(gaussian_velocity_model, None, 2.0, timesteps=grid, guidance="epsilon_scaling", **kw)
    assert torch.isfinite(fastdiff.sample(gaussian_velocity_model, STEPS, 2.0, guidance="epsilon_scaling", **kw)).all()
    fastdiff.sample(gaussian_velocity_model, None, 2.0, timesteps=grid, guidance=EpsilonScaling(space="state"), **kw)
    for prediction in ("eps", "score"):  # g' = g / s: no x term (the methods' own conversions may be singular)
        table = EpsilonScaling(1.1).table_transform(get_path("condot"), prediction)
        assert not table.start_late and table.coefficients(0.0) == (0.0, 1 / 1.1)
    assert EpsilonScaling(1.1).table_transform(get_path("condot"), "velocity").start_late
