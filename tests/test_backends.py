"""Backend selection: availability report, use_backend, FASTDIFF_BACKEND, explicit-backend errors."""

import os
import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff import dispatch as B
from fastdiff import ops


def test_backends_report():
    report = fastdiff.backends()
    assert set(report) == {"cuda", "triton", "cpu", "reference"}
    assert report["reference"].available
    assert report["cpu"].available, report["cpu"].reason  # every install builds the C++ CPU kernels
    for name, st in report.items():
        assert isinstance(st.reason, str) and st.reason, name
    if not torch.cuda.is_available():
        assert not report["cuda"].available and report["cuda"].reason


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    assert B.resolve(torch.device("cpu")) == "cpu"
    with fastdiff.use_backend("reference"):
        assert B.resolve(torch.device("cpu")) == "reference"
        with fastdiff.use_backend("auto"):
            assert B.resolve(torch.device("cpu")) == "cpu"
        assert B.resolve(torch.device("cpu")) == "reference"
    assert B.current() == "auto"


def test_explicit_argument_beats_context():
    with fastdiff.use_backend("reference"):
        assert B.resolve(torch.device("cpu"), "cpu") == "cpu"


def test_env_variable(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    assert B.current() == "reference"
    with fastdiff.use_backend("cpu"):
        assert B.current() == "cpu"
    monkeypatch.setenv("FASTDIFF_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        B.current()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend='fast'.*auto, cuda, triton, cpu, reference"):
        with fastdiff.use_backend("fast"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU messages")
def test_explicit_backend_that_cannot_run_says_why():
    with pytest.raises(fastdiff.BackendUnavailable, match="'cuda' cannot run on cpu tensors"):
        ops.randn([0], 0, (4,), backend="cuda")
    with pytest.raises(fastdiff.BackendUnavailable, match="cuda"):
        with fastdiff.use_backend("cuda"):
            ops.randn([0], 0, (4,))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    st = B._status("triton", "cpu")
    assert not st.available
    assert "TRITON_INTERPRET" in st.reason or "not installed" in st.reason


def test_reference_backend_any_device_result_equals_cpu():
    a = ops.randn([1, 2], 0, (50,), backend="reference")
    b = ops.randn([1, 2], 0, (50,), backend="cpu")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_import_from_any_directory(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import fastdiff; assert fastdiff.backends()['cpu'].available, fastdiff.backends()['cpu']; print('ok')"
    for cwd in (tmp_path, repo):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
        assert out.returncode == 0, (cwd, out.stderr)
        assert out.stdout.strip() == "ok"
