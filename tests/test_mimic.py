"""Mimic (fastdiff.sampling.features.mimic): the rule against the sd-dynamic-thresholding extension's dynthresh
(dynthres_core.py, written here in float64 on each sample alone, with its ComfyUI node's cfg = mimic_scale skip) and
the module's reference on the same clean estimates, over every option; in the loop against hand-written Euler and
DDIM loops on every backend here, with a scheduled mode; the checks."""

import math

import pytest
import torch

import fastdiff
from fastdiff.sampling.features.guidance import RULES, get_rule
from fastdiff.sampling.features.mimic import MODES, Mimic, mimic_reference
from fastdiff.sampling.features.tensor_rules import At

from conftest import BACKENDS
from tensor_rule_testing import NULL, SHAPE, Y, Y2, close, hand, model, preds, sample, tol


def peer_scale(scale, mode, minimum, step, max_steps, sched_val):
    """The extension's interpret_scale."""
    scale -= minimum
    frac = step / (max_steps - 1)
    factor = {"Constant": 1.0, "Linear Down": 1.0 - frac, "Half Cosine Down": math.cos(frac),
              "Cosine Down": math.cos(frac * 1.5707), "Linear Up": frac, "Half Cosine Up": 1.0 - math.cos(frac),
              "Cosine Up": 1.0 - math.cos(frac * 1.5707), "Power Up": math.pow(frac, sched_val),
              "Power Down": 1.0 - math.pow(frac, sched_val),
              "Cosine Repeating": math.cos(frac * 6.28318 * sched_val) * 0.5 + 0.5,
              "Sawtooth": (frac * sched_val) % 1.0}.get(mode)
    if mode == "Linear Repeating":
        portion = (frac * sched_val) % 1.0
        factor = (0.5 - portion) * 2 if portion < 0.5 else (portion - 0.5) * 2
    return scale * factor + minimum


def peer_dynthresh(cond, uncond, cfg_scale, r: Mimic, step=0, max_steps=2):
    """dynthresh of one batch (the extension's variable names), float64, with the node's skip at cfg = mimic."""
    cond, uncond = cond.double(), uncond.double()
    if cfg_scale == r.mimic_scale:
        return uncond + (cond - uncond) * cfg_scale
    mimic_scale = peer_scale(r.mimic_scale, r.mimic_mode, r.mimic_scale_min, step, max_steps, r.sched_val)
    cfg_scale = peer_scale(cfg_scale, r.cfg_mode, r.cfg_scale_min, step, max_steps, r.sched_val)
    relative = cond - uncond
    mim_target, cfg_target = uncond + relative * mimic_scale, uncond + relative * cfg_scale
    mim_flat, cfg_flat = mim_target.flatten(2), cfg_target.flatten(2)
    cfg_means = cfg_flat.mean(dim=2).unsqueeze(2)
    mim_centered, cfg_centered = mim_flat - mim_flat.mean(dim=2).unsqueeze(2), cfg_flat - cfg_means
    p = r.threshold_percentile
    if r.separate_feature_channels:
        if r.variability_measure == "STD":
            mim_ref, cfg_ref = mim_centered.std(dim=2).unsqueeze(2), cfg_centered.std(dim=2).unsqueeze(2)
        else:
            mim_ref = mim_centered.abs().max(dim=2).values.unsqueeze(2)
            cfg_ref = torch.quantile(cfg_centered.abs(), p, dim=2).unsqueeze(2)
    elif r.variability_measure == "STD":
        mim_ref, cfg_ref = mim_centered.std(), cfg_centered.std()
    else:
        mim_ref, cfg_ref = mim_centered.abs().max(), torch.quantile(cfg_centered.abs(), p)
    if r.scaling_startpoint == "ZERO":
        result = cfg_flat * (mim_ref / cfg_ref)
    else:
        if r.variability_measure == "STD":
            renorm = (cfg_centered / cfg_ref) * mim_ref
        else:
            top = torch.maximum(mim_ref, cfg_ref)
            renorm = (cfg_centered.clamp(-top, top) / top) * mim_ref
        result = renorm + cfg_means
    res = result.unflatten(2, mim_target.shape[2:])
    if r.interpolate_phi != 1.0:
        res = res * r.interpolate_phi + cfg_target * (1.0 - r.interpolate_phi)
    return res


def peer(cond, uncond, w, r, step=0, steps=2):
    """The extension on each sample as its own batch (fastdiff's: a sample does not depend on the others)."""
    return torch.cat([peer_dynthresh(cond[b:b + 1], uncond[b:b + 1], w, r, step, steps)
                      for b in range(cond.shape[0])])


OPTIONS = [dict(), dict(threshold_percentile=0.9), dict(separate_feature_channels=False),
           dict(separate_feature_channels=False, threshold_percentile=0.95, interpolate_phi=0.6),
           dict(variability_measure="STD"), dict(variability_measure="STD", separate_feature_channels=False),
           dict(scaling_startpoint="ZERO"), dict(scaling_startpoint="ZERO", variability_measure="STD"),
           dict(scaling_startpoint="ZERO", threshold_percentile=0.8, separate_feature_channels=False),
           dict(mimic_scale=3.0, interpolate_phi=0.3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 33), (2, 3, 1, 5)])
@pytest.mark.parametrize("options", OPTIONS, ids=range(len(OPTIONS)))
def test_rule_is_the_extension(dtype, shape, options):
    u, c = preds(shape, dtype)
    rule = Mimic(**options)
    for w in (12.0, 4.5, 1.5, -2.0):
        ours = rule.guide(u, c, w, At(0, 2, 0.0))
        assert ours.dtype == torch.float32 and ours.shape == u.shape
        spec = peer(c, u, w, rule)
        torch.testing.assert_close(ours.double(), spec, **tol(spec))
        torch.testing.assert_close(mimic_reference(u, c, w, rule, 0, 2), spec, **tol(spec, 1e-12))
    cfg = u.double() + 12.0 * (c.double() - u.double())
    assert (rule.guide(u, c, 12.0, At(0, 2, 0.0)).double() - cfg).abs().max() > 0.1
    one = rule.guide(u[:1], c[:1], 9.0, At(0, 2, 0.0)).double()  # batch 1 is the extension's batch
    torch.testing.assert_close(one, peer_dynthresh(c[:1], u[:1], 9.0, rule), **tol(one))


@pytest.mark.parametrize("mode", MODES)
def test_schedules(mode):
    u, c = preds((3, 5, 7), seed=3)
    rule = Mimic(mimic_mode=mode, cfg_mode=mode, mimic_scale_min=1.5, cfg_scale_min=2.0, sched_val=2.5)
    for step in range(7):
        ours = rule.guide(u, c, 9.0, At(step, 7, 0.0))
        spec = peer(c, u, 9.0, rule, step, 7)
        torch.testing.assert_close(ours.double(), spec, **tol(spec))
    assert rule.scales(9.0, At(0, 1, 0.0)) == rule.scales(9.0, At(0, 2, 0.0))  # one step: fraction 0


def test_zero_variability_is_left_unscaled():
    """A constant channel: the extension divides 0 by 0 (NaN); fastdiff keeps its values (the CFG target)."""
    u, c = preds((2, 3, 4), seed=4)
    u[:, 1], c[:, 1] = 0.5, -0.25
    for options in OPTIONS:
        rule = Mimic(**options)
        ours = rule.guide(u, c, 6.0, At(0, 2, 0.0))
        assert torch.isfinite(ours).all()
        cfg = u[:, 1].double() + 6.0 * (c[:, 1].double() - u[:, 1].double())
        if options.get("separate_feature_channels", True) and options.get("interpolate_phi", 1.0) == 1.0:
            torch.testing.assert_close(ours[:, 1].double(), cfg, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["euler", "ddim"])
def test_sample_is_the_hand_loop(backend, method):
    w, rule = 6.0, Mimic(mimic_scale=2.5, threshold_percentile=0.9, cfg_mode="Linear Down", cfg_scale_min=1.0)
    ours = sample(backend, rule, w, method)
    close(ours, hand(method, lambda u, c, t, i: peer(c, u, w, rule, i, 4)))
    assert (sample(backend, None, w, method) - ours).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_two_conditions(backend):
    w, rule = (3.0, 2.0), Mimic(mimic_scale=2.0)
    ours = sample(backend, rule, w, conditions=[Y, Y2])
    close(ours, hand("euler", lambda u, c, t, i: peer(c, u, sum(w), rule, i, 4), conditions=[Y, Y2],
                     weights=list(w)))


def test_registered_and_checked():
    assert RULES["mimic"] is Mimic and get_rule("mimic") == Mimic()
    assert Mimic(mimic_mode="CONSTANT", variability_measure="std").variability_measure == "STD"
    for name, bad in (("mimic_scale", float("nan")), ("threshold_percentile", 1.5), ("interpolate_phi", -0.1),
                      ("sched_val", "2"), ("mimic_mode", "Linear"), ("cfg_mode", None), ("scaling_startpoint", "MAX"),
                      ("variability_measure", "MAD"), ("mimic_scale_min", float("inf"))):
        with pytest.raises(ValueError, match=name):
            Mimic(**{name: bad})
    with pytest.raises(TypeError, match="separate_feature_channels"):
        Mimic(separate_feature_channels="enable")
    kw = dict(y=Y, null_y=NULL, guidance="mimic", seed=0)
    with pytest.raises(ValueError, match=r"guidance='mimic' centers each channel.*\[2, 9\]"):
        fastdiff.sample(lambda x, t, y: x, 2, 3.0, shape=(9,), **kw)
    with pytest.raises(ValueError, match="variability_measure='STD' needs 2 or more"):
        fastdiff.sample(lambda x, t, y: x, 2, 3.0, shape=(3, 1), y=Y, null_y=NULL, seed=0,
                        guidance=Mimic(variability_measure="STD"))
