"""The trainer under failure: non-finite losses and gradients (stop or skip, never a bad checkpoint),
resume refusing a checkpoint whose weights mean something else, edited or incomplete checkpoint
JSON, argument checks, an unwritable out_dir, and temp files left by killed writers."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from fastdiff import mixtures
from fastdiff.demo import models
from fastdiff.training import CheckpointError, DiffusionObjective, Trainer
from fastdiff.training import checkpoint as ckpt

from trainer_state import assert_identical, trainer_state


def _data(n=256):
    mixture = mixtures.ring_mixture(4, radius=3.0, std=0.3)
    return mixture.sample(n, generator=torch.Generator().manual_seed(0))[0].float()


class _Poisoned(Trainer):
    """A Trainer whose model outputs NaN (or whose gradients are NaN) on the 1-based steps in ``bad``."""

    def __init__(self, *args, bad=(), where="loss", **kw):
        super().__init__(*args, **kw)
        self.bad, self.poison = set(bad), False

        def forward_hook(module, inputs, out):
            return out * math.nan if self.poison and where == "loss" else None

        self.model.register_forward_hook(forward_hook)
        if where == "grad":  # a finite loss with a non-finite gradient
            p = next(self.model.parameters())
            p.register_hook(lambda g: g * math.nan if self.poison else g)

    def train_step(self):
        self.poison = self.step + 1 in self.bad
        return super().train_step()


def _trainer(out=None, cls=Trainer, hidden=32, **kw):
    torch.manual_seed(0)
    base = {"steps": 12, "batch_size": 32, "lr": 3e-3, "warmup": 2, "seed": 1, "out_dir": out, "progress": False,
            "log_every": 3, "checkpoint_every": 4 if out else 0, "keep": 2}
    base.update(kw)
    return cls(models.MLP(2, hidden=hidden, depth=2), _data(), **base)


def _steps(folder):
    return [s for s, _ in ckpt.list_checkpoints(folder)]


# ---- non-finite loss / gradient ----------------------------------------------------------------------

def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_good_checkpoints(tmp_path):
    tr = _trainer(tmp_path, cls=_Poisoned, bad={6}, keep=1)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 6 .*detected at step 6.*step-00000004"):
        tr.fit()
    folder = tmp_path / "checkpoints"
    assert _steps(folder) == [4]  # no NaN checkpoint, and pruning (keep=1) did not remove the good one
    tensors, _ = ckpt.read(folder)
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())
    # detected at the first read-back after the bad step (log_every=3: step 6), not before step 6
    tr = _trainer(None, cls=_Poisoned, bad={7}, log_every=5)
    with pytest.raises(FloatingPointError, match=r"at step 7 .*detected at step 10"):
        tr.fit()


def test_nonfinite_is_caught_before_a_checkpoint_between_log_reads(tmp_path):
    tr = _trainer(tmp_path, cls=_Poisoned, bad={5}, log_every=10, checkpoint_every=4)
    with pytest.raises(FloatingPointError, match=r"at step 5 .*detected at step 8"):
        tr.fit()
    assert _steps(tmp_path / "checkpoints") == [4]


def test_nonfinite_gradient_with_finite_loss_stops(tmp_path):
    tr = _trainer(cls=_Poisoned, bad={3}, where="grad", grad_clip=None)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm at step 3 \(loss [0-9.]+, gradient norm nan"):
        tr.fit()
    tr = _trainer(cls=_Poisoned, bad={3}, where="grad", grad_clip=1.0)  # the clip's norm
    with pytest.raises(FloatingPointError, match="gradient norm at step 3"):
        tr.fit()


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path):
    tr = _trainer(tmp_path)
    tr.fit(4)
    with torch.no_grad():
        next(tr.model.parameters())[0] = math.inf
    with pytest.raises(FloatingPointError, match=r"refusing to write the checkpoint of step 4: non-finite values in "
                                                 r"model/.*step-00000004.json, is intact"):
        tr.save()
    tensors, state = ckpt.read(tmp_path / "checkpoints" / "step-00000004.json")
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_skip_leaves_the_state_untouched_and_resumes_exactly(tmp_path):
    seen = {}

    def keep(tr):
        if tr.step in (2, 4):
            seen[tr.step] = trainer_state(tr)

    full = _trainer(tmp_path / "full", cls=_Poisoned, bad={3, 4, 9}, on_nonfinite="skip", callback=keep)
    full.fit()
    assert full.step == 12 and full.skipped == [3, 4, 9]
    assert_identical(seen[4], seen[2])  # weights, EMA and AdamW state (its step count too) unchanged
    assert all(math.isfinite(loss) for _, loss in full.history)  # skipped losses are left out of the means
    _, state = ckpt.read(tmp_path / "full" / "checkpoints")
    assert state["skipped"] == [3, 4, 9]

    part = _trainer(tmp_path / "part", cls=_Poisoned, bad={3, 4, 9}, on_nonfinite="skip")
    part.fit(6)  # checkpoint at 6 (the end of a log window), after the skips 3 and 4
    resumed = _trainer(tmp_path / "part", cls=_Poisoned, bad={3, 4, 9}, on_nonfinite="skip")
    assert resumed.step == 6 and resumed.skipped == [3, 4]
    resumed.fit()
    assert_identical(trainer_state(resumed), trainer_state(full))
    assert resumed.skipped == full.skipped and resumed.history == full.history


def test_skip_gives_up_after_max_consecutive_skips():
    tr = _trainer(cls=_Poisoned, bad={3, 4, 5}, on_nonfinite="skip", max_consecutive_skips=3)
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps \(up to step 5\)"):
        tr.fit()


def test_skip_never_writes_nonfinite_weights(tmp_path):
    # weights that overflowed in a step whose loss and gradient were finite (a huge lr does that)
    def overflow(tr):
        if tr.step == 2:
            with torch.no_grad():
                tr.model.out.weight.fill_(math.inf)

    tr = _trainer(tmp_path, on_nonfinite="skip", max_consecutive_skips=100, callback=overflow)
    with pytest.raises(FloatingPointError, match="refusing to write the checkpoint of step 4: non-finite values in "
                                                 "model/out.weight; no checkpoint was written"):
        tr.fit()
    assert tr.skipped == [3, 4] and _steps(tmp_path / "checkpoints") == []


def test_stop_mode_adds_no_result_change():
    """The check reads values the loop computes anyway: weights equal those of a run without bad steps
    under either mode."""
    a, b = _trainer(), _trainer(on_nonfinite="skip")
    a.fit()
    b.fit()
    assert_identical(trainer_state(a), trainer_state(b))
    assert a.history == b.history


# ---- resume: what the weights mean, the checkpoint JSON ----------------------------------------------

def test_resume_refuses_another_path_prediction_or_model(tmp_path):
    _trainer(tmp_path, steps=4).fit()
    with pytest.raises(CheckpointError, match=r"prediction 'velocity'; this run has prediction 'eps'"):
        _trainer(tmp_path, steps=8, objective=DiffusionObjective("condot", "eps"))
    with pytest.raises(CheckpointError, match=r"path 'condot'; this run has path 'vp'"):
        _trainer(tmp_path, steps=8, objective=DiffusionObjective("vp", "velocity"))
    with pytest.raises(CheckpointError, match=r"different model: hidden=32 in the checkpoint, 64 in this run"):
        _trainer(tmp_path, steps=8, hidden=64)
    assert _trainer(tmp_path, steps=8, objective=DiffusionObjective("condot", "velocity")).step == 4


def _rewrite(path, edit, resign=True):
    record = json.loads(path.read_text())
    edit(record)
    if resign and "json_sha256" in record:
        record["json_sha256"] = ckpt.json_digest(record)
    path.write_text(json.dumps(record, indent=1, sort_keys=True))


def test_an_edited_checkpoint_json_is_refused(tmp_path):
    _trainer(tmp_path, steps=8).fit()
    folder = tmp_path / "checkpoints"
    j8 = folder / "step-00000008.json"
    assert json.loads(j8.read_text())["version"] == ckpt.VERSION == 2
    _rewrite(j8, lambda r: r.update(step=4), resign=False)
    with pytest.raises(CheckpointError, match=r"step-00000008.json was modified after it was written"):
        ckpt.read(j8)
    with pytest.raises(CheckpointError, match="step-00000008.json"):
        _trainer(tmp_path, steps=12, resume=j8)
    with pytest.warns(RuntimeWarning, match="skipping checkpoint of step 8"):
        assert _trainer(tmp_path, steps=12).step == 4  # the newest intact one
    # re-signed by hand, a step that disagrees with the file name is still caught
    _rewrite(j8, lambda r: r.update(step=4))
    with pytest.raises(CheckpointError, match=r"step-00000008.json records step 4 but its file name says step 8"):
        ckpt.read(j8)


def test_missing_keys_are_named_up_front(tmp_path):
    _trainer(tmp_path, steps=4).fit()
    j = tmp_path / "checkpoints" / "step-00000004.json"
    original = j.read_text()
    _rewrite(j, lambda r: r.pop("json_sha256"), resign=False)
    with pytest.raises(CheckpointError, match=r"step-00000004.json is missing the required key 'json_sha256'"):
        ckpt.read(j)
    for key in ("bytes", "step", "tensors"):
        j.write_text(original)
        _rewrite(j, lambda r, key=key: r.pop(key))
        with pytest.raises(CheckpointError, match=rf"step-00000004.json is missing the required key '{key}'"):
            ckpt.read(j)
    for key in ("optimizer", "objective", "seed"):
        j.write_text(original)
        _rewrite(j, lambda r, key=key: r.pop(key))
        with pytest.raises(CheckpointError, match=rf"step-00000004.json is missing the required key '{key}'"):
            _trainer(tmp_path, steps=8, resume=j)
    j.write_text(original)
    _rewrite(j, lambda r: r.update(tensors="../../elsewhere.safetensors"))
    with pytest.raises(CheckpointError, match="invalid tensors file name"):
        ckpt.read(j)


def test_version_1_checkpoints_still_load(tmp_path):
    _trainer(tmp_path, steps=4).fit()
    j = tmp_path / "checkpoints" / "step-00000004.json"

    def legacy(r):
        r.pop("json_sha256")
        r["version"] = 1

    _rewrite(j, legacy, resign=False)
    assert _trainer(tmp_path, steps=8).step == 4
    _rewrite(j, lambda r: r.update(step=3), resign=False)
    with pytest.raises(CheckpointError, match="records step 3 but its file name says step 4"):
        ckpt.read(j)


# ---- arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,name", [
    ({"steps": 0}, "steps"), ({"steps": -3}, "steps"), ({"steps": 2.5}, "steps"),
    ({"lr": math.nan}, "lr"), ({"lr": math.inf}, "lr"), ({"lr": 0.0}, "lr"), ({"lr_min": -1.0}, "lr_min"),
    ({"grad_clip": math.nan}, "grad_clip"), ({"grad_clip": -1.0}, "grad_clip"),
    ({"weight_decay": math.nan}, "weight_decay"), ({"betas": (0.9, 1.0)}, r"betas\[1\]"),
    ({"ema_decay": math.nan}, "ema_decay"), ({"seed": -1}, "seed"), ({"log_every": 0}, "log_every"),
    ({"checkpoint_every": -1}, "checkpoint_every"), ({"keep": -1}, "keep"), ({"batch_size": 0}, "batch_size"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"), ({"max_consecutive_skips": 0}, "max_consecutive_skips"),
])
def test_trainer_arguments_are_checked(kw, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        _trainer(**kw)


def test_fit_steps_is_checked():
    tr = _trainer()
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            tr.fit(bad)


# ---- the run folder -------------------------------------------------------------------------------

def test_an_unwritable_out_dir_fails_at_construction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match=re.escape(f"out_dir {blocker / 'run'} is not writable")):
        _trainer(blocker / "run")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match="out_dir .* is not writable"):
                _trainer(ro / "run")
        finally:
            ro.chmod(0o700)


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = folder / f".step-00000012.safetensors.tmp-{dead.pid}"
        writing = folder / f".step-00000012.json.tmp-{live.pid}"
        ours = folder / f".step-00000016.json.tmp-{os.getpid()}"
        other = folder / "notes.txt.tmp-1x"
        for p in (stale, writing, ours, other):
            p.write_bytes(b"partial")
        _trainer(tmp_path)
        assert not stale.exists()
        assert writing.exists() and ours.exists() and other.exists()
        assert not list(folder.glob(".write-probe*"))  # the writability probe is gone too
    finally:
        live.kill()
        live.wait()
    assert ckpt.clean_stale_temp_files(folder) == [writing]


def test_temp_files_are_named_for_the_cleanup(tmp_path):
    """clean_stale_temp_files recognizes the temp names _write_atomic uses."""
    names = []
    ckpt._write_atomic(tmp_path / "step-00000001.json", lambda f: names.append(os.path.basename(f.name)))
    assert len(names) == 1 and ckpt._TEMP.match(names[0]) and names[0].endswith(f".tmp-{os.getpid()}")


def test_a_fresh_start_refuses_a_folder_with_an_earlier_run(tmp_path):
    """resume=False on a folder holding checkpoints would prune them and a later resume would mix two runs:
    refused, naming the folder and the newest checkpoint; the earlier run is untouched."""
    _trainer(tmp_path, steps=4, checkpoint_every=2).fit()
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    with pytest.raises(ValueError, match=r"resume=False but out_dir .* holds checkpoints of an earlier run .*step"):
        _trainer(tmp_path, steps=4, resume=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == before
    _trainer(tmp_path / "elsewhere", steps=2, resume=False).fit()  # an empty folder starts fresh


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    """While one run trains in a folder (its main process holds an flock on the checkpoints folder), another
    fit() there is refused before its first step; once the first is done the folder is free."""
    import fcntl

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first run, still training
    try:
        second = _trainer(tmp_path, steps=2, lr=3e-4)
        with pytest.raises(RuntimeError, match="in use by another training run"):
            second.fit()
        assert second.step == 0 and not ckpt.list_checkpoints(folder)
    finally:
        os.close(fd)
    assert _trainer(tmp_path, steps=2).fit()["step"] == 2
