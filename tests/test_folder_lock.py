"""The run-folder lock of generate and the Trainer: a second holder is refused with an error naming the first."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdiff.folder_lock import HOLDER_FILE, FolderInUseError, FolderLock


def test_second_holder_is_refused_naming_the_first(tmp_path):
    first = FolderLock(tmp_path, "fastdiff generate")
    try:
        assert (tmp_path / HOLDER_FILE).exists()
        with pytest.raises(FolderInUseError, match=rf"out_dir {tmp_path} is in use by another fastdiff generate: "
                                                   rf"process {os.getpid()} on \S+ \(`.*`, since 20"):
            FolderLock(tmp_path, "fastdiff generate")
    finally:
        first.release()
    assert not (tmp_path / HOLDER_FILE).exists()  # released: the label goes with the lock
    FolderLock(tmp_path, "fastdiff generate").release()  # and the folder can be taken again


def test_unreadable_holder_label_still_refuses(tmp_path):
    first = FolderLock(tmp_path, "training run", argument="out_dir/checkpoints")
    try:
        (tmp_path / HOLDER_FILE).write_text("not json")
        with pytest.raises(FolderInUseError, match="in use by another training run: another process holds"):
            FolderLock(tmp_path, "training run", argument="out_dir/checkpoints")
    finally:
        first.release()


def test_torchrun_job_refused_by_rank_0_stops_every_rank(tmp_path):
    """Rank 0 fails to take the folder (this process holds it); rank 1, waiting for it, must stop too instead of
    hanging in the barrier after which it would have checked the manifest."""
    script = Path(__file__).with_name("generate_script.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    holder = FolderLock(tmp_path, "fastdiff generate job")
    try:
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(script), str(tmp_path)], env=env, timeout=120, capture_output=True, text=True)
    finally:
        holder.release()
    assert run.returncode != 0
    assert "is in use by another fastdiff generate job" in run.stderr
    assert "rank 0 could not open" in run.stderr
    assert not list(tmp_path.glob("shard-*"))
