"""FastDiffScheduler.from_config of diffusers' SASolverScheduler (method sa_solver: diffusers' predictor / corrector
orders, its order-2 weights as simple_order_2, its lower_order_final, its default tau = 1 on timesteps 200-800 as
eta on the grid interval of those steps) against SASolverScheduler itself on the same tiny random UNet2DModel, grid,
initial latents and noise (diffusers' randn_tensor answered with fastdiff's stream of the step); img2img from a begin
index; the refusals. Tolerance: max |ours - theirs| <= 1e-5 max |theirs| in float32 (measured: see each test)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_sasolver  # noqa: E402

from fastdiff.adapters.diffusers import FastDiffScheduler  # noqa: E402
from fastdiff.sampling.core.stage import draw_stream  # noqa: E402
from test_adapter_diffusers import tiny_unet  # noqa: E402
from test_adapter_diffusers_generic import SD15, _close, _feed, _loop, _ours, _x  # noqa: E402

SEEDS = [3, 4]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def _run(unet, monkeypatch, config, steps, start=0, init=None, float64_sigmas=False):
    """(ours, theirs, our scheduler): diffusers' SASolverScheduler draws fastdiff's stream of its step index (it
    draws on every step; the steps with tau = 0 scale the draw by 0). ``float64_sigmas``: diffusers' lambdas from its
    sigmas in float64 (it takes them in float32, whose rounding its order-3 weights amplify: 2.3e-5 of max |x| from
    fastdiff's float64 weights on Karras sigmas at orders 3 / 3, 2.3e-6 with float64 sigmas)."""
    if float64_sigmas:
        set_timesteps = diffusers.SASolverScheduler.set_timesteps

        def promoted(self, *args, **kw):
            set_timesteps(self, *args, **kw)
            self.sigmas = self.sigmas.double()

        monkeypatch.setattr(diffusers.SASolverScheduler, "set_timesteps", promoted)
    ref = diffusers.SASolverScheduler(**config)
    ours = _ours(ref)
    ours.set_seeds(SEEDS)
    got, _ = _loop(unet, ours, _x(), steps, start=start, init=init)
    hook = _feed(monkeypatch, scheduling_sasolver, lambda s: draw_stream(s.step_index), SEEDS)
    want, _ = _loop(unet, ref, _x(), steps, start=start, init=init, before_step=hook)
    return got, want, ours


@pytest.mark.parametrize("config,steps,float64_sigmas", [
    ({}, 8, False),  # predictor 2, corrector 2 (simple order-2 weights), tau = 1 on timesteps 200-800
    (dict(predictor_order=3, corrector_order=4), 10, True),  # (5.7e-6 with diffusers' float32 sigmas)
    (dict(predictor_order=4, corrector_order=4, prediction_type="v_prediction"), 12, False),
    (dict(predictor_order=1, corrector_order=3, lower_order_final=False), 6, False),
    (dict(predictor_order=3, corrector_order=1, timestep_spacing="trailing", **SD15), 7, False),
    (dict(use_karras_sigmas=True), 9, False),  # ends on a zero-length step
    (dict(use_karras_sigmas=True, predictor_order=3, corrector_order=3), 9, True),
    (dict(prediction_type="sample", timestep_spacing="leading", steps_offset=1), 5, False),
    ({}, 2, False),
    ({}, 1, False),
])
def test_matches_sasolver_on_fastdiff_noise(unet, monkeypatch, config, steps, float64_sigmas):
    """Measured: max relative error 1e-7 to 9e-7, 3.9e-6 with Karras sigmas (2.3e-6 at orders 3 / 3 with float64
    sigmas, 2.3e-5 without)."""
    got, want, ours = _run(unet, monkeypatch, config, steps, float64_sigmas=float64_sigmas)
    assert ours.config.method == "sa_solver"
    assert ours.config.method_options["simple_order_2"] is True
    _close(got, want)


def test_options_follow_the_config(unet):
    ours = FastDiffScheduler.from_config(diffusers.SASolverScheduler(predictor_order=3, corrector_order=1,
                                                                     lower_order_final=False))
    assert ours.config.method_options == {"predictor_order": 3, "corrector_order": 1, "simple_order_2": True,
                                          "lower_order_final": False, "eta": 1.0}
    ours.set_timesteps(10)  # timesteps 999, 899, ..., 100: tau = 1 on the steps from 799 to 200
    options = ours._sa_solver_tau()
    assert options["eta"] == 1.0 and options["sde_start_percent"] == ours._grid[3]
    assert options["sde_end_percent"] == ours._grid[9]


@pytest.mark.parametrize("steps,start", [(10, 3), (8, 6)])
def test_img2img_start_matches_diffusers(unet, monkeypatch, steps, start):
    """set_begin_index(t_start) and add_noise: both restart the warm-up at the begin index and count
    lower_order_final over the steps left; grid step i draws stream draw_stream(i) of the whole schedule on both
    sides."""
    init = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    got, want, _ = _run(unet, monkeypatch, dict(predictor_order=3, corrector_order=3), steps, start=start, init=init)
    _close(got, want)


@pytest.mark.parametrize("config,match", [
    (dict(algorithm_type="noise_prediction"), r"algorithm_type='noise_prediction' .*data_prediction"),
    (dict(tau_func=lambda t: 0.5), r"tau_func=.* custom tau_func is not expressible"),
    (dict(variance_type="learned_range"), r"variance_type='learned_range' .*learned variance"),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), r"use_flow_sigmas=True"),
    (dict(thresholding=True), r"thresholding=True"),
    (dict(prediction_type="flow_prediction"), r"prediction_type='flow_prediction' is not supported"),
])
def test_refusals_name_the_option(config, match):
    with pytest.raises(ValueError, match=match):
        FastDiffScheduler.from_config(diffusers.SASolverScheduler(**config))
