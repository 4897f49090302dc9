"""Generation at scale: N samples of a model on any number of processes, in resumable shards
(docs/generation.md).

Sample i is ``fastdiff.sample`` with seed ``seed + i`` (and label ``labels[i]``): a function of i alone, so
the set does not depend on the batch size, the number of processes or restarts (bit for bit on one backend
and device). The samples are cut into shards of ``shard_size``; shard k of a job of W processes is made by
rank k mod W, in batches of ``batch_size``, and written atomically (a temporary file, then a rename) as
``shard-<k>.safetensors`` with tensors ``x`` [count, *shape], ``seeds`` [count] (int64) and ``y`` when the
model is conditional, and in its metadata the sha256 of each tensor's bytes and of the set's settings (the
manifest). A shard already on disk whose seeds, settings and contents check out is skipped (any other is made
again), so a killed job restarted with any number of processes finishes the set without gaps or duplicates, and
``load_generated`` refuses a shard whose bytes or settings do not match. ``manifest.json``
records what defines the set (n, seed, shard size, shape, labels, the sampler's settings, the checkpoint's
sha256, the fastdiff version); a run whose settings differ from a folder's manifest is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import time
from pathlib import Path

import torch

from fastdiff.folder_lock import FolderLock

MANIFEST = "manifest.json"
FORMAT = "fastdiff-generate"
VERSION = 1


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.safetensors"


def _jsonable(name: str, value):
    """A sampler setting as JSON that is the same in every run with the same setting (for the manifest)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(name, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(name, v) for k, v in sorted(value.items())}
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        return {"tensor_sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest(), "shape": list(data.shape),
                "dtype": str(data.dtype)}
    from fastdiff.paths import GaussianPath

    if isinstance(value, GaussianPath):
        return repr(value)
    raise TypeError(f"{name}={value!r} cannot be recorded in the manifest: give sampler settings as numbers, strings, "
                    "lists, tensors or paths (a schedule function has no stable record; pass timesteps instead)")


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _labels(labels, n: int, num_classes):
    """Per-sample labels: None, "balanced" (i mod num_classes) or n given labels, as an int64 tensor."""
    if labels is None:
        return None, None
    if isinstance(labels, str):
        if labels != "balanced":
            raise ValueError(f'labels must be None, "balanced" or a sequence of n labels, got {labels!r}')
        if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError('labels="balanced" needs num_classes (an int >= 1; or a model with num_classes)')
        return torch.arange(n, dtype=torch.int64) % int(num_classes), {"balanced": int(num_classes)}
    y = torch.as_tensor(labels).cpu()
    if y.shape[:1] != (n,) or y.is_floating_point():
        raise ValueError(f"labels must hold n = {n} integer labels, got shape {tuple(y.shape)}")
    return y, _jsonable("labels", y)


def _check_manifest(path: Path, manifest: dict) -> None:
    saved = json.loads(path.read_text())
    differ = sorted(k for k in set(saved) | set(manifest) if k != "fastdiff" and saved.get(k) != manifest.get(k))
    if differ:
        detail = "; ".join(f"{k}: folder {saved.get(k)!r}, this run {manifest.get(k)!r}" for k in differ)
        raise ValueError(f"{path.parent} holds another set ({detail}); use another out_dir or the same settings")


def settings_sha256(manifest: dict) -> str:
    """The digest of what defines a set (the manifest without the fastdiff version), recorded in every shard."""
    defining = {k: v for k, v in manifest.items() if k != "fastdiff"}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


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


def generate(model, n: int, out_dir, *, shape, seed: int = 0, batch_size: int = 64, shard_size: int | None = None,
             labels=None, num_classes: int | None = None, checkpoint=None, checkpoint_sha256: str | None = None,
             png: bool = False, progress: bool = True, device=None, **sample_kwargs) -> dict:
    """Generate samples 0 … n − 1 of ``model`` into ``out_dir`` (see the module docstring); under ``torchrun``
    each process makes its share. Returns a summary (samples made by this job, seconds, samples/s, shards).

    Args:
        model: ``model(x, t, y)`` as for fastdiff.sample. n: the set's size. shape: per-sample shape.
        seed: sample i uses seed + i. batch_size: samples per sampler call (does not change the samples).
        shard_size: samples per file (default: batch_size); part of the set's definition.
        labels: None, "balanced" (label i mod num_classes; num_classes defaults to ``model.num_classes``) or n
            labels. checkpoint: the file the model's weights came from (its sha256 goes into the manifest), or
            checkpoint_sha256: that digest (a fastdiff checkpoint's JSON records it).
        png: also write ``png/<i>.png`` per sample (images [C, H, W] in [−1, 1], C = 1 or 3; needs Pillow).
        progress: one tqdm bar on rank 0 for the whole job's count. device: where to sample (default: the
            process's GPU under torchrun with CUDA, else the CPU).
        **sample_kwargs: fastdiff.sample's settings (steps, cfg, method, path, prediction, null_y, ...).
    """
    from fastdiff.sampling.loop import sample
    from fastdiff.training import distributed

    for name, value in (("n", n), ("batch_size", batch_size)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    shard_size = batch_size if shard_size is None else shard_size
    if not isinstance(shard_size, numbers.Integral) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed <= (1 << 63) - n:
        raise ValueError(f"seed must be an int in [0, 2^63 - n], got {seed!r}")
    for reserved in ("seed", "batch_size", "y", "noise", "callback", "progress", "device"):
        if reserved in sample_kwargs:
            raise TypeError(f"generate() sets {reserved} itself; remove it from the sampler settings")
    if checkpoint is not None and checkpoint_sha256 is not None:
        raise ValueError("give checkpoint (a file, hashed here) or checkpoint_sha256, not both")
    shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(int(s) for s in shape)
    num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    y_all, label_record = _labels(labels, n, num_classes)
    ctx = distributed.setup(device)
    out = Path(out_dir)
    manifest = {"format": FORMAT, "version": VERSION, "n": int(n), "seed": int(seed), "shard_size": int(shard_size),
                "shape": list(shape), "labels": label_record,
                "settings": {k: _jsonable(k, v) for k, v in sorted(sample_kwargs.items())},
                "checkpoint_sha256": file_sha256(checkpoint) if checkpoint is not None else checkpoint_sha256}
    from fastdiff import __version__

    manifest["fastdiff"] = __version__
    path = out / MANIFEST
    lock = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # before anything is removed or written: two jobs in one folder would mix two sets under one manifest
        # and remove each other's temporary files
        lock = FolderLock(out, "fastdiff generate job")
        for stale in [*out.glob(".shard-*.tmp*"), *out.glob(".progress-*"), *out.glob("png/.*.png.tmp*")]:  # a job killed mid-write
            stale.unlink(missing_ok=True)
        if path.exists():
            _check_manifest(path, manifest)
        else:
            tmp = out / f".{MANIFEST}.tmp{os.getpid()}"
            tmp.write_text(json.dumps(manifest, indent=1))
            try:
                os.link(tmp, path)  # exclusive: a manifest another job wrote meanwhile is checked, never replaced
            except FileExistsError:
                _check_manifest(path, manifest)
            except OSError:  # a filesystem without hard links: the folder lock alone guards this
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    distributed.barrier(ctx)
    if not ctx.is_main:
        _check_manifest(path, manifest)

    shards = math.ceil(n / shard_size)
    settings = settings_sha256(manifest)
    mine = [k for k in range(ctx.rank, shards, ctx.world)]
    todo, present = [], 0
    for k in mine:
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        seeds = torch.arange(lo, hi, dtype=torch.int64) + seed
        if shard_valid(out / shard_name(k), seeds, shape, settings):
            present += hi - lo
            if png and not all((out / "png" / _png_name(i)).exists() for i in range(lo, hi)):
                # a job killed between a shard and its pictures, or an earlier run without png=True
                import safetensors.torch as st

                _write_pngs(out / "png", st.load_file(str(out / shard_name(k)))["x"], lo)
        else:
            todo.append((k, lo, hi, seeds))
    counter = _Counter(ctx, out, n, present, progress)
    t0, made = time.perf_counter(), 0
    for k, lo, hi, seeds in todo:
        parts = []
        for b in range(lo, hi, batch_size):
            e = min(hi, b + batch_size)
            y = y_all[b:e].to(ctx.device) if y_all is not None else None
            x = sample(model, shape=shape, seed=seeds[b - lo:e - lo].tolist(), batch_size=e - b, y=y, device=ctx.device,
                       **sample_kwargs)
            parts.append(x.cpu())
            counter.add(e - b)
        x = torch.cat(parts)
        _write_shard(out, k, x, seeds, y_all[lo:hi] if y_all is not None else None, settings)
        if png:
            _write_pngs(out / "png", x, lo)
        made += hi - lo
    counter.finish()
    distributed.barrier(ctx)
    seconds = time.perf_counter() - t0
    job_made = n - counter.present
    rate = job_made / seconds if seconds > 0 and job_made else None
    if ctx.is_main:
        counter.clean()
        if progress:
            print(f"fastdiff generate: {job_made} samples in {seconds:.1f} s ({rate or 0:.1f} samples/s), "
                  f"{counter.present} were there; {out}")
    if lock is not None:
        lock.release()
    return {"made": made, "job_made": job_made, "present": counter.present, "shards": shards, "seconds": seconds,
            "samples_per_second": rate, "rank": ctx.rank, "world": ctx.world}


class _Counter:
    """The job's progress, one tqdm bar on rank 0. Each process's count is host data (no device sync): it writes
    it to ``.progress-<rank>`` in the output folder after each batch, and rank 0 sums the files when it updates
    (no collective inside the loop, whose ranks may have different numbers of batches after a resume)."""

    def __init__(self, ctx, out: Path, n: int, present: int, progress: bool):
        self.ctx, self.out, self.n, self.mine = ctx, out, n, 0
        if ctx.world > 1:
            import torch.distributed as dist

            total = torch.tensor([present], dtype=torch.int64)
            dist.all_reduce(total, group=dist.new_group(backend="gloo"))  # once, before the loop
            present = int(total)
        self.present = present
        self.bar = None
        if progress and ctx.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n, initial=present, desc="fastdiff generate", unit="sample")

    def _file(self, rank: int) -> Path:
        return self.out / f".progress-{rank}"

    def _job_count(self) -> int:
        total = 0
        for rank in range(self.ctx.world):
            try:
                total += int(self._file(rank).read_text() or 0)
            except (FileNotFoundError, ValueError):
                pass
        return total

    def add(self, count: int) -> None:
        self.mine += count
        if self.ctx.world == 1:
            if self.bar is not None:
                self.bar.update(count)
            return
        tmp = self.out / f".progress-{self.ctx.rank}.tmp{os.getpid()}"
        tmp.write_text(str(self.mine))
        os.replace(tmp, self._file(self.ctx.rank))
        if self.bar is not None:
            self.bar.n = self.present + self._job_count()
            self.bar.refresh()

    def finish(self) -> None:
        """Rank 0 follows the others to the end of the job before closing its bar."""
        if self.ctx.world > 1:
            self.add(0)
            while self.bar is not None and self.present + self._job_count() < self.n:
                time.sleep(0.2)
                self.bar.n = self.present + self._job_count()
                self.bar.refresh()
        if self.bar is not None:
            self.bar.close()

    def clean(self) -> None:
        for rank in range(self.ctx.world):
            self._file(rank).unlink(missing_ok=True)


def _write_shard(out: Path, k: int, x: torch.Tensor, seeds: torch.Tensor, y, settings: str) -> None:
    import safetensors.torch as st

    tensors = {"x": x.contiguous(), "seeds": seeds.contiguous()}
    if y is not None:
        tensors["y"] = y.contiguous()
    metadata = {"settings_sha256": settings, **{f"{key}_sha256": _tensor_sha256(t) for key, t in tensors.items()}}
    tmp = out / f".{shard_name(k)}.tmp{os.getpid()}"
    st.save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / shard_name(k))


def _write_pngs(folder: Path, x: torch.Tensor, first: int) -> None:
    from PIL import Image

    folder.mkdir(exist_ok=True)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"png=True needs images [C, H, W] with C = 1 or 3, got per-sample shape {tuple(x.shape[1:])}")
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, image in enumerate(pixels):
        # atomic, as the shards: a picture on disk is a whole one, so a rerun can trust what exists
        tmp = folder / f".{_png_name(first + i)}.tmp{os.getpid()}"
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")
        os.replace(tmp, folder / _png_name(first + i))


def _png_name(i: int) -> str:
    return f"{i:06d}.png"


def load_generated(out_dir) -> dict[str, torch.Tensor]:
    """The set in ``out_dir`` in sample order: {"x", "seeds"[, "y"]}; an error naming missing or failing shards."""
    out = Path(out_dir)
    manifest = json.loads((out / MANIFEST).read_text())
    shards = math.ceil(manifest["n"] / manifest["shard_size"])
    missing = [k for k in range(shards) if not (out / shard_name(k)).exists()]
    if missing:
        raise FileNotFoundError(f"{out} lacks shards {missing[:10]}{' …' if len(missing) > 10 else ''} of {shards}; "
                                "run generate again to finish the set")
    settings = settings_sha256(manifest)
    parts, bad = [], {}
    for k in range(shards):  # each file read once: checked, then kept
        why, tensors = checked_shard(out / shard_name(k), settings)
        if why is not None:
            bad[k] = why
        parts.append(tensors)
    if bad:
        listed = "; ".join(f"{shard_name(k)}: {why}" for k, why in list(bad.items())[:5])
        raise ValueError(f"{out}: {len(bad)} of {shards} shards fail their check ({listed}{' …' if len(bad) > 5 else ''}); "
                         "run generate again with the same settings to remake them")
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
