"""The feature pairs the plan made possible (issue: the sampler as a plan of composable features), each checked by an
identity where one exists and against a hand-written loop otherwise, on every backend that runs here:

- several conditions with any rule, rescale, interval or schedule: K identical conditions are one condition with the
  summed weight; two different ones are the rule on (p_null, p_c, W), p_c = Σ (w_k / W) p_k (a hand loop);
- classifier guidance with anything: the same as sampling a model that adds λ(t) s ∇ log p(y | x) itself;
- thresholding with CFG++ / rescale + CFG++ / per-sample churn: hand loops and batch independence;
- per-sample churn with any feature: sample b is the batch-1 run with its own setting and seed;
- the corrector with step noise, RePaint with step noise and per-sample churn: identities and the known region;
- img2img at strength 1 with anything is that thing from noise (alpha_0 = 0 on CondOT), bit for bit;
- CFG++ for euler is ComfyUI's euler_cfg_pp: x' = x0(g) + sigma' eps(p_null);
- the new combinations under cuda_graph on the CPU recorder stand-in (tests/graph_recorder.py).
"""

import pytest
import torch

import fastdiff
from fastdiff.ops.randn import randn
from fastdiff.paths import affine_coefficients, get_path
from fastdiff.sampling.features.guidance import apg_reference, rescale_reference, zero_star_reference
from fastdiff.sampling.features.thresholding import DynamicThresholding

from combination_matrix import gaussian_classifier, gaussian_velocity_model as model

BACKENDS = [b for b in ("cpu", "reference", "triton") if fastdiff.backends()[b]]
SHAPE, B, STEPS = (2, 3), 3, 6
BROWNIAN_STEPS = 3  # with step_noise="brownian": its sums' launches cost the Triton interpreter ~2.5x the steps'
Y = torch.tensor([0, 1, 2])
Y2 = torch.tensor([2, 0, 1])
NULL = 3


def _close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def kw(backend, **more):
    return dict(shape=SHAPE, seed=3, backend=backend, **more)


# ---- several conditions -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("feature", [dict(guidance="apg"), dict(guidance="cfg_zero_star"), dict(guidance="cfg_pp"),
                                     dict(guidance_rescale=0.7), dict(guidance_interval=(0.2, 0.7)),
                                     dict(guidance=fastdiff.sampling.features.guidance.APG(momentum=-0.5))],
                         ids=["apg", "cfg_zero_star", "cfg_pp", "rescale", "interval", "apg_momentum"])
@pytest.mark.parametrize("method", ["euler", "euler_ancestral"])
def test_identical_conditions_are_one_condition_with_the_summed_weight(backend, feature, method):
    one = fastdiff.sample(model, STEPS, 2.5, y=Y, null_y=NULL, method=method, **kw(backend, **feature))
    two = fastdiff.sample(model, STEPS, (1.0, 1.5), conditions=[Y, Y], null_y=NULL, method=method,
                          **kw(backend, **feature))
    _close(two, one)


def test_one_condition_is_y_with_any_rule(backend):
    for feature in (dict(guidance="apg"), dict(guidance_rescale=0.5), dict(guidance_interval=(0.3, 0.9))):
        assert torch.equal(fastdiff.sample(model, STEPS, 2.0, conditions=[Y], null_y=NULL, **kw(backend, **feature)),
                           fastdiff.sample(model, STEPS, 2.0, y=Y, null_y=NULL, **kw(backend, **feature)))


def test_a_schedule_weighs_every_condition(backend):
    def w(t):
        return 1.0 + t
    two = fastdiff.sample(model, STEPS, w, conditions=[Y, Y], null_y=NULL, **kw(backend))
    one = fastdiff.sample(model, STEPS, lambda t: 2.0 * w(t), y=Y, null_y=NULL, **kw(backend))
    _close(two, one)


def _hand_euler(blend, steps=STEPS, seed=3):
    """Euler on CondOT from the sampler's own initial noise: x' = x + h blend(x, t)."""
    x = randn(torch.arange(seed, seed + B), 0, SHAPE).double()  # the initial noise (beta_0 = 1 on CondOT)
    grid = [i / steps for i in range(steps + 1)]
    for t, t1 in zip(grid, grid[1:]):
        x = x + (t1 - t) * blend(x.float(), torch.full((B,), t)).double()
    return x.float()


@pytest.mark.parametrize("rule", ["rescale", "apg", "cfg_zero_star"])
def test_two_conditions_with_a_rule_act_on_their_weighted_mean(backend, rule):
    w = (2.0, 1.0)
    W, a = sum(w), [wk / sum(w) for wk in w]
    feature = {"rescale": dict(guidance_rescale=0.6), "apg": dict(guidance="apg"),
               "cfg_zero_star": dict(guidance=fastdiff.sampling.features.guidance.CFGZeroStar(zero_init_steps=0))}[rule]

    def blend(x, t):
        p_null = model(x, t, torch.full((B,), NULL))
        p_c = a[0] * model(x, t, Y).double() + a[1] * model(x, t, Y2).double()
        if rule == "rescale":
            return rescale_reference(p_null, p_c, W, 0.6)
        if rule == "apg":
            return apg_reference(p_null, p_c, W, fastdiff.sampling.features.guidance.APG())
        return zero_star_reference(p_null, p_c, W)

    got = fastdiff.sample(model, STEPS, w, conditions=[Y, Y2], null_y=NULL, **kw(backend, **feature))
    _close(got, _hand_euler(blend), 1e-4)


def test_outside_the_interval_two_conditions_take_their_weighted_mean(backend):
    w = (2.0, 1.0)
    a = [wk / sum(w) for wk in w]

    def blend(x, t):
        p_c = a[0] * model(x, t, Y).double() + a[1] * model(x, t, Y2).double()
        if 0.3 <= float(t[0]) <= 0.6:
            p_null = model(x, t, torch.full((B,), NULL)).double()
            return p_null + w[0] * (model(x, t, Y).double() - p_null) + w[1] * (model(x, t, Y2).double() - p_null)
        return p_c

    for cfg_batch in (True, False):
        got = fastdiff.sample(model, STEPS, w, conditions=[Y, Y2], null_y=NULL, guidance_interval=(0.3, 0.6),
                              cfg_batch=cfg_batch, **kw(backend))
        _close(got, _hand_euler(blend), 1e-4)


def test_condition_weights_summing_to_zero_are_refused_where_a_rule_needs_their_mean():
    with pytest.raises(ValueError, match="sum to 0"):
        fastdiff.sample(model, STEPS, (1.0, -1.0), conditions=[Y, Y2], null_y=NULL, guidance="apg", shape=SHAPE)
    # plain CFG needs no mean: g = p_null + (p_1 - p_null) - (p_2 - p_null)
    assert torch.isfinite(fastdiff.sample(model, STEPS, (1.0, -1.0), conditions=[Y, Y2], null_y=NULL,
                                          shape=SHAPE)).all()


# ---- classifier guidance with anything ----------------------------------------------------------------------

def guided_model(path, prediction, scale=1.0, labels=Y):
    """The model with classifier guidance folded in: p + λ(t) s ∇ log softmax(classifier)[labels], λ the score's
    coefficient in the prediction (what the fused step adds through its history term)."""
    path = get_path(path)

    def m(x, t, y):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            target = labels.repeat(x.shape[0] // len(labels)).view(-1, 1)  # a batched guided call: every branch
            picked = torch.log_softmax(gaussian_classifier(xg, t).float(), -1).gather(1, target).sum()
            grad = torch.autograd.grad(picked, xg)[0]
        lam = torch.tensor([affine_coefficients(path, float(tb), "score", prediction)[1] for tb in t],
                           dtype=torch.float32).view(-1, *([1] * (x.dim() - 1)))
        return model(x, t, y) + lam * scale * grad

    return m


@pytest.mark.parametrize("feature", [dict(dynamic_thresholding=True), dict(corrector_steps=1),
                                     dict(method="heun", s_churn=[0.0, 0.8, 0.3], s_tmax=10.0),
                                     dict(init=torch.linspace(-1, 1, 18).view(3, 2, 3), strength=0.7),
                                     dict(init=torch.linspace(-1, 1, 18).view(3, 2, 3), resample=2,
                                          known_mask=torch.tensor([True, False, True]))],
                         ids=["thresholding", "corrector", "per_sample_churn", "img2img", "repaint"])
def test_classifier_guidance_is_a_model_that_adds_the_gradient(backend, feature):
    start = dict(timesteps=[0.02 + 0.98 * i / STEPS for i in range(STEPS + 1)], steps=None)  # the score is finite
    got = fastdiff.sample(model, **start, y=Y, classifier=gaussian_classifier, **kw(backend, **feature))
    want = fastdiff.sample(guided_model("condot", "velocity"), **start, y=Y, **kw(backend, **feature))
    _close(got, want, 1e-4)


def test_classifier_guidance_with_conditions_reads_classifier_y(backend):
    start = dict(timesteps=[0.02 + 0.98 * i / STEPS for i in range(STEPS + 1)], steps=None)
    got = fastdiff.sample(model, **start, cfg=(2.0, 1.0), conditions=[Y, Y2], null_y=NULL, classifier=gaussian_classifier,
                          classifier_y=Y2, **kw(backend))
    want = fastdiff.sample(guided_model("condot", "velocity", labels=Y2), **start, cfg=(2.0, 1.0), conditions=[Y, Y2],
                           null_y=NULL, **kw(backend))
    _close(got, want, 1e-4)


# ---- per-sample churn: each sample is its own batch-1 run --------------------------------------------------

@pytest.mark.parametrize("feature", [dict(dynamic_thresholding=True), dict(corrector_steps=1),
                                     dict(classifier=gaussian_classifier),
                                     dict(init=torch.linspace(-1, 1, 18).view(3, 2, 3), resample=2,
                                          known_mask=torch.tensor([True, False, True]))],
                         ids=["thresholding", "corrector", "classifier", "repaint"])
def test_per_sample_churn_gives_each_sample_its_own_run(backend, feature):
    churn = [0.0, 0.8, 0.3]
    start = dict(timesteps=[0.02 + 0.98 * i / STEPS for i in range(STEPS + 1)], steps=None)
    got = fastdiff.sample(model, **start, y=Y, method="heun", s_churn=churn, s_tmax=10.0, seed=[5, 6, 7],
                          **{k: v for k, v in kw(backend, **feature).items() if k != "seed"})
    for b in range(B):
        one = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) and k == "init" else v) for k, v in feature.items()}
        want = fastdiff.sample(model, **start, y=Y[b:b + 1], method="heun", s_churn=churn[b], s_tmax=10.0,
                               seed=[5 + b], shape=SHAPE, backend=backend, **one)
        _close(got[b:b + 1], want, 1e-5)


@pytest.mark.parametrize("guidance", ["cfg_norm", "mahiro", "mimic", "tcfg", "apg"])
@pytest.mark.parametrize("two", [False, True], ids=["y", "conditions"])
def test_per_sample_churn_with_a_cfg_schedule(guidance, two):
    """Churn per sample with a cfg schedule and a guidance rule (the tensor rules run once per group of samples
    sharing a time; the fused ones read per-sample weights): each sample is its own batch-1 run."""
    churn = [0.0, 0.8, 0.3]
    labels = dict(conditions=[Y, Y2], cfg=[lambda t: 2.0 + t, lambda t: 1.0 - 0.5 * t]) if two else \
        dict(y=Y, cfg=lambda t: 2.0 + t)
    start = dict(timesteps=[0.02 + 0.98 * i / STEPS for i in range(STEPS + 1)], steps=None)
    common = dict(null_y=NULL, method="heun", s_tmax=10.0, guidance=guidance, shape=SHAPE, backend="cpu")
    got = fastdiff.sample(model, **start, **labels, s_churn=churn, seed=[5, 6, 7], **common)
    for b in range(B):
        one = {k: ([c[b:b + 1] for c in v] if k == "conditions" else v[b:b + 1] if k == "y" else v)
               for k, v in labels.items()}
        want = fastdiff.sample(model, **start, **one, s_churn=churn[b], seed=[5 + b], **common)
        _close(got[b:b + 1], want, 1e-5)
    fixed = fastdiff.sample(model, **start, **{**labels, "cfg": [2.5, 0.75] if two else 2.5}, s_churn=churn,
                            seed=[5, 6, 7], **common)
    assert (got - fixed).abs().max() > 1e-3  # the schedule matters (the check can tell)


# ---- thresholding and CFG++ ----------------------------------------------------------------------------------

@pytest.mark.parametrize("phi", [0.0, 0.5])
def test_thresholding_and_rescale_with_cfg_pp_on_ddim(backend, phi):
    w, thr = 0.8, DynamicThresholding(ratio=0.9, max_value=1.0)

    def step_all():
        x = randn(torch.arange(3, 3 + B), 0, SHAPE).double()
        grid = [i / STEPS for i in range(STEPS + 1)]
        for t, t1 in zip(grid, grid[1:]):
            tt = torch.full((B,), t)
            p_n, p_y = model(x.float(), tt, torch.full((B,), NULL)).double(), model(x.float(), tt, Y).double()
            g = p_n + w * (p_y - p_n) if not phi else rescale_reference(p_n, p_y, w, phi)
            x0 = thr.apply((x + (1 - t) * g).float()).double()  # CondOT velocity: x0 = x + (1 - t) v
            eps_null = x - t * p_n  # eps = x - t v
            x = t1 * x0 + (1 - t1) * eps_null
        return x.float()

    got = fastdiff.sample(model, STEPS, w, y=Y, null_y=NULL, method="ddim", guidance="cfg_pp", guidance_rescale=phi,
                          dynamic_thresholding=thr, **kw(backend))
    _close(got, step_all(), 1e-4)


def test_euler_cfg_pp_is_comfyuis(backend):
    w = 0.7

    def blend(x, t):  # x' = t' x0(g) + (1 - t') eps(p_null) written as x + h (p_null + rho w (p_y - p_null))
        tb = float(t[0])
        t1 = min(1.0, tb + 1 / STEPS)
        p_n, p_y = model(x, t, torch.full((B,), NULL)).double(), model(x, t, Y).double()
        rho = t1 * (1 - tb) / (t1 - tb)
        return p_n + rho * w * (p_y - p_n)

    got = fastdiff.sample(model, STEPS, w, y=Y, null_y=NULL, guidance="cfg_pp", **kw(backend))
    _close(got, _hand_euler(blend), 1e-4)


# ---- step noise with the corrector and RePaint; img2img at strength 1 ------------------------------------------

def test_brownian_noise_leaves_the_correctors_own_draws(backend):
    # euler's ODE steps draw nothing: Brownian step noise changes nothing, the corrector keeps its draws
    base = dict(y=Y, corrector_steps=1, **kw(backend))
    n = BROWNIAN_STEPS
    assert torch.equal(fastdiff.sample(model, n, step_noise="brownian", **base), fastdiff.sample(model, n, **base))
    noisy = fastdiff.sample(model, n, method="euler_ancestral", step_noise="brownian", **base)
    assert torch.isfinite(noisy).all()
    assert not torch.equal(noisy, fastdiff.sample(model, n, method="euler_ancestral", **base))


@pytest.mark.parametrize("extra", [dict(step_noise="brownian", method="euler_ancestral"),
                                   dict(method="heun", s_churn=[0.0, 0.8, 0.3], s_tmax=10.0),
                                   dict(method="dpm_2"), dict(method="dpmpp_sde")])
def test_repaint_keeps_the_known_region_with_any_single_step_method(backend, extra):
    init = torch.linspace(-1, 1, 18).view(3, 2, 3)
    mask = torch.tensor([True, False, True])
    n = BROWNIAN_STEPS if "step_noise" in extra else STEPS
    out = fastdiff.sample(model, n, y=Y, init=init, known_mask=mask, resample=3, **kw(backend, **extra))
    assert torch.equal(out[..., mask], init[..., mask])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("feature", [dict(classifier=gaussian_classifier), dict(dynamic_thresholding=True),
                                     dict(corrector_steps=1), dict(step_noise="brownian", method="euler_ancestral"),
                                     dict(cfg=2.0, null_y=NULL, guidance="apg")])
def test_img2img_at_strength_one_is_sampling_from_noise(backend, feature):
    n = BROWNIAN_STEPS if "step_noise" in feature else STEPS
    start = dict(timesteps=[0.0] + [0.02 + 0.98 * i / n for i in range(1, n + 1)], steps=None) \
        if "classifier" not in feature else dict(timesteps=[0.02 + 0.98 * i / n for i in range(n + 1)], steps=None)
    init = torch.linspace(-1, 1, 18).view(3, 2, 3)
    a = fastdiff.sample(model, **start, y=Y, init=init, strength=1.0, **kw(backend, **feature))
    b = fastdiff.sample(model, **start, y=Y, **kw(backend, **feature))
    if "classifier" in feature:  # the grid starts at t = 0.02: alpha_0 > 0, the data shows through
        assert not torch.equal(a, b)
    else:
        assert torch.equal(a, b)


# ---- under cuda_graph, on the recorder (the ``recorder`` fixture: tests/conftest.py) ---------------------------

class CaptureModel(torch.nn.Module):
    """Reads x, t and y with device ops only (a capture allows no host reads): a linear map and a label embedding."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(6, 6)
        with torch.no_grad():
            self.lin.weight.copy_(0.2 * torch.randn(6, 6, generator=g))
        self.emb = torch.nn.Embedding(4, 6)

    def forward(self, x, t, y):
        flat = x.flatten(1)
        return (self.lin(flat) * (1.0 + t[:, None]) + self.emb(y)).view_as(x)


class CaptureClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)

    def forward(self, x, t):
        return self.lin(x.flatten(1)) * (1.0 + t[:, None])


@pytest.mark.parametrize("feature", [dict(cfg=(2.0, 1.0), conditions=[Y, Y2], null_y=NULL, guidance_rescale=0.5),
                                     dict(cfg=(2.0, 1.0), conditions=[Y, Y2], null_y=NULL, guidance_interval=(0.2, 0.6)),
                                     dict(cfg=2.0, y=Y, null_y=NULL, dynamic_thresholding=True, prediction="eps",
                                          steps=None, timesteps=[0.02 + 0.98 * i / STEPS for i in range(STEPS + 1)]),
                                     dict(y=Y, classifier=CaptureClassifier()),
                                     dict(y=Y, init=torch.linspace(-1, 1, 18).view(3, 2, 3), resample=2,
                                          known_mask=torch.tensor([True, False, True]))],
                         ids=["conditions_rescale", "conditions_interval", "thresholding", "classifier", "repaint"])
def test_new_combinations_run_in_a_captured_loop(recorder, feature):
    feature = {"steps": STEPS, **feature}
    m = CaptureModel()
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    for seed in (1, 2):
        got = fastdiff.sample(m, **feature, shape=SHAPE, seed=seed, backend=backend, cuda_graph=True)
        want = fastdiff.sample(m, **feature, shape=SHAPE, seed=seed, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert recorder.captures == 1 and recorder.replays == 2


def test_cfg_pp_with_thresholding_and_the_corrector_on_euler_ancestral_is_ddims(backend):
    # with eta = 0, euler_ancestral's step is DDIM's (on CondOT): the same CFG++ split, so the same samples
    for feature in (dict(dynamic_thresholding=DynamicThresholding(ratio=0.9)), dict(corrector_steps=1),
                    dict(guidance_rescale=0.5)):
        a = fastdiff.sample(model, STEPS, 0.8, y=Y, null_y=NULL, guidance="cfg_pp", method="euler_ancestral", eta=0.0,
                            **kw(backend, **feature))
        b = fastdiff.sample(model, STEPS, 0.8, y=Y, null_y=NULL, guidance="cfg_pp", method="ddim",
                            **kw(backend, **feature))
        _close(a, b, 1e-4)


# ---- every pair the redesign made possible keeps samples apart: sample b is its own batch-1 run ------------------

NEWLY_COMBINING = [
    ("euler", "apg", "two_conditions"), ("euler", "cfg_zero_star", "two_conditions"),
    ("euler", "guidance_rescale", "two_conditions"), ("euler", "guidance_interval", "two_conditions"),
    ("euler", "cfg_schedule", "two_conditions"), ("euler_ancestral", "cfg_pp", "two_conditions"),
    ("euler", "classifier", "two_conditions"), ("euler", "classifier", "dynamic_thresholding"),
    ("euler", "classifier", "corrector"), ("euler", "classifier", "per_sample_churn"), ("euler", "classifier", "repaint"),
    ("euler_ancestral", "cfg_pp", "dynamic_thresholding"), ("euler_ancestral", "cfg_pp", "corrector"),
    ("euler_ancestral", "cfg_pp", "guidance_rescale"), ("euler", "brownian", "corrector"),
    ("euler_ancestral", "brownian", "corrector"), ("euler", "corrector", "per_sample_churn"),
    ("euler", "dynamic_thresholding", "per_sample_churn"), ("euler", "per_sample_churn", "repaint"),
    ("euler_ancestral", "brownian", "repaint"), ("heun", "repaint"), ("dpm_2", "repaint"), ("dpmpp_sde", "repaint"),
    ("euler", "cfg_pp"), ("euler", "cfg_pp", "classifier"), ("euler", "cfg_pp", "inpainting"),
    ("euler", "cfg_pp", "per_sample_churn"), ("euler", "cfg_pp", "sde_sigma"), ("euler", "cfg_pp", "cfg_batch_false"),
    # not new, but fixed: a schedule under per-sample churn was read at the first sample's time for every sample
    ("euler", "cfg_schedule", "per_sample_churn"), ("euler", "guidance_rescale", "per_sample_churn"),
]


def _one_sample(kwargs: dict, b: int, n: int) -> dict:
    """The arguments of sample b alone: per-sample tensors and lists sliced, the seed b's."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            return v[b:b + 1]
        if isinstance(v, list) and len(v) == n:
            return v[b:b + 1]
        return v
    out = {k: ([cut(c) for c in v] if k == "conditions" else cut(v)) for k, v in kwargs.items()}
    out["seed"] = kwargs.get("seed", 0) + b
    return out


@pytest.mark.parametrize("cell", NEWLY_COMBINING, ids=["-".join(c) for c in NEWLY_COMBINING])
def test_a_newly_combining_pair_keeps_each_sample_its_own(cell):
    import combination_matrix as matrix

    method, *features = cell
    device = torch.device("cpu")
    kwargs = matrix.base_kwargs(BACKENDS[0], device)
    for name in features:
        kwargs = matrix.merge(kwargs, matrix.FEATURES[name](matrix.B, matrix.SHAPE, device))
    if "conditions" in kwargs:
        y = kwargs.pop("y")
        if "classifier" in kwargs:
            kwargs["classifier_y"] = y
    kwargs.pop("callback", None)
    batch = fastdiff.sample(model, matrix.STEPS, method=method, **kwargs)
    for b in range(matrix.B):
        alone = fastdiff.sample(model, matrix.STEPS, method=method, **_one_sample(kwargs, b, matrix.B))
        _close(batch[b:b + 1], alone, 1e-5)
