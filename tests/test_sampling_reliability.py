"""Reliability round 2: regressions for the sampling loop (sample, invert, guidance, classifier guidance,
editing): the backend in force, EDM churn without noise, non-finite classifiers, callbacks under batched CFG,
condition batches, bool arguments, and the errors of bad arguments (each names the argument at fault)."""

import math

import pytest
import torch

import fastdiff
from fastdiff import _backends
from fastdiff.adapters import k_diffusion as fk
from fastdiff.paths import VE
from fastdiff.sampling.features.guidance import APG


def decay(x, t, y=None):
    return -x


def labelled(x, t, y):  # a conditional velocity field: the labels shift it
    return -x + 0.25 * y.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _spy(monkeypatch, backend: str) -> list:
    """Counts the sampler_step calls of ``backend``."""
    calls = []
    kernels = _backends.get(backend).kernels
    original = kernels["sampler_step"]

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setitem(kernels, "sampler_step", spy)
    return calls


# ---- 1. the backend in force -----------------------------------------------------------------------


def test_sample_follows_use_backend(monkeypatch):
    calls = _spy(monkeypatch, "reference")
    with fastdiff.use_backend("reference"):
        fastdiff.sample(decay, 3, shape=(4,), batch_size=2)
    assert calls


def test_sample_follows_the_environment(monkeypatch):
    calls = _spy(monkeypatch, "reference")
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    fastdiff.sample(decay, 3, shape=(4,), batch_size=2)
    assert calls


def test_explicit_backend_still_wins(monkeypatch):
    if not fastdiff.backends()["cpu"]:
        pytest.skip("the cpu backend is not built")
    calls = _spy(monkeypatch, "reference")
    with fastdiff.use_backend("reference"):
        fastdiff.sample(decay, 3, shape=(4,), batch_size=2, backend="cpu")
    assert not calls


def test_langevin_follows_use_backend(monkeypatch):
    calls = _spy(monkeypatch, "reference")
    with fastdiff.use_backend("reference"):
        fastdiff.langevin(lambda x: -x, steps=3, step_size=0.1, shape=(4,), batch_size=2)
    assert calls


def test_log_likelihood_follows_use_backend(monkeypatch):
    calls = _spy(monkeypatch, "reference")
    with fastdiff.use_backend("reference"):
        fastdiff.log_likelihood(lambda x, t, y=None: -0.5 * x, torch.zeros(2, 3), 3)
    assert calls


# ---- 2. churn with s_noise = 0 ---------------------------------------------------------------------


def _denoiser(x, sigma):  # the exact denoiser of N(0, I) data: D = x / (1 + sigma^2)
    return x / (1.0 + sigma.view(-1, *([1] * (x.dim() - 1))) ** 2)


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun"])
def test_churn_without_noise_matches_k_diffusion(name):
    from fastdiff.bench.peers import k_diffusion_sampling

    try:
        kd = k_diffusion_sampling()
    except ImportError as exc:
        pytest.skip(f"k-diffusion not installed: {exc}")
    sigmas = kd.get_sigmas_karras(6, 0.05, 10.0)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    kw = dict(s_churn=4.0, s_noise=0.0)
    ref = getattr(kd, name)(_denoiser, x.clone(), sigmas, disable=True, **kw)
    plain = getattr(kd, name)(_denoiser, x.clone(), sigmas, disable=True)
    assert not torch.allclose(ref, plain, atol=1e-3)  # the churn's raised levels change the result
    got = getattr(fk, name)(_denoiser, x.clone(), sigmas, **kw)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_sample_churn_without_noise_steps_from_the_raised_level():
    # s_noise -> 0 is continuous: a vanishing draw gives the noiseless churn's samples
    kw = dict(shape=(3,), batch_size=2, path=VE(10.0), prediction="x0", timesteps=[0.4, 0.6, 0.8, 0.9, 1.0],
              steps=None, s_churn=3.0)
    model = lambda x, t, y: x / (1.0 + (10.0 * (1.0 - t.view(-1, 1))) ** 2)  # noqa: E731
    noiseless = fastdiff.sample(model, s_noise=0.0, **kw)
    tiny = fastdiff.sample(model, s_noise=1e-30, **kw)
    torch.testing.assert_close(noiseless, tiny)


# ---- 3. non-finite classifier gradients -------------------------------------------------------------


def _nan_classifier(bad_from: float, bad_to: float = 2.0):
    def classifier(x, t):
        logits = torch.stack([x.sum(1), -x.sum(1)], 1)
        bad = ((t >= bad_from) & (t <= bad_to)).view(-1, 1)
        # NaN added (not multiplied: where's backward would spread NaN to every row)
        return logits + torch.where(bad, float("nan"), 0.0)

    return classifier


def test_classifier_nan_at_the_last_step_raises():
    # euler, 4 steps from T_MIN_SINGULAR: the last step starts near t = 0.75
    with pytest.raises(FloatingPointError, match=r"classifier.*step 3"):
        fastdiff.sample(decay, 4, shape=(3,), y=torch.tensor([0, 1]), classifier=_nan_classifier(0.7))


def test_classifier_nan_is_blamed_on_the_classifier_at_its_step():
    with pytest.raises(FloatingPointError, match=r"classifier.*step 1\b"):
        fastdiff.sample(decay, 4, shape=(3,), y=torch.tensor([0, 1]), classifier=_nan_classifier(0.2, 0.3))


# ---- 4. callbacks under batched CFG --------------------------------------------------------------


def test_callback_in_place_edit_reaches_both_branches():
    def halve(step, t, x, x0):
        if step == 1:
            x.mul_(0.5)

    kw = dict(shape=(3,), y=torch.tensor([1, 2]), null_y=0, callback=halve, seed=3)
    batched = fastdiff.sample(labelled, 4, 3.0, cfg_batch=True, **kw)
    separate = fastdiff.sample(labelled, 4, 3.0, cfg_batch=False, **kw)  # one state buffer: the oracle
    torch.testing.assert_close(batched, separate)


# ---- 5. and 7. condition batches ----------------------------------------------------------------


def test_conditions_of_mixed_dtypes_are_refused():
    seen = []

    def model(x, t, y):
        seen.append(y.dtype)
        return -x

    with pytest.raises(TypeError, match=r"conditions\[1\]"):
        fastdiff.sample(model, 2, 2.0, shape=(3,), conditions=[torch.tensor([0, 1]), torch.tensor([0.5, 1.5])],
                        null_y=0)
    assert not seen


@pytest.mark.parametrize("bad", [5, None, "ab", torch.ones(2, 2, dtype=torch.long), [0, 1]],
                         ids=["int", "None", "str", "shape", "list-with-tensor"])
def test_malformed_conditions_name_the_entry(bad):
    with pytest.raises((TypeError, ValueError), match=r"conditions\[1\]"):
        fastdiff.sample(labelled, 2, 2.0, shape=(3,), conditions=[torch.tensor([0, 1]), bad], null_y=0)


def test_null_y_of_the_wrong_kind_names_null_y():
    with pytest.raises(TypeError, match="null_y"):
        fastdiff.sample(labelled, 2, 2.0, shape=(3,), y=torch.tensor([0, 1]), null_y="four")


# ---- 6. bool arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cfg_batch", "check_finite", "progress", "cuda_graph"])
def test_sample_bool_arguments_take_only_bools(name):
    with pytest.raises(TypeError, match=name):
        fastdiff.sample(labelled, 2, 2.0, shape=(3,), y=torch.tensor([0, 1]), null_y=0, **{name: "no"})


def test_invert_bool_arguments_take_only_bools():
    with pytest.raises(TypeError, match="check_finite"):
        fastdiff.invert(decay, torch.zeros(2, 3), 2, check_finite="no")


def test_apg_original_takes_only_bools():
    with pytest.raises(TypeError, match="original"):
        APG(original="no")


def test_unipc_lower_order_final_takes_only_bools():
    with pytest.raises(TypeError, match="lower_order_final"):
        fastdiff.sample(decay, 3, shape=(3,), batch_size=2, method="unipc", lower_order_final="no")


def test_register_method_flags_take_only_bools():
    from fastdiff.sampling import register_method

    with pytest.raises(TypeError, match="inverts"):
        register_method("never_registered", evals_per_step=1, conversions=(), description="x", inverts="no")


# ---- 7. and 8. errors that name the argument -------------------------------------------------------


def test_init_without_strength_or_known_mask_is_refused():
    with pytest.raises(ValueError, match="strength.*known_mask"):
        fastdiff.sample(decay, 4, init=torch.zeros(2, 3))


@pytest.mark.parametrize("init", [torch.zeros(2, 3, dtype=torch.long), "x", torch.zeros(())],
                         ids=["int", "str", "0-d"])
def test_init_errors_name_init(init):
    with pytest.raises(TypeError, match=r"^init"):
        fastdiff.sample(decay, 4, init=init, strength=0.5)


@pytest.mark.parametrize("method", ["dpmpp_2m", "unipc"])
def test_invert_with_a_noise_level_method_to_t1_names_timesteps(method):
    with pytest.raises(ValueError, match="timesteps"):
        fastdiff.invert(decay, torch.zeros(2, 3), 10, method=method)


@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_device_without_cuda(device):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="device.*CUDA is not available"):
        fastdiff.sample(decay, 2, shape=(3,), batch_size=2, device=device)


def test_cuda_device_beyond_the_gpus():
    with pytest.raises(ValueError, match="device"):
        fastdiff.sample(decay, 2, shape=(3,), batch_size=2, device=f"cuda:{max(torch.cuda.device_count(), 1) + 7}")


@pytest.mark.parametrize("device", ["tpu", 3.5, "meta"])
def test_unknown_or_dataless_device_names_device(device):
    with pytest.raises((TypeError, ValueError), match=r"^device(?!\()"):  # not torch's own "device() received ..."
        fastdiff.sample(decay, 2, shape=(3,), batch_size=2, device=device)


def test_noise_on_meta_names_the_device():
    with pytest.raises(ValueError, match="device"):
        fastdiff.sample(decay, 2, noise=torch.empty(2, 3, device="meta"))


@pytest.mark.parametrize("classifier", [lambda x, t: torch.zeros(x.shape[0], 2),
                                        lambda x, t: x.detach()[:, :2] * 1.0],
                         ids=["constant", "detached"])
def test_classifier_without_a_gradient_path(classifier):
    with pytest.raises(ValueError, match="classifier.*depend on x"):
        fastdiff.sample(decay, 2, shape=(3,), y=torch.tensor([0, 1]), classifier=classifier)


def test_callback_is_checked_before_the_model_runs():
    calls = []

    def model(x, t, y):
        calls.append(1)
        return -x

    with pytest.raises(TypeError, match="callback"):
        fastdiff.sample(model, 2, shape=(3,), batch_size=2, callback=3)
    assert not calls


def test_an_option_error_carries_no_grid_hint():
    """Only a singular conversion gets the "start the grid after the singular point" hint; an option's own error
    (the CLI's --option s_noise=nan) is passed on as it is."""
    with pytest.raises(ValueError, match=r"^s_noise must be a finite number >= 0, got nan$"):
        fastdiff.sample(decay, 3, shape=(2,), batch_size=2, s_churn=1.0, s_noise=math.nan)
    with pytest.raises(ValueError, match="singular.*start the grid after the singular point"):
        fastdiff.sample(decay, None, shape=(2,), batch_size=2, method="dpmpp_2m", prediction="score",
                        timesteps=[0.0, 0.5, 1.0])


def test_non_finite_step_noise_is_named():
    def nan_noise(step, j):
        return torch.full((4, 2), math.nan)

    with pytest.raises(FloatingPointError, match="and step_noise"):
        fastdiff.sample(decay, 3, shape=(2,), batch_size=4, method="euler_ancestral", step_noise=nan_noise)


def test_a_batch_far_beyond_memory_is_refused_naming_batch_size():
    with pytest.raises(ValueError, match=r"batch_size = 1000000000 samples of shape = \(2,\) need .* GiB"):
        fastdiff.sample(decay, 3, shape=(2,), batch_size=10**9)


def test_the_memory_check_honours_the_address_space_limit():
    """Under ulimit -v the host's free memory overstates what the process may take: the allocator's RuntimeError
    came instead of the ValueError naming batch_size."""
    script = ("import resource, fastdiff\n"
              "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY))\n"
              "try:\n"
              "    fastdiff.sample(lambda x, t, y=None: -x, 3, shape=(500,), batch_size=10**6)\n"
              "except ValueError as e:\n"
              "    print('refused:', e)\n")
    import subprocess
    import sys
    from pathlib import Path

    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "refused: batch_size = 1000000 samples of shape = (500,)" in run.stdout, run.stderr[-2000:]


def test_langevin_seed_errors_name_seed():
    for seed in (torch.tensor(1), 1.5):
        with pytest.raises((TypeError, ValueError), match="seed"):
            fastdiff.langevin(lambda x: -x, steps=3, step_size=0.1, shape=(4, 2), seed=seed)


def test_log_likelihood_refuses_meta_data():
    with pytest.raises(ValueError, match="x's device = 'meta'"):
        fastdiff.log_likelihood(decay, torch.zeros(4, 2, device="meta"), 3)
