"""Perp-Neg (fastdiff.sampling.features.perp_neg): the per-sample weights from the Gram matrix of (1, e, p, n)
against ComfyUI's perp_neg formula (written here in float64, applied to one sample at a time: ComfyUI's sums run
over its batch tensor) on the same predictions, degenerate samples (p = e) included; the rule in the loop against
a hand-written Euler loop on every backend here; and the refusals."""

import pytest
import torch

import fastdiff
from fastdiff.ops.randn import randn
from fastdiff.ops.sample_gram import sample_gram_reference
from fastdiff.ops.sampler_step import sampler_step
from fastdiff.sampling.features.guidance import RULES, branch_weights, get_rule
from fastdiff.sampling.features.perp_neg import PerpNeg, perp_neg_reference

from combination_matrix import gaussian_velocity_model as model

BACKENDS = [b for b in ("reference", "cpu", "triton") if fastdiff.backends()[b]]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def comfy_perp_neg(noise_pred_pos, noise_pred_neg, noise_pred_nocond, neg_scale, cond_scale):
    """ComfyUI's comfy_extras/nodes_perpneg.perp_neg, in float64, for one sample (its sums cover the tensor)."""
    pos = noise_pred_pos.double() - noise_pred_nocond.double()
    neg = noise_pred_neg.double() - noise_pred_nocond.double()
    perp = neg - ((neg * pos).sum() / torch.norm(pos) ** 2) * pos
    return noise_pred_nocond.double() + cond_scale * (pos - perp * neg_scale)


def _comfy(e, p, n, w, s):
    """ComfyUI's formula per sample; where p = e (its 0 / 0) fastdiff's convention, a zero projection."""
    out = []
    for b in range(len(e)):
        if torch.equal(p[b], e[b]):
            out.append(e[b].double() - w * s * (n[b].double() - e[b].double()))
        else:
            out.append(comfy_perp_neg(p[b:b + 1], n[b:b + 1], e[b:b + 1], s, w)[0])
    return torch.stack(out)


def _preds(shape, dtype, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(B, *shape, generator=g) * 0.8 + 0.1
    p = e + torch.randn(B, *shape, generator=g) * torch.linspace(0.2, 1.5, B).view(-1, *([1] * len(shape)))
    n = e + 0.5 * (p - e) + torch.randn(B, *shape, generator=g) * 0.7  # a part along p - e, a part across
    return e.to(dtype), p.to(dtype), n.to(dtype)


def _fused(rule, e, p, n, w, backend, phi=0.0):
    """The blend through the fused step with the rule's per-sample weights (sampler_step's [B, 3] rows)."""
    weights = branch_weights(sample_gram_reference([e, p, n]), rule, w, phi, torch.empty(len(e), 3))
    x = torch.zeros(e.shape, dtype=torch.float32)
    return sampler_step(x, [e, p, n], weights=weights, coeffs=[0.0, 1.0, 0.0, 0.0], backend=backend).double()


def _tol(ref):
    return dict(rtol=0, atol=1e-6 * ref.abs().max().item())


# ---- the rule on given predictions ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2,), (1, 2 ** 12 + 5)])
@pytest.mark.parametrize("w,s", [(8.0, 1.0), (3.0, 2.5), (1.0, 1.0), (5.0, 0.0), (-1.0, 0.7)])
def test_blend_is_comfyui(backend, dtype, shape, w, s):
    if backend == "triton" and (dtype, w) != (torch.float32, 3.0):
        pytest.skip("the triton interpreter pays per launch: one case of each shape")
    e, p, n = _preds(shape, dtype)
    spec = _comfy(e, p, n, w, s)
    ours = _fused(PerpNeg(neg_scale=s), e, p, n, w, backend)
    torch.testing.assert_close(ours, spec, **_tol(spec))
    torch.testing.assert_close(perp_neg_reference(e, p, n, w, s), spec, rtol=0, atol=1e-12 * spec.abs().max().item())


def test_only_the_perpendicular_part_of_the_negative_acts(backend):
    """A negative along p - e changes nothing; one across it pushes away from it, by w neg_scale."""
    e, p, _ = _preds((3, 5), torch.float32)
    along = e + 0.7 * (p - e)
    cfg = e.double() + 4.0 * (p.double() - e.double())
    torch.testing.assert_close(_fused(PerpNeg(), e, p, along, 4.0, backend), cfg, **_tol(cfg))
    across = torch.zeros_like(e)
    across[:, 0, 0], across[:, 1, 0] = 1.0, -1.0
    d = (p - e).flatten(1)
    q = across.flatten(1)
    q = (q - (q * d).sum(1, keepdim=True) / (d * d).sum(1, keepdim=True) * d).view_as(e)  # exactly perpendicular
    got = _fused(PerpNeg(neg_scale=2.0), e, p, (e.double() + q.double()).float(), 4.0, backend)
    want = cfg - 4.0 * 2.0 * q.double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_degenerate_p_equal_e(backend):
    """Samples with p = e (ComfyUI's 0 / 0): the projection is 0, g = e - w neg_scale (n - e)."""
    e, p, n = _preds((3, 5, 7), torch.float32)
    p[1] = e[1]
    p[3] = e[3]
    n[3] = e[3]  # all three equal: g = e
    w, s = 6.0, 1.5
    got = _fused(PerpNeg(neg_scale=s), e, p, n, w, backend)
    assert torch.isfinite(got).all()
    want = perp_neg_reference(e, p, n, w, s)
    torch.testing.assert_close(want[1], e[1].double() - w * s * (n[1].double() - e[1].double()))
    torch.testing.assert_close(want[3], e[3].double())
    torch.testing.assert_close(got, want, **_tol(want))
    regular = [0, 2]  # the other samples are ComfyUI's
    torch.testing.assert_close(got[regular], _comfy(e, p, n, w, s)[regular], **_tol(want))


def test_rescale_toward_the_positive(backend):
    """guidance_rescale composes: the Perp-Neg blend pulled toward p's standard deviation (diffusers' formula)."""
    e, p, n = _preds((3, 5, 7), torch.float32)
    w, s, phi = 5.0, 1.0, 0.7
    g = _comfy(e, p, n, w, s)
    dims = [1, 2, 3]
    r = g * (p.double().std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))
    spec = phi * r + (1 - phi) * g
    torch.testing.assert_close(_fused(PerpNeg(neg_scale=s), e, p, n, w, backend, phi), spec, **_tol(spec))


# ---- in the loop ----------------------------------------------------------------------------------------------

SHAPE, B, STEPS = (2, 3), 3, 6
POS, NEG, EMPTY = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), 3


def _hand_euler(w, s, steps=STEPS, seed=3, interval=None, phi=0.0):
    """Euler on CondOT from the sampler's own initial noise, each step ComfyUI's blend."""
    x = randn(torch.arange(seed, seed + B), 0, SHAPE).double()
    grid = [i / steps for i in range(steps + 1)]
    for t, t1 in zip(grid, grid[1:]):
        xf, tt = x.float(), torch.full((B,), t)
        p = model(xf, tt, POS)
        if interval is None or interval[0] <= t <= interval[1]:
            g = _comfy(model(xf, tt, torch.full((B,), EMPTY)), p, model(xf, tt, NEG), w, s)
            if phi:
                r = g * (p.double().std(dim=[1, 2], keepdim=True) / g.std(dim=[1, 2], keepdim=True))
                g = phi * r + (1 - phi) * g
        else:
            g = p.double()
        x = x + (t1 - t) * g
    return x.float()


@pytest.mark.parametrize("cfg_batch", [True, False])
@pytest.mark.parametrize("w,s", [(4.0, 1.0), (2.5, 3.0)])
def test_sample_is_the_hand_loop(backend, w, s, cfg_batch):
    got = fastdiff.sample(model, STEPS, w, conditions=[POS, NEG], null_y=EMPTY, guidance=PerpNeg(neg_scale=s),
                          shape=SHAPE, seed=3, backend=backend, cfg_batch=cfg_batch)
    torch.testing.assert_close(got, _hand_euler(w, s), rtol=1e-5, atol=1e-5)
    cfg = fastdiff.sample(model, STEPS, w, y=POS, null_y=EMPTY, shape=SHAPE, seed=3, backend=backend)
    assert (got - cfg).abs().max() > 1e-3  # the negative acts here (the check can tell)


def test_interval_schedule_and_rescale_in_the_loop(backend):
    kw = dict(conditions=[POS, NEG], null_y=EMPTY, shape=SHAPE, seed=3, backend=backend)
    got = fastdiff.sample(model, STEPS, 3.0, guidance="perp_neg", guidance_interval=(0.3, 0.8), **kw)
    torch.testing.assert_close(got, _hand_euler(3.0, 1.0, interval=(0.3, 0.8)), rtol=1e-5, atol=1e-5)
    got = fastdiff.sample(model, STEPS, 3.0, guidance="perp_neg", guidance_rescale=0.6, **kw)
    torch.testing.assert_close(got, _hand_euler(3.0, 1.0, phi=0.6), rtol=1e-5, atol=1e-5)


def test_neg_scale_zero_is_cfg_on_the_positive(backend):
    got = fastdiff.sample(model, STEPS, 3.0, conditions=[POS, NEG], null_y=EMPTY, guidance=PerpNeg(neg_scale=0.0),
                          shape=SHAPE, seed=3, backend=backend)
    cfg = fastdiff.sample(model, STEPS, 3.0, y=POS, null_y=EMPTY, shape=SHAPE, seed=3, backend=backend)
    torch.testing.assert_close(got, cfg, rtol=1e-6, atol=1e-6)


def test_degenerate_in_the_loop():
    """A model that ignores the labels: p = e = n everywhere, g = e (no NaN from 0 / 0)."""
    def blind(x, t, y):
        return model(x, t, torch.zeros(x.shape[0], dtype=torch.long))

    got = fastdiff.sample(blind, STEPS, 5.0, conditions=[POS, NEG], null_y=EMPTY, guidance="perp_neg", shape=SHAPE,
                          seed=3)
    plain = fastdiff.sample(blind, STEPS, 1.0, y=POS, shape=SHAPE, seed=3)
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)


# ---- the refusals -------------------------------------------------------------------------------------------------

def test_rule_is_registered_and_checked():
    assert RULES["perp_neg"] is PerpNeg and get_rule("perp_neg") == PerpNeg()
    for bad in (-1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="neg_scale"):
            PerpNeg(neg_scale=bad)


def test_bad_input_names_the_argument():
    kw = dict(shape=SHAPE, steps=3, guidance="perp_neg")
    with pytest.raises(ValueError, match=r"conditions=\[positive, negative\]"):
        fastdiff.sample(model, cfg=3.0, y=POS, null_y=EMPTY, **kw)
    with pytest.raises(ValueError, match=r"conditions=\[positive, negative\]"):
        fastdiff.sample(model, cfg=3.0, conditions=[POS, NEG, POS], null_y=EMPTY, **kw)
    with pytest.raises(ValueError, match="cfg is one scale"):
        fastdiff.sample(model, cfg=[3.0, 2.0], conditions=[POS, NEG], null_y=EMPTY, **kw)
    with pytest.raises(ValueError, match="null_y"):
        fastdiff.sample(model, cfg=3.0, conditions=[POS, NEG], **kw)


@pytest.mark.parametrize("phi", [0.0, 0.5])
def test_cfg_schedule_with_churn_per_sample(phi):
    """Churn per sample with a cfg schedule: each sample's scale at its own times, as when it is sampled alone."""
    churn = [0.0, 0.5, 0.9]
    kw = dict(null_y=EMPTY, shape=SHAPE, method="heun", guidance="perp_neg", guidance_rescale=phi, backend="cpu")
    got = fastdiff.sample(model, 6, lambda t: 2.0 + t, conditions=[POS, NEG], seed=3, s_churn=churn, **kw)
    for b in range(len(POS)):
        alone = fastdiff.sample(model, 6, lambda t: 2.0 + t, conditions=[POS[b:b + 1], NEG[b:b + 1]], seed=3 + b,
                                s_churn=churn[b], **kw)
        torch.testing.assert_close(got[b:b + 1], alone, rtol=1e-6, atol=1e-6)
    fixed = fastdiff.sample(model, 6, 2.5, conditions=[POS, NEG], seed=3, s_churn=churn, **kw)
    assert (got - fixed).abs().max() > 1e-3  # the schedule matters (the check can tell)
