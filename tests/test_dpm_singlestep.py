"""method "dpm_singlestep" (fastdiff/sampling/methods/dpm_singlestep.py): diffusers' singlestep DPM-Solver(++) on any
path. Its split of the steps into groups is diffusers' get_order_list; its convergence order against the exact flow
map of a Gaussian; the samples of a mixture; its stage layout and option errors. (The updates against diffusers'
DPMSolverSinglestepScheduler itself: tests/test_adapter_diffusers_generic.py.)"""

import itertools
import math

import pytest

import fastdiff
from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
from fastdiff.paths import get_path
from fastdiff.sampling.methods import get_method
from fastdiff.sampling.methods.dpm_singlestep import group_sizes
import convergence
from convergence import flow_map_errors
from test_sample import N, _quadratic_grid, _zmax


def _runs(orders):
    """diffusers' order list [1, 2, 3, 1, 2, 1] as group sizes [3, 2, 1]: a group starts at each 1."""
    sizes = []
    for o in orders:
        if o == 1:
            sizes.append(1)
        else:
            sizes[-1] += 1
    return sizes


@pytest.mark.parametrize("order,lower_order_final,final", itertools.product((1, 2, 3), (True, False),
                                                                           ("zero", "sigma_min")))
def test_groups_are_diffusers_order_list(order, lower_order_final, final):
    diffusers = pytest.importorskip("diffusers")
    for steps in range(1, 21):
        sched = diffusers.DPMSolverSinglestepScheduler(solver_order=order, lower_order_final=lower_order_final,
                                                       final_sigmas_type=final)
        sched.set_timesteps(steps)  # (it turns lower_order_final on where the steps need it, as group_sizes does)
        assert group_sizes(steps, order, lower_order_final, final == "zero") == _runs(sched.order_list), steps


# (options, path, prediction, order, measured slopes over 24 -> 48 -> 96 steps on one AMD EPYC)
CONVERGENCE = [
    (dict(order=2), "condot", "velocity", 2.0),  # 1.82, 1.91
    (dict(order=2, algorithm_type="dpmsolver"), "vp", "eps", 2.0),  # 2.03, 2.04
    (dict(order=3, solver_type="heun"), "vp", "eps", 3.0),  # 2.79, 2.91
    (dict(order=3), "condot", "velocity", 3.0),  # 2.99, 3.06
    (dict(order=3, algorithm_type="dpmsolver"), "vp", "eps", 3.0),  # 3.24, 3.07
]


@pytest.mark.parametrize("options,path,prediction,order", CONVERGENCE)
def test_convergence_order(options, path, prediction, order):
    """Error against the exact flow map of a Gaussian on [0.05, 0.95] (no singular end): with lower_order_final=False
    and step counts divisible by the order every group is a full one, and the slopes of log error are the order."""
    errors = flow_map_errors("dpm_singlestep", path, prediction, (24, 48, 96), lower_order_final=False, **options)
    slopes = convergence.slopes(errors)
    assert all(order - 0.35 < s < order + 0.6 for s in slopes), (errors, slopes)


@pytest.mark.parametrize("options", [{}, dict(order=3), dict(order=3, algorithm_type="dpmsolver", solver_type="heun")])
def test_samples_the_mixture(options):
    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, "vp", "eps")
    grid = _quadratic_grid(40)
    grid[0] = 1e-3
    x = fastdiff.sample(model, None, method="dpm_singlestep", shape=(2,), seed=3, path="vp", prediction="eps",
                        batch_size=N, timesteps=grid, **options)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


def test_stage_layout():
    """One stage per grid step; a group's stages but its last keep their output (side0, side1) for the later ones,
    which read them as history; the step to sigma = 0 is alone and first order (x' = alpha' D)."""
    path, grid = get_path("vp"), [0.02 + 0.98 * i / 8 for i in range(9)]  # 8 steps, the last to sigma = 0
    stages = get_method("dpm_singlestep").stages(path, grid, "x0", order=3, algorithm_type="dpmsolver++",
                                                 solver_type="heun", lower_order_final=True)
    assert [s.step for s in stages] == list(range(8)) and all(s.final for s in stages)
    assert group_sizes(8, 3, True, True) == [3, 3, 1, 1]
    assert [s.side for s in stages] == ["side0", "side1", None, "side0", "side1", None, None, None]
    assert [s.history_buffers() for s in stages] == [(), ("side0",), ("side0", "side1"), (), ("side0",),
                                                     ("side0", "side1"), (), ()]
    last = stages[-1]  # x0 prediction g: x' = alpha(1) g
    assert (last.c_x, last.c_pred) == (0.0, pytest.approx(path.coefficients(1.0)[0], rel=1e-12))
    # from alpha = 0 (t = 0 on CondOT): DDIM's first-order limit, the groups after it
    stages = get_method("dpm_singlestep").stages(get_path("condot"), [0.0, 0.3, 0.6, 0.9], "velocity", order=2,
                                                 algorithm_type="dpmsolver++", solver_type="midpoint",
                                                 lower_order_final=False)
    assert [s.side for s in stages] == [None, "side0", None] and all(math.isfinite(s.c_x) for s in stages)


def test_options_are_checked():
    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), batch_size=2, path="vp", prediction="eps", method="dpm_singlestep",
              timesteps=[0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match="order must be 1, 2 or 3 for method='dpm_singlestep', got 4"):
        fastdiff.sample(model, None, order=4, **kw)
    with pytest.raises(ValueError, match="algorithm_type must be 'dpmsolver\\+\\+' or 'dpmsolver'"):
        fastdiff.sample(model, None, algorithm_type="sde-dpmsolver++", **kw)
    with pytest.raises(ValueError, match="solver_type must be 'midpoint' or 'heun' for method='dpm_singlestep'"):
        fastdiff.sample(model, None, solver_type="bh2", **kw)
    with pytest.raises(TypeError, match="lower_order_final must be True or False"):
        fastdiff.sample(model, None, lower_order_final="no", **kw)
    with pytest.raises(ValueError, match="algorithm_type applies to method='dpm_singlestep'"):
        fastdiff.sample(model, None, **{**kw, "method": "euler"}, algorithm_type="dpmsolver")
