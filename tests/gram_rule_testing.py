"""What the tests of the branch-function guidance rules (test_tcfg, test_mambo_g, test_apg_mix, test_epsilon_scaling)
share: the backends, the loop's shapes and labels, the hand-written Euler loop the samplers are held against, the
CLI check, and a model of device ops only for the captured-loop checks."""

from __future__ import annotations

import argparse

import pytest
import torch

import fastdiff
from fastdiff.ops.randn import randn

from combination_matrix import gaussian_velocity_model as model

BACKENDS = [b for b in ("cpu", "reference", "triton") if fastdiff.backends()[b]]
SHAPE, B, STEPS = (2, 3), 3, 6
Y, Y2, NULL = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), 3


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def kw(backend, **more):
    return dict(shape=SHAPE, seed=3, backend=backend, **more)


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def hand_euler(blend, grid=None, steps=STEPS, seed=3, batch=B):
    """Euler on CondOT from the sampler's own initial noise, in float64 (the blend's model in float32):
    x' = x + h blend(x, t) over ``grid`` (default: ``steps`` uniform steps from 0 to 1)."""
    x = randn(torch.arange(seed, seed + batch), 0, SHAPE).double()
    grid = [i / steps for i in range(steps + 1)] if grid is None else grid
    for t, t1 in zip(grid, grid[1:]):
        x = x + (t1 - t) * blend(x.float(), torch.full((batch,), t)).double()
    return x.float()


def branches(x, t, a=(1.0,), labels=(Y, Y2), null=NULL):
    """(p_null, Σ_k a_k p_k) of the model at (x, t): the unconditional branch and the weighted conditions."""
    p_null = model(x, t, torch.full((x.shape[0],), null))
    p_c = sum(ak * model(x, t, yk).double() for ak, yk in zip(a, labels))
    return p_null, p_c


def assert_cli_accepts(name: str) -> None:
    """``--guidance name`` parses in the sampling CLI."""
    from fastdiff.cli_sampler import add_sampler_arguments

    p = argparse.ArgumentParser()
    add_sampler_arguments(p)
    assert p.parse_args(["--checkpoint", "c.json", "--guidance", name]).guidance == name


def device_ops_model():
    """A model of device ops only (a linear map and a label embedding, no host read): what a captured loop runs."""
    lin = 0.2 * torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))

    def m(x, t, y):
        return ((x.flatten(1) @ lin) * (1.0 + t[:, None]) + emb[y]).view_as(x)

    return m


def assert_identical_conditions_are_one(backend, guidance, method):
    """conditions=[Y, Y] with weights (1, 1.5) is y=Y with cfg 2.5 under the rule."""
    one = fastdiff.sample(model, STEPS, 2.5, y=Y, null_y=NULL, method=method, guidance=guidance, **kw(backend))
    two = fastdiff.sample(model, STEPS, (1.0, 1.5), conditions=[Y, Y], null_y=NULL, method=method, guidance=guidance,
                          **kw(backend))
    close(two, one)


def assert_two_conditions_act_on_their_weighted_mean(backend, guidance, reference):
    """conditions=[Y, Y2] with weights (2, 1): the rule's ``reference(p_null, p_c, w)`` on the weighted mean p_c of
    the conditions' predictions at the summed weight, in the hand Euler loop."""
    w = (2.0, 1.0)
    a = [wk / sum(w) for wk in w]

    def blend(x, t):
        return reference(*branches(x, t, a), sum(w))

    got = fastdiff.sample(model, STEPS, w, conditions=[Y, Y2], null_y=NULL, guidance=guidance, **kw(backend))
    close(got, hand_euler(blend), 1e-4)


def assert_cfg_one_is_no_rule(backend, rules):
    plain = fastdiff.sample(model, STEPS, 1.0, y=Y, null_y=NULL, **kw(backend))
    for guidance in rules:
        assert torch.equal(fastdiff.sample(model, STEPS, 1.0, y=Y, null_y=NULL, guidance=guidance, **kw(backend)),
                           plain)


def assert_captured_once(recorder, **args):
    """No host read in the rule's weights: the loop of ``args`` (sample()'s, with y and the rule) captures once and
    replays bit for bit (tests/graph_recorder.py, the conftest ``recorder``)."""
    m = device_ops_model()
    for seed in (1, 2):
        run = dict(null_y=NULL, shape=SHAPE, seed=seed, backend=BACKENDS[0], **args)
        torch.testing.assert_close(fastdiff.sample(m, STEPS, 3.0, cuda_graph=True, **run),
                                   fastdiff.sample(m, STEPS, 3.0, **run), rtol=0, atol=0)
    assert recorder.captures == 1 and recorder.replays == 2
