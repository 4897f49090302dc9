"""bench/gpu_check.sh, the one-call GPU check, in its dry run (GPU_CHECK_DRY=1: every stage on a small CPU
selection): it completes and writes each of the files a device call returns, every stage reports its exit status,
the junit files hold the tests that ran, the benchmark CSV its rows, and the kernels' small calls match their
references. A stage stopped at its time limit still leaves its files (limits of 1 s)."""

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ("summary.txt", "build.log", "tests.log", "cuda.xml", "triton.xml", "bench.csv", "bench.log",
         "sanitizer.log")

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("bash") is None,
                                reason="needs bash and coreutils' timeout")


def _run(out: Path, **limits) -> subprocess.CompletedProcess:
    env = dict(os.environ, GPU_CHECK_DRY="1", OUT=str(out), PYTHON=sys.executable,
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **{k: str(v) for k, v in limits.items()})
    # not the Triton interpreter that conftest turns on: the dry run's sanitizer calls would run the Triton kernels
    # in it too (52 of the 56 s each test took in CI; the Triton tests cover them). Its Triton test stage is a
    # pytest run, whose conftest turns the interpreter on again.
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_dry_run_writes_every_file(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)  # at most 8 files come back from a device
    summary = (tmp_path / "summary.txt").read_text()
    for stage in ("build", "cuda tests", "triton tests", "bench"):
        assert f"stage {stage}: exit 0" in summary, summary
    for kind in ("cuda", "triton"):
        suite = ET.parse(tmp_path / f"{kind}.xml").getroot().find("testsuite")
        assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == 0
    rows = (tmp_path / "bench.csv").read_text().splitlines()
    assert rows[0].startswith("date,device") and len(rows) > 1
    assert "all calls match their references" in (tmp_path / "sanitizer.log").read_text()


def test_a_stage_past_its_limit_still_leaves_its_files(tmp_path):
    r = _run(tmp_path, CUDA_S=1, TRITON_S=1, BENCH_S=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    for stage in ("cuda tests", "triton tests", "bench"):
        assert f"stage {stage}: exit 124 (stopped at its 1 s limit)" in summary, summary
    assert all((tmp_path / name).exists() for name in FILES)
    assert "== done" in summary  # the stages after them still ran
