"""method "unipc" (fastdiff/sampling/methods/unipc.py): diffusers' UniPCMultistepScheduler on the same model, grid
and initial state (an analytic mixture's eps predictions on the DiscreteVP path of diffusers' schedule);
the samples of the mixture on other paths; one kernel pass per step."""

import pytest
import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, mode_zscores, ring_mixture
from fastdiff.paths import DiscreteVP
from fastdiff.sampling.methods import get_method


@pytest.mark.parametrize("config", [
    dict(solver_order=1), dict(solver_order=2), dict(solver_order=3), dict(solver_order=3, steps=25),
    dict(solver_order=2, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(solver_order=2, timestep_spacing="trailing")], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_diffusers_unipc(config):
    diffusers = pytest.importorskip("diffusers")
    config = dict(config)
    steps = config.pop("steps", 10)
    sched = diffusers.UniPCMultistepScheduler(**config)
    path = DiscreteVP(sched.alphas_cumprod)
    model = MixtureModel(ring_mixture(heterogeneous=True), path, "eps")
    sched.set_timesteps(steps)
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((x.shape[0],), path.time(float(t))), None), t, x).prev_sample
    end = 1.0 if sched.config.final_sigmas_type == "zero" else path.time(0.0)
    grid = [path.time(float(t)) for t in sched.timesteps] + [end]
    ours = fastdiff.sample(model, None, noise=noise, path=path, prediction="eps", method="unipc", timesteps=grid,
                           order=sched.config.solver_order, solver_type=sched.config.solver_type,
                           lower_order_final=sched.config.lower_order_final)
    torch.testing.assert_close(ours, x, rtol=0, atol=3e-5 * x.abs().max().item())


@pytest.mark.parametrize("path,prediction,order,solver_type", [
    ("vp", "eps", 2, "bh2"), ("vp", "x0", 3, "bh1"), ("condot", "velocity", 3, "bh2"), ("vp-cosine", "velocity", 2, "bh1")])
def test_samples_the_mixture(path, prediction, order, solver_type):
    """The mixture's modes within statistical error at 40 steps (at 20 the bias is dpmpp_2m's or smaller:
    mean z-scores 4.7-11 against 9.5-15 on CondOT and VP-cosine; at 40, 1.8-3.4 against 3.4-5.7)."""
    from test_sample import N, _quadratic_grid, _zmax

    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, path, prediction)
    x = fastdiff.sample(model, None, method="unipc", shape=(2,), seed=3, path=path, prediction=prediction,
                        batch_size=N, timesteps=_quadratic_grid(40), order=order, solver_type=solver_type)
    assert _zmax(mode_zscores(x.double(), mixture)) < 6.0


def test_one_pass_per_step_with_three_previous_outputs_at_most():
    """The corrected state is never stored: each step is one kernel call reading at most the three previous
    x0 predictions (a ring of four side buffers), from the first step on CondOT's t = 0 (lambda = -inf)."""
    path = fastdiff.paths.get_path("condot")
    grid = [i / 12 for i in range(13)]
    stages = get_method("unipc").stages(path, grid, "velocity", order=3, solver_type="bh2", lower_order_final=True)
    assert len(stages) == 12 and all(st.final and st.input == "x" == st.out for st in stages)
    assert max(len(st.history_buffers()) for st in stages) == 3
    for st in stages:
        assert st.side == f"side{st.step % 4}" and st.side not in st.history_buffers()


def test_options_are_checked():
    model = MixtureModel(ring_mixture(), "vp", "eps")
    kw = dict(shape=(2,), batch_size=2, path="vp", prediction="eps", method="unipc")
    with pytest.raises(ValueError, match="order must be 1, 2 or 3 for method='unipc'"):
        fastdiff.sample(model, 5, order=4, **kw)
    with pytest.raises(ValueError, match="solver_type must be 'bh1' or 'bh2'"):
        fastdiff.sample(model, 5, solver_type="midpoint", **kw)
    with pytest.raises(ValueError, match="lower_order_final applies to method='unipc'"):
        fastdiff.sample(model, 5, shape=(2,), batch_size=2, path="vp", prediction="eps", method="euler",
                        lower_order_final=False)
