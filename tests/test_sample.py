"""fastdiff.sample against analytic oracles (Gaussian mixtures with exact fields), against diffusers'
scheduler loops, and its argument errors. The step backend is the fastest available ("auto")."""

import dataclasses
import math

import pytest
import torch

import fastdiff
from fastdiff.ops.randn import randn
from fastdiff.sampling.sampler import T_MIN_SINGULAR
from fastdiff.mixtures import (GaussianMixture, MixtureModel, assign_modes, class_conditional_mixture, mode_zscores,
                              ring_mixture)

N = 20_000  # samples per oracle run: per-mode weight/mean/covariance standard errors of 1-4 %


def _zmax(z):
    return max(float(z.weights.abs().max()), float(z.means.abs().max()), float(z.covs.abs().max()))


# (method, kwargs, steps, z-score bound). Statistical error is z < 4; the bound adds the method's
# discretization bias at that step count (first-order DDIM at 50 steps shrinks mode covariances ~2 %).
ORACLE_RUNS = [
    ("euler", {}, 100, 5.0),
    ("euler", {"sigma": 1.0}, 100, 5.0),
    ("heun", {}, 30, 5.0),
    ("dpmpp_2m", {}, 20, 5.0),
    ("ddim", {}, 50, 6.0),
]


@pytest.mark.parametrize("method,kwargs,steps,bound", ORACLE_RUNS, ids=[f"{r[0]}{r[1]}" for r in ORACLE_RUNS])
def test_ring_mixture_is_reproduced(method, kwargs, steps, bound):
    mixture = ring_mixture(heterogeneous=True)  # 8 modes, unequal weights, anisotropic covariances
    model = MixtureModel(mixture, "condot", "velocity")
    x = fastdiff.sample(model, steps, shape=(2,), batch_size=N, seed=1, method=method, **kwargs)
    z = mode_zscores(x.double(), mixture)
    assert _zmax(z) < bound, (z.weights, z.means, z.covs)


def _quadratic_grid(steps):
    """Denser towards the data end (t = 1 - (1 - u)^2): VP paths change fast there (beta ~ sqrt(1 - t)),
    and a first-order last step from t = 1 - 1/steps would shrink the modes to the x0-posterior mean."""
    return [1.0 - (1.0 - i / steps) ** 2 for i in range(steps + 1)]


@pytest.mark.parametrize("path,prediction,method,steps,grid", [
    ("vp", "eps", "dpmpp_2m", 25, "quadratic"),
    ("vp-cosine", "x0", "heun", 30, "quadratic"),
    ("condot", "score", "euler", 100, "uniform"),
    ("vp", "velocity", "ddim", 50, "quadratic"),
])
def test_prediction_types_and_paths(path, prediction, method, steps, grid):
    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, prediction)
    timesteps = _quadratic_grid(steps) if grid == "quadratic" else None
    if timesteps is not None and prediction in ("eps", "score") and path == "condot":
        timesteps[0] = 1e-3
    x = fastdiff.sample(model, steps, shape=(2,), batch_size=N, seed=2, method=method, path=path,
                        prediction=prediction, timesteps=timesteps)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


def test_class_conditional_cfg1_samples_the_class():
    mixture = class_conditional_mixture(num_classes=4, modes_per_class=2)
    model = MixtureModel(mixture, "condot", "velocity", null_label=-1)
    y = torch.arange(4).repeat(500)
    x = fastdiff.sample(model, 50, shape=(2,), y=y, seed=3)
    labels = mixture.labels[assign_modes(x.double(), mixture)]
    assert float((labels == y).double().mean()) > 0.995
    # and each class's own mixture is reproduced
    for c in range(4):
        sub = mixture.conditional(c)
        assert _zmax(mode_zscores(x[y == c].double(), sub)) < 5.0


def test_cfg_batched_equals_two_passes_and_uses_one_2b_forward():
    mixture = class_conditional_mixture(num_classes=4, modes_per_class=2)
    model = MixtureModel(mixture, "condot", "velocity", null_label=-1)
    y = torch.arange(4).repeat(8)
    model.reset()
    a = fastdiff.sample(model, 20, cfg=4.0, shape=(2,), y=y, null_y=-1, seed=4)
    assert model.nfe == 20 and set(model.batch_sizes) == {64}
    model.reset()
    b = fastdiff.sample(model, 20, cfg=4.0, shape=(2,), y=y, null_y=-1, seed=4, cfg_batch=False)
    assert model.nfe == 40 and set(model.batch_sizes) == {32}
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # guidance sharpens towards the class: every sample lands on its class
    labels = mixture.labels[assign_modes(a.double(), mixture)]
    assert bool((labels == y).all())


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
def test_guided_result_owns_its_memory_and_is_the_callbacks_last_state(method):
    # the guided state is half of a [2, B, ...] pair; the returned samples must not keep it alive
    mixture = class_conditional_mixture(num_classes=2, modes_per_class=2)
    model = MixtureModel(mixture, "condot", "velocity", null_label=-1)
    y = torch.tensor([0, 1, 1])
    seen = []
    x = fastdiff.sample(model, 6, cfg=2.0, shape=(2,), y=y, null_y=-1, seed=2, method=method,
                        callback=lambda i, t, x, x0: seen.append(x.clone()))
    assert x.untyped_storage().nbytes() == x.numel() * x.element_size()
    assert torch.equal(seen[-1], x)
    noise = randn(torch.arange(2, 5), 0, (2,))  # the initial noise of seeds 2, 3, 4
    torch.testing.assert_close(fastdiff.sample(model, 6, cfg=2.0, y=y, null_y=-1, seed=2, method=method, noise=noise),
                               x, atol=0, rtol=0)


def test_stage_tables_are_reused_only_for_the_same_method_and_settings():
    import sys

    from fastdiff.sampling.core import tables
    methods = sys.modules["fastdiff.sampling.methods.registry"]

    model = MixtureModel(ring_mixture(), "condot", "velocity")
    kw = dict(shape=(2,), batch_size=3, seed=1)
    first = fastdiff.sample(model, 8, sigma=0.5, **kw)
    hits = len(tables.STAGE_CACHE.tables)
    assert torch.equal(fastdiff.sample(model, 8, sigma=0.5, **kw), first)
    assert len(tables.STAGE_CACHE.tables) == hits  # reused
    assert not torch.equal(fastdiff.sample(model, 8, sigma=lambda t: 0.5 * (1 - t), **kw), first)
    # a method registered again under the same name builds its own table
    record, saved = methods.get_method("euler"), dict(methods._REGISTRY)
    try:
        methods.unregister_method("euler")
        methods.register_method("euler", options=record.options, evals_per_step=1, conversions=record.conversions,
                                description=record.description, churn_options=record.churn_options)(lambda *a, **k: [
                                    dataclasses.replace(st, c_noise=0.0) for st in record.build(*a, **k)])
        assert not torch.equal(fastdiff.sample(model, 8, sigma=0.5, **kw), first)
    finally:  # the registry as it was, in its order
        methods._REGISTRY.clear()
        methods._REGISTRY.update(saved)
    assert torch.equal(fastdiff.sample(model, 8, sigma=0.5, **kw), first)


def test_cpu_scratch_buffers_are_reused_but_never_the_returned_samples(monkeypatch):
    from fastdiff.sampling import plan_cache
    from fastdiff.sampling.core.scratch import POOL

    monkeypatch.setattr(plan_cache, "MAX_BYTES", 0)  # calls too large to keep their plan: the pool serves them

    mixture = class_conditional_mixture(num_classes=2, modes_per_class=2)
    model = MixtureModel(mixture, "condot", "velocity", null_label=-1)
    y = torch.tensor([0, 1, 1, 0])
    kw = dict(shape=(2,), y=y, null_y=-1, seed=5, method="heun")
    fastdiff.clear_scratch()
    first = fastdiff.sample(model, 4, cfg=3.0, **kw)
    kept = POOL.nbytes()
    assert kept > 0  # the pair and Heun's stage / side buffers
    second = fastdiff.sample(model, 4, cfg=3.0, **kw)
    assert torch.equal(first, second) and POOL.nbytes() == kept  # taken and given back, not grown
    pooled = {t.untyped_storage().data_ptr() for t in POOL._free}
    assert not pooled & {first.untyped_storage().data_ptr(), second.untyped_storage().data_ptr()}
    unguided = fastdiff.sample(model, 4, **kw)  # the state is the result here: not pooled
    assert unguided.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr() for t in POOL._free}
    fastdiff.clear_scratch()
    assert POOL.nbytes() == 0


def test_scratch_pool_lends_a_buffer_to_one_call_at_a_time_and_keeps_at_most_its_limit():
    from fastdiff.sampling.core.scratch import ScratchPool

    pool = ScratchPool(max_bytes=3 * 4 * 10)
    a = pool.take((2, 5), torch.device("cpu"))
    pool.give([a])
    b, c = pool.take((2, 5), torch.device("cpu")), pool.take((2, 5), torch.device("cpu"))
    assert b is a and c is not a  # a lent buffer is out of the pool
    pool.give([b, c, torch.empty(10), torch.empty(10)])
    assert pool.nbytes() <= 3 * 4 * 10 and all(t is not b for t in pool._free)  # the least recently given left


def test_guidance_interval_runs_one_pass_outside():
    mixture = class_conditional_mixture(num_classes=2, modes_per_class=2)
    model = MixtureModel(mixture, "condot", "velocity", null_label=-1)
    y = torch.tensor([0, 1, 0])
    model.reset()
    fastdiff.sample(model, 10, cfg=3.0, shape=(2,), y=y, null_y=-1, guidance_interval=(0.25, 0.6))
    # grid 0, 0.1, ..., 0.9: guided at 0.3, 0.4, 0.5, 0.6 (batch 6), single elsewhere (batch 3)
    assert model.batch_sizes == [3, 3, 3, 6, 6, 6, 6, 3, 3, 3]


def _single_gaussian():
    return GaussianMixture(means=torch.tensor([[1.0, -2.0]]), covs=torch.tensor([[[0.5, 0.2], [0.2, 0.3]]]))


@pytest.mark.parametrize("method,order,steps", [("euler", 1.0, (8, 16, 32)), ("heun", 2.0, (16, 32, 64))])
def test_convergence_order(method, order, steps):
    g = _single_gaussian()
    model = MixtureModel(g, "condot", "velocity")
    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    exact = g.flow_map(x0.double(), 0.0, 1.0, "condot")
    errors = []
    for n in steps:
        x = fastdiff.sample(model, n, noise=x0, method=method)
        errors.append(float((x.double() - exact).norm(dim=1).mean()))
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(s - order) < 0.25 for s in slopes), (errors, slopes)


@pytest.mark.parametrize("method,options,path,prediction,order", [
    ("dpmpp_2m", {}, "condot", "velocity", 2.0), ("dpm_2", {}, "vp", "eps", 2.0),
    ("unipc", dict(order=2), "vp", "eps", 2.0), ("unipc", dict(order=3, lower_order_final=False), "condot", "velocity", 3.0),
    ("lms", dict(order=4), "vp", "eps", 3.5), ("dpmpp_3m_sde", dict(eta=0.0), "condot", "velocity", 3.0)])
def test_convergence_order_of_the_higher_order_methods(method, options, path, prediction, order):
    """Error against the exact flow map of a Gaussian on [0.05, 0.95] (no singular end), 16 -> 32 -> 64 steps:
    the slopes of log error are the methods' orders (warm-up steps of the multistep methods cost a little:
    LMS order 4 measures 3.6-3.9 on VP)."""
    g = _single_gaussian()
    model = MixtureModel(g, path, prediction)
    p = fastdiff.paths.get_path(path)
    t0, t1 = 0.05, 0.95
    al, be = p.coefficients(t0)[:2]
    x0 = (be * torch.randn(256, 2, generator=torch.Generator().manual_seed(0)).double()
          + al * torch.tensor([1.0, -2.0], dtype=torch.float64))
    exact = g.flow_map(x0, t0, t1, path)
    errors = []
    for n in (16, 32, 64):
        grid = [t0 + (t1 - t0) * i / n for i in range(n + 1)]
        x = fastdiff.sample(model, None, noise=x0.float(), path=path, prediction=prediction, method=method,
                            timesteps=grid, **options)
        errors.append(float((x.double() - exact).norm(dim=1).mean()))
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(s > order - 0.45 for s in slopes) and max(slopes) < order + 1.0, (errors, slopes)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_sample_of_batch_equals_seed_alone(sigma):
    model = MixtureModel(ring_mixture(), "condot", "velocity")
    batch = fastdiff.sample(model, 25, shape=(2,), batch_size=16, seed=100, sigma=sigma)
    alone = fastdiff.sample(model, 25, shape=(2,), batch_size=1, seed=105, sigma=sigma)
    torch.testing.assert_close(batch[5:6], alone, atol=1e-6, rtol=0)
    per_sample = fastdiff.sample(model, 25, shape=(2,), batch_size=2, seed=[105, 7], sigma=sigma)
    torch.testing.assert_close(per_sample[:1], alone, atol=1e-6, rtol=0)


def test_backends_agree():
    model = MixtureModel(ring_mixture(), "condot", "velocity")
    kw = dict(shape=(2,), batch_size=64, seed=9, sigma=0.7)
    ref = fastdiff.sample(model, 30, backend="reference", **kw)
    for name, st in fastdiff.backends().items():
        if st.available and name != "reference" and (name != "triton" or torch.cuda.is_available()):
            torch.testing.assert_close(fastdiff.sample(model, 30, backend=name, **kw), ref, atol=1e-4, rtol=0)


def test_callback_progress_and_custom_grid():
    model = MixtureModel(ring_mixture(), "condot", "velocity")
    seen = []
    grid = [0.0, 0.1, 0.3, 0.6, 1.0]
    x = fastdiff.sample(model, None, shape=(2,), batch_size=4, timesteps=grid, progress=True,
                        callback=lambda i, t, x, x0: seen.append((i, t, x0.clone())))
    assert [(i, t) for i, t, _ in seen] == [(0, 0.1), (1, 0.3), (2, 0.6), (3, 1.0)]
    assert x.shape == (4, 2)
    assert all(torch.isfinite(x0).all() for _, _, x0 in seen)


# ---- peers -----------------------------------------------------------------------------------------

def test_euler_matches_diffusers_flow_match_euler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(12)
    sigmas = sched.sigmas.double()  # 1 (noise) ... 0 (data); flow time t = 1 - sigma
    model = MixtureModel(ring_mixture(heterogeneous=True), "condot", "velocity")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        u = model(x, torch.full((64,), 1.0 - float(sigmas[i])), None)
        x = sched.step(-u, t, x).prev_sample  # diffusers' flow output is eps - x0 = -u
    ours = fastdiff.sample(model, None, noise=noise, timesteps=(1.0 - sigmas).tolist(), method="euler")
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=0)


def test_ddim_matches_diffusers_ddim_with_its_alphas_as_a_path():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True,
                                    prediction_type="epsilon")
    steps = 20
    sched.set_timesteps(steps)
    table = torch.cat([torch.ones(1, dtype=torch.float64), sched.alphas_cumprod.double()])  # k = -1 .. 999

    def abar(t):  # flow time t <-> train step k = 1000 (1 - t) - 1, linear in between
        t = torch.as_tensor(t, dtype=torch.float64)
        pos = (1000.0 * (1.0 - t)).clamp(0, 1000)
        lo = pos.floor().clamp(max=999)
        return table[lo.long()] + (pos - lo) * (table[(lo + 1).long()] - table[lo.long()])

    path = fastdiff.paths.UserPath(alpha=lambda t: abar(t).sqrt(), beta=lambda t: (1 - abar(t)).sqrt())
    ks = sched.timesteps.tolist() + [-1]
    grid = [1.0 - (k + 1) / 1000.0 for k in ks]
    model = MixtureModel(ring_mixture(heterogeneous=True), path, "eps")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(6))
    x = noise.clone()
    for k, t in zip(ks, grid):
        if k < 0:
            break
        eps = model(x, torch.full((64,), t), None)
        x = sched.step(eps, k, x, eta=0.0).prev_sample
    ours = fastdiff.sample(model, None, noise=noise, timesteps=grid, method="ddim", path=path, prediction="eps")
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=0)


# ---- errors ----------------------------------------------------------------------------------------

def _model(x, t, y):
    return torch.zeros_like(x)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(steps=0), ValueError, "steps must be >= 1"),
    (dict(cfg=2.0, y=torch.zeros(2)), ValueError, "null_y"),
    (dict(steps=None, timesteps=[0.0, 0.5, 0.4, 1.0]), ValueError, "strictly increasing"),
    (dict(steps=None, timesteps=[0.0, 0.5, 1.5]), ValueError, r"\[0, 1\]"),
    (dict(steps=3, timesteps=[0.0, 1.0]), ValueError, "steps \\+ 1"),
    (dict(sigma=-1.0), ValueError, r"sigma must be in \[0, 1000\]"),
    (dict(sigma=2.0 ** 31), ValueError, r"sigma must be in \[0, 1000\]"),
    (dict(sigma=lambda t: -t - 1), ValueError, "sigma"),
    (dict(method="rk4"), ValueError, "method='rk4'"),
    (dict(prediction="noise"), ValueError, "prediction"),
    (dict(path="edm"), ValueError, "path"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(eta=2.0, method="ddim"), ValueError, "eta"),
    (dict(sigma=1.0, method="heun"), ValueError, "sigma applies"),
    # each of these was once accepted silently or reported with Python's internals
    (dict(eta=float("nan"), method="ddim"), ValueError, "eta"),
    (dict(batch_size=2.7), TypeError, "batch_size must be an int"),
    (dict(batch_size=-1), ValueError, "batch_size must be >= 0"),
    (dict(steps=10**12), ValueError, "steps=1000000000000 is more than"),
    (dict(steps=None, timesteps=torch.rand(2, 3)), ValueError, "timesteps must be 1-D"),
    (dict(steps=None, timesteps=[[0.0, 1.0]]), TypeError, r"timesteps\[0\] must be a float"),
    (dict(guidance_interval=(0.1, 0.5, 0.9), cfg=2.0, y=torch.zeros(2), null_y=0.0), TypeError,
     "guidance_interval must be a pair"),
    (dict(y=torch.tensor(3), batch_size=None), ValueError, "y must hold one label per sample"),
    (dict(cfg=2.0, y=torch.tensor([1, 2]), null_y=9.7), TypeError, "null_y must be a label of y's kind"),
    (dict(cfg=2.0, y=[1, 2], null_y=[0, 0, 0]), ValueError, "null_y holds 3 labels but the batch has 2"),
    (dict(sigma=lambda t: -1.0), ValueError, r"sigma\(t\) must be in \[0, 1000\]"),
    (dict(sigma=lambda t: torch.full((2,), 0.5)), TypeError, r"sigma\(t\) must return one number per time"),
    (dict(sigma=lambda t: "0.5"), TypeError, r"sigma\(t\) must return a float"),
])
def test_bad_arguments(kwargs, exc, match):
    args = dict(steps=5, shape=(3,), batch_size=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        fastdiff.sample(_model, args.pop("steps"), **args)


def test_sigma_errors_are_not_blamed_on_the_grid():
    for sigma in (lambda t: -1.0, lambda t: torch.full((2,), 0.5)):
        with pytest.raises((ValueError, TypeError)) as info:
            fastdiff.sample(_model, 5, shape=(3,), batch_size=2, sigma=sigma)
        assert "singular" not in str(info.value)


def test_empty_batches_and_samples_return_empty_without_calling_the_model():
    def model(x, t, y):
        raise AssertionError("the model must not be called for an empty batch")

    assert fastdiff.sample(model, 5, shape=(3,), batch_size=0).shape == (0, 3)
    assert fastdiff.sample(model, 5, shape=(0, 4), batch_size=2, sigma=1.0).shape == (2, 0, 4)
    assert fastdiff.sample(model, 5, cfg=3.0, y=torch.zeros(0, dtype=torch.long), null_y=1, shape=(2,)).shape == (0, 2)


def test_sampling_keeps_no_autograd_graph():
    lin = torch.nn.Linear(3, 3)
    grad_modes = []

    def model(x, t, y):
        grad_modes.append(torch.is_grad_enabled())
        return lin(x)

    x = fastdiff.sample(model, 4, shape=(3,), batch_size=2, method="heun")
    assert grad_modes and not any(grad_modes)
    assert not x.requires_grad and x.grad_fn is None


def test_bad_model_outputs_name_step_and_t():
    with pytest.raises(ValueError, match=r"step 0 \(t=0\).*shape \(2, 4\)"):
        fastdiff.sample(lambda x, t, y: torch.zeros(2, 4), 5, shape=(3,), batch_size=2)
    with pytest.raises(TypeError, match="dtype torch.float64"):
        fastdiff.sample(lambda x, t, y: torch.zeros_like(x, dtype=torch.float64), 5, shape=(3,), batch_size=2)
    with pytest.raises(TypeError, match="must return a tensor"):
        fastdiff.sample(lambda x, t, y: None, 5, shape=(3,), batch_size=2)

    def nan_late(x, t, y):
        return torch.full_like(x, float("nan")) if float(t[0]) >= 0.6 else torch.zeros_like(x)

    with pytest.raises(FloatingPointError, match=r"step 3 \(t=0.6\)"):
        fastdiff.sample(nan_late, 5, shape=(3,), batch_size=2)


def test_eps_model_under_condot_starts_after_t0():
    seen = []

    def model(x, t, y):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    fastdiff.sample(model, 4, shape=(1,), batch_size=1, prediction="eps")
    assert seen[0] == pytest.approx(T_MIN_SINGULAR)
    with pytest.raises(ValueError, match="singular"):
        fastdiff.sample(model, None, shape=(1,), batch_size=1, prediction="eps", timesteps=[0.0, 0.5, 1.0])


@pytest.mark.cuda
def test_cuda_graph_replay_matches_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    lin = torch.nn.Linear(8, 8).cuda()

    def model(x, t, y):
        return lin(x) * t[:, None]

    kw = dict(shape=(8,), batch_size=32, sigma=0.5, device="cuda")
    eager = fastdiff.sample(model, 20, seed=11, **kw)
    first = fastdiff.sample(model, 20, seed=11, cuda_graph=True, **kw)
    replay = fastdiff.sample(model, 20, seed=12, cuda_graph=True, **kw)
    torch.testing.assert_close(first, eager)
    torch.testing.assert_close(replay, fastdiff.sample(model, 20, seed=12, **kw))


@pytest.mark.parametrize("method,steps", [("dpmpp_2m", 40), ("heun", 60), ("euler", 150)])
def test_ve_path_on_a_karras_grid_reproduces_the_mixture(method, steps):
    """The VE / EDM family: x0 model, Karras rho = 7 noise levels as the time grid. The start is
    sigma_max eps without the data (as in k-diffusion), so sigma_max must dwarf the data: 400 for modes
    at radius 4 (with 80 the ~5 % shift of the start shows in the mode weights at N = 20000)."""
    from fastdiff import schedules

    path, grid = schedules.ve_grid(schedules.karras_sigmas(steps, 0.002, 400.0))
    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, "x0")
    x = fastdiff.sample(model, None, shape=(2,), batch_size=N, seed=3, method=method, path=path, prediction="x0",
                        timesteps=grid)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0
