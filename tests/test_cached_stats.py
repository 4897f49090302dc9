"""Step caching's statistics from the fused step's pass (fastdiff/sampling/features/cached_stats.py): the eager
decider reads no subsample where the plan lets the kernels measure, and every run equals the one whose decider reads
the subsamples itself (the statistics' path tested against the rules' references in tests/test_caching.py), bit for
bit, with the same model calls; where the plan writes the next input otherwise or transforms the predictions, it
reads as before."""

import pytest
import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, ring_mixture
from fastdiff.sampling.features import caching
from fastdiff.sampling.features.cached_calls import CachedCalls
from fastdiff.sampling.features.caching import AdaptiveCache, EasyCache, LazyCache

from combination_matrix import gaussian_velocity_model
from test_caching import Counted, _device_model

MIXTURE = MixtureModel(ring_mixture(heterogeneous=True), "condot", "velocity")
GRID = torch.linspace(1e-3, 1.0, 41).tolist()
RULES = {"easycache": EasyCache(0.2), "lazycache": LazyCache(0.2), "adaptive": AdaptiveCache(0.3, max_skips=2)}


def _runs(monkeypatch, model, run):
    """(result, model calls, subsample reads, copies) with the kernels' statistics and with the decider's reads."""
    counts = {}
    mean_abs, copy_into = caching._mean_abs, caching._copy_into

    def counted_mean_abs(*a, **k):
        counts["reads"] += 1
        return mean_abs(*a, **k)

    def counted_copy(*a, **k):
        counts["copies"] += 1
        return copy_into(*a, **k)

    monkeypatch.setattr(caching, "_mean_abs", counted_mean_abs)
    monkeypatch.setattr(caching, "_copy_into", counted_copy)
    out = {}
    for in_step in (True, False):
        monkeypatch.setattr(CachedCalls, "in_step_stats", in_step)
        counts.update(reads=0, copies=0)
        counted = Counted(model)
        out[in_step] = (run(counted), counted.calls, counts["reads"], counts["copies"])
    return out[True], out[False]


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("guided", [False, True])
def test_the_decider_reads_nothing(monkeypatch, method, rule, guided):
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 8
    kw = dict(y=y, cfg=3.0, null_y=torch.full_like(y, 8)) if guided else {}
    (got, calls, reads, copies), (want, want_calls, want_reads, _) = _runs(
        monkeypatch, MIXTURE, lambda m: fastdiff.sample(m, None, timesteps=GRID, noise=noise, method=method,
                                                        cache=RULES[rule], **kw))
    assert torch.equal(got, want) and calls == want_calls < len(GRID) * (2 if method == "heun" else 1)
    assert reads == 0 and copies == 1 and want_reads > 20  # the first input's subsample, copied once


def test_image_shaped_samples_and_a_reused_sampler(monkeypatch):
    """[B, C, H, W] samples (the strided pick, rows across the kernel's blocks), a Sampler called twice."""
    noise = torch.randn(4, 3, 17, 19, generator=torch.Generator().manual_seed(5))

    def model(x, t, y=None):
        return -x * (1.0 - t.view(-1, 1, 1, 1)) + torch.sin(3.0 * x)

    rule = EasyCache(reuse_threshold=0.3, subsample_factor=4)

    def run(m):
        sampler = fastdiff.Sampler(m, None, timesteps=GRID, noise=noise, cache=rule)
        first = sampler(noise=noise)
        return torch.stack([first, sampler(noise=noise)])

    (got, calls, reads, copies), (want, want_calls, _, _) = _runs(monkeypatch, model, run)
    assert torch.equal(got, want) and torch.equal(got[0], got[1]) and calls == want_calls < 2 * (len(GRID) - 1)
    assert reads == 0 and copies == 2


@pytest.mark.parametrize("case, reads", [
    ("inpainting", "all"),  # the known region is written after the step: the decider reads
    ("thresholding", "outputs"),  # the predictions change before the step: the outputs are read
    ("pag", "outputs"),  # a perturbed branch: its outputs are read
    ("conditions", "none"), ("two_calls", "none"), ("interval", "none"), ("rescale", "outputs"), ("apg", "outputs"),
])
@pytest.mark.parametrize("rule", ["easycache", "lazycache"])
def test_features_measure_or_read(monkeypatch, case, reads, rule):
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(3))
    y = torch.arange(6) % 3
    kw = dict(timesteps=GRID, noise=noise, y=y, null_y=3)
    if case == "inpainting":
        kw.update(init=noise * 0.1, known_mask=torch.tensor([1.0, 0.0]), seed=5)
        kw.pop("noise")
    elif case == "thresholding":
        kw.update(dynamic_thresholding=True, prediction="velocity")
    elif case == "pag":
        from fastdiff.sampling.features.perturbed import PAG

        kw.update(guidance=PAG(perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0),
                  perturbed_model=lambda x, t, y=None: 0.8 * gaussian_velocity_model(x, t, y))
    elif case == "conditions":
        kw = dict(timesteps=GRID, noise=noise, conditions=[y, (y + 1) % 3], null_y=3)
    elif case == "two_calls":
        kw["cfg_batch"] = False
    elif case == "interval":
        kw["guidance_interval"] = (0.2, 0.7)
    elif case == "rescale":
        kw["guidance_rescale"] = 0.7
    elif case == "apg":
        kw["guidance"] = "apg"
    (got, calls, n_reads, copies), (want, want_calls, want_reads, _) = _runs(
        monkeypatch, gaussian_velocity_model, lambda m: fastdiff.sample(m, None, 2.0, cache=RULES[rule], **kw))
    assert torch.equal(got, want) and calls == want_calls
    computed = calls // (2 if case == "two_calls" else 1)
    if reads == "all":
        assert n_reads == want_reads
    elif reads == "outputs":  # one read per computed evaluation's output (none for the inputs)
        assert 0 < n_reads < want_reads and n_reads <= computed
    elif rule == "lazycache" and case == "conditions":  # its blend of the first condition is not the kernel's g
        assert 0 < n_reads <= computed
    else:
        assert n_reads == 0 and copies == 1


@pytest.mark.parametrize("in_step", [True, False])
def test_lazycache_decides_on_the_blend_with_one_call_per_branch(monkeypatch, in_step):
    """LazyCache with cfg_batch=False decides on the CFG blend as with one batched call (it took the conditional
    branch alone before), eager with or without the kernels' statistics and captured (the recording stand-in)."""
    from fastdiff.sampling.core import graphs
    from graph_recorder import RecordingCapture

    monkeypatch.setattr(graphs, "CAPTURE", RecordingCapture())
    monkeypatch.setattr(graphs, "CACHE", graphs.GraphCache())
    monkeypatch.setattr(CachedCalls, "in_step_stats", in_step)
    y = torch.tensor([0, 1, 2, 1, 0])
    kw = dict(y=y, null_y=3, shape=(4,), method="euler", cache=LazyCache(reuse_threshold=0.3, start_percent=0.0))
    batched = fastdiff.Sampler(_device_model, 30, 2.0, **kw)
    want = batched(seed=1)
    for cuda_graph in (False, True):
        split = fastdiff.Sampler(_device_model, 30, 2.0, cfg_batch=False, cuda_graph=cuda_graph, **kw)
        torch.testing.assert_close(split(seed=1), want, rtol=0, atol=1e-5 * want.abs().max().item())
        assert split._plan.model_calls.report() == batched._plan.model_calls.report()
    assert "0 of" not in batched._plan.model_calls.report()
