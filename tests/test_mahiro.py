"""Mahiro (fastdiff.sampling.features.mahiro): the rule against ComfyUI's Mahiro node's formula (written here in
float64, on each sample alone) and the module's reference on the same clean estimates, and in the loop against
hand-written Euler and DDIM loops on every backend here, with two conditions and a cfg schedule; the checks."""

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.sampling.features.guidance import RULES, get_rule
from fastdiff.sampling.features.mahiro import Mahiro, mahiro_reference

from conftest import BACKENDS
from tensor_rule_testing import NULL, SHAPE, Y, Y2, close, hand, model, preds, sample, tol


def comfy_mahiro(cond, uncond, scale):
    """ComfyUI's Mahiro (nodes_mahiro.py) on one batch of its post-CFG arguments, float64."""
    cond, uncond = cond.double(), uncond.double()
    leap = cond * scale
    u_leap = uncond * scale
    cfg = uncond + (cond - uncond) * scale
    merge = (leap + cfg) / 2
    normu = torch.sqrt(u_leap.abs()) * u_leap.sign()
    normm = torch.sqrt(merge.abs()) * merge.sign()
    sim = F.cosine_similarity(normu, normm).mean()
    simsc = 2 * (sim + 1)
    return (simsc * cfg + (4 - simsc) * leap) / 4


def comfy_per_sample(cond, uncond, scale):
    """The node on each sample as its own batch (fastdiff's: a sample does not depend on the others)."""
    return torch.cat([comfy_mahiro(cond[b:b + 1], uncond[b:b + 1], scale) for b in range(cond.shape[0])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 9), (2, 3, 1, 5)])
def test_rule_is_comfyui(dtype, shape):
    u, c = preds(shape, dtype)
    for w in (4.0, 7.5, 1.5, 0.5, -2.0):
        ours = Mahiro().guide(u, c, w, None)
        assert ours.dtype == torch.float32 and ours.shape == u.shape
        spec = comfy_per_sample(c, u, w)
        torch.testing.assert_close(ours.double(), spec, **tol(spec))
        torch.testing.assert_close(mahiro_reference(u, c, w), spec, **tol(spec, 1e-12))
    one = Mahiro().guide(u[:1], c[:1], 5.0, None).double()  # batch 1: the node's batch mean is the sample's
    torch.testing.assert_close(one, comfy_mahiro(c[:1], u[:1], 5.0), **tol(one))
    cfg = u.double() + 5.0 * (c.double() - u.double())
    assert (Mahiro().guide(u, c, 5.0, None).double() - cfg).abs().max() > 0.1


def test_zero_estimates():
    """Zero branches: the similarity is 0 (the cosine's eps), k = 2: the mean of the blend and the leap."""
    u = torch.zeros(2, 3, 4, 5)
    c = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(2))
    c[1] = 0.0
    ours = Mahiro().guide(u, c, 3.0, None).double()
    spec = comfy_per_sample(c, u, 3.0)
    torch.testing.assert_close(ours, spec, **tol(spec))
    assert torch.isfinite(ours).all() and ours[1].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["euler", "ddim"])
def test_sample_is_the_hand_loop(backend, method):
    w = 3.5
    ours = sample(backend, "mahiro", w, method)
    close(ours, hand(method, lambda u, c, t, i: comfy_per_sample(c, u, w)))
    assert (sample(backend, None, w, method) - ours).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_two_conditions_and_a_schedule(backend):
    w = (2.0, 1.5)
    ours = sample(backend, Mahiro(), w, conditions=[Y, Y2])
    close(ours, hand("euler", lambda u, c, t, i: comfy_per_sample(c, u, sum(w)), conditions=[Y, Y2],
                     weights=list(w)))
    ours = sample(backend, "mahiro", lambda t: 1.5 + 3 * t)
    close(ours, hand("euler", lambda u, c, t, i: comfy_per_sample(c, u, 1.5 + 3 * t)))


def test_registered_and_checked():
    assert RULES["mahiro"] is Mahiro and get_rule("mahiro") == Mahiro()
    with pytest.raises(TypeError):
        Mahiro(1.0)  # no options: the node has none
    kw = dict(y=Y, null_y=NULL, guidance="mahiro", seed=0)
    with pytest.raises(ValueError, match=r"guidance='mahiro' takes cosine similarities .*\[2\]"):
        fastdiff.sample(lambda x, t, y: x, 2, 3.0, shape=(), **kw)
    with pytest.raises(ValueError, match="sum to 0"):
        fastdiff.sample(model, 2, (1.0, -1.0), shape=SHAPE, conditions=[Y, Y2], null_y=NULL, guidance="mahiro")
