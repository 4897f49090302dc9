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
sha256, the fastdiff version); a run whose settings differ from a folder's manifest is refused, unless no shard
was written under it (a first run that failed). The files and their checks: fastdiff/generation_files.py.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch

from fastdiff import _checks
from fastdiff._version import __version__
from fastdiff.folder_lock import FolderLock
from fastdiff.generation_files import (  # noqa: F401  (the file format's names, public here as before)
    FORMAT, MANIFEST, VERSION, check_manifest, check_png_shape, checked_shard, file_sha256, png_name, read_manifest,
    put_back, remove_beyond, remove_stale, set_aside, settings_sha256, settle_manifest, shard_files, shard_name,
    shard_valid, png_intact, write_pngs, write_shard)


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
    from fastdiff.schedules import Schedule

    if isinstance(value, (GaussianPath, Schedule)):  # a schedule object is a value: its repr names its options
        return repr(value)
    raise TypeError(f"{name}={value!r} cannot be recorded in the manifest: give sampler settings as numbers, strings, "
                    "lists, tensors or paths (a schedule function has no stable record; pass timesteps instead)")


def _labels(labels, n: int, num_classes):
    """Per-sample labels: None, "balanced" (i mod num_classes) or n given labels, as an int64 tensor."""
    if labels is None:
        return None, None
    if num_classes is not None and (not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    if isinstance(labels, str):
        if labels != "balanced":
            raise ValueError(f'labels must be None, "balanced" or a sequence of n labels, got {labels!r}')
        if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError('labels="balanced" needs num_classes (an int >= 1; or a model with num_classes)')
        return torch.arange(n, dtype=torch.int64) % int(num_classes), {"balanced": int(num_classes)}
    if isinstance(labels, torch.Tensor):
        y = labels.detach().cpu()
    else:
        try:
            y = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f'labels must be None, "balanced" or a sequence of n = {n} integer labels, got '
                            f"{type(labels).__name__} ({e})") from None
    if y.shape[:1] != (n,) or y.is_floating_point() or y.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise ValueError(f"labels must hold n = {n} integer labels, got {y.dtype} of shape {tuple(y.shape)}")
    if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, num_classes = {num_classes}), got labels in "
                         f"[{int(y.min())}, {int(y.max())}]")
    return y, _jsonable("labels", y)


MAX_SAMPLES, MAX_SHARDS = 1 << 40, 1 << 24
# sample() settings that may hold one value per sample: given for the whole set (n of them), each batch gets its
# samples' slice, so sample i sees its own init row whatever the batch size
def _per_sample_settings(settings: dict, n: int, shape: tuple) -> tuple[str, ...]:
    """The names of ``settings`` that hold the set's n per-sample values (checked to be n)."""
    from fastdiff.sampling.methods.churn import OPTIONS as CHURN_OPTIONS

    def rows(value):
        return value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else \
            len(value) if isinstance(value, (list, tuple)) else None

    names = []
    for name, value in settings.items():
        if name == "init" and value is not None:
            per = True
        elif name == "known_mask" and isinstance(value, torch.Tensor):
            per = value.dim() == len(shape) + 1 and value.shape[0] != 1  # else one mask, broadcast to every sample
        elif name == "conditions" and value is not None:
            if any(rows(c) != n for c in value):
                raise ValueError(f"conditions must hold the set's n = {n} labels per condition (one per sample; "
                                 f"generate gives each batch its samples' slice), got {[rows(c) for c in value]}")
            names.append(name)
            continue
        else:
            per = name in CHURN_OPTIONS and rows(value) is not None
        if per:
            if rows(value) != n:
                raise ValueError(f"{name} must hold the set's n = {n} per-sample values (generate gives each batch "
                                 f"its samples' slice), got {rows(value)}")
            names.append(name)
    return tuple(names)


def _batch_settings(settings: dict, per_sample: tuple, lo: int, hi: int) -> dict:
    """The sampler settings of samples lo … hi − 1: per-sample settings sliced to them."""
    if not per_sample:
        return settings
    out = dict(settings)
    for name in per_sample:
        value = settings[name]
        out[name] = [c[lo:hi] for c in value] if name == "conditions" else value[lo:hi]
    return out


def generate(model, n: int, out_dir, *, shape, seed: int = 0, batch_size: int = 64, shard_size: int | None = None,
             labels=None, num_classes: int | None = None, checkpoint=None, checkpoint_sha256: str | None = None,
             png: bool = False, progress: bool = True, device=None, overwrite: bool = False, **sample_kwargs) -> dict:
    """Generate samples 0 … n − 1 of ``model`` into ``out_dir`` (see the module docstring); under ``torchrun``
    each process makes its share. Returns a summary (samples made by this job, seconds, samples/s, shards).

    Args:
        model: ``model(x, t, y)`` as for fastdiff.sample. n: the set's size. shape: per-sample shape.
        seed: sample i uses seed + i. batch_size: samples per sampler call (does not change the samples).
        shard_size: samples per file (default: batch_size); part of the set's definition.
        labels: None, "balanced" (label i mod num_classes; num_classes defaults to ``model.num_classes``) or n
            labels. checkpoint: the file the model's weights came from (its sha256 goes into the manifest), or
            checkpoint_sha256: that digest (a fastdiff checkpoint's JSON records it).
        png: also write ``png/<i:06d>.png`` per sample (images [C, H, W] in [−1, 1], C = 1 or 3; needs Pillow).
        overwrite: a folder holding another set (its manifest differs or is damaged) is refused unless
            overwrite=True, which removes that set's manifest, shards and pictures first (a set with these very
            settings is resumed either way: its shards are the ones this run would make).
        progress: one tqdm bar on rank 0 for the whole job's count. device: where to sample (default: the
            process's GPU under torchrun with CUDA, else the CPU).
        **sample_kwargs: fastdiff.sample's settings (steps, cfg, method, path, prediction, null_y, ...).

    A ``fastdiff.cfg_parallel(model, group_size=G)`` model: each group of G ranks makes its shards together (the
    branches of each call shared among them, fastdiff/sampling/cfg_parallel.py), its first rank writing them.
    """
    from fastdiff.sampling import cfg_parallel
    from fastdiff.sampling.sampler import sample
    from fastdiff.training import distributed

    for name, value in (("n", n), ("batch_size", batch_size)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    shard_size = batch_size if shard_size is None else shard_size
    if not isinstance(shard_size, numbers.Integral) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    if n > MAX_SAMPLES or math.ceil(n / shard_size) > MAX_SHARDS:  # the job lists its shards up front
        raise ValueError(f"n = {n} samples in shards of shard_size = {shard_size}: at most {MAX_SAMPLES} samples "
                         f"and {MAX_SHARDS} shards")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= seed <= (1 << 63) - n:
        raise ValueError(f"seed must be an int in [0, 2^63 - n], got {seed!r}")
    for reserved in ("seed", "batch_size", "y", "noise", "callback", "progress", "device"):
        if reserved in sample_kwargs:
            raise TypeError(f"generate() sets {reserved} itself; remove it from the sampler settings")
    if checkpoint is not None and checkpoint_sha256 is not None:
        raise ValueError("give checkpoint (a file, hashed here) or checkpoint_sha256, not both")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        # open() takes an int as a file descriptor: checkpoint=1 would hash and then close stdout
        raise TypeError(f"checkpoint must be a path (str or os.PathLike), got {type(checkpoint).__name__} "
                        f"{checkpoint!r}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {os.fspath(checkpoint)!r} is not a file (the weights' file, hashed into "
                                "the manifest)")
    if checkpoint_sha256 is not None and (not isinstance(checkpoint_sha256, str)
                                          or re.fullmatch(r"[0-9a-f]{64}", checkpoint_sha256) is None):
        raise ValueError(f"checkpoint_sha256 must be 64 lowercase hex digits (a sha256), got {checkpoint_sha256!r}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path (str or os.PathLike), got {type(out_dir).__name__} {out_dir!r}")
    if os.fspath(out_dir) in ("", b""):  # Path("") is the working directory: a set would land among its files
        raise ValueError("out_dir must name a folder, got an empty path")
    png, progress = _checks.flag("png", png), _checks.flag("progress", progress)
    overwrite = _checks.flag("overwrite", overwrite)
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, y), got {type(model).__name__}")
    shape = _checks.shape_tuple(shape)
    per_sample = _per_sample_settings(sample_kwargs, n, shape)
    if png:  # before the manifest: a run refused after it would leave one that blocks the corrected rerun
        check_png_shape(shape)
    num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    y_all, label_record = _labels(labels, n, num_classes)
    ctx = distributed.setup(device)
    # a cfg_parallel model: its groups of ranks share each call, and each group takes its own batches
    layout = cfg_parallel.batch_layout(model, ctx.rank, ctx.world, ctx.device)
    out = Path(out_dir)
    manifest = {"format": FORMAT, "version": VERSION, "n": int(n), "seed": int(seed), "shard_size": int(shard_size),
                "shape": list(shape), "labels": label_record,
                "settings": {k: _jsonable(k, v) for k, v in sorted(sample_kwargs.items())},
                "checkpoint_sha256": file_sha256(checkpoint) if checkpoint is not None else checkpoint_sha256}
    manifest["fastdiff"] = __version__
    # every sampler setting checked before the folder is touched, so that a typo neither costs the set that
    # overwrite=True replaces nor leaves a manifest (sample() of no samples runs its checks and calls no model)
    sample(model, shape=shape, seed=0, batch_size=0, y=None if y_all is None else y_all[:0].to(ctx.device),
           device=ctx.device, **_batch_settings(sample_kwargs, per_sample, 0, 0))
    shards = math.ceil(n / shard_size)
    lock, aside = None, None
    try:
        if ctx.is_main:
            lock, aside = _open_folder(out, manifest, shards, overwrite)
    finally:  # a rank-0 failure (folder in use, another set's manifest) reaches the other ranks instead of a hang
        if not distributed.all_ok(ctx, ctx.is_main is False or lock is not None) and not ctx.is_main:
            raise RuntimeError(f"rank 0 could not open {out} (its error says why); this rank stops too")
    try:  # released on failure too: a traceback kept alive (a notebook, pytest.raises) would hold it
        if not ctx.is_main:
            check_manifest(out, manifest)
        summary = _make(model, n, out, ctx, manifest, shards, y_all, batch_size, png, progress, sample_kwargs,
                        per_sample, layout)
    except BaseException:
        if aside is not None:
            if not shard_files(out):  # the new run wrote nothing: the earlier set comes back as it was
                put_back(aside, out)
            else:
                warnings.warn(f"overwrite=True: this run failed after writing shards; the set it replaces is kept "
                              f"in {aside}", RuntimeWarning, stacklevel=2)
        raise
    finally:
        if lock is not None:
            lock.release()
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return summary


def _open_folder(out: Path, manifest: dict, shards: int, overwrite: bool) -> tuple[FolderLock, Path | None]:
    """Rank 0: lock the folder, remove what killed jobs left (and, told to overwrite, another set), settle the
    manifest, remove shards beyond the set."""
    out.mkdir(parents=True, exist_ok=True)
    # before anything is removed or written: two jobs in one folder would mix two sets under one manifest
    # and remove each other's temporary files
    lock, aside = FolderLock(out, "fastdiff generate job"), None
    try:
        remove_stale(out, locked=lock.fd is not None)
        if overwrite and (out / MANIFEST).exists():
            try:
                check_manifest(out, manifest)
            except ValueError as e:  # another set, or a damaged manifest: told to, make room for this one
                aside, count = set_aside(out)
                warnings.warn(f"overwrite=True: replacing the set in {out} ({count} shards; removed once this run "
                              f"has finished): {e}", RuntimeWarning, stacklevel=3)
        settle_manifest(out, manifest)
        removed = remove_beyond(out, shards)
    except BaseException:
        if aside is not None:
            put_back(aside, out)
        lock.release()
        raise
    if removed:
        warnings.warn(f"removed {removed} shard files beyond the set's {shards} from {out}: they belonged to a larger "
                      f"set whose {MANIFEST} was deleted or edited", RuntimeWarning, stacklevel=3)
    return lock, aside


def _make(model, n: int, out: Path, ctx, manifest: dict, shards: int, y_all, batch_size: int, png: bool,
          progress: bool, sample_kwargs: dict, per_sample: tuple = (), layout=None) -> dict:
    """This process's shards of the set (those on disk that check out are kept). ``layout``
    (cfg_parallel.batch_layout): a group of ranks makes its shards together, its first rank writing them."""
    from fastdiff.sampling.sampler import sample

    seed, shard_size, shape = manifest["seed"], manifest["shard_size"], tuple(manifest["shape"])
    settings = settings_sha256(manifest)
    shard_rank, shard_world, writer, group = layout or (ctx.rank, ctx.world, True, None)
    mine = [k for k in range(shard_rank, shards, shard_world)]
    todo, present = [], 0
    for k in mine:
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        seeds = torch.arange(lo, hi, dtype=torch.int64) + seed
        if writer and shard_valid(out / shard_name(k), seeds, shape, settings):
            present += hi - lo
            if png and not all(png_intact(out / "png" / png_name(i)) for i in range(lo, hi)):
                # a job killed between a shard and its pictures, an earlier run without png=True, or a damaged one
                import safetensors.torch as st

                write_pngs(out / "png", st.load_file(str(out / shard_name(k)))["x"], lo)
        else:
            todo.append((k, lo, hi, seeds))
    if group is not None:  # the writer's list for the whole group: its ranks then make the same calls
        import torch.distributed as dist

        making = {item[0] for item in todo}
        flags = torch.tensor([k in making for k in mine], dtype=torch.int64, device=ctx.device)
        dist.broadcast(flags, src=dist.get_global_rank(group, 0), group=group)
        todo = [item for item, make in zip(todo, flags.tolist()) if make or writer]
    counter = _Counter(ctx, out, n, present, progress)
    t0, made = time.perf_counter(), 0
    for k, lo, hi, seeds in todo:
        # pictures of a shard being made again belong to the old one (another set, or damaged): without this they
        # would pass the "all pictures present" check of a later run with png=True
        for i in range(lo, hi) if writer else ():
            (out / "png" / png_name(i)).unlink(missing_ok=True)
        parts = []
        for b in range(lo, hi, batch_size):
            e = min(hi, b + batch_size)
            y = y_all[b:e].to(ctx.device) if y_all is not None else None
            x = sample(model, shape=shape, seed=seeds[b - lo:e - lo].tolist(), batch_size=e - b, y=y, device=ctx.device,
                       **_batch_settings(sample_kwargs, per_sample, b, e))
            parts.append(x.cpu())
            if writer:
                counter.add(e - b)
        if not writer:  # the group's writer has the same samples
            continue
        x = torch.cat(parts)
        write_shard(out, k, x, seeds, y_all[lo:hi] if y_all is not None else None, settings)
        if png:
            write_pngs(out / "png", x, lo)
        made += hi - lo
    counter.finish()
    from fastdiff.training import distributed

    distributed.barrier(ctx)
    seconds = time.perf_counter() - t0
    job_made = n - counter.present
    rate = job_made / seconds if seconds > 0 and job_made else None
    if ctx.is_main:
        counter.clean()
        if progress:
            print(f"fastdiff generate: {job_made} samples in {seconds:.1f} s ({rate or 0:.1f} samples/s), "
                  f"{counter.present} were there; {out}")
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


def load_generated(out_dir) -> dict[str, torch.Tensor]:
    """The set in ``out_dir`` in sample order: {"x", "seeds"[, "y"]}; an error naming the manifest, or the missing,
    failing or extra shards."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    n, shard_size = manifest["n"], manifest["shard_size"]
    shards = math.ceil(n / shard_size)
    files = shard_files(out)
    missing = [k for k in range(shards) if k not in files]
    if missing:
        raise FileNotFoundError(f"{out} lacks shards {missing[:10]}{' …' if len(missing) > 10 else ''} of {shards}; "
                                "run generate again to finish the set")
    beyond = sorted(k for k in files if k >= shards)
    if beyond:
        names = ", ".join(shard_name(k) for k in beyond[:5]) + (" …" if len(beyond) > 5 else "")
        raise ValueError(f"{out} holds shards beyond the {shards} of its {MANIFEST} (n = {n}): {names}; the manifest "
                         "was edited or replaced: restore it, or run generate with its settings (which removes them)")
    settings = settings_sha256(manifest)
    seed, shape = manifest.get("seed"), manifest.get("shape")
    parts, bad = [], {}
    for k in range(shards):  # each file read once: checked, then kept
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        # the digest covers the settings; the seeds and shape are checked too (a shard must hold what it says)
        seeds = torch.arange(lo, hi, dtype=torch.int64) + seed if isinstance(seed, int) else None
        why, tensors = checked_shard(out / shard_name(k), settings, seeds,
                                     tuple(shape) if isinstance(shape, list) else None)
        if why is not None:
            bad[k] = why
        parts.append(tensors)
    if bad and len(bad) == shards and all(why.startswith("written for other settings") for why in bad.values()):
        raise ValueError(f"{out / MANIFEST} does not match its shards: all {shards} were written for other settings "
                         "(the manifest was edited or replaced); restore it, or run generate again with its settings "
                         "to remake the set")
    if bad:
        listed = "; ".join(f"{shard_name(k)}: {why}" for k, why in list(bad.items())[:5])
        raise ValueError(f"{out}: {len(bad)} of {shards} shards fail their check ({listed}{' …' if len(bad) > 5 else ''}); "
                         "run generate again with the same settings to remake them")
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
