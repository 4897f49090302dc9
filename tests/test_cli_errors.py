"""The command line under failure: one-line errors with exit status 2 (bad input) or 1 (training
diverged), tracebacks only for bugs (or with FASTDIFF_DEBUG=1), argument checks naming the option,
a non-finite loss that stops training with the good checkpoints intact, resume refusing another
objective, pictures in the format their suffix names, and --version."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdiff import cli
from fastdiff.training import CheckpointError
from fastdiff.training import checkpoint as ckpt

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
RING = ["train", "--data", "ring", "--batch-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
    """A 4-step ring run (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("ring") / "run"
    assert cli.main([*RING, "--out", str(out), "--steps", "4", "--checkpoint-every", "2"]) == 0
    return out


def _fails(capsys, argv, status, *words):
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith(f"fastdiff {argv[0]}: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err


# ---- non-finite loss --------------------------------------------------------------------------------

def test_nonfinite_loss_exits_1_naming_the_step(tmp_path, capsys):
    out = tmp_path / "r"
    _fails(capsys, ["train", "--data", "ring", "--out", str(out), "--steps", "20", "--checkpoint-every", "5",
                    "--lr", "1e30", "--grad-clip", "0", "--no-progress"], 1,
           "non-finite loss at step 2", "no checkpoint was written")
    assert ckpt.list_checkpoints(out / "checkpoints") == []


def test_nonfinite_loss_after_good_checkpoints_keeps_them(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main([*RING, "--out", str(out), "--steps", "4", "--checkpoint-every", "2", "--keep", "1"]) == 0
    capsys.readouterr()
    _fails(capsys, [*RING, "--out", str(out), "--steps", "12", "--checkpoint-every", "2", "--keep", "1",
                    "--lr", "1e30", "--grad-clip", "0", "--warmup", "0"], 1,
           "non-finite loss at step 6", "step-00000004.json, is intact")
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [4]
    assert ckpt.verify(out / "checkpoints" / "step-00000004.json") is None


def test_skip_mode_reports_skipped_steps(tmp_path, capsys):
    out = tmp_path / "r"
    _fails(capsys, [*RING, "--out", str(out), "--steps", "30", "--lr", "1e30", "--grad-clip", "0", "--warmup", "0",
                    "--on-nonfinite", "skip"], 1, "10 consecutive steps", "on_nonfinite='skip'")


# ---- user errors, bugs, debug -----------------------------------------------------------------------

def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    _fails(capsys, ["sample", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")], 2,
           "does not exist")
    blocker = tmp_path / "file"
    blocker.write_text("")
    _fails(capsys, [*RING, "--out", str(blocker / "run"), "--steps", "2"], 2, f"out_dir {blocker / 'run'}",
           "not writable")


def test_resume_with_another_prediction_is_refused(ring_run, capsys):
    _fails(capsys, [*RING, "--out", str(ring_run), "--steps", "6", "--prediction", "eps"], 2,
           "prediction 'velocity'", "prediction 'eps'")
    _fails(capsys, [*RING, "--out", str(ring_run), "--steps", "6", "--path", "vp"], 2, "path 'condot'", "path 'vp'")
    assert [s for s, _ in ckpt.list_checkpoints(ring_run / "checkpoints")] == [4, 2]  # untouched


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_DEBUG", "1")
    with pytest.raises(CheckpointError, match="does not exist"):
        cli.main(["sample", "--checkpoint", str(tmp_path / "none")])


def test_a_bug_still_prints_its_traceback(monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_info", broken)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err and "internal error" in err


def test_subprocess_exit_status_and_stderr(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastdiff.cli", "sample", "--checkpoint", str(tmp_path / "none")],
                         capture_output=True, text=True, env=ENV, timeout=120, check=False)
    assert out.returncode == 2
    assert out.stderr.startswith("fastdiff sample: error: checkpoint") and "Traceback" not in out.stderr


# ---- argument checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args,option", [
    (["--steps", "0"], "--steps"), (["--steps", "-5"], "--steps"), (["--batch-size", "0"], "--batch-size"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"), (["--keep", "-1"], "--keep"),
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"), (["--lr=-1e-3"], "--lr"),
    (["--grad-clip", "nan"], "--grad-clip"), (["--grad-clip", "-1"], "--grad-clip"),
    (["--ema-decay", "1"], "--ema-decay"), (["--label-dropout", "1"], "--label-dropout"),
    (["--snr-gamma", "0"], "--snr-gamma"), (["--warmup", "-1"], "--warmup"), (["--seed", "-1"], "--seed"),
    (["--steps", "ten"], "--steps"),
])
def test_train_arguments_are_checked(tmp_path, capsys, args, option):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", "ring", "--out", str(tmp_path / "r"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"fastdiff train: error: argument {option}:" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing was created or trained


@pytest.mark.parametrize("args,option", [(["--steps", "0"], "--steps"), (["--per-class", "0"], "--per-class"),
                                         (["--sigma", "-1"], "--sigma"), (["--cfg", "nan"], "--cfg")])
def test_sample_arguments_are_checked(capsys, args, option):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--checkpoint", "x", *args])
    assert e.value.code == 2 and f"argument {option}:" in capsys.readouterr().err


def test_nothing_to_do_when_the_run_is_already_there(ring_run, capsys):
    assert cli.main([*RING, "--out", str(ring_run), "--steps", "3"]) == 0
    assert "nothing to do: the run is at step 4 and --steps is 3" in capsys.readouterr().out


# ---- sample output formats, --version ------------------------------------------------------------------

def test_sample_writes_the_format_its_suffix_names(ring_run, tmp_path, capsys):
    PIL = pytest.importorskip("PIL.Image")
    common = ["sample", "--checkpoint", str(ring_run / "checkpoints"), "--steps", "2", "--per-class", "5",
              "--no-progress"]
    for name, fmt, magic in (("x.jpg", "JPEG", b"\xff\xd8\xff"), ("x.jpeg", "JPEG", b"\xff\xd8\xff"),
                             ("x.png", "PNG", b"\x89PNG"), ("x.webp", "WEBP", b"RIFF")):
        path = tmp_path / name
        assert cli.main([*common, "--out", str(path)]) == 0
        assert path.read_bytes()[:len(magic)] == magic
        with PIL.open(path) as im:
            assert im.format == fmt and im.size[0] > 100
    capsys.readouterr()
    _fails(capsys, [*common, "--out", str(tmp_path / "x.xyz")], 2, "--out", "'.xyz'", ".png")
    assert not (tmp_path / "x.xyz").exists()


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastdiff {version('fastdiff')}"


def test_version_falls_back_to_the_package_attribute(monkeypatch):
    import importlib.metadata

    import fastdiff

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.version() == fastdiff.__version__
