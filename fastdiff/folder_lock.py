"""An exclusive lock on a folder for the length of a job (generate's output folder, a training run's
checkpoints): a second job into the same folder is refused with a clear error instead of mixing its files with
the first one's. flock on the folder itself (no lock file left behind); released by ``release()`` or when the
process ends, so a killed job never leaves the folder locked."""

from __future__ import annotations

import os
from pathlib import Path


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
            raise FolderInUseError(f"{argument} {folder} is in use by another {what} (it holds the folder's lock); "
                                   "wait for it to finish, or use another folder") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = release
