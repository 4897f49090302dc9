"""An exclusive lock on a folder for the length of a job (generate's output folder, a training run's
checkpoints): a second job into the same folder is refused with a clear error instead of mixing its files with
the first one's. flock on the folder itself, released by ``release()`` or when the process ends, so a killed job
never leaves the folder locked. The holder also writes who it is to ``.lock-holder`` (process, host, command,
start time), which the refused job's error quotes; that file is only a label (a stale one is overwritten)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

HOLDER_FILE = ".lock-holder"


def _describe_holder(folder: Path) -> str:
    try:
        h = json.loads((folder / HOLDER_FILE).read_text())
        return (f"process {h['pid']} on {h['host']} (`{h['command']}`, since {h['started']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _write_holder(folder: Path, what: str) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
              "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:200],
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    tmp = folder / f"{HOLDER_FILE}.tmp{os.getpid()}"
    try:
        tmp.write_text(json.dumps(record))
        os.replace(tmp, folder / HOLDER_FILE)
    except OSError:  # the label is a courtesy: the lock itself holds
        tmp.unlink(missing_ok=True)


class FolderInUseError(RuntimeError):
    """Another job holds the folder (the CLI reports it as a failed run, exit status 1)."""


class FolderLock:
    def __init__(self, folder, what: str, argument: str = "out_dir"):
        self.fd = None
        try:
            import fcntl
        except ImportError:  # no flock on this platform (Windows): unguarded, as before
            return
        fd = os.open(Path(folder), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if not isinstance(e, BlockingIOError):  # a filesystem without flock (some network mounts): unguarded
                import warnings

                warnings.warn(f"cannot lock {folder} ({e}); a second job into it would not be detected",
                              RuntimeWarning, stacklevel=3)
                return
            raise FolderInUseError(f"{argument} {folder} is in use by another {what}: {_describe_holder(Path(folder))} "
                                   "holds the folder's lock; wait for it to finish, or use another folder") from None
        self.fd = fd
        self.folder = Path(folder)
        _write_holder(self.folder, what)

    def release(self) -> None:
        if self.fd is not None:
            try:
                (self.folder / HOLDER_FILE).unlink(missing_ok=True)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    __del__ = release
