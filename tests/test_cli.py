import math
import subprocess
import sys

import pytest
import torch

from fastdiff import cli


def test_info_lists_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("fastdiff", "torch", "backends:", "cpu", "reference", "triton", "cuda"):
        assert word in out
    assert "cpu        yes" in out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "fastdiff.cli", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout


def _png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_train_then_sample_ring(tmp_path, capsys):
    import pytest

    pytest.importorskip("PIL")
    out = tmp_path / "run"
    assert cli.main(["train", "--data", "ring", "--out", str(out), "--steps", "30", "--checkpoint-every", "10",
                     "--batch-size", "64", "--no-progress"]) == 0
    assert "checkpoints in" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == ["step-00000020.json",
                                                                           "step-00000030.json"]
    # running it again with more steps resumes
    assert cli.main(["train", "--data", "ring", "--out", str(out), "--steps", "40", "--batch-size", "64",
                     "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    png = tmp_path / "ring.png"
    assert cli.main(["sample", "--checkpoint", str(out / "checkpoints"), "--cfg", "3", "--out", str(png),
                     "--steps", "8", "--per-class", "50", "--no-progress"]) == 0
    assert _png_size(png)[0] > 100
    st = tmp_path / "ring.safetensors"
    assert cli.main(["sample", "--checkpoint", str(out / "checkpoints"), "--out", str(st), "--steps", "4",
                     "--per-class", "5", "--method", "euler", "--no-progress"]) == 0
    import safetensors.torch

    saved = safetensors.torch.load_file(st)
    assert saved["x"].shape == (20, 2) and saved["y"].tolist() == [c for c in range(4) for _ in range(5)]
    # a method's further options: --option NAME=VALUE, checked by sample()
    base = ["sample", "--checkpoint", str(out / "checkpoints"), "--out", str(st), "--steps", "4", "--per-class", "5",
            "--no-progress"]
    assert cli.main(base + ["--method", "dpmpp_2m_sde", "--option", "eta=0.5", "--option", "solver_type=heun"]) == 0
    other = safetensors.torch.load_file(st)["x"]
    assert cli.main(base + ["--method", "heun", "--option", "s_churn=2"]) == 0
    assert not torch.equal(other, safetensors.torch.load_file(st)["x"])
    # --step-noise brownian: the steps' noise from the Brownian path (other samples, same settings)
    assert cli.main(base + ["--method", "dpmpp_2m_sde", "--option", "eta=0.5", "--option", "solver_type=heun",
                            "--step-noise", "brownian"]) == 0
    brownian = safetensors.torch.load_file(st)["x"]
    assert brownian.isfinite().all() and not torch.equal(other, brownian)
    # --corrector-steps / --snr: score_sde's predictor-corrector (the corrector moves the samples)
    assert cli.main(base + ["--method", "reverse_diffusion"]) == 0
    predictor = safetensors.torch.load_file(st)["x"]
    assert cli.main(base + ["--method", "reverse_diffusion", "--corrector-steps", "1", "--snr", "0.1"]) == 0
    corrected = safetensors.torch.load_file(st)["x"]
    assert corrected.isfinite().all() and not torch.equal(predictor, corrected)
    # --guidance-rescale: CFG rescale of the guided blend
    assert cli.main(base + ["--cfg", "3"]) == 0
    guided = safetensors.torch.load_file(st)["x"]
    assert cli.main(base + ["--cfg", "3", "--guidance-rescale", "0.7"]) == 0
    assert not torch.equal(guided, safetensors.torch.load_file(st)["x"])
    assert cli.main(base + ["--cfg", "3", "--guidance", "cfg_zero_star"]) == 0
    assert not torch.equal(guided, safetensors.torch.load_file(st)["x"])
    assert cli.main(base + ["--cfg", "3", "--method", "ddim", "--guidance", "cfg_pp"]) == 0
    # --cache: step caching (the samples change: some of 16 steps reuse outputs)
    assert cli.main(base + ["--cfg", "3", "--steps", "16"]) == 0
    full = safetensors.torch.load_file(st)["x"]
    assert cli.main(base + ["--cfg", "3", "--steps", "16", "--cache", "adaptive"]) == 0
    cached = safetensors.torch.load_file(st)["x"]
    assert cached.isfinite().all() and not torch.equal(full, cached)
    assert cli.main(base + ["--cfg", "3", "--dynamic-thresholding", "0.9"]) == 0
    assert safetensors.torch.load_file(st)["x"].isfinite().all()
    assert cli.main(base + ["--guidance-rescale", "0.7"]) == 2
    assert "guidance_rescale applies to guided sampling" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(base + ["--cfg", "3", "--guidance-rescale", "1.5"])
    assert "argument --guidance-rescale: must be <= 1" in capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(base + ["--method", "heun", "--option", "r=0.4"]) == 2
    assert "r applies to method='dpmpp_sde'" in capsys.readouterr().err
    assert cli.main(base + ["--option", "eta=0.1", "--option", "eta=0.2"]) == 2
    assert "--option eta is given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(base + ["--option", "eta"])


def test_demo_pieces_run_quickly(tmp_path):
    """The demo's wiring on a tiny budget (its targets on a short run: test_demo_meets_its_targets)."""
    import json

    import pytest

    pytest.importorskip("sklearn")
    pytest.importorskip("PIL")
    from fastdiff.demo import run as demo

    metrics = demo.run(tmp_path, steps=6, batch_size=32, sample_steps=2, judged_per_class=3, progress=False,
                       log=lambda *a: None)
    assert set(metrics["generated_accuracy"]) == {"1", "4"}
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 6
    w, h = _png_size(tmp_path / "samples.png")
    assert w > 2 * 3 * 32 and h > 10 * 32  # two panels of 10 classes x 3 digits at 4x
    png = tmp_path / "grid.png"
    assert cli.main(["sample", "--checkpoint", str(tmp_path / "checkpoints"), "--cfg", "4", "--out", str(png),
                     "--steps", "2", "--per-class", "3", "--no-progress"]) == 0
    assert _png_size(png)[1] > 10 * 32


@pytest.mark.slow
def test_demo_meets_its_targets(tmp_path, capsys, monkeypatch):
    """`fastdiff demo`'s contract on a short run (the full demo, 2000 steps of 256 and 100 digits per class at
    50 Heun steps, is the README's): samples.png, metrics.json, checkpoints, and a rerun that reuses the
    finished training. Targets of issue 4, on 300 steps of 128 and 20 digits per class at 10 steps:
    classifier accuracy on generated digits >= 0.9 with cfg = 4 and higher than with cfg = 1 (measured: 0.94
    and 1.000; the full demo: 0.994 and 1.000)."""
    import functools
    import json

    pytest.importorskip("sklearn")
    pytest.importorskip("PIL")
    from fastdiff.demo import run as demo

    # the CLI has no sampling options: a smaller judged set through the same command
    monkeypatch.setattr(demo, "run", functools.partial(demo.run, sample_steps=10, judged_per_class=20))
    args = ["demo", "--out", str(tmp_path), "--steps", "300", "--batch-size", "128", "--no-progress"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "accuracy on generated digits, cfg = 4" in out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert (m["steps"], m["batch_size"], m["sampling_steps"], m["judged_per_class"]) == (300, 128, 10, 20)
    acc = m["generated_accuracy"]
    assert acc["4"] >= 0.9 and acc["4"] > acc["1"], acc
    assert {k: len(v) for k, v in m["generated_accuracy_per_class"].items()} == {"1": 10, "4": 10}
    assert 0.9 < m["classifier_accuracy_on_real_digits"] <= 1 and math.isfinite(m["final_loss"])
    # the Fréchet distance on the classifier's features, next to two halves of the real digits' (measured: cfg 1
    # 0.83, cfg 4 3.0, real halves 0.51; the full demo: 0.23, 0.69): unguided samples sit near the real-vs-real
    # distance, guidance trades diversity for class fidelity
    fd, floor = m["frechet_distance"], m["frechet_distance_real_halves"]
    assert set(fd) == {"1", "4"} and 0 <= fd["1"] < 3 * floor and fd["4"] > fd["1"], (fd, floor)
    w, h = _png_size(tmp_path / "samples.png")
    assert m["samples_png"] == str(tmp_path / "samples.png") and w > 2 * 10 * 32 and h > 10 * 32  # 2 panels, 10x10
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.json")) == ["step-00000240.json",
                                                                                 "step-00000300.json"]
    # run again: resumes from the last checkpoint, trains nothing, judges the same weights the same way
    assert cli.main(args) == 0
    assert "(step 300 of 300)" in capsys.readouterr().out
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["generated_accuracy"] == acc and again["frechet_distance"] == fd


def test_generate_then_evaluate(tmp_path, capsys, ring_checkpoint):
    """fastdiff generate writes the set that fastdiff.sample makes for those seeds and labels (balanced classes),
    a rerun has nothing to do, other settings are refused (exit 2); fastdiff evaluate compares two sets."""
    import json

    import torch

    import fastdiff
    from fastdiff.demo.models import load_model

    gen = tmp_path / "gen"
    capsys.readouterr()  # the shared checkpoint's training, when this test is its first user
    base = ["generate", "--checkpoint", str(ring_checkpoint), "--num", "20", "--out", str(gen), "--steps", "4",
            "--batch-size", "8", "--shard-size", "8", "--seed", "5", "--cfg", "2", "--no-progress"]
    assert cli.main(base) == 0
    assert "20 samples (0 were there, 20 made by 1 process)" in capsys.readouterr().out
    got = fastdiff.load_generated(gen)
    model, state = load_model(ring_checkpoint)
    y = torch.arange(20) % model.num_classes
    # bit for bit only in generate's batches (8, 8, 4): a trained MLP's GEMMs round by batch size
    # (docs/generation.md)
    want = torch.cat([fastdiff.sample(model, 4, 2.0, shape=(2,), y=y[lo:lo + 8], null_y=model.null_label,
                                      seed=5 + lo, method="heun") for lo in (0, 8, 16)])
    assert torch.equal(got["x"], want) and torch.equal(got["y"], y)
    manifest = json.loads((gen / "manifest.json").read_text())
    assert manifest["checkpoint_sha256"] == state["sha256"] and manifest["settings"]["cfg"] == 2.0
    assert cli.main(base + ["--batch-size", "5"]) == 0  # another batch size: the same set, nothing to do
    assert "20 were there, 0 made" in capsys.readouterr().out
    assert cli.main(base[:-1] + ["--steps", "5", "--no-progress"]) == 2
    assert "holds another set" in capsys.readouterr().err
    metrics = tmp_path / "metrics.json"
    assert cli.main(["evaluate", str(gen), "--ref", str(gen), "--features", "raw", "--json", str(metrics)]) == 0
    result = json.loads(metrics.read_text())
    assert abs(result["frechet_distance"]) < 1e-9 and result["precision"] == result["recall"] == 1.0


def test_evaluate_against_the_digits_with_the_demo_classifier(tmp_path):
    """fastdiff evaluate --ref digits (its default features: the demo classifier's, which the command line, not
    fastdiff.evaluation, brings in) gives what evaluate() gives with fastdiff.demo.data.digits_features."""
    pytest.importorskip("sklearn")
    import json

    import fastdiff
    from fastdiff.demo import data
    from fastdiff.evaluation import evaluate

    gen, metrics = tmp_path / "gen", tmp_path / "metrics.json"
    fastdiff.generate(lambda x, t, y=None: -x, 32, gen, shape=(1, 8, 8), steps=2, batch_size=32, progress=False)
    assert cli.main(["evaluate", str(gen), "--ref", "digits", "--json", str(metrics)]) == 0
    got = json.loads(metrics.read_text())
    want = evaluate(gen, data.digits().tensors[0], features=data.digits_features())
    assert got["features"] == "digits" and got["feature_dim"] == 10 and got["n_reference"] == 1797
    assert got == pytest.approx({**want, "features": "digits"})
