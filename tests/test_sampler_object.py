"""fastdiff.Sampler (a plan built once, run per call) and sample()'s plan cache: both give sample()'s samples bit for
bit, refill seeds, noise and labels, never share a returned tensor, and let go of the model."""

import gc
import threading

import pytest
import torch

import fastdiff
from fastdiff.sampling import plan_cache

from combination_matrix import gaussian_velocity_model as model

BACKENDS = [b for b in ("cpu", "reference") if fastdiff.backends()[b]]
SHAPE = (2, 3)
Y, Y2 = torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0])

CONFIGS = {
    "euler": dict(y=Y),
    "cfg": dict(cfg=2.0, y=Y, null_y=3),
    "cfg_two_calls": dict(cfg=2.0, y=Y, null_y=3, cfg_batch=False),
    "heun_churn": dict(y=Y, method="heun", s_churn=0.5, s_tmax=10.0),
    "dpmpp_2m_sde_brownian": dict(y=Y, method="dpmpp_2m_sde", step_noise="brownian"),
    "apg_rescale": dict(cfg=3.0, y=Y, null_y=3, guidance="apg"),
    "euler_ancestral_cfg_pp": dict(cfg=0.8, y=Y, null_y=3, method="euler_ancestral", guidance="cfg_pp"),
    "corrector": dict(y=Y, corrector_steps=1),
    "thresholding": dict(y=Y, method="ddim", dynamic_thresholding=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_a_reused_sampler_gives_samples_bit_for_bit(backend, name):
    kw = dict(shape=SHAPE, backend=backend, **CONFIGS[name])
    sampler = fastdiff.Sampler(model, 5, **kw)
    for seed in (0, 7, 7, 123):
        assert torch.equal(sampler(seed=seed), fastdiff.sample(model, 5, seed=seed, **kw))


def test_refills_labels_noise_and_null_and_replans_a_new_layout():
    kw = dict(shape=SHAPE, cfg=2.0, null_y=3, backend="cpu" if "cpu" in BACKENDS else "reference")
    sampler = fastdiff.Sampler(model, 4, y=Y, **kw)
    first = sampler(seed=1)
    assert torch.equal(sampler(seed=1, y=Y2), fastdiff.sample(model, 4, y=Y2, seed=1, **kw))
    noise = torch.randn(3, *SHAPE)
    assert torch.equal(sampler(noise=noise, y=Y2), fastdiff.sample(model, 4, y=Y2, noise=noise, **kw))
    assert torch.equal(sampler(seed=1, y=Y2, null_y=1), fastdiff.sample(model, 4, y=Y2, seed=1, **{**kw, "null_y": 1}))
    # a new batch size: a new plan
    assert torch.equal(sampler(seed=2, y=Y[:2]), fastdiff.sample(model, 4, y=Y[:2], seed=2, **kw))
    assert torch.equal(first, fastdiff.sample(model, 4, y=Y, seed=1, **kw))  # the first result was never reused


def test_returned_samples_are_the_callers():
    sampler = fastdiff.Sampler(model, 3, shape=SHAPE, batch_size=2)
    a = sampler(seed=0)
    kept = a.clone()
    b = sampler(seed=1)
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, kept)


def test_arguments_are_checked_when_the_sampler_is_made():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fastdiff.Sampler(model, 0, shape=SHAPE, batch_size=2)
    with pytest.raises(ValueError, match="method='nope' is not a sampler"):
        fastdiff.Sampler(model, 3, shape=SHAPE, batch_size=2, method="nope")
    assert fastdiff.Sampler(model, 3, shape=SHAPE, batch_size=0)().shape == (0, *SHAPE)


def test_sample_reuses_its_plan_and_lets_go_of_the_model():
    plan_cache.clear()

    class Model(torch.nn.Module):
        def forward(self, x, t, y):
            return model(x, t, y)

    m = Model()
    kw = dict(shape=SHAPE, y=Y, cfg=2.0, null_y=3)
    outs = [fastdiff.sample(m, 4, seed=s, **kw) for s in (0, 1, 0)]
    assert len(plan_cache._CACHE) == 1
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])
    assert torch.equal(outs[1], fastdiff.Sampler(m, 4, **kw)(seed=1))
    del m
    gc.collect()
    assert len(plan_cache._CACHE) == 0  # the plan went with its model


def test_calls_that_carry_data_plan_anew():
    plan_cache.clear()
    init = torch.zeros(3, *SHAPE)
    fastdiff.sample(model, 4, shape=SHAPE, y=Y, init=init, strength=0.5)
    fastdiff.sample(model, 4, shape=SHAPE, y=[0, 1, 2])
    assert len(plan_cache._CACHE) == 0


def test_concurrent_calls_never_share_a_plan():
    kw = dict(shape=SHAPE, y=Y, cfg=2.0, null_y=3, method="heun")
    want = {s: fastdiff.sample(model, 6, seed=s, **kw) for s in range(8)}
    got, errors = {}, []

    def work(seeds):
        try:
            for s in seeds:
                got[s] = fastdiff.sample(model, 6, seed=s, **kw)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(range(i, 8, 2),)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(got[s], want[s]) for s in range(8))


def test_a_sampler_captures_once_and_replays(monkeypatch):
    from fastdiff.sampling.core import graphs
    from graph_recorder import RecordingCapture
    from test_feature_combinations import CaptureModel

    rec = RecordingCapture()
    monkeypatch.setattr(graphs, "CAPTURE", rec)
    m = CaptureModel()
    kw = dict(shape=SHAPE, y=Y, cfg=2.0, null_y=3, backend=BACKENDS[0])
    sampler = fastdiff.Sampler(m, 4, cuda_graph=True, **kw)
    for seed in (0, 1, 2):
        assert torch.equal(sampler(seed=seed), fastdiff.sample(m, 4, seed=seed, **kw))
    assert torch.equal(sampler(seed=0, y=Y2), fastdiff.sample(m, 4, seed=0, **{**kw, "y": Y2}))
    assert rec.captures == 1 and rec.replays == 4


@pytest.mark.parametrize("captured", [False, True])
@pytest.mark.parametrize("edit", ["img2img", "inpainting"])
def test_an_editing_sampler_noises_init_with_each_calls_seeds(recorder, captured, edit):
    """A Sampler with init: each call's start is init noised with that call's seeds (the plan's first seeds were
    the Sampler's own), eager and captured; the same as sample()."""
    g = torch.Generator().manual_seed(2)
    init = torch.randn(5, 4, generator=g)
    extra = dict(strength=0.6) if edit == "img2img" else dict(known_mask=torch.rand(5, 4, generator=g) > 0.5)
    lin = 0.3 * torch.randn(4, 4, generator=g)

    def model(x, t, y=None):
        return torch.tanh(x @ lin) * (1.0 + t[:, None]) - x

    sampler = fastdiff.Sampler(model, 20, init=init, cuda_graph=captured, **extra)
    for seed in (1, 2, 1, 7):
        torch.testing.assert_close(sampler(seed=seed), fastdiff.sample(model, 20, init=init, seed=seed, **extra),
                                   rtol=0, atol=1e-6)


def test_a_classifier_sampler_leaves_the_callers_labels():
    """A Sampler with classifier guidance refills its own copy of the targets: the y it was made with is not
    overwritten by a later call's y (it was), and each call is sample()'s."""
    g = torch.Generator().manual_seed(4)
    lin, w, emb = 0.3 * torch.randn(4, 4, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, 4, generator=g)

    def model(x, t, y=None):
        return torch.tanh(x @ lin) * (1.0 + t[:, None]) + emb[y] - x

    def classifier(x, t):
        return torch.tanh(x) @ w

    y0 = torch.tensor([0, 1, 2, 1, 0])
    kw = dict(shape=(4,), classifier=classifier, classifier_scale=2.0, null_y=3)
    sampler = fastdiff.Sampler(model, 20, 2.0, y=y0, **kw)
    for y in (torch.tensor([2, 2, 2, 2, 2]), y0, torch.tensor([1, 0, 0, 2, 2])):
        torch.testing.assert_close(sampler(seed=1, y=y), fastdiff.sample(model, 20, 2.0, y=y, seed=1, **kw), rtol=0,
                                   atol=1e-6)
    assert y0.tolist() == [0, 1, 2, 1, 0]
