"""The fused step's statistics (fastdiff/ops/step_stats.py) on every backend against the specification: the pick is
step caching's subsample, the sums are the subsample's L1 norms, the keep buffers the picked values, the step's own
outputs unchanged; odd shapes (partial blocks, strided picks across blocks), 16-bit predictions, the blend g, a
clip, per-sample rows, aliasing, a sample split between threads, and clear errors."""

import pytest
import torch

from conftest import BACKENDS, interpreted
from fastdiff.ops.sampler_step import sampler_step
from fastdiff.ops.step_stats import BLEND, NO_Q, StepStats, picked, picked_indices, subsample_pick
from fastdiff.sampling.features.caching import _subsample

SHAPES = [(3, 4103), (2, 5, 13, 11), (2, 3, 64, 70), (1, 129), (4, 8, 8)]


@pytest.mark.parametrize("shape", [(2, 5000), (2, 100), (3, 4, 9, 10), (2, 17, 16), (1, 2, 3, 4, 5)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("f", [1, 2, 3, 8])
def test_the_pick_is_step_cachings_subsample(shape, f):
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    pick = subsample_pick(shape, f)
    n = x[0].numel()
    want = _subsample(x, f).reshape(shape[0], -1)
    idx = picked_indices(n, pick)
    assert picked(n, pick) == idx.numel() == want.shape[1]
    assert torch.equal(x.reshape(shape[0], n)[:, idx], want)


def _case(shape, dtype, device, K1=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device)
    preds = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(K1)]
    return x, preds, [1.0, 3.5, -0.5][:K1], [0.9, -0.25, 0.0, 0.0]


def _stats(x, pick, refs: bool, keeps: bool, q: bool, seed=1):
    B, n = x.shape[0], x[0].numel()
    S = picked(n, pick)
    g = torch.Generator().manual_seed(seed)

    def buf():
        return torch.randn(B, S, generator=g).to(x.device)

    sums = torch.full((B, 3), 0.5, dtype=torch.float64, device=x.device)  # the kernel adds to it
    return StepStats(sums, pick, x_ref=buf() if refs else None, x_keep=buf() if keeps else None,
                     q_ref=buf() if refs and q else None, q_keep=buf() if keeps and q else None)


def _run(backend, x, preds, weights, coeffs, stats, **kw):
    return sampler_step(x, preds, weights=weights, coeffs=coeffs, stats=stats, backend=backend, **kw)


def _copy(stats):
    def clone(t):
        return None if t is None else t.clone()

    return StepStats(stats.sums.clone(), stats.pick, clone(stats.x_ref), clone(stats.x_keep), clone(stats.q_ref),
                     clone(stats.q_keep))


def _assert_stats(got, want, q_exact=True):
    # the step's values are the kernel's (fma: within an ulp of the reference's), the sums are of those
    torch.testing.assert_close(got.sums, want.sums, rtol=1e-5, atol=1e-5)
    for col, keep, ref in ((0, got.x_keep, got.x_ref), (1, got.q_keep, got.q_ref)):
        if keep is not None and ref is not None:  # exactly its own values' sums (to the order of the adds)
            torch.testing.assert_close(got.sums[:, col], 0.5 + (keep - ref).double().abs().sum(1), rtol=1e-12,
                                       atol=1e-12)
    if want.x_keep is not None:  # exactly the kernel's output: _run's callers check
        torch.testing.assert_close(got.x_keep, want.x_keep, rtol=1e-5, atol=1e-5)
    if want.q_keep is not None:
        if q_exact:
            assert torch.equal(got.q_keep, want.q_keep)
        else:  # the blend: the kernels' fma against the reference's two roundings
            torch.testing.assert_close(got.q_keep, want.q_keep, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("f", [1, 3, 8])
@pytest.mark.parametrize("branch", [NO_Q, BLEND, 0, 1])
def test_stats_match_the_specification(backend, shape, f, branch):
    name, device = backend
    x, preds, w, c = _case(shape, torch.float32, device)
    pick = subsample_pick(shape, f, branch)
    stats = _stats(x, pick, refs=True, keeps=True, q=branch != NO_Q)
    want = _copy(stats)
    out_ref = _run("reference", x, preds, w, c, want)
    out = _run(name, x, preds, w, c, stats)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    _assert_stats(stats, want, q_exact=branch != BLEND)
    assert torch.equal(stats.x_keep, _subsample(out, f).reshape(x.shape[0], -1))  # the values it wrote
    # the oracle by hand, on step caching's subsample (the pick, test above)
    B = x.shape[0]
    osub = _subsample(out_ref, f).reshape(B, -1)
    assert torch.equal(want.x_keep, osub)
    torch.testing.assert_close(want.sums[:, 0], 0.5 + (osub.double() - stats.x_ref.double()).abs().sum(1))
    if branch != NO_Q:
        q = preds[branch] if branch >= 0 else preds[0] + w[1] * (preds[1] - preds[0])
        qsub = _subsample(q, f).reshape(B, -1).double()
        torch.testing.assert_close(want.sums[:, 2], 0.5 + qsub.abs().sum(1))
        torch.testing.assert_close(want.sums[:, 1], 0.5 + (qsub - stats.q_ref.double()).abs().sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_stats_of_16_bit_predictions(backend, dtype):
    name, device = backend
    shape = (2, 3, 33, 35)
    x, preds, w, c = _case(shape, dtype, device)
    for branch in (1, BLEND):
        stats = _stats(x, subsample_pick(shape, 4, branch), refs=True, keeps=True, q=True)
        want = _copy(stats)
        _run("reference", x, preds, w, c, want)
        _run(name, x, preds, w, c, stats)
        _assert_stats(stats, want, q_exact=branch != BLEND)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("parts", ["sums only", "refs only", "keeps only"])
def test_stats_with_some_buffers(backend, parts):
    name, device = backend
    shape = (3, 6000)
    x, preds, w, c = _case(shape, torch.float32, device)
    stats = _stats(x, subsample_pick(shape, 8, 1), refs=parts == "refs only", keeps=parts == "keeps only", q=True)
    want = _copy(stats)
    _run("reference", x, preds, w, c, want)
    _run(name, x, preds, w, c, stats)
    _assert_stats(stats, want)
    if parts != "refs only":
        assert torch.equal(stats.sums[:, :2], want.sums[:, :2]) and (stats.sums[:, :2] == 0.5).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_step_is_unchanged_by_its_statistics(backend):
    name, device = backend
    shape = (3, 2, 40, 41)
    x, preds, w, c = _case(shape, torch.float32, device)
    plain = _run(name, x, preds, w, c, None)
    stats = _stats(x, subsample_pick(shape, 2, BLEND), refs=True, keeps=True, q=True)
    assert torch.equal(_run(name, x, preds, w, c, stats), plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_in_place_with_a_clip_and_per_sample_rows(backend):
    name, device = backend
    shape = (3, 5, 17)
    x, preds, w, _ = _case(shape, torch.float32, device)
    rows = [1.0, -2.0, 0.5, 1.5]  # out = x - 2 g, side = 0.5 x + 1.5 g
    for kw in ({"clip": [0.7, -2.0]}, {"coeffs": torch.tensor([rows] * 3).add_(torch.arange(3.0)[:, None] / 10)}):
        stats = _stats(x, subsample_pick(shape, 2, 0), refs=True, keeps=True, q=True)
        want = _copy(stats)
        coeffs = kw.pop("coeffs", rows)
        coeffs = coeffs.to(device) if isinstance(coeffs, torch.Tensor) else coeffs
        x_ref, x_own = x.clone(), x.clone()
        _run("reference", x_ref, preds, w, coeffs, want, outs=[x_ref], **kw)  # outs[0] = x: in place
        _run(name, x_own, preds, w, coeffs, stats, outs=[x_own], **kw)
        torch.testing.assert_close(x_own, x_ref, rtol=1e-5, atol=1e-5)
        _assert_stats(stats, want)
        assert torch.equal(want.x_keep, _subsample(x_ref, 2).reshape(3, -1))  # after the clip


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sample_split_between_tasks(backend):
    """Samples of 2^17 elements (several tasks each on the CPU): every task's part of a sample's sums lands."""
    name, device = backend
    shape = (2, 1 << 15) if interpreted(name) else (2, 1 << 17)
    x, preds, w, c = _case(shape, torch.float32, device, K1=1)
    pick = (shape[1], 1, 1, 1, 0)  # every element
    stats = _stats(x, pick, refs=True, keeps=True, q=True)
    want = _copy(stats)
    _run("reference", x, preds, [1.0], c, want)
    _run(name, x, preds, [1.0], c, stats)
    _assert_stats(stats, want)


def test_stats_errors_name_the_argument():
    x, preds, w, c = _case((2, 4, 6), torch.float32, "cpu")
    sums = torch.zeros(2, 3, dtype=torch.float64)
    pick = subsample_pick((2, 4, 6), 2, 0)
    S = picked(24, pick)
    cases = [
        (StepStats(sums.float(), pick), "stats.sums must be a contiguous float64"),
        (StepStats(sums, (24, 4, 6, 2)), "stats.pick must be 5 ints"),
        (StepStats(sums, (24, 4, 6, 0, 0)), "H, W and f must be >= 1"),
        (StepStats(sums, (20, 4, 6, 2, 0)), "m must be n = 24"),
        (StepStats(sums, (25, 1, 1, 1, 0)), r"m must be in \[0, 24\]"),
        (StepStats(sums, (24, 4, 6, 2, 2)), "branch must be -2"),
        (StepStats(sums, pick, x_ref=torch.zeros(2, S + 1)),
         r"stats.x_ref must be a contiguous float32 tensor \[B, S\]"),
        (StepStats(sums, (24, 4, 6, 2, NO_Q), q_keep=torch.zeros(2, S)), "stats.q_keep needs q"),
        (StepStats(sums, pick, x_keep=x.reshape(2, -1)[:, :S]), "stats.x_keep"),
        ("stats", "stats must be a fastdiff.ops.step_stats.StepStats"),
    ]
    for stats, message in cases:
        with pytest.raises((TypeError, ValueError), match=message):
            sampler_step(x, preds, weights=w, coeffs=c, stats=stats, backend="reference")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.id in ("cpu", "cuda")])
def test_the_native_op_checks_stats(backend):
    """torch.ops.fastdiff.sampler_step called directly refuses bad statistics buffers (no write out of bounds)."""
    name, device = backend
    x, preds, w, c = _case((2, 4, 6), torch.float32, device)
    sums = torch.zeros(2, 3, dtype=torch.float64, device=device)
    op = torch.ops.fastdiff.sampler_step
    args = (x, preds, [], torch.zeros(2, dtype=torch.int64, device=device), [], w, c, None, None,
            [torch.empty_like(x)], None, None, None)
    empty = torch.empty(0, device=device)
    with pytest.raises(RuntimeError, match=r"x_ref must be a contiguous float32 tensor \[B, S\] = \[2, 6\]"):
        op(*args, [sums, torch.zeros(2, 5, device=device), empty, empty, empty], [24, 4, 6, 2, 0])
    with pytest.raises(RuntimeError, match="stats_pick's branch"):
        op(*args, [sums, empty, empty, empty, empty], [24, 4, 6, 2, 3])
    op(*args, [sums, empty, empty, empty, empty], [24, 4, 6, 2, 0])
    assert (sums[:, 2] > 0).all() and (sums[:, :2] == 0).all()
