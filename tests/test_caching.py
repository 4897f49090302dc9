"""Step caching (fastdiff.sampling.features.caching): each rule against an independent model-level implementation of
its peer's decision (ComfyUI's EasyCache / LazyCache wrappers, AdaptiveDiffusion's pipeline loop) wrapped around
the model of an uncached run — the same evaluations skipped, the same samples —, on every backend here; with
guidance, guidance rules, several conditions, multi-stage methods and editing; a reused Sampler; the refusals."""

import math

import pytest
import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, ring_mixture
from fastdiff.sampling.features.caching import AdaptiveCache, CacheIndicator, EasyCache, LazyCache, get_cache

from combination_matrix import gaussian_velocity_model

MIXTURE = MixtureModel(ring_mixture(heterogeneous=True), "condot", "velocity")
B = 64


class Counted:
    """A model that counts its calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, y=None):
        self.calls += 1
        return self.model(x, t, y)


def _order(rule):
    """The rule's extrapolation order on these deterministic runs (None: 2)."""
    return 2 if rule.order is None else rule.order


def lagrange(kept, t):
    """The polynomial through the kept (t_i, v_i) at t, in float64 (the newest alone: itself)."""
    if len(kept) == 1:
        return kept[0][1]
    out = 0.0
    for i, (ti, vi) in enumerate(kept):
        w = 1.0
        for m, (tm, _) in enumerate(kept):
            if m != i:
                w *= (t - tm) / (ti - tm)
        out = out + w * vi.double()
    return out.float()


class EasyCacheReference:
    """ComfyUI's EasyCache / LazyCache decision as a wrapper of the model's batched calls (one call per evaluation,
    conditions first, the null branch last), written from its published algorithm; float32 statistics as the
    library's, extrapolation in float64."""

    def __init__(self, model, rule, B, cfg=1.0):
        self.model, self.rule, self.B, self.cfg = model, rule, B, cfg
        self.rate = self.x_prev = self.o_prev = self.o_norm = None
        self.total = 0.0
        self.kept = []  # [(t, value)] of the last two computed calls
        self.calls = self.skips = 0
        self.run = 0

    def _first_out(self, out):
        if self.rule.on_guided and out.shape[0] == 2 * self.B:
            y, null = out[:self.B], out[self.B:]
            return null + self.cfg * (y - null)
        return out[:self.B]

    def _sub(self, v):
        f = self.rule.subsample_factor
        if v.dim() >= 3:
            return v[..., ::f, ::f]
        return v.flatten(1)[:, :v[0].numel() // (f * f)] if f > 1 and v[0].numel() >= 4096 else v

    def __call__(self, x, t, y=None):
        r, tt = self.rule, float(t[0])
        xf = self._sub(x[:self.B])
        ic = None
        if r.start_percent <= tt < r.end_percent:
            ic = None if self.x_prev is None else torch.nn.functional.l1_loss(xf, self.x_prev)
            if self.o_norm is not None and self.rate is not None and ic is not None:
                self.total += float(self.rate * ic / self.o_norm)
                if self.total < r.reuse_threshold and self.kept and self.kept[-1][1].shape == x.shape and \
                        (r.max_skips is None or self.run < r.max_skips):
                    self.run += 1
                    self.skips += 1
                    return self._reuse(x, tt)
                self.total = 0.0
        self.run = 0
        self.calls += 1
        out = self.model(x, t, y)
        value = out - x if r.reuse == "residual" else out.clone()
        self.kept = (self.kept + [(tt, value)])[-(_order(r) + 1):]
        if tt < r.end_percent:
            of = self._sub(self._first_out(out))
            if self.o_prev is not None and ic is not None:
                self.rate = torch.nn.functional.l1_loss(of, self.o_prev) / ic
            self.x_prev, self.o_prev, self.o_norm = xf.clone(), of.clone(), of.abs().mean()
        return out

    def _reuse(self, x, tt):
        value = lagrange(self.kept, tt)
        return x + value if self.rule.reuse == "residual" else value


class AdaptiveReference:
    """AdaptiveDiffusion's loop (Ye et al. 2024) as a model wrapper: d_j = mean |x_j - x_{j-1}| over the calls'
    inputs; a call after the warm-up reuses the last output when |(d_j + d_{j-2}) / 2 - d_{j-1}| <= threshold
    d_{j-1}, at most max_skips in a row."""

    def __init__(self, model, rule, B):
        self.model, self.rule, self.B = model, rule, B
        self.x_last, self.diffs, self.count, self.run = None, [], 0, 0
        self.kept = []
        self.calls = self.skips = 0

    def __call__(self, x, t, y=None):
        xf = x[:self.B]
        if self.x_last is not None:
            self.diffs.append(float((xf - self.x_last).abs().mean()))
        self.x_last, self.count = xf.clone(), self.count + 1
        r = self.rule
        if self.count > r.warmup and len(self.diffs) >= 3 and self.run < r.max_skips:
            cur, prev, pp = self.diffs[-1], self.diffs[-2], self.diffs[-3]
            if abs(0.5 * (cur + pp) - prev) <= r.threshold * prev:
                self.run += 1
                self.skips += 1
                return lagrange(self.kept, float(t[0]))
        self.run = 0
        self.calls += 1
        out = self.model(x, t, y)
        self.kept = (self.kept + [(float(t[0]), out)])[-(_order(r) + 1):]
        return out


def _noise(seed=0, shape=(2,)):
    return torch.randn(B, *shape, generator=torch.Generator().manual_seed(seed))


GRID = torch.linspace(1e-3, 1.0, 51).tolist()
EASY_RULES = [EasyCache(reuse_threshold=0.2, order=0), EasyCache(reuse="residual"),
              EasyCache(reuse_threshold=0.3, order=1, reuse="residual"),
              EasyCache(reuse_threshold=0.5, reuse="output", order=2, max_skips=2),
              LazyCache(reuse_threshold=0.3, start_percent=0.3, end_percent=0.8)]
EASY_IDS = ["order0", "residual", "residual-order1", "order2-max-skips", "lazy-window"]


BACKENDS = [b for b in ("cpu", "reference", "triton") if fastdiff.backends()[b]]


@pytest.mark.parametrize("rule", EASY_RULES, ids=EASY_IDS)
def test_easycache_is_the_reference_decision(rule):
    _against_reference(rule, "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends(backend):
    """The cache is above the kernels: every backend's run skips alike (the triton interpreter pays per launch,
    so one rule on 12 steps)."""
    _against_reference(EasyCache(reuse_threshold=0.3, order=1, max_skips=2, start_percent=0.0), backend,
                       torch.linspace(1e-3, 1.0, 13).tolist())


def _against_reference(rule, backend, grid=GRID):
    noise = _noise()
    reference = EasyCacheReference(MIXTURE, rule, B)
    want = fastdiff.sample(reference, None, timesteps=grid, noise=noise, backend=backend)
    counted = Counted(MIXTURE)
    got = fastdiff.sample(counted, None, timesteps=grid, noise=noise, backend=backend, cache=rule)
    assert reference.skips > 0 and counted.calls == reference.calls
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("rule", [EasyCache(reuse_threshold=0.3, reuse="output"), LazyCache(reuse_threshold=0.3),
                                  EasyCache(reuse_threshold=0.3, order=1)], ids=["easy", "lazy", "order1"])
def test_guided_batched_calls(rule):
    """cfg 3 on the class-conditional Gaussians: one batched call per evaluation, both branches reused."""
    noise, y = _noise(1), torch.arange(B) % 3
    reference = EasyCacheReference(gaussian_velocity_model, rule, B, cfg=3.0)
    kw = dict(timesteps=GRID, noise=noise, y=y, null_y=3)
    want = fastdiff.sample(reference, None, 3.0, **kw)
    counted = Counted(gaussian_velocity_model)
    got = fastdiff.sample(counted, None, 3.0, cache=rule, **kw)
    assert reference.skips > 0 and counted.calls == reference.calls
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("rule", [AdaptiveCache(), AdaptiveCache(threshold=0.05, max_skips=2, order=1)],
                         ids=["default", "order1"])
def test_adaptive_is_the_reference_decision(rule):
    noise = _noise(2)
    reference = AdaptiveReference(MIXTURE, rule, B)
    want = fastdiff.sample(reference, timesteps=GRID, noise=noise)
    counted = Counted(MIXTURE)
    got = fastdiff.sample(counted, timesteps=GRID, noise=noise, cache=rule)
    assert reference.skips > 0 and counted.calls == reference.calls
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_fused_replay_is_the_extrapolation_pass(method, backend, monkeypatch):
    """A reused step reading the kept outputs itself (the stage's call with their predictions and the spread
    weights) gives the extrapolation's pass result; it is used where nothing else reads the predictions."""
    from fastdiff.sampling.features import cached_calls

    noise, y = _noise(6), torch.arange(B) % 3
    # the triton interpreter pays per launch: 8 steps, every other one reused
    short = backend == "triton"
    kw = dict(timesteps=torch.linspace(1e-3, 1.0, 9).tolist() if short else GRID[:21], noise=noise, y=y, null_y=3,
              method=method, backend=backend,
              cache=EasyCache(reuse_threshold=5.0, max_skips=1, start_percent=0.0) if short else
              EasyCache(reuse_threshold=0.5))
    made = []
    real = cached_calls.FusedReplay.hook

    def counting(self, k, preds, call):
        out = real(self, k, preds, call)
        if out is not call:
            made.append(k)
        return out

    monkeypatch.setattr(cached_calls.FusedReplay, "hook", counting)
    fused = fastdiff.sample(gaussian_velocity_model, None, 2.5, **kw)  # (steps from the timesteps)
    assert made
    monkeypatch.setattr(cached_calls.FusedReplay, "possible", lambda self, k, kept: False)
    made.clear()
    separate = fastdiff.sample(gaussian_velocity_model, None, 2.5, **kw)
    assert not made
    torch.testing.assert_close(fused, separate, rtol=0, atol=2e-6 * separate.abs().max().item())


def test_a_model_writing_one_buffer():
    """A model that returns the same tensor each call: the cache sees its storage and keeps copies."""
    buffer = torch.empty(B, 2)

    def model(x, t, y=None):
        return buffer.copy_(MIXTURE(x, t, y))

    rule = EasyCache(reuse_threshold=0.3)
    want = fastdiff.sample(MIXTURE, timesteps=GRID, noise=_noise(7), cache=rule)
    got = fastdiff.sample(model, timesteps=GRID, noise=_noise(7), cache=rule)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_a_model_rotating_buffers_gets_its_outputs_copied_into_dropped_copies():
    """A model returning 3 buffers in turn overwrites outputs a second-order series keeps: from the first clash on,
    outputs are copied, into the storage of copies the series dropped (no new tensor per call), and the run equals
    the one with a model returning new tensors from that point."""
    from fastdiff.sampling.features import cached_calls

    buffers, i = [torch.empty(B, 2) for _ in range(3)], [0]

    def model(x, t, y=None):
        i[0] += 1
        return buffers[i[0] % 3].copy_(MIXTURE(x, t, y))

    made = []
    real_copy = cached_calls.CachedCalls._copy

    def copy(self, out):
        got = real_copy(self, out)
        made.append(got.untyped_storage().data_ptr())
        return got

    rule = AdaptiveCache(threshold=0.3, max_skips=2, order=2)
    want = fastdiff.sample(MIXTURE, timesteps=GRID, noise=_noise(7), method="heun", cache=rule)
    cached_calls.CachedCalls._copy = copy
    try:
        got = fastdiff.sample(model, timesteps=GRID, noise=_noise(7), method="heun", cache=rule)
    finally:
        cached_calls.CachedCalls._copy = real_copy
    assert len(made) > 10 and len(set(made)) <= 5  # copies reuse a few storages
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("shape,view", [((16, 1 << 14), lambda t: t[:, :300]),
                                        ((3, 5, 67, 41), lambda t: t[..., ::8, ::8]), ((7, 9), lambda t: t.t()),
                                        ((1, 1), lambda t: t), ((), lambda t: t), ((4, 0), lambda t: t)])
def test_native_mean_abs_is_the_torch_expression(shape, view):
    """fastdiff._C.mean_abs (the CPU statistics' one read): mean |a - b|, mean |a|, and b <- a, on strided views."""
    C = pytest.importorskip("fastdiff._C")
    g = torch.Generator().manual_seed(0)
    a, b = view(torch.randn(shape, generator=g)), view(torch.randn(shape, generator=g))
    want_diff, want_norm = (a.double() - b.double()).abs().mean().item(), a.double().abs().mean().item()
    if a.numel() == 0:
        assert math.isnan(C.mean_abs(a, b)) and math.isnan(C.mean_abs(a))
        return
    assert C.mean_abs(a, b) == pytest.approx(want_diff, rel=1e-6)
    assert C.mean_abs(a) == pytest.approx(want_norm, rel=1e-6)
    diff, norm = C.mean_abs(a, b, norm=True, keep=True)
    assert diff == pytest.approx(want_diff, rel=1e-6) and norm == pytest.approx(want_norm, rel=1e-6)
    assert torch.equal(b, a)  # kept
    with pytest.raises(RuntimeError, match="b must have a's shape"):
        C.mean_abs(a, torch.zeros(5))
    with pytest.raises(RuntimeError, match="float32 CPU"):
        C.mean_abs(a.double())


@pytest.mark.parametrize("method", ["euler_ancestral", "dpmpp_2m_sde"])
def test_stochastic_methods_reuse_without_extrapolating(method):
    """order=None reuses a stochastic method's outputs as they are (order 0): extrapolating a noisy trajectory's
    outputs amplifies its noise (docs/guidance.md, "Where it loses")."""
    kw = dict(timesteps=GRID, noise=_noise(8), method=method, seed=4)
    default = fastdiff.sample(MIXTURE, **kw, cache=AdaptiveCache(threshold=0.3, max_skips=2))
    plain = fastdiff.sample(MIXTURE, **kw, cache=AdaptiveCache(threshold=0.3, max_skips=2, order=0))
    extrapolated = fastdiff.sample(MIXTURE, **kw, cache=AdaptiveCache(threshold=0.3, max_skips=2, order=2))
    assert torch.equal(default, plain) and not torch.equal(default, extrapolated)


def test_indicator_sums_the_callers_estimate():
    """A constant estimate 0.3 under threshold 1: each computed evaluation is followed by three reused ones."""
    seen = []

    def indicator(x, t):
        seen.append(float(t[0]))
        return 0.3

    counted = Counted(MIXTURE)
    fastdiff.sample(counted, timesteps=GRID, noise=_noise(), cache=CacheIndicator(indicator, threshold=1.0))
    assert counted.calls == 13 and len(seen) == 50  # steps 0, 4, 8, ..., 48


@pytest.mark.parametrize("rule", ["easycache", "lazycache", "adaptive"])
@pytest.mark.parametrize("case", ["heun", "dpmpp_2m", "apg", "conditions", "img2img", "two_calls", "interval",
                                  "pag", "pag_conditions", "mambo_g", "cfg_norm", "perp_neg", "epsilon_scaling",
                                  "rescale", "thresholding"])
def test_combines_with_features(rule, case):
    """Each feature with caching: fewer model calls than without, a finite result near the uncached one, and with
    nothing to reuse (threshold 0) bit for bit the uncached run."""
    noise, y = _noise(3), torch.arange(B) % 3
    kw = dict(timesteps=GRID, noise=noise, y=y, null_y=3)
    if case in ("heun", "dpmpp_2m"):
        kw["method"] = case
    elif case == "apg":
        kw["guidance"] = "apg"
    elif case == "conditions":
        kw = dict(timesteps=GRID, noise=noise, conditions=[y, (y + 1) % 3], null_y=3)
    elif case == "img2img":
        kw = dict(timesteps=GRID, init=noise * 0.1, strength=0.7, seed=5, y=y, null_y=3)
    elif case == "two_calls":
        kw["cfg_batch"] = False
    elif case == "interval":
        kw["guidance_interval"] = (0.2, 0.7)
    elif case == "pag":  # the perturbed calls are reused with the others
        from fastdiff.sampling.features.perturbed import PAG

        kw.update(guidance=PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0),
                  perturbed_model=Counted(lambda x, t, y=None: 0.8 * gaussian_velocity_model(x, t, y)))
    elif case == "pag_conditions":  # the perturbed call of both conditions (one of 2B) too
        from fastdiff.sampling.features.perturbed import PAG

        kw = dict(timesteps=GRID, noise=noise, conditions=[y, (y + 1) % 3], null_y=3,
                  guidance=PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0),
                  perturbed_model=Counted(lambda x, t, y=None: 0.8 * gaussian_velocity_model(x, t, y)))
    elif case in ("mambo_g", "cfg_norm", "epsilon_scaling"):
        kw.update(guidance=case, timesteps=GRID[1:] if case == "epsilon_scaling" else GRID)
    elif case == "perp_neg":
        kw = dict(timesteps=GRID, noise=noise, conditions=[y, (y + 1) % 3], null_y=3, guidance="perp_neg")
    elif case == "rescale":
        kw["guidance_rescale"] = 0.7
    elif case == "thresholding":
        kw.update(dynamic_thresholding=True, prediction="velocity")
    full_model, cached_model = Counted(gaussian_velocity_model), Counted(gaussian_velocity_model)
    full = fastdiff.sample(full_model, None, 2.0, **kw)
    if case.startswith("pag"):
        kw["perturbed_model"].calls = 0
    got = fastdiff.sample(cached_model, None, 2.0, cache=rule, **kw)
    assert cached_model.calls < full_model.calls
    if case.startswith("pag"):
        pert = kw["perturbed_model"]
        # one perturbed call with each computed evaluation but the first (diffusers' window: step 0 is not perturbed)
        assert pert.calls == cached_model.calls - 1
    assert torch.isfinite(got).all()
    assert (got - full).norm(dim=1).mean() < 0.25 * full.norm(dim=1).mean()
    never = {"easycache": EasyCache(reuse_threshold=0.0), "lazycache": LazyCache(reuse_threshold=0.0),
             "adaptive": AdaptiveCache(threshold=0.0)}[rule]
    assert torch.equal(fastdiff.sample(gaussian_velocity_model, None, 2.0, cache=never, **kw), full)


def test_reused_sampler_and_plan_cache_start_afresh():
    noise = _noise(4)
    first = fastdiff.sample(MIXTURE, timesteps=GRID, noise=noise, cache="easycache")
    again = fastdiff.sample(MIXTURE, timesteps=GRID, noise=noise, cache="easycache")
    sampler = fastdiff.Sampler(MIXTURE, timesteps=GRID, noise=noise, cache="easycache")
    assert torch.equal(first, again)
    assert torch.equal(sampler(noise=noise), first) and torch.equal(sampler(noise=noise), first)


def test_image_shaped_statistics_are_subsampled():
    """[B, C, H, W] samples: the decision reads every 8th pixel; the reference subsamples alike."""
    shape = (3, 17, 19)
    noise = torch.randn(4, *shape, generator=torch.Generator().manual_seed(5))

    def model(x, t, y=None):
        return -x * (1.0 - t.view(-1, 1, 1, 1)) + torch.sin(3.0 * x)

    rule = EasyCache(reuse_threshold=0.3, reuse="output")
    reference = EasyCacheReference(model, rule, 4)
    want = fastdiff.sample(reference, timesteps=GRID, noise=noise)
    counted = Counted(model)
    got = fastdiff.sample(counted, timesteps=GRID, noise=noise, cache=rule)
    assert reference.skips > 0 and counted.calls == reference.calls
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())


def test_refusals():
    with pytest.raises(ValueError, match="cache must be one of"):
        get_cache("teacache")
    with pytest.raises(TypeError, match="cache must be a rule"):
        get_cache(0.2)
    with pytest.raises(ValueError, match="reuse_threshold"):
        EasyCache(reuse_threshold=-1)
    with pytest.raises(ValueError, match="start_percent"):
        EasyCache(start_percent=1.5)
    with pytest.raises(ValueError, match="max_skips"):
        AdaptiveCache(max_skips=0)
    with pytest.raises(ValueError, match="reuse must be"):
        EasyCache(reuse="x0")
    with pytest.raises(ValueError, match="order must be"):
        EasyCache(order=3)
    with pytest.raises(ValueError, match="warmup"):
        AdaptiveCache(warmup=1)
    with pytest.raises(TypeError, match="indicator must be"):
        CacheIndicator(3.0)
    with pytest.raises(ValueError, match="indicator returned"):
        fastdiff.sample(MIXTURE, timesteps=GRID, noise=_noise(), cache=CacheIndicator(lambda x, t: float("nan")))
    with pytest.raises(ValueError, match="does not apply to method='dpm_adaptive'"):
        fastdiff.sample(MIXTURE, noise=_noise(), method="dpm_adaptive", cache="easycache")


# ---- a captured loop (cuda_graph=True, on the recorder: tests/graph_recorder.py) ------------------------------

_LIN = 0.3 * torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
_EMB = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))


def _device_model(x, t, y):
    """Device ops only (a capture allows no host reads)."""
    return torch.tanh(x @ _LIN) * (1.0 + t[:, None]) + _EMB[y] - x


def _indicator(x, t):
    return 0.5 * (1.0 - t[0]) * torch.ones((), dtype=torch.float32)


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("rule", [EasyCache(reuse_threshold=0.3, start_percent=0.0),
                                  LazyCache(reuse_threshold=0.3, order=0),
                                  AdaptiveCache(threshold=0.3, max_skips=2),
                                  EasyCache(reuse_threshold=0.3, reuse="residual", order=1, max_skips=1),
                                  CacheIndicator(_indicator, threshold=1.0)],
                         ids=["easycache", "lazycache-o0", "adaptive", "residual-o1-max1", "indicator"])
def test_captured_loop_decides_on_the_device(monkeypatch, method, rule):
    """cuda_graph=True: the decision, the statistics and the kept outputs on the device, each evaluation's branches
    conditional nodes: the eager loop's result (its decisions) without a host read, replayed for other seeds."""
    from fastdiff.sampling.core import graphs
    from graph_recorder import RecordingCapture

    rec = RecordingCapture()
    monkeypatch.setattr(graphs, "CAPTURE", rec)
    monkeypatch.setattr(graphs, "CACHE", graphs.GraphCache())
    kw = dict(y=torch.tensor([0, 1, 2, 1, 0]), null_y=3, shape=(4,), method=method, cache=rule)
    sampler = fastdiff.Sampler(_device_model, 20, 2.0, cuda_graph=True, **kw)
    for seed in (1, 2, 3):
        eager_sampler = fastdiff.Sampler(_device_model, 20, 2.0, **kw)
        eager = eager_sampler(seed=seed)
        got = sampler(seed=seed)
        torch.testing.assert_close(got, eager, rtol=0, atol=2e-6 * eager.abs().max().item())
        assert sampler._plan.model_calls.report() == eager_sampler._plan.model_calls.report()
    assert rec.captures == 1 and rec.replays == 3 and rec.conditionals > 0
    assert not sampler._plan.model_calls.report().split(": ")[1].startswith("0 of")  # some reused (it can tell)
    plain = fastdiff.sample(_device_model, 20, 2.0, seed=3, **{**kw, "cache": None})
    assert (got - plain).abs().max() > 1e-5


def test_reused_plan_writes_this_calls_samples():
    """A reused plan (sample()'s plan cache, a Sampler) gives its last stage a new output tensor each call: a reused
    last step's fused replay writes it, not the tensor an earlier call returned."""
    kw = dict(y=torch.tensor([0, 1, 2, 1, 0]), null_y=3, shape=(4,), seed=1, method="euler",
              cache=AdaptiveCache(threshold=0.3, max_skips=2))
    fastdiff.clear_scratch()
    first = fastdiff.sample(_device_model, 20, 2.0, **kw)
    kept = first.clone()
    again = fastdiff.sample(_device_model, 20, 2.0, **kw)
    assert torch.equal(first, kept) and torch.equal(again, first)
    sampler = fastdiff.Sampler(_device_model, 20, 2.0, **kw)
    a = sampler()
    b = sampler()
    assert torch.equal(a, first) and torch.equal(b, first)


def _perturbed_device_model(x, t, y):
    return torch.tanh(x @ _LIN.T) * (1.0 + t[:, None]) + _EMB[y] - x


@pytest.mark.parametrize("case", ["interval", "pag", "conditions", "two_calls", "rescale", "apg", "bf16"])
def test_captured_loop_combines_with_features(monkeypatch, case):
    """The captured cache with a guidance interval (a new call layout restarts the kept series), a perturbed
    branch, two conditions, one call per branch, rescale and a Gram rule: the eager loop's result and decisions."""
    from fastdiff.sampling.core import graphs
    from fastdiff.sampling.features.perturbed import PAG
    from graph_recorder import RecordingCapture

    monkeypatch.setattr(graphs, "CAPTURE", RecordingCapture())
    monkeypatch.setattr(graphs, "CACHE", graphs.GraphCache())
    y = torch.tensor([0, 1, 2, 1, 0])
    extra = {"interval": dict(guidance_interval=(0.2, 0.7)), "two_calls": dict(cfg_batch=False),
             "pag": dict(guidance=PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=0.6),
                         perturbed_model=_perturbed_device_model),
             "conditions": dict(conditions=[y, y.flip(0)]), "rescale": dict(guidance_rescale=0.5),
             "apg": dict(guidance="apg"), "bf16": {}}[case]
    cfg = [2.0, 1.0] if case == "conditions" else 2.0
    kw = dict(null_y=3, shape=(4,), method="heun", **({} if case == "conditions" else {"y": y}), **extra)
    model = (lambda x, t, y: _device_model(x, t, y).to(torch.bfloat16)) if case == "bf16" else _device_model
    rules = (EasyCache(reuse_threshold=0.3, start_percent=0.0), AdaptiveCache(threshold=0.3, max_skips=2))
    if case == "bf16":  # a bfloat16 model: kept as bfloat16, its residual as float32 (as the eager loop does)
        rules += (EasyCache(reuse_threshold=0.3, start_percent=0.0, reuse="residual"),)
    for rule in rules:
        eager = fastdiff.Sampler(model, 20, cfg, cache=rule, **kw)
        captured = fastdiff.Sampler(model, 20, cfg, cache=rule, cuda_graph=True, **kw)
        want = eager(seed=1)
        torch.testing.assert_close(captured(seed=1), want, rtol=0, atol=4e-6 * want.abs().max().item())
        assert captured._plan.model_calls.report() == eager._plan.model_calls.report()


def test_verbose_reports_once_per_call_eager_and_captured(monkeypatch, caplog):
    """verbose=True logs each call's reuse count: an eager loop after its last step, a captured one after the replay
    (the device counters read once the graph has run; while it runs a graph reads nothing back)."""
    import logging

    from fastdiff.sampling.core import graphs
    from graph_recorder import RecordingCapture

    monkeypatch.setattr(graphs, "CAPTURE", RecordingCapture())
    monkeypatch.setattr(graphs, "CACHE", graphs.GraphCache())
    kw = dict(y=torch.tensor([0, 1, 2, 1, 0]), null_y=3, shape=(4,), method="euler",
              cache=EasyCache(reuse_threshold=0.3, start_percent=0.0, verbose=True))
    reports = {}
    for captured in (False, True):
        sampler = fastdiff.Sampler(_device_model, 20, 2.0, cuda_graph=captured, **kw)
        for seed in (1, 2):
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="fastdiff"):
                sampler(seed=seed)
            lines = [r.getMessage() for r in caplog.records if "evaluations reused" in r.getMessage()]
            assert len(lines) == 1, lines
            reports[captured, seed] = lines[0]
        with caplog.at_level(logging.INFO, logger="fastdiff"):  # sample()'s cached graph reports too
            caplog.clear()
            fastdiff.sample(_device_model, 20, 2.0, seed=3, cuda_graph=captured, **kw)
            reports[captured, 3] = [r.getMessage() for r in caplog.records if "evaluations reused" in r.getMessage()]
    for seed in (1, 2):
        assert reports[True, seed] == reports[False, seed]
        assert not reports[True, seed].split(": ")[1].startswith("0 of")
    assert len(reports[True, 3]) == len(reports[False, 3]) == 1 and reports[True, 3] == reports[False, 3]
