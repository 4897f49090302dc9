"""fastdiff.generate: the same set for any batch size and number of processes, resumable after SIGKILL with another
world size, atomic shards, and a manifest that refuses a run with other settings."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.generation import MANIFEST, shard_name

SCRIPT = Path(__file__).with_name("generate_script.py")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
sys.path.insert(0, str(SCRIPT.parent))
import generate_script as job  # noqa: E402

KW = job.KW


@pytest.fixture
def reference(generation_reference):
    return generation_reference


def test_the_set_is_the_samples_of_its_seeds(reference):
    """Sample i is fastdiff.sample with seed seed + i and label i mod classes, whatever the batch; every shard
    holds its seeds and labels."""
    y = torch.arange(job.N) % 4
    want = fastdiff.sample(job.model(), job.STEPS, 2.0, shape=(2,), y=y, null_y=-1, seed=job.SEED, path="vp",
                           prediction="eps", method="dpmpp_2m")
    assert torch.equal(reference["x"], want)
    assert torch.equal(reference["seeds"], torch.arange(job.N) + job.SEED) and torch.equal(reference["y"], y)


@pytest.mark.parametrize("batch", [1, 5, 12])
def test_any_batch_size_gives_the_same_set(tmp_path, reference, batch):
    fastdiff.generate(job.model(), job.N, tmp_path, batch_size=batch, **KW)
    got = fastdiff.load_generated(tmp_path)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_torchrun_two_processes_give_the_same_set(tmp_path, reference):
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(SCRIPT), str(tmp_path), "--batch", "2"], check=True, env=ENV, timeout=300)
    got = fastdiff.load_generated(tmp_path)
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    assert not list(tmp_path.glob(".*"))  # no temporary or progress files left


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_sigkill_of_a_rank_then_another_world_size_finishes_the_set(tmp_path, reference):
    """Two processes, one killed with SIGKILL after the first shards are written (torchrun then stops the other);
    restarted in one process, the job finishes the set: the same bits as uninterrupted, no half-written shard."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(SCRIPT), str(tmp_path), "--batch", "1", "--slow", "0.05"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("shard-*.safetensors"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert workers, "torchrun's workers"
    os.kill(workers[-1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    done = len(list(tmp_path.glob("shard-*.safetensors")))
    assert 2 <= done < job.N // job.SHARD, done  # killed mid-run
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--batch", "2"], check=True, env=ENV, timeout=300)
    got = fastdiff.load_generated(tmp_path)
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    assert not list(tmp_path.glob(".shard-*"))


def test_a_damaged_shard_is_made_again(tmp_path, reference):
    fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    damaged = tmp_path / shard_name(1)
    damaged.write_bytes(damaged.read_bytes()[:40])
    summary = fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    assert summary["made"] == job.SHARD and summary["present"] == job.N - job.SHARD
    got = fastdiff.load_generated(tmp_path)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_a_flipped_byte_is_found_and_the_shard_made_again(tmp_path, reference):
    """A shard whose size and header are intact but whose sample bytes changed (a flipped byte near the end of
    the file) fails its sha256: load_generated refuses it, naming it, and a rerun makes it again."""
    fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    damaged = tmp_path / shard_name(1)
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x40
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard_name(1)}: its .* tensor does not match the sha256"):
        fastdiff.load_generated(tmp_path)
    summary = fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    assert summary["made"] == job.SHARD and summary["present"] == job.N - job.SHARD
    got = fastdiff.load_generated(tmp_path)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_a_shard_of_another_set_is_not_taken(tmp_path, reference):
    """A shard with the expected seeds and shape but made with other settings (cfg) is refused and remade."""
    other = tmp_path / "other"
    fastdiff.generate(job.model(), job.N, other, batch_size=3, **{**KW, "cfg": 3.0})
    fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    os.replace(other / shard_name(0), tmp_path / shard_name(0))
    with pytest.raises(ValueError, match=f"{shard_name(0)}: written for other settings"):
        fastdiff.load_generated(tmp_path)
    summary = fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    assert summary["made"] == job.SHARD
    got = fastdiff.load_generated(tmp_path)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_second_job_in_the_same_folder_is_refused(tmp_path, reference):
    """While one job holds the folder (its rank 0 holds an flock on it), another is refused before it removes
    or writes anything; once the first is done the folder is free again."""
    import fcntl

    fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)
    inflight = tmp_path / f".{shard_name(0)}.tmp999999"
    inflight.write_bytes(b"the other job's shard being written")
    fd = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first job, still running
    try:
        with pytest.raises(RuntimeError, match="in use by another fastdiff generate"):
            fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **{**KW, "cfg": 3.0})
        assert inflight.exists()  # the running job's temporary file is left alone
    finally:
        os.close(fd)
    assert fastdiff.generate(job.model(), job.N, tmp_path, batch_size=3, **KW)["made"] == 0
    got = fastdiff.load_generated(tmp_path)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_the_manifest_refuses_other_settings(tmp_path):
    fastdiff.generate(job.model(), job.N, tmp_path, batch_size=6, **KW)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["n"] == job.N and manifest["settings"]["steps"] == job.STEPS and manifest["labels"] == {"balanced": 4}
    with pytest.raises(ValueError, match="holds another set.*settings"):
        fastdiff.generate(job.model(), job.N, tmp_path, batch_size=6, **{**KW, "steps": job.STEPS + 1})
    with pytest.raises(ValueError, match="holds another set.*seed"):
        fastdiff.generate(job.model(), job.N, tmp_path, batch_size=6, **{**KW, "seed": 7})
    ckpt = tmp_path / "weights.bin"
    ckpt.write_bytes(b"weights")
    with pytest.raises(ValueError, match="checkpoint_sha256"):
        fastdiff.generate(job.model(), job.N, tmp_path, batch_size=6, checkpoint=ckpt, **KW)
    # the batch size is not part of the set
    assert fastdiff.generate(job.model(), job.N, tmp_path, batch_size=4, **KW)["made"] == 0


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        fastdiff.generate(job.model(), 0, tmp_path, **KW)
    with pytest.raises(ValueError, match="shard_size must be"):
        fastdiff.generate(job.model(), 4, tmp_path, **{**KW, "shard_size": 0})
    with pytest.raises(TypeError, match="generate\\(\\) sets y itself"):
        fastdiff.generate(job.model(), 4, tmp_path, y=torch.zeros(4), **KW)
    with pytest.raises(ValueError, match="labels must hold n = 4 integer labels"):
        fastdiff.generate(job.model(), 4, tmp_path, **{**KW, "labels": [0, 1]})
    with pytest.raises(TypeError, match="cannot be recorded in the manifest"):
        fastdiff.generate(job.model(), 4, tmp_path, **{**KW, "cfg": lambda t: 2.0})
    with pytest.raises(FileNotFoundError, match="lacks shards"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / MANIFEST).write_text(json.dumps({"n": 4, "shard_size": 2}))
        fastdiff.load_generated(tmp_path / "empty")


def test_the_documented_torchrun_command_matches_one_process(tmp_path, ring_checkpoint):
    """`torchrun ... -m fastdiff.cli generate --num-samples ...` (docs/generation.md) on a trained MLP checkpoint
    gives the set of one process with the same batch size and threads per process: a shard is sampled in the
    same batches whichever process makes it. (The MLP's matrix multiplies round differently with another
    thread count or batch size, ~6e-8 here; torchrun gives each worker one thread.)"""
    two, one = tmp_path / "two", tmp_path / "one"
    cli = [sys.executable, "-m", "fastdiff.cli"]
    args = ["generate", "--checkpoint", str(ring_checkpoint), "--num-samples", "24", "--steps", "3",
            "--batch-size", "4", "--shard-size", "4", "--cfg", "2", "--no-progress"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "fastdiff.cli"] + args + ["--out", str(two)], check=True, env=ENV, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(cli + args + ["--out", str(one)], check=True,
                   env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=300, stdout=subprocess.DEVNULL)
    a, b = fastdiff.load_generated(two), fastdiff.load_generated(one)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_png_files_for_images(tmp_path):
    """png=True also writes each image as png/<i>.png (values in [−1, 1] to 0 … 255, grayscale or RGB)."""
    pytest.importorskip("PIL")
    from PIL import Image

    def model(x, t, y):  # a velocity field whose samples are x0 = 0.5 everywhere, noise gone at t = 1
        return (0.5 - x) / (1 - t.view(-1, 1, 1, 1)).clamp(min=1e-3)

    fastdiff.generate(model, 5, tmp_path, shape=(1, 4, 6), steps=4, batch_size=2, png=True, progress=False,
                      timesteps=[0.0, 0.5, 0.9, 0.99, 1.0])
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
    x = fastdiff.load_generated(tmp_path)["x"]
    with Image.open(pngs[3]) as im:
        assert im.size == (6, 4) and im.mode == "L"
        pixels = torch.tensor(np.asarray(im), dtype=torch.float32)
    assert torch.equal(pixels, ((x[3, 0].clamp(-1, 1) + 1) * 127.5).round())
    with pytest.raises(ValueError, match="png=True needs images"):
        fastdiff.generate(lambda x, t, y: -x, 2, tmp_path / "flat", shape=(3,), steps=2, png=True, progress=False)


def test_png_files_of_finished_shards_are_written_on_rerun(tmp_path):
    """Pictures missing beside finished shards (a job killed between a shard and its pictures, or a first run
    without png=True) are written from the shards on the next run; nothing is sampled again."""
    pytest.importorskip("PIL")
    kw = dict(shape=(1, 4, 6), steps=4, batch_size=2, progress=False, timesteps=[0.0, 0.5, 0.9, 0.99, 1.0])
    model = lambda x, t, y: (0.5 - x) / (1 - t.view(-1, 1, 1, 1)).clamp(min=1e-3)  # noqa: E731
    fastdiff.generate(model, 5, tmp_path, **kw)
    assert not (tmp_path / "png").exists()
    assert fastdiff.generate(model, 5, tmp_path, png=True, **kw)["made"] == 0
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    (tmp_path / "png" / "000003.png").unlink()  # killed after shard 1 but before its pictures
    (tmp_path / "png" / ".000004.png.tmp123").write_bytes(b"half")
    assert fastdiff.generate(model, 5, tmp_path, png=True, **kw)["made"] == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"{i:06d}.png" for i in range(5)]
