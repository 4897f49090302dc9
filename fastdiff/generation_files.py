"""The files of a generated set (fastdiff.generation): ``manifest.json``, the shards and their pictures, each
written atomically (a temporary ``.<name>.tmp<pid>``, then a rename), and the checks that decide whether a file
on disk belongs to the set. Errors name the file at fault; a failed write is an OSError naming it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

MANIFEST = "manifest.json"
FORMAT = "fastdiff-generate"
VERSION = 1
_SHARD = re.compile(r"shard-(\d{6,})\.safetensors")
_PNG = re.compile(r"\d{6,}\.png")  # png_name's pictures


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


def png_name(i: int) -> str:
    return f"{i:06d}.png"


_PNG_SIGNATURE, _PNG_END = b"\x89PNG\r\n\x1a\n", b"\x00\x00\x00\x00IEND\xaeB`\x82"


def png_intact(path: Path) -> bool:
    """Whether ``path`` is a whole PNG file: its signature and its closing IEND chunk (a truncated or emptied
    picture fails; two small reads, not a decode, so a rerun over a large set stays cheap)."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return False
            f.seek(-12, os.SEEK_END)
            return f.read(12) == _PNG_END
    except OSError:  # missing, or shorter than 12 bytes
        return False


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def settings_sha256(manifest: dict) -> str:
    """The digest of what defines a set (the manifest without the fastdiff version), recorded in every shard."""
    defining = {k: v for k, v in manifest.items() if k != "fastdiff"}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _disk_error(path: Path, e: BaseException) -> OSError:
    # safetensors reports a full disk as a SafetensorError, not an OSError: the CLI would print a traceback
    return OSError(f"cannot write {path} ({type(e).__name__}: {e}); the disk may be full or not writable")


# ---- the manifest ----------------------------------------------------------------------------------------

def read_manifest(folder: Path) -> dict:
    """The folder's manifest as a dict with n and shard_size ints >= 1, or an error naming the file."""
    path = folder / MANIFEST
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: not a folder written by fastdiff generate, or its "
                                "manifest was deleted (run generate with the set's settings to write it again)"
                                ) from None
    except ValueError as e:  # not UTF-8, not JSON
        raise ValueError(f"{path} is not JSON ({e}): a damaged manifest, or not fastdiff generate's") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not a fastdiff generate manifest (an object)")
    for key in ("n", "shard_size"):
        value = saved.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            detail = "is missing" if key not in saved else f"is {value!r}, not an int >= 1"
            raise ValueError(f"{path}: {key!r} {detail}: a damaged manifest, or not fastdiff generate's")
    return saved


def check_manifest(folder: Path, manifest: dict) -> None:
    saved = read_manifest(folder)
    differ = sorted(k for k in set(saved) | set(manifest) if k != "fastdiff" and saved.get(k) != manifest.get(k))
    if differ:
        detail = "; ".join(f"{k}: folder {saved.get(k)!r}, this run {manifest.get(k)!r}" for k in differ)
        hint = (f" (shard_size defaults to the batch size: pass shard_size={saved['shard_size']}, --shard-size "
                f"{saved['shard_size']}, to resume with another batch size)" if differ == ["shard_size"] else "")
        asides = sorted(p.name for p in folder.glob(".overwritten-*"))  # a killed overwrite run's earlier set
        kept = (f"; the set that an interrupted overwrite replaced is kept in {', '.join(asides)} (move its files "
                "back to restore it, or delete it)" if asides else "")
        raise ValueError(f"{folder} holds another set ({detail}){hint}; use another out_dir, the same settings, or "
                         f"overwrite=True (--overwrite) to replace it{kept}")


def _made_nothing(folder: Path) -> bool:
    """Whether the folder's manifest is fastdiff generate's and no shard was written under it (a first run
    that failed before its first shard): then it protects nothing and a corrected run may replace it."""
    if shard_files(folder):  # (not any(): its keys are shard indices, and shard 0 is falsy)
        return False
    try:
        saved = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and saved.get("format") == FORMAT


def settle_manifest(folder: Path, manifest: dict) -> None:
    """Rank 0, holding the folder's lock: write the manifest, or check the one there against this run."""
    path = folder / MANIFEST
    if path.exists() and not _made_nothing(folder):
        check_manifest(folder, manifest)
        return
    tmp, taken = folder / f".{MANIFEST}.tmp{os.getpid()}", False
    try:
        tmp.write_text(json.dumps(manifest, indent=1))
        if path.exists():  # a run that made no shard: this run's settings replace it
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # exclusive: a manifest another job wrote meanwhile is checked, never replaced
        except FileExistsError:
            taken = True
        except OSError:  # a filesystem without hard links: the folder lock alone guards this
            os.replace(tmp, path)
    except OSError as e:
        raise _disk_error(path, e) from e
    finally:
        tmp.unlink(missing_ok=True)
    if taken:
        check_manifest(folder, manifest)


# ---- shards ----------------------------------------------------------------------------------------------

def shard_files(folder: Path) -> dict[int, Path]:
    """The folder's finished shard files by index."""
    out = {}
    for p in folder.glob("shard-*.safetensors"):
        m = _SHARD.fullmatch(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def checked_shard(path: Path, settings: str, seeds: torch.Tensor | None = None,
                  shape: tuple | None = None) -> tuple[str | None, dict | None]:
    """(why ``path`` is not a finished shard of this set, or None; its tensors when it could be read):
    unreadable, written for other settings, other seeds or shape, or bytes that differ from their digests."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # a truncated or foreign file
        return f"unreadable ({type(e).__name__}: {e})", None
    if meta.get("settings_sha256") != settings:
        return "written for other settings (or by a fastdiff without shard digests)", tensors
    if "x" not in tensors or "seeds" not in tensors:
        return "lacks the x or seeds tensor", tensors
    for key, t in tensors.items():
        if meta.get(f"{key}_sha256") != _tensor_sha256(t):
            return f"its {key} tensor does not match the sha256 written with it (a damaged file)", tensors
    if seeds is not None and not torch.equal(tensors["seeds"], seeds):
        return "holds other seeds", tensors
    if shape is not None and tuple(tensors["x"].shape) != (len(tensors["seeds"]), *shape):
        return f"holds samples of shape {tuple(tensors['x'].shape[1:])}, not {tuple(shape)}", tensors
    return None, tensors


def shard_valid(path: Path, seeds: torch.Tensor, shape: tuple, settings: str) -> bool:
    """Whether ``path`` is a finished, undamaged shard of these seeds, per-sample shape and settings."""
    return checked_shard(path, settings, seeds, shape)[0] is None


def write_shard(out: Path, k: int, x: torch.Tensor, seeds: torch.Tensor, y, settings: str) -> None:
    import safetensors.torch as st
    from safetensors import SafetensorError

    tensors = {"x": x.contiguous(), "seeds": seeds.contiguous()}
    if y is not None:
        tensors["y"] = y.contiguous()
    metadata = {"settings_sha256": settings, **{f"{key}_sha256": _tensor_sha256(t) for key, t in tensors.items()}}
    tmp, path = out / f".{shard_name(k)}.tmp{os.getpid()}", out / shard_name(k)
    try:
        st.save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise _disk_error(path, e) from e


def write_pngs(folder: Path, x: torch.Tensor, first: int) -> None:
    from PIL import Image

    folder.mkdir(exist_ok=True)
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, image in enumerate(pixels):
        # atomic, as the shards: a picture on disk is a whole one, so a rerun can trust what exists
        tmp, path = folder / f".{png_name(first + i)}.tmp{os.getpid()}", folder / png_name(first + i)
        try:
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _disk_error(path, e) from e


def check_png_shape(shape: tuple) -> None:
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"png=True needs images [C, H, W] with C = 1 or 3, got per-sample shape {tuple(shape)}")


# ---- files left by killed jobs ---------------------------------------------------------------------------

def _writer_gone(path: Path, locked: bool) -> bool:
    """Whether the temporary file ``.<name>.tmp<pid>`` is left by a dead writer: always, while this job holds the
    folder's lock (only its own processes write there); else when no process has that pid."""
    if locked:
        return True
    try:
        pid = int(path.name.rsplit(".tmp", 1)[1])
    except (IndexError, ValueError):
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, under another user
        return False
    return False


def remove_stale(folder: Path, locked: bool) -> None:
    """Rank 0, before anything is written: temporary files of killed jobs, and progress counts."""
    for stale in [*folder.glob(".shard-*.tmp*"), *folder.glob(f".{MANIFEST}.tmp*"), *folder.glob("png/.*.png.tmp*")]:
        if _writer_gone(stale, locked):
            stale.unlink(missing_ok=True)
    for stale in folder.glob(".progress-*"):
        stale.unlink(missing_ok=True)


def set_aside(folder: Path) -> tuple[Path, int]:
    """Move a set's files (manifest, shards, pictures; nothing else in the folder) into ``.overwritten-<pid>/``
    (``overwrite=True``, under the folder's lock): the new run deletes them when it has finished, or puts them back
    when it fails before its first shard. (that folder, how many shard files there were)"""
    # a new folder each time (pids repeat, across containers especially): it holds exactly what was moved
    aside = Path(tempfile.mkdtemp(prefix=f".overwritten-{os.getpid()}-", dir=folder))
    (aside / "png").mkdir()
    shards = list(shard_files(folder).values())
    for p in [*shards, folder / MANIFEST]:
        if p.exists():
            os.replace(p, aside / p.name)
    for p in (folder / "png").glob("*.png"):
        if _PNG.fullmatch(p.name):  # the set's own pictures, not other files a user keeps there
            os.replace(p, aside / "png" / p.name)
    return aside, len(shards)


def put_back(aside: Path, folder: Path) -> None:
    """Undo set_aside (the new run failed before writing any shard): the earlier set as it was."""
    for p in [*aside.glob("*.safetensors"), aside / MANIFEST]:
        if p.exists():
            os.replace(p, folder / p.name)
    (folder / "png").mkdir(exist_ok=True)
    for p in (aside / "png").glob("*.png"):
        os.replace(p, folder / "png" / p.name)
    shutil.rmtree(aside, ignore_errors=True)


def remove_beyond(folder: Path, shards: int) -> int:
    """Remove the shard files with index >= shards (those of a larger set whose manifest was deleted or edited:
    never this set's, whose n is in every shard's settings digest); how many there were."""
    beyond = [p for k, p in shard_files(folder).items() if k >= shards]
    for p in beyond:
        p.unlink(missing_ok=True)
    return len(beyond)
