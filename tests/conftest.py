import json
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run in its CPU interpreter on machines without a GPU (CI). It must be set before
# triton compiles anything, so before fastdiff.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastdiff  # noqa: E402

SPEC = Path(__file__).with_name("noise_vectors.json")


@pytest.fixture(scope="session")
def spec():
    with open(SPEC) as f:
        return json.load(f)


def _backend_params():
    """(backend, device) pairs; unavailable ones are skipped with the reason fastdiff gives."""
    out = []
    for name, device in (("reference", "cpu"), ("cpu", "cpu"), ("triton", "cuda" if torch.cuda.is_available() else "cpu"),
                         ("cuda", "cuda")):
        st = fastdiff.backends()[name]
        marks = [pytest.mark.skipif(not st.available, reason=f"{name}: {st.reason}")]
        if name in ("triton", "cuda"):
            marks.append(getattr(pytest.mark, name))
        out.append(pytest.param((name, device), id=name, marks=marks))
    return out


BACKENDS = _backend_params()


@pytest.fixture(scope="session")
def ring_checkpoint(tmp_path_factory):
    """The checkpoints of one `fastdiff train --data ring` run (20 steps of 64: a trained class-conditional MLP),
    trained once per test run for the tests that only read it (generate, evaluate, torchrun generate)."""
    from fastdiff import cli

    run = tmp_path_factory.mktemp("ring-checkpoint") / "run"
    assert cli.main(["train", "--data", "ring", "--out", str(run), "--steps", "20", "--batch-size", "64",
                     "--no-progress"]) == 0
    return run / "checkpoints"


def interpreted(name):
    """True for the triton backend in the CPU interpreter: it pays per program (blocks of 8192 groups of 4
    elements), so its multi-block cases are 2^15 + 5 elements (a full block and a partial one), not 2^20 + 5."""
    return name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="session")
def generation_reference(tmp_path_factory):
    """The set of tests/generate_script.py made in one process, batch = shard size (the generation tests' oracle)."""
    import generate_script as job

    out = tmp_path_factory.mktemp("generation-reference")
    fastdiff.generate(job.model(), job.N, out, batch_size=job.SHARD, **job.KW)
    return fastdiff.load_generated(out)


@pytest.fixture
def recorder(monkeypatch):
    """The CUDA-graph capture and replay replaced by the recording stand-in (tests/graph_recorder.py), with an empty
    cache of captured loops."""
    from graph_recorder import RecordingCapture

    from fastdiff.sampling.core import graphs

    rec = RecordingCapture()
    monkeypatch.setattr(graphs, "CAPTURE", rec)
    monkeypatch.setattr(graphs, "CACHE", graphs.GraphCache())
    return rec
