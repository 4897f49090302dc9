"""Reliability round 2 regressions for Langevin / MALA, likelihoods, predictor-corrector sampling, the
training objectives, the Trainer and the ops: bad arguments fail with errors naming them, and silently
wrong results (a MALA chain stuck on a NaN log-density, a checkpoint of another objective) are refused."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastdiff
from fastdiff.sampling.likelihood import bits_per_dim


def _gauss_log_prob(x):
    return -0.5 * x.square().sum(1)


def _linear_model(x, t, y):
    return -x


# ---- Langevin / MALA ----------------------------------------------------------------------------------

def test_mala_nan_log_prob_raises_naming_log_prob_and_step():
    x0 = torch.zeros(2, 2)
    nan_everywhere = lambda x: _gauss_log_prob(x) * math.nan  # noqa: E731
    with pytest.raises(FloatingPointError, match="log_prob .*starting points"):
        fastdiff.langevin(x0=x0, steps=3, step_size=0.1, log_prob=nan_everywhere, score=lambda x: -x)

    def nan_away_from_start(x):  # finite at x0 = 0, NaN at every proposal
        lp = _gauss_log_prob(x)
        return torch.where(x.abs().sum(1) > 0, math.nan, lp)

    with pytest.raises(FloatingPointError, match="log_prob .*proposal of step 0"):
        fastdiff.langevin(x0=x0, steps=3, step_size=0.1, log_prob=nan_away_from_start, score=lambda x: -x)
    # −inf (zero density) is a rejected proposal, not an error
    out, acc = fastdiff.langevin(x0=x0, steps=3, step_size=0.1, score=lambda x: -x, return_acceptance=True,
                                 log_prob=lambda x: torch.where(x[:, 0] > 0, -math.inf, _gauss_log_prob(x)))
    assert torch.isfinite(out).all() and (acc <= 1).all()


def test_langevin_log_prob_without_gradient_path():
    with pytest.raises(ValueError, match="log_prob.* does not depend on x"):
        fastdiff.langevin(x0=torch.zeros(2, 2), steps=2, step_size=0.1, log_prob=lambda x: torch.zeros(x.shape[0]))


@pytest.mark.parametrize("step_size", ["0.1", ["0.1", "0.1"], [0.1, True]])
def test_langevin_step_size_strings(step_size):
    with pytest.raises(TypeError, match="step_size"):
        fastdiff.langevin(lambda x: -x, torch.zeros(2, 2), steps=2, step_size=step_size)


@pytest.mark.parametrize("name", ["metropolis", "return_acceptance", "progress", "check_finite"])
def test_langevin_bool_arguments(name):
    with pytest.raises(TypeError, match=name):
        fastdiff.langevin(lambda x: -x, torch.zeros(2, 2), steps=2, step_size=0.1, log_prob=_gauss_log_prob,
                          **{name: "no"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_langevin_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="device"):
        fastdiff.langevin(lambda x: -x, shape=(2,), batch_size=2, steps=2, step_size=0.1, device="cuda")
    with pytest.raises(ValueError, match="device"):
        fastdiff.langevin(lambda x: -x, torch.zeros(2, 2), steps=2, step_size=0.1, device="cuda:0")


# ---- likelihoods ---------------------------------------------------------------------------------------

def test_log_likelihood_refuses_probes_with_exact_trace():
    x = torch.randn(2, 2)
    with pytest.raises(ValueError, match="probes"):
        fastdiff.log_likelihood(_linear_model, x, 2, probes=4)
    with pytest.raises(ValueError, match="probe_kind"):
        fastdiff.log_likelihood(_linear_model, x, 2, probe_kind="gaussian")
    exact = fastdiff.log_likelihood(_linear_model, x, 2)
    hutch = fastdiff.log_likelihood(_linear_model, x, 2, divergence="hutchinson", probes=1)
    # u = -x … the divergence of a linear field is the same for every probe: both agree
    torch.testing.assert_close(exact.log_prob, hutch.log_prob)


def test_log_likelihood_model_without_gradient_path():
    with pytest.raises(ValueError, match="model.* no gradient path"):
        fastdiff.log_likelihood(lambda x, t, y: torch.zeros_like(x), torch.randn(2, 2), 2)


def test_log_likelihood_empty_batch():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's std over no samples warned
        r = fastdiff.log_likelihood(_linear_model, torch.randn(0, 2), 2, divergence="hutchinson", probes=2)
    assert r.log_prob.shape == (0,) and r.std_error.shape == (0,)


@pytest.mark.parametrize("name", ["t_data", "t_noise"])
def test_log_likelihood_time_strings(name):
    with pytest.raises(TypeError, match=name):
        fastdiff.log_likelihood(_linear_model, torch.randn(2, 2), 2, **{name: "0.5"})


def test_log_likelihood_progress_flag():
    with pytest.raises(TypeError, match="progress"):
        fastdiff.log_likelihood(_linear_model, torch.randn(2, 2), 2, progress="no")


def test_bits_per_dim_arguments():
    lp = torch.tensor([-3.0])
    with pytest.raises(ValueError, match="dims"):
        bits_per_dim(lp, 0)
    with pytest.raises(ValueError, match="levels"):
        bits_per_dim(lp, 2, levels=0)
    with pytest.raises(ValueError, match="levels"):
        bits_per_dim(lp, 2, levels=1)
    with pytest.raises(ValueError, match="data_range"):
        bits_per_dim(lp, 2, data_range=0.0)
    with pytest.raises(TypeError, match="dims"):
        bits_per_dim(lp, 2.0)
    ref = (3.0 / 2 + math.log(256 / 2.0)) / math.log(2.0)
    assert bits_per_dim(lp, 2).item() == pytest.approx(ref)


# ---- predictor-corrector -------------------------------------------------------------------------------

def _eps_model(x, t, y):
    return torch.zeros_like(x)


@pytest.mark.parametrize("snr, error", [(math.nan, ValueError), ("0.16", TypeError), (0.0, ValueError)])
def test_snr_checked_without_corrector_steps(snr, error):
    with pytest.raises(error, match="snr"):
        fastdiff.sample(_eps_model, 2, path="vp", prediction="eps", shape=(2,), batch_size=1, corrector_steps=0,
                        snr=snr)


def test_annealed_langevin_denoise_flag():
    with pytest.raises(TypeError, match="denoise"):
        fastdiff.sample(_eps_model, 2, path="vp", prediction="eps", shape=(2,), batch_size=1,
                        method="annealed_langevin", n_steps_each=1, denoise="no")


# ---- ops -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1.0, torch.tensor([0.5, 1.0], dtype=torch.float64)], ids=["float", "tensor"])
def test_diffusion_loss_refuses_singular_score_target(t):
    z, pred = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"'score' target is singular at t = 1\.0"):
        fastdiff.ops.diffusion_loss(pred, z, t, [1, 2], 0, "condot", "score")
    # where the target is finite the loss is the reference's: mean over samples of ‖pred + ε/β‖² / n
    t_ok = torch.tensor([0.25, 0.5], dtype=torch.float64)
    eps = fastdiff.ops.randn([1, 2], 0, (3,))
    want = (pred + eps / (1 - t_ok[:, None].float())).square().mean(1).mean()
    got = fastdiff.ops.diffusion_loss(pred, z, t_ok, [1, 2], 0, "condot", "score")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    # x0 needs no noise: t = 1 stays allowed there
    assert torch.isfinite(fastdiff.ops.diffusion_loss(pred, z, 1.0, [1, 2], 0, "condot", "x0"))


@pytest.mark.parametrize("fn", ["philox4x32_10", "philox4x32_10_reference"])
def test_philox_refuses_words_outside_uint32(fn):
    op = getattr(fastdiff.ops, fn)
    key = torch.zeros(1, 2, dtype=torch.int64)
    for bad in (1 << 32, -1):
        with pytest.raises(ValueError, match=r"counter words .*counter\[0, 2\]"):
            op(torch.tensor([[0, 0, bad, 0]]), key)
    with pytest.raises(ValueError, match=r"key words .*key\[0, 1\]"):
        op(torch.zeros(1, 4, dtype=torch.int64), torch.tensor([[0, 1 << 32]]))
    M = (1 << 32) - 1
    assert op(torch.tensor([[M, M, M, M]]), torch.tensor([[M, M]])).shape == (1, 4)  # the largest words pass


# ---- training objectives -------------------------------------------------------------------------------

def test_ncsn_and_score_matching_string_numbers():
    from fastdiff.training import DiffusionObjective, ScoreMatchingObjective, ncsn_objective

    for kw, name in (({"sigma_min": "0.1"}, "sigma_min"), ({"sigma_max": "1.0"}, "sigma_max")):
        with pytest.raises(TypeError, match=name):
            ncsn_objective(**kw)
    for kw, name in (({"t": "0.5"}, "t"), ({"noise_std": "0.1"}, "noise_std")):
        with pytest.raises(TypeError, match=f"^{name} must"):
            ScoreMatchingObjective(**kw)
    for kw, name in (({"logit_mean": "0"}, "logit_mean"), ({"snr_gamma": "5"}, "snr_gamma"),
                     ({"label_dropout": "0.1"}, "label_dropout"),
                     ({"time_sampling": "levels", "levels": ["0.5"]}, r"levels\[0\]")):
        with pytest.raises(TypeError, match=f"^{name} must"):
            DiffusionObjective(**kw)
    with pytest.raises(ValueError, match="^t must be <= 1"):
        ScoreMatchingObjective(t=1.5)
    with pytest.raises(ValueError, match="^t must be finite"):
        ScoreMatchingObjective(t=math.nan)


def test_score_matching_bool_argument():
    from fastdiff.training import ScoreMatchingObjective

    with pytest.raises(TypeError, match="variance_reduced"):
        ScoreMatchingObjective(variance_reduced="no")
    assert ScoreMatchingObjective(variance_reduced=False).variance_reduced is False


def test_score_matching_model_without_gradient_path():
    from fastdiff.training import ScoreMatchingObjective, training_seeds

    with pytest.raises(ValueError, match="model's output has no gradient path"):
        ScoreMatchingObjective()(lambda x, t, y: torch.zeros_like(x), torch.randn(2, 2), None,
                                 training_seeds(0, 0, 2))


# ---- the Trainer ---------------------------------------------------------------------------------------

def _tiny_trainer(**kw):
    from fastdiff.demo import models
    from fastdiff.training import Trainer

    torch.manual_seed(0)
    base = dict(steps=1, batch_size=4, progress=False, log_every=1, ema_decay=0.0)
    base.update(kw)
    return Trainer(models.MLP(2, hidden=8, depth=1, time_features=4), torch.randn(8, 2), **base)


def test_trainer_objective_must_be_an_objective():
    with pytest.raises(TypeError, match="objective must be a DiffusionObjective .*ScoreMatchingObjective"):
        _tiny_trainer(objective="velocity")


@pytest.mark.parametrize("name", ["amp", "progress"])
def test_trainer_bool_arguments(name):
    with pytest.raises(TypeError, match=f"^{name} must be True or False"):
        _tiny_trainer(**{name: "no"})


def test_trainer_resume_type():
    with pytest.raises(TypeError, match="^resume must be"):
        _tiny_trainer(resume=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_trainer_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="^device = 'cuda'"):
        _tiny_trainer(device="cuda")


def test_trainer_steps_bounded_by_the_noise_seeds():
    with pytest.raises(ValueError, match="^steps must be at most"):
        _tiny_trainer(steps=10**12)  # 4 × 10^12 samples: beyond the 2^40 noise seeds
    with pytest.raises(ValueError, match="^steps must be at most"):
        _tiny_trainer(steps=(1 << 40) + 1, batch_size=1)
    tr = _tiny_trainer(steps=(1 << 38))  # 2^40 samples: the last one still has its own seed
    with pytest.raises(ValueError, match="^steps must be at most"):
        tr.fit((1 << 38) + 1)


def test_trainer_model_without_gradient_path():
    class Frozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x, t, y):
            with torch.no_grad():
                return self.lin(x)

    from fastdiff.training import Trainer

    tr = Trainer(Frozen(), torch.randn(8, 2), steps=1, batch_size=4, progress=False, ema_decay=0.0)
    with pytest.raises(ValueError, match="loss has no gradient path to the model's parameters"):
        tr.fit()


def test_resume_refuses_a_checkpoint_of_another_objective(tmp_path):
    from fastdiff.training import CheckpointError, DiffusionObjective, ScoreMatchingObjective

    sm, diff = tmp_path / "sm", tmp_path / "diff"
    _tiny_trainer(objective=ScoreMatchingObjective(), out_dir=sm).fit()
    _tiny_trainer(objective=DiffusionObjective(), out_dir=diff).fit()
    pattern = r"checkpoint .*step-00000001\.json was trained with a {} .*this run has a {}"
    with pytest.raises(CheckpointError, match=pattern.format("ScoreMatchingObjective", "DiffusionObjective")):
        _tiny_trainer(objective=DiffusionObjective(), out_dir=sm, steps=2)
    with pytest.raises(CheckpointError, match=pattern.format("DiffusionObjective", "ScoreMatchingObjective")):
        _tiny_trainer(objective=ScoreMatchingObjective(), out_dir=diff, steps=2)
    with pytest.raises(CheckpointError, match="was trained with t 1.0; this run has t 0.5"):
        _tiny_trainer(objective=ScoreMatchingObjective(t=0.5), out_dir=sm, steps=2)
    # the same kind of objective still resumes
    assert _tiny_trainer(objective=ScoreMatchingObjective("implicit"), out_dir=sm, steps=2).step == 1


# ---- bool arguments elsewhere --------------------------------------------------------------------------

def test_other_bool_arguments():
    from fastdiff.mixtures import class_conditional_mixture, ring_mixture
    from fastdiff.paths import convert
    from fastdiff.training import checkpoint

    with pytest.raises(TypeError, match="^heterogeneous must be True or False"):
        ring_mixture(4, heterogeneous="no")
    with pytest.raises(TypeError, match="^heterogeneous must be True or False"):
        class_conditional_mixture(2, 2, heterogeneous="no")
    with pytest.raises(TypeError, match="^k must be an int"):
        ring_mixture("4")
    x = torch.randn(2, 2)
    with pytest.raises(TypeError, match="^check must be True or False"):
        convert(x, x, torch.tensor([0.5, 0.5]), "condot", "eps", "x0", check="no")
    with pytest.raises(TypeError, match="^warn must be True or False"):
        checkpoint.latest("/nonexistent-folder", warn="no")


def test_mala_nan_score_at_the_proposals_raises():
    x0 = torch.zeros(2, 2)

    def score(x):  # finite at x0 = 0 only: every proposal's ratio is NaN, so the chain never moved
        return torch.where(x.abs().sum(1, keepdim=True) > 0, math.nan, -x)

    with pytest.raises(FloatingPointError, match="score was not finite, at the proposal of step 0"):
        fastdiff.langevin(score, x0, steps=3, step_size=0.1, log_prob=_gauss_log_prob)


def test_trainer_model_without_trainable_parameters_is_named():
    from fastdiff.training import Trainer

    frozen = torch.nn.Linear(3, 2).requires_grad_(False)
    for model in (torch.nn.Identity(), frozen):
        with pytest.raises(ValueError, match="model has no trainable parameters"):
            Trainer(model, torch.zeros(8, 2), steps=1, batch_size=4, progress=False)


def test_trainer_replaces_an_earlier_run_only_when_told_to_overwrite(tmp_path):
    """resume=False on a folder with checkpoints is refused; overwrite=True (with resume=False) starts a new run
    there, deleting the earlier checkpoints in fit() before its first one, so no later resume mixes the runs."""
    from fastdiff.training import Trainer
    from fastdiff.training import checkpoint as ckpt

    data = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))

    def trainer(**kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        net = _TimeConcat(model)
        return Trainer(net, data, steps=4, batch_size=4, progress=False, out_dir=tmp_path, checkpoint_every=1,
                       keep=10, **kw)

    trainer(seed=1).fit()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [4, 3, 2, 1]
    with pytest.raises(ValueError, match="overwrite=True replaces it"):
        trainer(seed=2, resume=False)
    with pytest.raises(ValueError, match="pass resume=False with it"):
        trainer(seed=2, overwrite=True)
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        trainer(seed=2, resume=False, overwrite="yes")
    fresh = trainer(seed=2, resume=False, overwrite=True)
    assert len(ckpt.list_checkpoints(tmp_path / "checkpoints")) == 4  # nothing deleted before fit()
    wrong = _TimeConcat(torch.nn.Linear(3, 3))  # a mistake found at step 1, before any checkpoint
    failing = Trainer(wrong, data, steps=4, batch_size=4, progress=False, out_dir=tmp_path, checkpoint_every=1,
                      resume=False, overwrite=True)
    with pytest.raises(ValueError, match="model"):
        failing.fit(2)
    assert len(ckpt.list_checkpoints(tmp_path / "checkpoints")) == 4  # so the earlier run is intact
    with pytest.warns(RuntimeWarning, match="removed the 3 checkpoints of an earlier run"):  # step 1: replaced
        fresh.fit(2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2, 1]
    assert trainer(seed=2).step == 2  # the new run resumes; the seed-1 run is gone


class _TimeConcat(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x, t[:, None]], 1))


def _ring_run(tmp_path, **kw):
    from fastdiff.training import Trainer

    torch.manual_seed(0)
    net = _TimeConcat(torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)))
    data = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    return Trainer(net, data, steps=4, batch_size=4, progress=False, out_dir=tmp_path, checkpoint_every=2, **kw)


def test_resume_refuses_a_folder_whose_checkpoints_all_fail(tmp_path):
    """Starting from step 0 beside damaged checkpoints would overwrite and prune them (two runs in one folder)."""
    from fastdiff.training import CheckpointError
    from fastdiff.training import checkpoint as ckpt

    _ring_run(tmp_path).fit()
    for _, json_path in ckpt.list_checkpoints(tmp_path / "checkpoints"):
        tensors = json_path.with_suffix(".safetensors")
        data = bytearray(tensors.read_bytes())
        data[-1] ^= 1
        tensors.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
        with pytest.raises(CheckpointError, match=r"holds 2 checkpoints and none verifies \(newest: .*step-00000004"):
            _ring_run(tmp_path)
    assert len(ckpt.list_checkpoints(tmp_path / "checkpoints")) == 2  # nothing touched


def test_a_full_disk_names_the_checkpoint_and_leaves_no_orphan(tmp_path, monkeypatch):
    import errno
    import os

    from fastdiff.training import checkpoint as ckpt

    real = os.replace

    def full(src, dst):
        if str(dst).endswith("00000002.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", full)
    with pytest.raises(OSError, match=r"cannot write .*step-00000002\.json \(No space left on device\); the disk "
                                      "may be full"):
        _ring_run(tmp_path).fit()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step-00000002.safetensors" not in names and not [n for n in names if ".tmp-" in n]


def test_a_safetensors_file_that_is_not_a_checkpoint_is_named(tmp_path):
    from fastdiff.training import CheckpointError
    from fastdiff.training import checkpoint as ckpt

    shard = tmp_path / "shard-000000.safetensors"
    fastdiff.generate(lambda x, t, y=None: -x, 2, tmp_path, shape=(2,), steps=2, progress=False)
    with pytest.raises(CheckpointError, match=r"shard-000000\.safetensors is not a fastdiff checkpoint"):
        ckpt.read(shard)


def test_log_likelihood_of_an_empty_batch_calls_no_model():
    from fastdiff.mixtures import MixtureModel, ring_mixture

    out = fastdiff.log_likelihood(MixtureModel(ring_mixture(), "condot", "velocity"), torch.zeros(0, 2), 3)
    assert out.log_prob.shape == (0,) and out.noise.shape == (0, 2)


def test_a_dataloaders_batch_size_is_the_default():
    from torch.utils.data import DataLoader, TensorDataset

    from fastdiff.training import Trainer

    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    net = _TimeConcat(torch.nn.Linear(3, 2))
    assert Trainer(net, DataLoader(TensorDataset(data), batch_size=8), steps=1, progress=False).batch_size == 8
    assert Trainer(net, DataLoader(TensorDataset(data), batch_size=8), steps=1, batch_size=16,
                   progress=False).batch_size == 16  # given: it wins
    assert Trainer(net, torch.randn(200, 2), steps=1, progress=False).batch_size == 128
    with pytest.raises(ValueError, match="batch_size: give one"):
        Trainer(net, DataLoader(TensorDataset(data), batch_size=None), steps=1, progress=False)


def test_tuple_data_of_unequal_lengths_is_named():
    from fastdiff.training import Trainer

    with pytest.raises(ValueError, match=r"data's tensors must hold the same number of samples.*\(16, 2\), \(10,\)"):
        Trainer(_TimeConcat(torch.nn.Linear(3, 2)), (torch.zeros(16, 2), torch.zeros(10, dtype=torch.long)),
                batch_size=8, progress=False)


def test_numpy_numbers_are_refused_saying_what_to_pass():
    np = pytest.importorskip("numpy")
    from fastdiff.training import Trainer

    with pytest.raises(ValueError, match=r"lr must be a finite number > 0 \(a Python int or float: float\(lr\)"):
        Trainer(_TimeConcat(torch.nn.Linear(3, 2)), torch.zeros(8, 2), batch_size=4, lr=np.float32(1e-3),
                progress=False)


def test_langevin_kept_states_are_counted_in_the_memory_check():
    with pytest.raises(ValueError, match=r"thin = 1 keeps 1000000 states .* need \d+ GiB"):
        fastdiff.langevin(lambda x: -x, None, shape=(1024,), batch_size=64, steps=10**6, step_size=0.1, thin=1)


def test_a_cpu_device_index_is_the_host():
    x = fastdiff.sample(lambda x, t, y=None: -x, 2, shape=(2,), batch_size=2, device=torch.device("cpu", 7))
    assert x.device == torch.device("cpu")


def test_overwrite_keeps_the_earlier_run_until_its_first_checkpoint_reads_back(tmp_path, monkeypatch):
    """A full disk at the new run's first checkpoint must leave the earlier run's checkpoints."""
    import errno

    from fastdiff.training import checkpoint as ckpt

    _ring_run(tmp_path).fit()
    before = [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    real = ckpt.os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    fresh = _ring_run(tmp_path, seed=3, resume=False, overwrite=True)
    monkeypatch.setattr(ckpt.os, "replace", full)
    with pytest.raises(OSError, match="the disk may be full"):
        fresh.fit()
    monkeypatch.setattr(ckpt.os, "replace", real)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == before
