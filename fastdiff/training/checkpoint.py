"""Atomic, verifiable checkpoints: tensors in safetensors, state in a small JSON file.

A checkpoint of step k is two files in one folder:

    step-0000000k.safetensors   every tensor (model, EMA, optimizer state, RNG state); no pickle
    step-0000000k.json          step, settings, the sha256 and size of the .safetensors file, and
                                the sha256 of the JSON's own canonical body ("json_sha256")

Each file is written to a temporary name, flushed to disk and renamed, the tensor file first: the
JSON appears only once the tensors it vouches for are complete, so a process killed at any moment
leaves either a whole checkpoint or none. Loading re-hashes the tensor file, so a truncated or
modified checkpoint is refused with :class:`CheckpointError`; so is a JSON that was edited (its
digest, and its step against its file name), or that lacks a required key. Older checkpoints are
deleted only after a newer one is written and verified.

Version 1 checkpoints (no "json_sha256") still load; their step is checked against the file name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from fastdiff import _checks

FORMAT = "fastdiff-checkpoint"
VERSION = 2  # 2: the JSON carries "json_sha256"; version 1 (without it) is still read
READABLE_VERSIONS = (1, 2)
REQUIRED_KEYS = ("format", "version", "step", "tensors", "bytes", "sha256")
_NAME = re.compile(r"^step-(\d{8,})\.json$")
# The temporary files of _write_atomic and check_writable: ".<name>.tmp-<pid>".
_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or of an unknown format."""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - safetensors is a dependency
        raise ImportError("fastdiff checkpoints need safetensors: pip install safetensors") from e
    return st


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # ENOSPC names no file by itself
        raise type(e)(e.errno, f"cannot write {path} ({e.strerror or e}); the disk may be full or not writable",
                      str(path)) from e
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # ours: possibly being written right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OSError, OverflowError):
        return False  # not a valid pid on this machine
    return True


def clean_stale_temp_files(folder) -> list[Path]:
    """Delete the temporary files that processes killed mid-write (SIGKILL, OOM) left in ``folder``;
    those of live processes are kept. Returns the deleted paths."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                p.unlink()
            except FileNotFoundError:  # another process cleaned it first
                continue
            removed.append(p)
    return removed


def check_writable(folder, label=None) -> None:
    """Create ``folder`` and write, flush and remove a probe file in it, so an unwritable run folder is
    found before any training rather than at the first checkpoint. Raises the OSError subclass of the
    failure (PermissionError, NotADirectoryError, ...) naming ``label`` (default: the folder)."""
    folder = Path(folder)
    probe = folder / f".write-probe.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"fastdiff")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise type(e)(f"{label or folder} is not writable: {e.strerror or e} ({e.filename or folder})") from None


def json_digest(record: dict) -> str:
    """sha256 of the canonical JSON of ``record`` without its "json_sha256" (what that key holds)."""
    body = {k: v for k, v in record.items() if k != "json_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_paths(folder, step: int) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f"step-{step:08d}.safetensors", folder / f"step-{step:08d}.json"


def save(folder, step: int, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write checkpoint ``step`` atomically; returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensor_path, json_path = checkpoint_paths(folder, step)
    st = _safetensors()
    data = st.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    _write_atomic(tensor_path, lambda f: f.write(data))
    record = {**state, "format": FORMAT, "version": VERSION, "step": int(step), "tensors": tensor_path.name,
              "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    record = json.loads(json.dumps(record))  # the digest is of what a reader will parse (tuples -> lists, ...)
    record["json_sha256"] = json_digest(record)
    text = json.dumps(record, indent=1, sort_keys=True).encode()
    try:
        _write_atomic(json_path, lambda f: f.write(text))
    except BaseException:  # a tensor file without its JSON is no checkpoint: leave no orphan behind
        tensor_path.unlink(missing_ok=True)
        raise
    return json_path


def read(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of the checkpoint at ``path`` (its .json, its .safetensors, or a folder: the
    newest valid checkpoint in it), after checking size and sha256."""
    json_path = _json_path(path)
    try:
        state = json.loads(json_path.read_text())
    except FileNotFoundError:
        given = Path(path)
        if given.suffix == ".safetensors" and given.is_file():  # e.g. a generated shard
            raise CheckpointError(f"{given} is not a fastdiff checkpoint: a checkpoint is a step-*.json beside its "
                                  f".safetensors, and {json_path.name} is not there") from None
        raise CheckpointError(f"checkpoint {json_path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {json_path} is corrupt: its JSON state does not parse ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a fastdiff checkpoint (format {state.get('format')!r})"
                              if isinstance(state, dict) else f"{json_path} is not a fastdiff checkpoint")
    if state.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{json_path} has checkpoint format version {state.get('version')}; "
                              f"this fastdiff reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    _check_record(json_path, state)
    tensor_path = json_path.with_name(state["tensors"])
    if not tensor_path.exists():
        raise CheckpointError(f"checkpoint {json_path} is incomplete: its tensor file {tensor_path.name} is missing")
    size = tensor_path.stat().st_size
    if size != state["bytes"]:
        raise CheckpointError(f"checkpoint {tensor_path} is truncated or corrupt: {size} bytes, expected "
                              f"{state['bytes']}")
    data = tensor_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != state["sha256"]:
        raise CheckpointError(f"checkpoint {tensor_path} is corrupt: its sha256 does not match the one "
                              f"recorded in {json_path.name}")
    tensors = _safetensors().load(data)
    return tensors, state


def _check_record(json_path: Path, state: dict) -> None:
    """Required keys and their types, the JSON's own digest, and its step against its file name, so an
    edited or incomplete JSON is refused here rather than failing later with a bare KeyError."""
    for key in REQUIRED_KEYS + (("json_sha256",) if state["version"] >= 2 else ()):
        if key not in state:
            raise CheckpointError(f"checkpoint {json_path} is missing the required key {key!r}")
    if state["version"] >= 2 and state["json_sha256"] != json_digest(state):
        raise CheckpointError(f"checkpoint {json_path} was modified after it was written: its contents do not "
                              "match the json_sha256 it records")
    step, size, tensors = state["step"], state["bytes"], state["tensors"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"checkpoint {json_path} has an invalid step {step!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise CheckpointError(f"checkpoint {json_path} has an invalid bytes {size!r}")
    if not isinstance(state["sha256"], str):
        raise CheckpointError(f"checkpoint {json_path} has an invalid sha256 {state['sha256']!r}")
    # a bare file name next to the JSON: never a path that reads a file elsewhere
    if not isinstance(tensors, str) or not tensors or Path(tensors).name != tensors or tensors in (".", ".."):
        raise CheckpointError(f"checkpoint {json_path} has an invalid tensors file name {tensors!r}")
    m = _NAME.match(json_path.name)
    if m and int(m.group(1)) != step:  # catches an edited step in version 1 files too
        raise CheckpointError(f"checkpoint {json_path} records step {step} but its file name says step "
                              f"{int(m.group(1))}: it was edited or renamed")


def _json_path(path) -> Path:
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {path}")
        return found
    if path.suffix == ".safetensors":
        return path.with_suffix(".json")
    return path


def list_checkpoints(folder) -> list[tuple[int, Path]]:
    """(step, json path) of the checkpoints in ``folder``, newest first (not verified)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def verify(json_path) -> str | None:
    """None when the checkpoint reads back intact, else the reason it does not."""
    try:
        read(json_path)
    except CheckpointError as e:
        return str(e)
    except Exception as e:  # a safetensors header that does not parse, …
        return f"checkpoint {json_path} is corrupt: {type(e).__name__}: {e}"
    return None


def latest(folder, *, warn: bool = True) -> Path | None:
    """The newest checkpoint in ``folder`` that verifies; corrupt newer ones are reported and skipped."""
    warn = _checks.flag("warn", warn)  # warn='no' would warn
    for step, json_path in list_checkpoints(folder):
        problem = verify(json_path)
        if problem is None:
            return json_path
        if warn:
            warnings.warn(f"skipping checkpoint of step {step}: {problem}", RuntimeWarning, stacklevel=2)
    return None


def remove_all(folder, but: Path | None = None) -> int:
    """Delete every checkpoint in ``folder`` but ``but`` (Trainer(overwrite=True), holding the folder's lock);
    how many."""
    found = [(s, p) for s, p in list_checkpoints(folder) if but is None or p != but]
    for _, json_path in found:
        json_path.unlink(missing_ok=True)  # the JSON first: a half-deleted checkpoint is never "valid"
        json_path.with_suffix(".safetensors").unlink(missing_ok=True)
    return len(found)


def prune(folder, keep: int, newest_good: Path) -> None:
    """Delete all but the ``keep`` newest checkpoints, never ``newest_good`` and never a newer one."""
    if keep <= 0:
        return
    kept = 0
    good_step = int(_NAME.match(newest_good.name).group(1))
    for step, json_path in list_checkpoints(folder):
        if step >= good_step or kept < keep:
            kept += step <= good_step
            continue
        json_path.unlink(missing_ok=True)  # the JSON first: a half-deleted checkpoint is never "valid"
        json_path.with_suffix(".safetensors").unlink(missing_ok=True)
