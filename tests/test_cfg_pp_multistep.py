"""guidance="cfg_pp" on the multistep and two-stage methods (fastdiff.sampling.features.guidance: Stage.side_blend,
Stage.cfg_pp_form): dpmpp_2m, dpmpp_2s_ancestral, res_multistep, res_multistep_ancestral, gradient_estimation.

ComfyUI does not install here: each is checked against a short float64 torch loop of ComfyUI's *_cfg_pp sampler
written below from comfy/k_diffusion/sampling.py (sample_dpmpp_2m_cfg_pp, sample_dpmpp_2s_ancestral_cfg_pp,
res_multistep with cfg_pp=True, sample_gradient_estimation_cfg_pp), in k-diffusion's sigma = beta / alpha on
y = x / alpha (on the VE path: ComfyUI's EPS form itself), with D the guided x0 and U the unconditional one
(ComfyUI's post-CFG ``uncond_denoised``), on the same exact two-branch model (a labelled mixture with y and null_y),
grid (VE from Karras sigmas; CondOT) and noise (fastdiff's in-kernel streams, or a caller's step_noise); the
backends agree; plain CFG is unchanged by the CFG++ fields (the same stages without them); with agreeing branches
it is the method itself; rescale, a guidance interval, two conditions, callbacks, a Sampler object and a CUDA graph
capture (its CPU recorder) work with the side calls."""

import dataclasses
import math

import pytest
import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, class_conditional_mixture
from fastdiff.paths import get_path
from fastdiff.sampling.core.stage import draw_stream
from fastdiff.schedules import karras_sigmas, ve_grid
from conftest import BACKENDS

NULL = -1
W = 1.6  # (CFG++ is meant for small scales)


# ---- ComfyUI's *_cfg_pp samplers, float64, in sigma = beta / alpha on y = x / alpha --------------------------------

class _Model:
    """D (guided) and U (unconditional) x0 predictions of the mixture model at the state x = alpha y, float64."""

    def __init__(self, model, path, prediction, y, w):
        self.model, self.path, self.prediction, self.y, self.w = model, path, prediction, y, w

    def __call__(self, y_state, t):
        al, be = self.path.coefficients(t)[:2]
        x = al * y_state
        tt = torch.full((x.shape[0],), t, dtype=torch.float64)
        out = [self.model(x.float(), tt.float(), lab).double() for lab in (torch.full_like(self.y, NULL), self.y)]
        if self.prediction != "x0":  # eps: x0 = (x - beta eps) / alpha
            out = [(x - be * p) / al for p in out]
        u, c = out
        return u + self.w * (c - u), u


def _sigmas(path, ts):
    return [path.coefficients(t)[1] / path.coefficients(t)[0] for t in ts]


def _time(path, ts, sigma):
    """The flow time of a noise level (exact on VE; bisection between grid times elsewhere)."""
    from fastdiff.sampling.methods.sigma_space import time_at
    return time_at(path, sigma, ts[0], ts[-1])


def _ancestral(s, s1, eta):
    if not eta:
        return s1, 0.0
    up = min(s1, eta * (s1 ** 2 * (s ** 2 - s1 ** 2) / s ** 2) ** 0.5)
    return (s1 ** 2 - up ** 2) ** 0.5, up


def _dpmpp_2m_cfg_pp(m, path, ts, y, noise):
    sig = _sigmas(path, ts)
    old_u = None
    for i in range(len(ts) - 1):
        d, u = m(y, ts[i])
        h = math.log(sig[i] / sig[i + 1]) if sig[i + 1] > 0 else math.inf
        e = math.exp(-h)
        if old_u is None or sig[i + 1] == 0:
            mix = -e * u
        else:
            r = math.log(sig[i - 1] / sig[i]) / h
            mix = -e * u - math.expm1(-h) * (1 / (2 * r)) * (d - old_u)
        y = d + mix + e * y
        old_u = u
    return path.coefficients(ts[-1])[0] * y


def _dpmpp_2s_ancestral_cfg_pp(m, path, ts, y, noise, eta=1.0, s_noise=1.0):
    sig = _sigmas(path, ts)
    for i in range(len(ts) - 1):
        d, u = m(y, ts[i])
        guidance_vector = d - u
        down, up = _ancestral(sig[i], sig[i + 1], eta)
        if down == 0:
            y = u  # x + d (sigma_down - sigma) with d = (x - U) / sigma
        else:
            h = math.log(sig[i] / down)
            s = math.exp(-0.5 * h) * sig[i]  # sigma_fn(t + h / 2)
            y_2 = (s / sig[i]) * y - math.expm1(-0.5 * h) * u
            _, u_2 = m(y_2, _time(path, ts, s))
            y = (down / sig[i]) * y - math.expm1(-h) * u_2
        if sig[i + 1] > 0:
            y = y + noise(i) * s_noise * up
        y = y + guidance_vector
    return path.coefficients(ts[-1])[0] * y


def _res_multistep_cfg_pp(m, path, ts, y, noise, eta=0.0, s_noise=1.0):
    sig = _sigmas(path, ts)
    old_u, old_down = None, None
    for i in range(len(ts) - 1):
        d, u = m(y, ts[i])
        down, up = _ancestral(sig[i], sig[i + 1], eta)
        if down == 0 or old_u is None:
            y = d + (y - u) / sig[i] * down
        else:
            t, t_old, t_next, t_prev = (-math.log(v) for v in (sig[i], old_down, down, sig[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            y = y + (d - u)
            y = math.exp(-h) * y + h * (b1 * u + b2 * old_u)
        if sig[i + 1] > 0:
            y = y + noise(i) * s_noise * up
        old_u, old_down = u, down
    return path.coefficients(ts[-1])[0] * y


def _gradient_estimation_cfg_pp(m, path, ts, y, noise, ge_gamma=2.0):
    sig = _sigmas(path, ts)
    old_d = None
    for i in range(len(ts) - 1):
        d, u = m(y, ts[i])
        slope = (y - u) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            y = d
        else:
            y = d + slope * sig[i + 1]
            if i >= 1:
                y = y + (ge_gamma - 1) * (slope - old_d) * dt
        old_d = slope
    return path.coefficients(ts[-1])[0] * y


REFERENCES = {"dpmpp_2m": _dpmpp_2m_cfg_pp, "dpmpp_2s_ancestral": _dpmpp_2s_ancestral_cfg_pp,
              "res_multistep": _res_multistep_cfg_pp,
              "res_multistep_ancestral": lambda *a, eta=1.0, **kw: _res_multistep_cfg_pp(*a, eta=eta, **kw),
              "gradient_estimation": _gradient_estimation_cfg_pp}

CASES = [("dpmpp_2m", {}), ("dpmpp_2s_ancestral", {}), ("dpmpp_2s_ancestral", dict(eta=0.5, s_noise=0.8)),
         ("res_multistep", {}), ("res_multistep_ancestral", {}),
         ("res_multistep_ancestral", dict(eta=0.5, s_noise=0.8)),
         ("gradient_estimation", {}), ("gradient_estimation", dict(ge_gamma=1.5))]


def _setup(grid, prediction, steps=8, n=48):
    if grid == "ve":
        path, ts = ve_grid(karras_sigmas(steps, 0.02, 40.0))
    else:
        path, ts = get_path("condot"), [0.02 + 0.98 * (i / steps) ** 1.3 for i in range(steps + 1)]
    model = MixtureModel(class_conditional_mixture(std=0.8), path, prediction, null_label=NULL)
    al, be = path.coefficients(ts[0])[:2]
    g = torch.Generator().manual_seed(1)
    x = al * 4.0 * torch.randn(n, 2, generator=g, dtype=torch.float64) + be * torch.randn(n, 2, generator=g,
                                                                                           dtype=torch.float64)
    labels = torch.arange(n) % 4
    return path, ts, model, x, labels


def _reference(method, path, ts, model, prediction, x, labels, noise, w=W, **options):
    m = _Model(model, path, prediction, labels, w)
    return REFERENCES[method](m, path, ts, x / path.coefficients(ts[0])[0], noise, **options)


def _streams(seeds, shape=(2,)):
    """fastdiff's in-kernel draw of step i (stream draw_stream(i)): the reference adds sigma_up xi to y = x / alpha,
    fastdiff alpha' sigma_up xi to x."""
    return lambda i: fastdiff.ops.randn(seeds, draw_stream(i), shape).double()


@pytest.mark.parametrize("grid,prediction", [("ve", "x0"), ("ve", "eps"), ("condot", "eps")])
@pytest.mark.parametrize("method,options", CASES)
def test_matches_comfyuis_cfg_pp_loop(grid, prediction, method, options):
    """fastdiff's guidance="cfg_pp" and ComfyUI's *_cfg_pp loop on the same model, grid and noise: the same samples
    to fp32 rounding (1e-5 of max |x|; measured <= 2e-6 on the reference backend)."""
    path, ts, model, x, labels = _setup(grid, prediction)
    seeds = list(range(len(x)))
    ours = fastdiff.sample(model, None, W, noise=x.float(), seed=seeds, path=path, prediction=prediction,
                           method=method, timesteps=ts, y=labels, null_y=NULL, guidance="cfg_pp", **options)
    theirs = _reference(method, path, ts, model, prediction, x, labels, _streams(seeds), **options)
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())
    plain = fastdiff.sample(model, None, W, noise=x.float(), seed=seeds, path=path, prediction=prediction,
                            method=method, timesteps=ts, y=labels, null_y=NULL, **options)
    assert (plain - ours).abs().max() > 1e-2  # (CFG++ is another sampler)


def test_a_callers_step_noise_is_comfyuis_noise_sampler():
    """The ancestral ones draw once per step: step_noise(i, 0) is ComfyUI's noise_sampler(sigma_i, sigma_i+1)."""
    path, ts, model, x, labels = _setup("ve", "eps")
    g = torch.Generator().manual_seed(7)
    drawn = [torch.randn(len(x), 2, generator=g) for _ in ts]
    for method in ("dpmpp_2s_ancestral", "res_multistep_ancestral"):
        ours = fastdiff.sample(model, None, W, noise=x.float(), path=path, prediction="eps", method=method,
                               timesteps=ts, y=labels, null_y=NULL, guidance="cfg_pp",
                               step_noise=lambda i, j: drawn[i], eta=0.8)
        theirs = _reference(method, path, ts, model, "eps", x, labels, lambda i: drawn[i].double(), eta=0.8)
        torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,options", CASES[::2] + [("res_multistep_ancestral", {}), ("dpmpp_2s_ancestral", {})])
def test_backends_agree(backend, method, options):
    """reference, cpu and triton (its CPU interpreter: 128 elements) give the same CFG++ samples, rescale's
    per-sample weights included (the side weights made on the device). (A 16-dim linear x0 model: the mixture's
    2-D samples make rescale's per-sample std ill-conditioned.)"""
    from test_cuda_graph import TimeModel

    name, device = backend
    model = TimeModel(dim=16, classes=3).to(device)
    path, ts = ve_grid(karras_sigmas(5, 0.05, 20.0))
    z = 20.0 * torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    kw = dict(seed=list(range(8)), path=path, prediction="x0", method=method, timesteps=ts, null_y=3,
              guidance="cfg_pp", **options)
    for extra in ({}, dict(guidance_rescale=0.7)):
        want = fastdiff.sample(model.cpu(), None, W, noise=z, y=torch.arange(8) % 3, backend="reference", **kw, **extra)
        got = fastdiff.sample(model.to(device), None, W, noise=z.to(device), y=(torch.arange(8) % 3).to(device),
                              backend=name, device=device, **kw, **extra)
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-5 * want.abs().max().item())


def _stripped(monkeypatch, method):
    """The method registered with a builder whose stages have no CFG++ fields (share, side blend, form)."""
    from fastdiff.sampling.methods import registry

    record = registry.get_method(method)

    def build(*args, **kw):
        return [dataclasses.replace(st, cfg_pp=None, side_blend=None, cfg_pp_form=None)
                for st in record.build(*args, **kw)]

    monkeypatch.setitem(registry._REGISTRY, method, dataclasses.replace(record, build=build))


@pytest.mark.parametrize("method,options", CASES)
def test_plain_guidance_is_unchanged(monkeypatch, method, options):
    """Plain CFG (guidance=None, "cfg", rescale) and unguided sampling (cfg = 1, also with guidance="cfg_pp") read
    none of the CFG++ fields: bit for bit the samples of the same stages without them."""
    path, ts, model, x, labels = _setup("condot", "eps", steps=6, n=16)
    kw = dict(noise=x.float(), seed=list(range(16)), path=path, prediction="eps", method=method, timesteps=ts,
              y=labels, null_y=NULL, backend="cpu" if fastdiff.backends()["cpu"] else "reference", **options)
    runs = [dict(cfg=W), dict(cfg=W, guidance="cfg"), dict(cfg=W, guidance_rescale=0.5), dict(cfg=1.0),
            dict(cfg=1.0, guidance="cfg_pp")]
    with_fields = [fastdiff.sample(model, None, **kw, **run) for run in runs]
    _stripped(monkeypatch, method)
    for run, want in zip(runs, with_fields):
        assert torch.equal(fastdiff.sample(model, None, **kw, **run), want), run


def _rescaled(p_null, p_y, w, phi):
    from fastdiff.sampling.features.guidance import rescale_reference
    return rescale_reference(p_null, p_y, w, phi)


@pytest.mark.parametrize("method", ["dpmpp_2m", "dpmpp_2s_ancestral", "gradient_estimation"])
def test_with_rescale_the_guided_x0_is_the_rescaled_one(method):
    """guidance_rescale: D is the rescaled blend (diffusers' rescale_noise_cfg, per sample: the side weights of
    dpmpp_2s_ancestral's guidance vector are made on the device), U the unconditional prediction, as CFG++ with
    rescale is on the one-stage methods; the history stays U. (A 16-dim linear x0 model on VE: the 2-D mixture's
    per-sample std of two numbers makes rescale ill-conditioned.)"""
    from test_cuda_graph import TimeModel

    model, phi, null = TimeModel(dim=16, classes=3), 0.6, 3
    path, ts = ve_grid(karras_sigmas(6, 0.05, 20.0))
    labels = torch.arange(8) % 3
    x = 20.0 * torch.randn(8, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = fastdiff.sample(model, None, W, noise=x.float(), seed=list(range(8)), path=path, prediction="x0",
                           method=method, timesteps=ts, y=labels, null_y=null, guidance="cfg_pp",
                           guidance_rescale=phi)

    def rescaled(y_state, t):  # (D, U) on VE: x = y
        tt = torch.full((8,), t).float()
        with torch.no_grad():
            u, c = (model(y_state.float(), tt, lab).double() for lab in (torch.full_like(labels, null), labels))
        return _rescaled(u, c, W, phi), u

    theirs = REFERENCES[method](rescaled, path, ts, x, _streams(list(range(8)), (16,)))
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("method", ["dpmpp_2m", "dpmpp_2s_ancestral", "res_multistep"])
def test_guidance_interval(method):
    """Outside guidance_interval a stage takes the condition alone: there D = U = p_y (ComfyUI's loop with w = 1 and
    the conditional prediction as the unconditional one); the side calls follow (dpmpp_2s_ancestral's guidance
    vector is then 0, a call of weight 0; the multistep history the one prediction, the stage's own side)."""
    path, ts, model, x, labels = _setup("ve", "eps", steps=6)
    lo, hi = ts[2] - 1e-9, ts[4] + 1e-9
    ours = fastdiff.sample(model, None, W, noise=x.float(), seed=list(range(len(x))), path=path, prediction="eps",
                           method=method, timesteps=ts, y=labels, null_y=NULL, guidance="cfg_pp",
                           guidance_interval=(lo, hi))

    class Interval(_Model):
        def __call__(self, y_state, t):
            d, u = super().__call__(y_state, t)
            if lo <= t <= hi:
                return d, u
            c = u + (d - u) / self.w  # the conditional x0
            return c, c

    m = Interval(model, path, "eps", labels, W)
    theirs = REFERENCES[method](m, path, ts, x, _streams(list(range(len(x)))))
    torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("interval", [None, (0.5, 0.8)])
def test_two_conditions(interval):
    """conditions=[y_1, y_2] with weights: g = p_null + Σ w_k (p_k - p_null), the side blends over three branches;
    outside guidance_interval D = U = p_c, the weights' mean of the conditions (also at a stage of share 0)."""
    path, ts, model, x, labels = _setup("ve", "x0", steps=6)
    other, ws = (labels + 1) % 4, (0.9, 0.5)
    for method in ("dpmpp_2m", "dpmpp_2s_ancestral"):
        ours = fastdiff.sample(model, None, list(ws), noise=x.float(), seed=list(range(len(x))), path=path,
                               prediction="x0", method=method, timesteps=ts, conditions=[labels, other], null_y=NULL,
                               guidance="cfg_pp", guidance_interval=interval)

        class Two(_Model):
            def __call__(self, y_state, t):
                tt = torch.full((y_state.shape[0],), t).float()
                u, c1, c2 = (self.model(y_state.float(), tt, lab).double()
                             for lab in (torch.full_like(labels, NULL), labels, other))
                if interval is not None and not interval[0] <= t <= interval[1]:
                    c = (ws[0] * c1 + ws[1] * c2) / sum(ws)
                    return c, c
                return u + ws[0] * (c1 - u) + ws[1] * (c2 - u), u

        theirs = REFERENCES[method](Two(model, path, "x0", labels, None), path, ts, x,
                                    _streams(list(range(len(x)))))
        torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize("phi", [0.0, 0.5])
def test_callbacks_sampler_objects_and_graph_capture(recorder, phi):
    """A callback sees each step's guided x0 (step 0: D = p_null + w (p_y - p_null), rescaled) and leaves the samples
    alone; a Sampler and sample()'s plan cache give sample()'s samples bit for bit; a CUDA graph capture of the side
    calls (its CPU recorder: no host copies, no syncs, only live tensors read) replays them bit for bit."""
    from test_cuda_graph import TimeModel

    model = TimeModel(dim=6, classes=3)
    path, ts = ve_grid(karras_sigmas(6, 0.05, 20.0))
    y = torch.tensor([0, 1, 2, 1, 0])
    z = 20.0 * torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    kw = dict(noise=z, y=y, null_y=3, cfg=1.4, guidance="cfg_pp", guidance_rescale=phi, path=path, prediction="x0",
              timesteps=ts, backend="cpu" if fastdiff.backends()["cpu"] else "reference")
    with torch.no_grad():
        tt = torch.full((5,), ts[0])
        u, c = model(z, tt, torch.full_like(y, 3)).double(), model(z, tt, y).double()
    d0 = _rescaled(u, c, 1.4, phi) if phi else u + 1.4 * (c - u)
    for method in ("dpmpp_2m", "dpmpp_2s_ancestral", "res_multistep_ancestral", "gradient_estimation"):
        want = fastdiff.sample(model, None, method=method, seed=3, **kw)
        seen = []
        got = fastdiff.sample(model, None, method=method, seed=3, callback=lambda i, t, x, x0: seen.append(x0.clone()),
                              **kw)
        assert torch.equal(got, want) and len(seen) == 6
        torch.testing.assert_close(seen[0].double(), d0, rtol=0, atol=1e-5 * d0.abs().max().item())
        sampler = fastdiff.Sampler(model, None, method=method, **kw)
        for _ in range(2):
            assert torch.equal(sampler(seed=3), want)
        assert torch.equal(fastdiff.sample(model, None, method=method, seed=3, **kw), want)  # (the plan cache's)
        for _ in range(2):
            assert torch.equal(fastdiff.sample(model, None, method=method, seed=3, cuda_graph=True, **kw), want)
    assert recorder.captures == 4 and recorder.replays >= 4


def test_thresholding_with_a_carried_guidance_vector_is_refused():
    """dpmpp_2s_ancestral's CFG++ carries its first evaluation's D - U unthresholded: refused with thresholding; the
    multistep ones (history U, D thresholded through the clean estimate) run."""
    path, ts, model, x, labels = _setup("ve", "eps", steps=4, n=8)
    kw = dict(noise=x.float(), path=path, prediction="eps", timesteps=ts, y=labels, null_y=NULL, guidance="cfg_pp",
              dynamic_thresholding=True)
    with pytest.raises(ValueError, match="guidance='cfg_pp' on this method carries a guidance vector"):
        fastdiff.sample(model, None, W, method="dpmpp_2s_ancestral", **kw)
    assert torch.isfinite(fastdiff.sample(model, None, W, method="res_multistep", **kw)).all()


@pytest.mark.parametrize("method,options", CASES)
def test_with_agreeing_branches_it_is_the_method(method, options):
    """Where the unconditional branch is the conditional one (null_y = y), D = U and every CFG++ step is the
    method's own: the samples of unguided conditional sampling (cfg = 1) to fp32 rounding, for any scale."""
    path, ts, model, x, labels = _setup("condot", "eps", steps=6, n=16)
    kw = dict(noise=x.float(), seed=list(range(16)), path=path, prediction="eps", method=method, timesteps=ts,
              y=labels, **options)
    want = fastdiff.sample(model, None, 1.0, **kw)
    got = fastdiff.sample(model, None, 2.5, null_y=labels, guidance="cfg_pp", **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
