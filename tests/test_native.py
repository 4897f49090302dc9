"""Loading fastdiff._C: a build for another torch is refused with a clear message."""

import glob
import json
import os
import shutil

import torch

import fastdiff
from fastdiff import _native


def test_build_record_matches_running_torch():
    assert _native.status.loaded, _native.status.reason
    assert _native.status.build["torch"] == torch.__version__


def test_stale_build_detected(tmp_path):
    lib = _native.status.path
    assert lib is not None
    shutil.copy(lib, tmp_path / os.path.basename(lib))
    (tmp_path / "_C.build.json").write_text(json.dumps({"torch": "1.0.0", "cuda": None}))
    ok, why = _native._load_from(str(tmp_path))
    assert not ok
    assert "built against torch 1.0.0" in why and torch.__version__ in why and "--no-build-isolation" in why


def test_missing_build_reported(tmp_path):
    ok, why = _native._load_from(str(tmp_path))
    assert not ok and "no compiled fastdiff._C" in why


def test_ops_registered_for_cpu():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastdiff::randn", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastdiff::philox4x32_10", "CPU")
    assert torch.ops.fastdiff.cpu_simd() in ("avx512", "avx2", "portable")


def test_source_lists_are_globbed():
    from fastdiff import _build

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(repo, "csrc")):
        return
    src = _build.sources(repo, cuda=True)
    on_disk = {os.path.relpath(p, repo) for p in glob.glob(os.path.join(repo, "csrc", "**", "*.c*"), recursive=True)
               if not p.endswith(".cmake") and "/tests/" not in p}
    assert set(src["cpp"] + src["avx2"] + src["avx512"] + src["cuda"]) == on_disk
    assert fastdiff.__version__
