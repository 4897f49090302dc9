"""Reliability round 2: regressions for sharded generation (manifests edited, deleted or damaged, stale
temporary files, a full disk, damaged or foreign shards, a failed first run), the diffusers adapters
(UniPC started mid-schedule, the SDE step's variance_noise) and the backend registry's records."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff.generation import MANIFEST, shard_name

import generate_script as job  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest)

KW = job.KW


@pytest.fixture
def reference(generation_reference):
    return generation_reference


def _same(got, want, n=job.N):
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k][:n]) for k in want)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- manifests: deleted, edited, smaller n, damaged ------------------------------------------------------

def test_deleted_manifest_and_a_smaller_set_leaves_no_shard_of_the_old_one(tmp_path, reference):
    """manifest.json deleted, then generate with other settings and a smaller n: every old shard (its settings
    digest is another set's) is remade or removed, so the folder holds exactly the new set."""
    fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **{**KW, "cfg": 3.0})
    (tmp_path / MANIFEST).unlink()
    with pytest.warns(RuntimeWarning, match="removed 2 shard files"):
        summary = fastdiff.generate(job.model(), 6, tmp_path, batch_size=3, **KW)
    assert summary["made"] == 6 and summary["present"] == 0
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [shard_name(0), shard_name(1)]
    _same(fastdiff.load_generated(tmp_path), reference, 6)


def test_an_edited_manifest_is_noticed_by_load_generated(tmp_path, reference):
    fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["settings"]["cfg"] = 3.0
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{MANIFEST} does not match its shards.*edited or replaced"):
        fastdiff.load_generated(tmp_path)


def test_a_manifest_with_a_smaller_n_than_the_shards(tmp_path, reference):
    """n edited down: load_generated names the shards the manifest does not describe; generate with the
    manifest's settings remakes the set and removes them."""
    fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["n"] = 6
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"beyond .*n = 6.*{shard_name(2)}"):
        fastdiff.load_generated(tmp_path)
    with pytest.warns(RuntimeWarning, match="removed 2 shard files"):
        assert fastdiff.generate(job.model(), 6, tmp_path, batch_size=3, **KW)["made"] == 6
    _same(fastdiff.load_generated(tmp_path), reference, 6)


@pytest.mark.parametrize("text,why", [("[1, 2]", "holds a JSON list"), ('{"shard_size": 3}', "'n' is missing"),
                                      ("{not json", "is not JSON"), ('{"n": "12", "shard_size": 3}', "'n'")])
def test_a_damaged_manifest_is_named(tmp_path, text, why):
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(ValueError, match=why) as info:
        fastdiff.load_generated(tmp_path)
    assert str(tmp_path / MANIFEST) in str(info.value)
    (tmp_path / shard_name(0)).write_bytes(b"a shard, so the folder is a set")
    with pytest.raises(ValueError, match=why) as info:
        fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    assert str(tmp_path / MANIFEST) in str(info.value)


def test_a_folder_without_manifest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no {MANIFEST}"):
        fastdiff.load_generated(tmp_path)


# ---- temporary files, full disks ----------------------------------------------------------------------

def test_a_stale_manifest_temporary_file_is_removed(tmp_path, reference):
    """A run killed between writing the manifest's temporary file and linking it leaves
    .manifest.json.tmp<pid>; the next run removes it (its writer is dead)."""
    stale = tmp_path / f".{MANIFEST}.tmp{_dead_pid()}"
    stale.write_text("{}")
    fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    assert not stale.exists()
    assert not list(tmp_path.glob(".*"))
    _same(fastdiff.load_generated(tmp_path), reference)


def test_a_full_disk_is_a_one_line_cli_error_naming_the_shard(tmp_path, ring_checkpoint, monkeypatch, capsys):
    """safetensors reports a full disk as a SafetensorError (not an OSError): generate turns it into an OSError
    naming the shard, which the CLI prints as one line (exit status 1), and no temporary file is left."""
    import safetensors.torch
    from safetensors import SafetensorError

    from fastdiff import cli

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a shard")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "gen"
    argv = ["generate", "--checkpoint", str(ring_checkpoint), "--num-samples", "4", "--steps", "2", "--batch-size",
            "2", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastdiff generate: error: ") and err.count("\n") == 1, err
    assert str(out / shard_name(0)) in err and "disk may be full" in err and "Traceback" not in err
    assert not list(out.glob(".shard-*"))


# ---- shards: truncated, other shape, other seeds -------------------------------------------------------

def test_a_truncated_shard_is_named_by_load_generated(tmp_path):
    fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    damaged = tmp_path / shard_name(2)
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{shard_name(2)}: unreadable"):
        fastdiff.load_generated(tmp_path)


@pytest.mark.parametrize("what", ["shape", "seeds"])
def test_a_shard_with_the_set_digest_but_other_samples_is_named(tmp_path, reference, what):
    """A shard carrying the set's settings digest but samples of another shape, or other seeds (a bug, or a file
    made to pass): load_generated names it instead of failing inside torch.cat or returning wrong seeds; a
    rerun remakes it."""
    from fastdiff.generation_files import settings_sha256, write_shard

    fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    settings = settings_sha256(json.loads((tmp_path / MANIFEST).read_text()))
    part = fastdiff.load_generated(tmp_path)
    x, seeds, y = part["x"][3:6], part["seeds"][3:6], part["y"][3:6]
    if what == "shape":
        x = torch.cat([x, x], 1)
    else:
        seeds = seeds + 100
    write_shard(tmp_path, 1, x, seeds, y, settings)
    with pytest.raises(ValueError, match=f"{shard_name(1)}: holds (samples of shape|other seeds)"):
        fastdiff.load_generated(tmp_path)
    assert fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)["made"] == job.SHARD
    _same(fastdiff.load_generated(tmp_path), reference)


# ---- a failed first run ------------------------------------------------------------------------------

def test_a_failed_first_run_does_not_block_the_corrected_rerun(tmp_path, reference):
    """A first run that made no shard (its model raised, or a setting was refused by the sampler) leaves a
    manifest; the rerun with corrected settings replaces it instead of refusing them, even while the failed
    call's traceback (which holds its frame) is alive."""
    def broken(x, t, y=None):
        raise RuntimeError("the model's first call fails")

    with pytest.raises(RuntimeError, match="first call fails") as first:
        fastdiff.generate(broken, job.N, tmp_path, batch_size=3, num_classes=4, **{**KW, "steps": 2})
    with pytest.raises(ValueError, match="method") as second:
        fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **{**KW, "method": "no-such-method"})
    assert first.value is not None and second.value is not None  # the tracebacks are still held here
    assert fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)["made"] == job.N
    _same(fastdiff.load_generated(tmp_path), reference)
    with pytest.raises(ValueError, match="holds another set"):  # with shards, the manifest protects them
        fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **{**KW, "steps": 2})


def test_png_for_samples_that_are_not_images_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="png=True needs images"):
        fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, png=True, **KW)
    assert not list(tmp_path.iterdir())


# ---- the backend registry ----------------------------------------------------------------------------

def test_backend_records_have_a_readable_repr():
    for name, status in fastdiff.backends().items():
        text = repr(status)
        assert "function" not in text and "lambda" not in text, text
        assert text == f"BackendStatus(available={status.available}, reason={status.reason!r})"


# ---- the diffusers adapters ----------------------------------------------------------------------------

def _field(x, t):
    """A fixed analytic stand-in for a denoiser (a function of the sample and the timestep)."""
    return torch.tanh(x) * 0.7 + 1e-3 * float(t) * torch.cos(x)


def _unipc_from(sched, start, x, begin_index):
    """diffusers' img2img loop: set_timesteps, then the steps from timesteps[start:] (set_begin_index when
    asked, as the pipelines do for schedulers that have it)."""
    sched.set_timesteps(10)
    if begin_index:
        sched.set_begin_index(start * sched.order)
    for t in sched.timesteps[start * sched.order:]:
        x = sched.step(_field(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("begin_index", [True, False])
@pytest.mark.parametrize("config", [dict(solver_order=2),
                                    dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
                                    dict(solver_order=2, disable_corrector=[5], lower_order_final=False,
                                         final_sigmas_type="sigma_min")],
                         ids=["order2", "order3-bh1", "order2-no-corrector-5"])
def test_unipc_started_mid_schedule_matches_diffusers(config, begin_index):
    """FastDiffUniPCMultistepScheduler first stepped at step 4 (img2img's strength) warms its order up from there,
    as diffusers' UniPCMultistepScheduler does, instead of asking for the x0 predictions of steps never run;
    and a following run from the start (set_timesteps again) is diffusers' full-schedule run."""
    pytest.importorskip("diffusers")
    from diffusers import UniPCMultistepScheduler

    from fastdiff.adapters.diffusers import FastDiffUniPCMultistepScheduler

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    theirs, ours = UniPCMultistepScheduler(**config), FastDiffUniPCMultistepScheduler(**config)
    for start in (4, 0, 7):
        want = _unipc_from(theirs, start, x, begin_index)
        got = _unipc_from(ours, start, x, begin_index)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_sde_dpm_solver_variance_noise_of_another_shape_is_named():
    pytest.importorskip("diffusers")
    from fastdiff.adapters.diffusers import FastDiffDPMSolverMultistepScheduler

    sched = FastDiffDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    sched.set_timesteps(5)
    x = torch.randn(2, 3, 4, 4)
    x = sched.step(x, sched.timesteps[0], x, variance_noise=torch.randn_like(x)).prev_sample
    with pytest.raises(ValueError, match=r"variance_noise has shape \(2, 3, 4\) but sample has \(2, 3, 4, 4\)"):
        sched.step(x, sched.timesteps[1], x, variance_noise=torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="variance_noise must be a tensor"):
        sched.step(x, sched.timesteps[1], x, variance_noise=[0.0])


def test_pictures_of_a_remade_shard_are_not_kept(tmp_path):
    """A shard made again (here: another set's, after its manifest was deleted) takes its old pictures with it,
    so a later png=True run draws the new samples instead of keeping the other set's pictures."""
    from fastdiff.generation_files import png_name

    pytest.importorskip("PIL")
    model = lambda x, t, y=None: -x  # noqa: E731
    kw = dict(shape=(1, 2, 2), steps=2, progress=False, batch_size=2)
    fastdiff.generate(model, 2, tmp_path, png=True, **kw)
    old = (tmp_path / "png" / png_name(0)).read_bytes()
    (tmp_path / "manifest.json").unlink()
    fastdiff.generate(model, 2, tmp_path, seed=7, **kw)  # another set, no pictures
    assert not (tmp_path / "png" / png_name(0)).exists()
    fastdiff.generate(model, 2, tmp_path, seed=7, png=True, **kw)
    assert (tmp_path / "png" / png_name(0)).read_bytes() != old


def test_another_set_is_refused_unless_told_to_overwrite(tmp_path):
    """A run with other settings into a folder holding a set is refused; overwrite=True replaces that set (its
    manifest, shards and pictures), and a run with the set's own settings resumes either way."""
    pytest.importorskip("PIL")
    model = lambda x, t, y=None: -x  # noqa: E731
    kw = dict(shape=(1, 2, 2), steps=2, progress=False, batch_size=2)
    fastdiff.generate(model, 4, tmp_path, png=True, **kw)
    with pytest.raises(ValueError, match="holds another set"):
        fastdiff.generate(model, 4, tmp_path, cfg_batch=False, seed=5, **kw)
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        fastdiff.generate(model, 4, tmp_path, seed=5, overwrite="yes", **kw)
    before = {p.name: p.read_bytes() for p in [*tmp_path.glob("shard-*"), tmp_path / MANIFEST]}
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):  # a typo: refused before the folder is touched
        fastdiff.generate(model, 2, tmp_path, seed=5, overwrite=True, method="unipc", order=9, **kw)

    def broken(x, t, y=None):
        raise RuntimeError("the model fails")

    with pytest.warns(RuntimeWarning, match="overwrite=True: replacing the set"):
        with pytest.raises(RuntimeError, match="the model fails"):  # fails before its first shard
            fastdiff.generate(broken, 2, tmp_path, seed=5, overwrite=True, **kw)
    assert {p.name: p.read_bytes() for p in [*tmp_path.glob("shard-*"), tmp_path / MANIFEST]} == before
    assert len(list((tmp_path / "png").glob("*.png"))) == 4 and not list(tmp_path.glob(".overwritten-*"))
    with pytest.warns(RuntimeWarning, match="overwrite=True: replacing the set"):
        summary = fastdiff.generate(model, 2, tmp_path, seed=5, overwrite=True, **kw)
    assert summary["made"] == 2 and summary["present"] == 0
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [shard_name(0)]
    assert not list((tmp_path / "png").glob("*.png"))  # the old set's pictures went with it
    assert not list(tmp_path.glob(".overwritten-*"))  # removed once the run finished
    assert json.loads((tmp_path / MANIFEST).read_text())["seed"] == 5
    got = fastdiff.load_generated(tmp_path)
    assert torch.equal(got["x"], fastdiff.sample(model, 2, shape=(1, 2, 2), seed=5, batch_size=2))
    # the same settings again, with overwrite: nothing to replace, the shard is kept
    assert fastdiff.generate(model, 2, tmp_path, seed=5, overwrite=True, **kw)["made"] == 0


def test_cli_generate_overwrite_flag(tmp_path, ring_checkpoint):
    from fastdiff import cli

    base = ["generate", "--checkpoint", str(ring_checkpoint), "--num-samples", "2", "--out", str(tmp_path),
            "--steps", "2", "--no-progress"]
    assert cli.main(base) in (0, None)
    assert cli.main(base + ["--seed", "3"]) == 2  # another set: refused, naming the way out
    with pytest.warns(RuntimeWarning, match="overwrite=True"):
        assert cli.main(base + ["--seed", "3", "--overwrite"]) in (0, None)
    assert json.loads((tmp_path / MANIFEST).read_text())["seed"] == 3


def test_a_set_of_one_shard_is_not_taken_for_an_empty_one(tmp_path):
    """Shard 0 alone is a set that made something: another run's settings must be refused, not take it over."""
    model = lambda x, t, y=None: -x  # noqa: E731
    fastdiff.generate(model, 2, tmp_path, shape=(2,), steps=2, progress=False, batch_size=2)
    with pytest.raises(ValueError, match="holds another set"):
        fastdiff.generate(model, 2, tmp_path, shape=(2,), steps=2, progress=False, batch_size=2, seed=3)


@pytest.mark.parametrize("batch", [3, 8])
def test_per_sample_settings_of_the_set_are_sliced_per_batch(tmp_path, batch):
    """init / known_mask / per-sample churn given for the whole set (n rows): each batch gets its samples' rows, so
    the set equals one sample() call over all n whatever the batch size (before: rows i mod batch_size, or a
    refusal); another number of rows is refused naming the setting."""
    model = lambda x, t, y=None: -x  # noqa: E731
    init = torch.arange(16.0).reshape(8, 2)
    mask = torch.zeros(8, 2, dtype=torch.bool)
    mask[::2, 0] = True
    churn = [0.1 * i for i in range(8)]
    kw = dict(shape=(2,), steps=4, progress=False, batch_size=batch)
    for name, settings in (("edit", dict(init=init, known_mask=mask)),
                           ("churn", dict(method="euler", s_churn=churn))):
        fastdiff.generate(model, 8, tmp_path / name, **kw, **settings)
        want = fastdiff.sample(model, 4, shape=(2,), seed=0, batch_size=8, **settings)
        assert torch.equal(fastdiff.load_generated(tmp_path / name)["x"], want)
    for bad in (dict(init=init[:4], strength=0.5), dict(method="euler", s_churn=churn[:4])):
        name = "init" if "init" in bad else "s_churn"
        with pytest.raises(ValueError, match=f"{name} must hold the set's n = 8 per-sample values, got 4"
                           .replace("values, got", r"values \(generate gives each batch its samples' slice\), got")):
            fastdiff.generate(model, 8, tmp_path / f"bad-{name}", **kw, **bad)


def test_damaged_pictures_are_written_again(tmp_path):
    pytest.importorskip("PIL")
    from fastdiff.generation_files import png_intact, png_name

    model = lambda x, t, y=None: -x  # noqa: E731
    kw = dict(shape=(1, 2, 2), steps=2, progress=False, batch_size=4, png=True)
    fastdiff.generate(model, 8, tmp_path, **kw)
    good = (tmp_path / "png" / png_name(5)).read_bytes()
    (tmp_path / "png" / png_name(5)).write_bytes(good[:-5])  # truncated
    (tmp_path / "png" / png_name(7)).write_bytes(b"")  # emptied
    assert not png_intact(tmp_path / "png" / png_name(5)) and not png_intact(tmp_path / "png" / png_name(7))
    assert fastdiff.generate(model, 8, tmp_path, **kw)["made"] == 0
    assert (tmp_path / "png" / png_name(5)).read_bytes() == good
    assert png_intact(tmp_path / "png" / png_name(7))


def test_a_batch_size_change_is_told_how_to_resume(tmp_path):
    model = lambda x, t, y=None: -x  # noqa: E731
    fastdiff.generate(model, 8, tmp_path, shape=(2,), steps=2, progress=False, batch_size=4)
    with pytest.raises(ValueError, match=r"pass shard_size=4, --shard-size 4, to resume with another batch size"):
        fastdiff.generate(model, 8, tmp_path, shape=(2,), steps=2, progress=False, batch_size=2)
    assert fastdiff.generate(model, 8, tmp_path, shape=(2,), steps=2, progress=False, batch_size=2,
                             shard_size=4)["made"] == 0


def test_overwrite_sets_aside_only_the_sets_files_in_a_new_folder(tmp_path):
    """The aside folder is new each time (pids repeat) and holds only the set's files: a leftover one and a user's
    own picture in png/ are left alone."""
    pytest.importorskip("PIL")
    model = lambda x, t, y=None: -x  # noqa: E731
    kw = dict(shape=(1, 2, 2), steps=2, progress=False, batch_size=2, png=True)
    fastdiff.generate(model, 2, tmp_path, **kw)
    leftover = tmp_path / f".overwritten-{os.getpid()}"
    leftover.mkdir()
    (leftover / "shard-000005.safetensors").write_bytes(b"an older recovery copy")
    (tmp_path / "png" / "my_notes.png").write_bytes(b"mine")

    def broken(x, t, y=None):
        raise RuntimeError("the model fails")

    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="the model fails"):
        fastdiff.generate(broken, 2, tmp_path, seed=4, overwrite=True, **kw)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [shard_name(0)]
    assert fastdiff.load_generated(tmp_path)["x"].shape == (2, 1, 2, 2)
    with pytest.warns(RuntimeWarning):
        fastdiff.generate(model, 2, tmp_path, seed=4, overwrite=True, **kw)
    assert (tmp_path / "png" / "my_notes.png").read_bytes() == b"mine"
    assert (leftover / "shard-000005.safetensors").read_bytes() == b"an older recovery copy"
    assert [p.name for p in tmp_path.glob(".overwritten-*")] == [leftover.name]


def test_a_refusal_names_the_set_an_interrupted_overwrite_kept(tmp_path):
    model = lambda x, t, y=None: -x  # noqa: E731
    fastdiff.generate(model, 2, tmp_path, shape=(2,), steps=2, progress=False, batch_size=2)
    (tmp_path / ".overwritten-123-abc").mkdir()  # as a killed overwrite run leaves it
    with pytest.raises(ValueError, match=r"kept in \.overwritten-123-abc \(move its files back to restore it"):
        fastdiff.generate(model, 2, tmp_path, shape=(2,), steps=3, progress=False, batch_size=2)
