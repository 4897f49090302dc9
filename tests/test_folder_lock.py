"""The run-folder lock of generate and the Trainer: a second holder is refused with an error naming the first."""

import os

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
