"""Guidance beyond one fixed CFG scale (fastdiff.sampling.features.guidance): CFG rescale (diffusers' guidance_rescale)
and CFG-Zero* (diffusers' ClassifierFreeZeroStarGuidance) fused through the per-sample reduction pass, against
diffusers' formulas and a hand-written loop on every backend; scale schedules (cfg as a callable of t)."""

import math

import pytest
import torch

import fastdiff
from fastdiff.ops.sample_gram import sample_gram_reference
from fastdiff.sampling.features.guidance import CFG, CFGZeroStar, branch_weights, rescale_reference, zero_star_reference
from conftest import BACKENDS

SHAPE = (3, 5, 7)  # odd: partial vector blocks in every kernel


def _weights_blend(rule, p_null, p_y, w, phi):
    """The blend w_0 p_null + w_1 (p_y - p_null) of the per-sample weights branch_weights computes from the
    Gram matrix, in float64."""
    out = branch_weights(sample_gram_reference([p_null, p_y]), rule, w, phi, torch.empty(len(p_y), 2)).double()
    per = (-1, *([1] * (p_y.dim() - 1)))
    return out[:, 0].view(per) * p_null.double() + out[:, 1].view(per) * (p_y.double() - p_null.double())


def _preds(dtype=torch.float32, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    p_null = torch.randn(B, *SHAPE, generator=g) * 0.8 + 0.1
    p_y = p_null + torch.randn(B, *SHAPE, generator=g) * torch.linspace(0.2, 1.5, B).view(-1, 1, 1, 1)
    return p_null.to(dtype), p_y.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w,phi", [(4.0, 0.7), (7.5, 1.0), (2.0, 0.0), (-1.0, 0.5)])
def test_rescale_weights_are_diffusers_rescale(dtype, w, phi):
    """The per-sample weights from the Gram matrix blend to diffusers' rescale_noise_cfg of the CFG blend."""
    p_null, p_y = _preds(dtype)
    ours = _weights_blend(CFG(), p_null, p_y, w, phi)
    spec = rescale_reference(p_null, p_y, w, phi)
    torch.testing.assert_close(ours, spec, rtol=0, atol=1e-6 * spec.abs().max().item())
    try:
        from diffusers.guiders.guider_utils import rescale_noise_cfg
    except ImportError:
        return
    cfg = p_null.double() + w * (p_y.double() - p_null.double())
    torch.testing.assert_close(spec, rescale_noise_cfg(cfg, p_y.double(), guidance_rescale=phi), rtol=1e-12, atol=1e-12)


def _model(x, t, y):
    """A label-conditioned velocity field, smooth in x (y = 3 is the null label)."""
    label = y.view(-1, *([1] * (x.dim() - 1))).float()
    return torch.tanh(x * (1.0 + label) * 0.5 + 0.3 * label) - t.view(-1, *([1] * (x.dim() - 1))) * x


def _hand_euler(grid, seeds, y, null, w_at, phi, zero_star=None):
    """Euler on the CondOT velocity with the rescaled blend (CFG-Zero*'s with ``zero_star`` = its zero-init
    steps), in float64 (the model in float32)."""
    x = fastdiff.ops.randn(torch.tensor(seeds), 0, SHAPE).double()
    for i, (t, t1) in enumerate(zip(grid, grid[1:])):
        tt = torch.full((len(seeds),), t)
        p_y = _model(x.float(), tt, y).double()
        p_null = _model(x.float(), tt, torch.full_like(y, null)).double()
        w = w_at(t)
        g = p_null + w * (p_y - p_null) if zero_star is None else zero_star_reference(p_null, p_y, w)
        if phi:
            g = rescale_reference(p_null, p_y, w, phi, g)
        if zero_star is not None and i < zero_star:
            g = torch.zeros_like(g)
        x = x + (t1 - t) * g
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_rescaled_loop_is_the_hand_loop(backend):
    name, device = backend
    seeds, y, grid = [1, 2, 3, 4], torch.tensor([0, 1, 2, 1]), [i / 6 for i in range(7)]
    ours = fastdiff.sample(_model, 6, 4.0, shape=SHAPE, y=y.to(device), null_y=3, seed=seeds, method="euler",
                           guidance_rescale=0.7, backend=name, device=device)
    spec = _hand_euler(grid, seeds, y, 3, lambda t: 4.0, 0.7)
    torch.testing.assert_close(ours.cpu().double(), spec, rtol=0, atol=2e-5 * spec.abs().max().item())
    plain = fastdiff.sample(_model, 6, 4.0, shape=SHAPE, y=y.to(device), null_y=3, seed=seeds, method="euler",
                            backend=name, device=device)
    assert (plain.cpu() - ours.cpu()).abs().max() > 1e-2  # the rescale does something here


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id != "triton"])
@pytest.mark.parametrize("method", ["heun", "dpmpp_2m_sde", "dpmpp_sde"])
def test_rescale_in_every_stage_kind_matches_the_reference_backend(backend, method):
    """Two-evaluation and stochastic methods with rescale, the blend's twin buffers, cfg_batch either way, a
    guidance interval and a callback: the kernels against the reference backend."""
    name, device = backend
    seeds, y = [5, 6, 7], torch.tensor([2, 0, 1])
    kw = dict(shape=SHAPE, null_y=3, seed=seeds, method=method, guidance_rescale=0.5, path="vp", prediction="velocity",
              timesteps=[0.05, 0.3, 0.5, 0.7, 0.9], guidance_interval=(0.1, 0.8))
    seen = {}

    def run(backend_name, dev, cfg_batch):
        x0s = []
        out = fastdiff.sample(_model, None, 3.0, y=y.to(dev), backend=backend_name, device=dev, cfg_batch=cfg_batch,
                              callback=lambda i, t, x, x0: x0s.append(x0.cpu().clone()), **kw)
        seen[(backend_name, cfg_batch)] = x0s
        return out.cpu()

    ref = run("reference", "cpu", True)
    for cfg_batch in (True, False):
        ours = run(name, device, cfg_batch)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        for a, b in zip(seen[(name, cfg_batch)], seen[("reference", True)]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


def test_phi_zero_and_a_constant_schedule_are_plain_cfg():
    y = torch.tensor([0, 1, 2])
    kw = dict(shape=SHAPE, y=y, null_y=3, seed=2, method="dpmpp_2m")
    plain = fastdiff.sample(_model, 5, 4.0, **kw)
    assert torch.equal(plain, fastdiff.sample(_model, 5, 4.0, guidance_rescale=0.0, **kw))
    assert torch.equal(plain, fastdiff.sample(_model, 5, lambda t: 4.0, **kw))


def test_schedule_is_the_hand_loop():
    """cfg as a callable of t: each evaluation's scale is the schedule's at its time (1 = no guidance there,
    still two branches)."""
    seeds, y, grid = [1, 2, 3], torch.tensor([0, 2, 1]), [i / 8 for i in range(9)]

    def schedule(t):
        return 5.0 if t < 0.5 else 1.0 + t

    ours = fastdiff.sample(_model, 8, schedule, shape=SHAPE, y=y, null_y=3, seed=seeds, method="euler")
    spec = _hand_euler(grid, seeds, y, 3, schedule, 0.0)
    torch.testing.assert_close(ours.double(), spec, rtol=0, atol=2e-5 * spec.abs().max().item())
    with_rescale = fastdiff.sample(_model, 8, schedule, shape=SHAPE, y=y, null_y=3, seed=seeds, method="euler",
                                   guidance_rescale=0.6)
    spec = _hand_euler(grid, seeds, y, 3, schedule, 0.6)
    torch.testing.assert_close(with_rescale.double(), spec, rtol=0, atol=2e-5 * spec.abs().max().item())


@pytest.mark.parametrize("kw,exc,match", [
    (dict(cfg=4.0, guidance_rescale=1.5), ValueError, r"guidance_rescale must be in \[0, 1\]"),
    (dict(cfg=4.0, guidance_rescale=math.nan), ValueError, r"guidance_rescale must be in \[0, 1\]"),
    (dict(cfg=1.0, guidance_rescale=0.5), ValueError, "guidance_rescale applies to guided sampling"),
    (dict(cfg=lambda t: math.inf), ValueError, r"cfg\(t\) must return a finite number, got inf at t=0"),
    (dict(cfg="4"), ValueError, "cfg must be a finite number or a callable"),
])
def test_errors_name_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        fastdiff.sample(_model, 3, shape=SHAPE, y=torch.tensor([0, 1]), null_y=3, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w,phi", [(4.0, 0.0), (6.0, 0.7), (0.5, 0.3)])
def test_zero_star_weights_are_diffusers_guider(dtype, w, phi):
    """CFG-Zero*'s per-sample weights blend to diffusers' ClassifierFreeZeroStarGuidance output (after its
    zero-init steps), rescale included."""
    p_null, p_y = _preds(dtype, seed=3)
    ours = _weights_blend(CFGZeroStar(), p_null, p_y, w, phi)
    spec = zero_star_reference(p_null, p_y, w)
    if phi:
        spec = rescale_reference(p_null, p_y, w, phi, spec)
    torch.testing.assert_close(ours, spec, rtol=0, atol=1e-6 * spec.abs().max().item())
    try:
        from diffusers.guiders import ClassifierFreeZeroStarGuidance
    except ImportError:
        return
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=1, guidance_rescale=phi)
    guider.set_state(step=3, num_inference_steps=10, timestep=torch.tensor(500))
    theirs = guider.forward(p_y.double(), p_null.double()).pred  # its scale is computed in float32
    torch.testing.assert_close(spec, theirs, rtol=0, atol=1e-6 * spec.abs().max().item())
    guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(999))
    zero_init = guider.forward(p_y.double(), p_null.double()).pred
    if phi:  # diffusers rescales its zero prediction: 0 * std(p_y) / std(0) is NaN (fastdiff keeps the zero)
        assert zero_init.isnan().all()
    else:
        assert not zero_init.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero_init,phi", [(1, 0.0), (2, 0.6), (0, 0.0)])
def test_zero_star_loop_is_the_hand_loop(backend, zero_init, phi):
    name, device = backend
    seeds, y, grid = [1, 2, 3, 4], torch.tensor([0, 1, 2, 1]), [i / 6 for i in range(7)]
    rule = "cfg_zero_star" if zero_init == 1 else CFGZeroStar(zero_init_steps=zero_init)
    ours = fastdiff.sample(_model, 6, 4.0, shape=SHAPE, y=y.to(device), null_y=3, seed=seeds, method="euler",
                           guidance=rule, guidance_rescale=phi, backend=name, device=device)
    spec = _hand_euler(grid, seeds, y, 3, lambda t: 4.0, phi, zero_star=zero_init)
    torch.testing.assert_close(ours.cpu().double(), spec, rtol=0, atol=2e-5 * spec.abs().max().item())


def test_guidance_rules_are_checked():
    kw = dict(shape=SHAPE, y=torch.tensor([0, 1]), null_y=3)
    with pytest.raises(ValueError, match="guidance must be one of 'cfg', 'cfg_zero_star', 'cfg_pp', 'apg'"):
        fastdiff.sample(_model, 3, 4.0, guidance="apg-ish", **kw)
    with pytest.raises(TypeError, match="guidance must be a rule name or object"):
        fastdiff.sample(_model, 3, 4.0, guidance=3, **kw)
    with pytest.raises(ValueError, match="zero_init_steps must be an int >= 0"):
        CFGZeroStar(zero_init_steps=-1)
    # "cfg" is the default rule, bit for bit
    assert torch.equal(fastdiff.sample(_model, 3, 4.0, guidance="cfg", **kw), fastdiff.sample(_model, 3, 4.0, **kw))


def _hand_euler_conditions(grid, seeds, conds, null, ws):
    x = fastdiff.ops.randn(torch.tensor(seeds), 0, SHAPE).double()
    for t, t1 in zip(grid, grid[1:]):
        tt = torch.full((len(seeds),), t)
        p_null = _model(x.float(), tt, torch.full_like(conds[0], null)).double()
        g = p_null.clone()
        for c, w in zip(conds, ws):
            g += w * (_model(x.float(), tt, c).double() - p_null)
        x = x + (t1 - t) * g
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg_batch", [True, False])
def test_several_conditions_are_one_batched_call(backend, cfg_batch):
    """K conditions blend as p_null + Σ w_k (p_k - p_null): one model call of (K+1) B per evaluation (or K+1
    calls of B), equal to the hand loop; one condition is y's path bit for bit."""
    name, device = backend
    seeds, grid = [1, 2, 3], [i / 5 for i in range(6)]
    conds = [torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0]), torch.tensor([1, 0, 1])]
    ws = [3.0, -1.5, 0.5]
    sizes = []

    def model(x, t, y):
        sizes.append(x.shape[0])
        return _model(x, t, y)

    ours = fastdiff.sample(model, 5, ws, conditions=[c.to(device) for c in conds], shape=SHAPE, null_y=3, seed=seeds,
                           method="euler", backend=name, device=device, cfg_batch=cfg_batch)
    assert sizes == ([4 * 3] * 5 if cfg_batch else [3] * 20)
    spec = _hand_euler_conditions(grid, seeds, conds, 3, ws)
    torch.testing.assert_close(ours.cpu().double(), spec, rtol=0, atol=2e-5 * spec.abs().max().item())
    one = fastdiff.sample(_model, 5, 2.5, conditions=[conds[0].to(device)], shape=SHAPE, null_y=3, seed=seeds,
                          method="heun", backend=name, device=device, cfg_batch=cfg_batch)
    assert torch.equal(one, fastdiff.sample(_model, 5, 2.5, y=conds[0].to(device), shape=SHAPE, null_y=3, seed=seeds,
                                            method="heun", backend=name, device=device, cfg_batch=cfg_batch))


def test_several_conditions_in_two_stage_methods_and_callbacks():
    """A two-evaluation method keeps K + 1 copies of its stage buffer; the callback's x0 uses the K-way blend."""
    conds = [torch.tensor([0, 1]), torch.tensor([2, 0])]
    kw = dict(conditions=conds, shape=SHAPE, null_y=3, seed=[7, 8], method="dpm_2", path="vp", prediction="velocity",
              timesteps=[0.05, 0.4, 0.7, 0.9])
    seen = {}
    for backend in ("reference", "cpu"):
        x0s = []
        out = fastdiff.sample(_model, None, [2.0, 1.0], backend=backend,
                              callback=lambda i, t, x, x0: x0s.append(x0.clone()), **kw)
        seen[backend] = (out, x0s)
    torch.testing.assert_close(seen["cpu"][0], seen["reference"][0], rtol=0, atol=1e-5)
    for a, b in zip(seen["cpu"][1], seen["reference"][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(y=torch.tensor([0, 1]), conditions=[torch.tensor([0, 1])]), ValueError, "either as y .* or as conditions"),
    (dict(conditions=torch.tensor([0, 1])), TypeError, "conditions must be a non-empty sequence"),
    (dict(conditions=[torch.tensor([0, 1]), torch.tensor([1])]), ValueError, "one label per sample"),
    (dict(conditions=[torch.tensor([0, 1])] * 2, cfg=[1.0, 2.0, 3.0]), ValueError, "cfg must be one number or schedule, or 2"),
    (dict(conditions=[torch.tensor([0, 1])] * 2, cfg=[1.0, math.nan]), ValueError, r"cfg\[1\] must be a finite number"),
    (dict(conditions=[torch.tensor([0, 1])] * 8), ValueError, "at most 7"),
    (dict(conditions=[torch.tensor([0, 1])] * 2, cfg=[1.0, -1.0], guidance_rescale=0.5), ValueError,
     "weights .* sum to 0"),
])
def test_conditions_are_checked(kw, exc, match):
    kw = {"cfg": 3.0, **kw}
    with pytest.raises(exc, match=match):
        fastdiff.sample(_model, 3, shape=SHAPE, null_y=3, **kw)


def _hand_ddim_cfg_pp(path_name, grid, seeds, y, null, w, eta, s_noise=1.0):
    """CFG++'s DDIM step in float64: x' = alpha' x0(g_w) + k eps(p_null) + s xi (the model in float32)."""
    from fastdiff.paths import affine_coefficients, get_path
    from fastdiff.sampling.core.stage import draw_stream

    path = get_path(path_name)
    x = fastdiff.ops.randn(torch.tensor(seeds), 0, SHAPE).double() * path.coefficients(grid[0])[1]
    for i, (t, t1) in enumerate(zip(grid, grid[1:])):
        tt = torch.full((len(seeds),), t)
        p_y = _model(x.float(), tt, y).double()
        p_null = _model(x.float(), tt, torch.full_like(y, null)).double()
        g = p_null + w * (p_y - p_null)
        (al, be), (al1, be1) = path.coefficients(t)[:2], path.coefficients(t1)[:2]
        a_z, b_z = affine_coefficients(path, t, "velocity", "x0")
        a_e, b_e = affine_coefficients(path, t, "velocity", "eps")
        s = 0.0
        if eta > 0 and be1 > 0:
            s = eta * be1 * math.sqrt(max(0.0, 1 - ((al * be1) / (al1 * be)) ** 2))
        k = math.sqrt(max(0.0, be1 * be1 - s * s))
        x = al1 * (a_z * x + b_z * g) + k * (a_e * x + b_e * p_null)
        if s:
            x = x + s * s_noise * fastdiff.ops.randn(torch.tensor(seeds), draw_stream(i), SHAPE).double()
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,eta", [("ddim", 0.0), ("ddim", 0.6), ("euler_ancestral", 1.0)])
def test_cfg_pp_is_the_hand_loop(backend, method, eta):
    """CFG++: the guided prediction in the clean estimate, the unconditional one in the re-noising (ComfyUI's
    euler_cfg_pp / euler_ancestral_cfg_pp in sigma space are these steps on the VE path)."""
    name, device = backend
    seeds, y = [1, 2, 3], torch.tensor([0, 2, 1])
    grid = [0.05 + 0.9 * i / 6 for i in range(7)]
    ours = fastdiff.sample(_model, None, 1.8, timesteps=grid, shape=SHAPE, y=y.to(device), null_y=3, seed=seeds,
                           method=method, eta=eta, path="vp", guidance="cfg_pp", backend=name, device=device)
    spec = _hand_ddim_cfg_pp("vp", grid, seeds, y, 3, 1.8, eta)
    torch.testing.assert_close(ours.cpu().double(), spec, rtol=0, atol=2e-5 * spec.abs().max().item())
    plain = fastdiff.sample(_model, None, 1.8, timesteps=grid, shape=SHAPE, y=y.to(device), null_y=3, seed=seeds,
                            method=method, eta=eta, path="vp", backend=name, device=device)
    assert (plain.cpu() - ours.cpu()).abs().max() > 1e-3


def test_cfg_pp_on_ve_is_comfyui_euler_cfg_pp():
    """On the VE path (k-diffusion's sigma space) CFG++ DDIM is ComfyUI's sample_euler_cfg_pp as published:
    x' = D_g + sigma' (x - D_null) / sigma, D the denoiser's x0 predictions."""
    from fastdiff.adapters.k_diffusion import DenoiserModel
    from test_adapter_k_diffusion import Denoiser

    den = Denoiser()
    sigmas = torch.tensor([14.0, 6.0, 2.5, 1.0, 0.4, 0.1, 0.0])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    w = 1.5
    model = DenoiserModel(den, sigmas)

    def guided(x, t, y):  # the conditional branch adds the label (the Denoiser's cond)
        return model.denoiser(x, model.sigma(t).to(x.dtype), cond=y.float())

    ours = fastdiff.sample(guided, None, w, noise=x, path=model.path, prediction="x0", method="ddim",
                           timesteps=model.timesteps, y=torch.tensor([0.5, -0.3]), null_y=torch.tensor(0.0),
                           guidance="cfg_pp")
    xs = x.double()
    for s, s1 in zip(sigmas[:-1].double(), sigmas[1:].double()):
        d_y = den(xs.float(), s.float().expand(2), cond=torch.tensor([0.5, -0.3])).double()
        d_null = den(xs.float(), s.float().expand(2), cond=torch.tensor([0.0, 0.0])).double()
        d_g = d_null + w * (d_y - d_null)
        xs = d_g + s1 * (xs - d_null) / s
    torch.testing.assert_close(ours.double(), xs, rtol=0, atol=2e-5 * xs.abs().max().item())


def test_cfg_pp_is_checked():
    kw = dict(shape=SHAPE, y=torch.tensor([0, 1]), null_y=3)
    with pytest.raises(ValueError, match=r"guidance='cfg_pp' is defined for .*\(euler, ddim, euler_ancestral\)"):
        fastdiff.sample(_model, 3, 2.0, method="heun", guidance="cfg_pp", **kw)
    # without guidance it is the method's own step (cfg = 1: one branch)
    assert torch.equal(fastdiff.sample(_model, 3, 1.0, method="heun", guidance="cfg_pp", **kw),
                       fastdiff.sample(_model, 3, 1.0, method="heun", **kw))


def _big_model(x, t, y):
    """An eps-like prediction whose x0 estimates leave [-1, 1] (so that thresholding bites)."""
    label = 0.0 if y is None else y.view(-1, *([1] * (x.dim() - 1))).float()
    return 0.6 * x - 0.8 * torch.tanh(2.0 * x + label)


def _diffusers_threshold(ratio, max_value):
    try:
        from diffusers import DDIMScheduler
    except ImportError:
        from fastdiff.sampling.features.guidance import DynamicThresholding

        return DynamicThresholding(ratio, max_value).apply
    sched = DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    return sched._threshold_sample


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,cfg", [("ddim", 1.0), ("ddim", 3.0), ("dpmpp_2m", 3.0)])
def test_dynamic_thresholding_is_diffusers_on_every_stage(backend, method, cfg):
    """Each evaluation's x0 estimate is thresholded by diffusers' own _threshold_sample (ratio 0.9,
    max_value 1.5) and the step runs on the prediction that gives it: the hand loop, in float64."""
    from fastdiff.paths import affine_coefficients, get_path

    name, device = backend
    seeds, y = [1, 2, 3], torch.tensor([0, 2, 1])
    grid = [0.05 + 0.9 * i / 5 for i in range(6)]
    kw = dict(timesteps=grid, shape=SHAPE, seed=seeds, method=method, path="vp", prediction="eps",
              dynamic_thresholding=fastdiff.sampling.features.guidance.DynamicThresholding(0.9, 1.5))
    if cfg != 1.0:
        kw.update(y=y.to(device), null_y=3)
    else:
        kw.update(batch_size=3)
    ours = fastdiff.sample(_big_model, None, cfg, backend=name, device=device, **kw)
    threshold = _diffusers_threshold(0.9, 1.5)
    path = get_path("vp")
    x = fastdiff.ops.randn(torch.tensor(seeds), 0, SHAPE).double() * path.coefficients(grid[0])[1]
    d_prev, h_prev = None, None
    for i, (t, t1) in enumerate(zip(grid, grid[1:])):
        tt = torch.full((3,), t)
        if cfg != 1.0:
            p_y, p_null = (_big_model(x.float(), tt, lab).double() for lab in (y, torch.full_like(y, 3)))
            g = p_null + cfg * (p_y - p_null)
        else:
            g = _big_model(x.float(), tt, torch.zeros(3, dtype=torch.long)).double()
        a, b = affine_coefficients(path, t, "eps", "x0")
        d = threshold(a * x + b * g)  # the thresholded x0
        (al, be), (al1, be1) = path.coefficients(t)[:2], path.coefficients(t1)[:2]
        if method == "ddim":
            x = al1 * d + be1 * (x - al * d) / be
        else:  # DPM-Solver++(2M)
            lam = lambda al_, be_: math.log(al_ / be_)  # noqa: E731
            h = lam(al1, be1) - lam(al, be)
            dd = d if d_prev is None else d + 0.5 * h / h_prev * (d - d_prev)
            x = (be1 / be) * x + al1 * -math.expm1(-h) * dd
            d_prev, h_prev = d, h
    torch.testing.assert_close(ours.cpu().double(), x, rtol=0, atol=3e-5 * x.abs().max().item())
    plain = fastdiff.sample(_big_model, None, cfg, backend=name, device=device,
                            **{k: v for k, v in kw.items() if k != "dynamic_thresholding"})
    assert (plain.cpu() - ours.cpu()).abs().max() > 1e-3


def test_quantile_rows_is_torch_quantile():
    from fastdiff.sampling.features.guidance import quantile_rows

    rows = torch.randn(4, 1001, generator=torch.Generator().manual_seed(0))
    for q in (0.5, 0.9, 0.995, 1.0, 0.0):
        torch.testing.assert_close(quantile_rows(rows, q), torch.quantile(rows, q, dim=1), rtol=0, atol=1e-6)


def test_dynamic_thresholding_is_checked():
    kw = dict(shape=SHAPE, batch_size=2, method="ddim")
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        fastdiff.sample(_model, 3, dynamic_thresholding=1.5, **kw)
    with pytest.raises(ValueError, match="max_value must be a finite number >= 1"):
        fastdiff.sampling.features.guidance.DynamicThresholding(0.9, 0.5)
    with pytest.raises(TypeError, match="dynamic_thresholding must be True, a ratio"):
        fastdiff.sample(_model, 3, dynamic_thresholding="yes", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w,eta,threshold,original,phi", [(7.5, 1.0, 15.0, False, 0.0), (5.0, 0.0, 2.0, False, 0.0),
                                                         (4.0, 0.3, 0.0, True, 0.0), (6.0, 0.5, 3.0, False, 0.7)])
def test_apg_weights_are_diffusers_guider(dtype, w, eta, threshold, original, phi):
    """APG's per-sample weights from the Gram matrix blend to diffusers' AdaptiveProjectedGuidance output on the
    same predictions (no momentum), rescale included."""
    from fastdiff.sampling.features.guidance import APG, apg_reference

    p_null, p_y = _preds(dtype, seed=5)
    p_y = p_y * 3.0  # updates with norms on both sides of the thresholds
    rule = APG(eta=eta, norm_threshold=threshold, original=original)
    ours = _weights_blend(rule, p_null, p_y, w, phi)
    spec = apg_reference(p_null, p_y, w, rule)
    if phi:
        spec = rescale_reference(p_null, p_y, w, phi, spec)
    torch.testing.assert_close(ours, spec, rtol=0, atol=1e-6 * spec.abs().max().item())
    try:
        from diffusers.guiders import AdaptiveProjectedGuidance
    except ImportError:
        return
    guider = AdaptiveProjectedGuidance(guidance_scale=w, adaptive_projected_guidance_rescale=threshold, eta=eta,
                                       guidance_rescale=phi, use_original_formulation=original)
    guider.set_state(step=2, num_inference_steps=10, timestep=torch.tensor(500))
    theirs = guider.forward(p_y.double(), p_null.double()).pred
    torch.testing.assert_close(spec, theirs, rtol=0, atol=1e-6 * spec.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum,method", [(None, "euler"), (-0.5, "euler"), (0.6, "heun")])
def test_apg_loop_is_the_hand_loop(backend, momentum, method):
    """APG in the loop = a hand loop of diffusers' formula; with momentum the running average r = d + m r is
    updated at every guided evaluation (Heun: two per step), as diffusers' MomentumBuffer per guider call."""
    from fastdiff.sampling.features.guidance import APG, apg_reference

    name, device = backend
    if name == "triton" and device == "cpu" and momentum is None:
        pytest.skip("the Triton interpreter runs the momentum cases (the same kernels)")
    seeds, y, grid = [1, 2, 3, 4], torch.tensor([0, 1, 2, 1]), [i / 6 for i in range(7)]
    rule = APG(eta=0.2, norm_threshold=4.0, momentum=momentum)
    ours = fastdiff.sample(_model, 6, 5.0, shape=SHAPE, y=y.to(device), null_y=3, seed=seeds, method=method,
                           guidance=rule, backend=name, device=device)
    x = fastdiff.ops.randn(torch.tensor(seeds), 0, SHAPE).double()
    running = torch.zeros_like(x)

    def guided(x, t):
        nonlocal running
        tt = torch.full((len(seeds),), t)
        p_y = _model(x.float(), tt, y).double()
        p_null = _model(x.float(), tt, torch.full_like(y, 3)).double()
        if momentum is None:
            return apg_reference(p_null, p_y, 5.0, rule)
        running = p_y - p_null + momentum * running
        return apg_reference(p_null, p_y, 5.0, rule, update=running)
    for t, t1 in zip(grid, grid[1:]):
        d = guided(x, t)
        if method == "heun":
            d = 0.5 * (d + guided(x + (t1 - t) * d, t1))
        x = x + (t1 - t) * d
    torch.testing.assert_close(ours.cpu().double(), x, rtol=0, atol=2e-5 * x.abs().max().item())
    with pytest.raises(ValueError, match="momentum must be None or a finite number"):
        APG(momentum=math.inf)


@pytest.mark.parametrize("phi", [0.0, 0.7])
def test_apg_momentum_is_diffusers_guider_over_steps(phi):
    """Three guided evaluations in a row: the running average's weights blend to diffusers' guider output with
    its MomentumBuffer, rescale included."""
    from diffusers.guiders import AdaptiveProjectedGuidance
    from fastdiff.ops.sample_gram import sample_gram_reference
    from fastdiff.sampling.features.guidance import APG

    rule = APG(eta=0.3, norm_threshold=6.0, momentum=-0.5)
    guider = AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_rescale=6.0, eta=0.3,
                                       adaptive_projected_guidance_momentum=-0.5, guidance_rescale=phi)
    running = torch.zeros(4, *SHAPE)
    for step in range(3):
        p_null, p_y = _preds(seed=10 + step)
        running = p_y - p_null + (-0.5) * running
        weights = branch_weights(sample_gram_reference([p_null, p_y, running]), rule, 5.0, phi, torch.empty(4, 3))
        per = (-1, *([1] * len(SHAPE)))
        ours = (weights[:, 0].view(per) * p_null + weights[:, 1].view(per) * (p_y - p_null)
                + weights[:, 2].view(per) * (running - p_null)).double()
        guider.set_state(step=step, num_inference_steps=10, timestep=torch.tensor(500))
        guider.prepare_inputs({"x": (torch.zeros(1), torch.zeros(1))})
        theirs = guider.forward(p_y.double(), p_null.double()).pred
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5 * theirs.abs().max().item())
