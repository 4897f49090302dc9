"""The training loop: AdamW, EMA, bf16 autocast, gradient clipping, LR warmup, atomic checkpoints with
exact resume, a progress bar, and DDP under ``torchrun``.

Exactness: the data of step s, its noise, times and label dropout are pure functions of (seed, s)
(see :mod:`fastdiff.training.batches` and :mod:`fastdiff.training.objective`), and a checkpoint holds
everything else that evolves (weights, EMA, AdamW moments and step counts, torch's RNG state). So
a run resumed from step k performs the same arithmetic as the run that never stopped, and on the CPU
its weights are bit-identical (tests/test_training.py kills a run with SIGKILL to check).

Non-finite losses ("stop" without a sync per step, or "skip"): see :mod:`fastdiff.training.nonfinite`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from fastdiff import _checks
from fastdiff.folder_lock import FolderLock
from fastdiff.training import checkpoint as ckpt
from fastdiff.training import distributed
from fastdiff.training.batches import StepBatches
from fastdiff.training.nonfinite import ON_NONFINITE, NonFiniteGuard  # noqa: F401 (ON_NONFINITE: re-export)
from fastdiff.training.objective import DiffusionObjective, training_seeds
from fastdiff.training.options import check_resumed_objective, check_steps, check_trainer_args


def _unwrap(model):
    return getattr(model, "module", model)


class Trainer:
    """Train ``model(x, t, y)`` with the fused diffusion loss.

    Args:
        model: any ``nn.Module`` called as ``model(x_t, t, y)``; models with a ``config`` dict (those
            of :mod:`fastdiff.demo.models`) can be rebuilt from a checkpoint alone.
        data: a map-style Dataset of ``x`` or ``(x, y)`` items, a tensor or tuple of tensors, or a
            DataLoader (its dataset, collate_fn and batch size are used).
        objective: a :class:`DiffusionObjective` (default: velocity prediction on CondOT).
        steps: total optimizer steps of the run (a resumed run continues to this number).
        batch_size: the global batch (divided among DDP processes); default: a DataLoader's batch size
            (times the processes), else 128.
        lr, betas, weight_decay: AdamW; ``warmup`` steps of linear LR warmup, then ``lr_schedule``
            "constant" or "cosine" (to ``lr_min`` at the last step).
        grad_clip: max global gradient norm (None or 0: no clipping).
        ema_decay: decay of the exponential moving average of the weights (0: none).
        amp: run the model under bf16 autocast (the loss math stays float32).
        seed: run seed: data order, noise, times and label dropout derive from it.
        out_dir: where checkpoints go (``out_dir/checkpoints``); None: no checkpoints.
        checkpoint_every: steps between checkpoints (0: only at the end); ``keep`` newest are kept.
        resume: True: continue from the newest valid checkpoint in ``out_dir`` if there is one
            (skipping corrupt ones with a warning); a path: that checkpoint (an error if it is corrupt);
            False: start fresh (refused where out_dir holds an earlier run's checkpoints, unless overwrite).
        overwrite: with resume=False, start a new run in an out_dir that holds an earlier run's checkpoints: they are
            deleted once this run's first checkpoint is written and read back (a run that fails before leaves them).
        progress: tqdm progress bar with the loss (main process only).
        log_every: steps between reading the loss back to the host (it synchronizes a GPU).
        callback: ``callback(trainer)`` after every optimizer step.
        device: where to train (default: the model's device; under torchrun with CUDA, the local GPU).
        on_nonfinite: what a step with a non-finite loss or gradient norm does. "stop" (default):
            :meth:`fit` raises FloatingPointError naming the first such step, at the latest
            ``log_every`` steps later and always before a checkpoint of a later step is written.
            "skip": that step changes nothing (weights, optimizer, EMA; the step counter advances,
            so resume stays exact) and is listed in ``skipped``; ``max_consecutive_skips`` skipped
            steps in a row raise FloatingPointError. Skip reads the check back every step (a device
            sync per step). Either way a checkpoint with non-finite weights is never written.
    """

    def __init__(self, model: torch.nn.Module, data, *, objective: Optional[DiffusionObjective] = None,
                 steps: int = 1000, batch_size: Optional[int] = None, lr: float = 1e-3,
                 betas=(0.9, 0.999), weight_decay: float = 0.0, warmup: int = 0, lr_schedule: str = "constant",
                 lr_min: float = 0.0, grad_clip: Optional[float] = 1.0, ema_decay: float = 0.999,
                 amp: bool = False, seed: int = 0, out_dir=None, checkpoint_every: int = 0, keep: int = 2,
                 resume=True, progress: bool = True, log_every: int = 10,
                 callback: Optional[Callable] = None, device=None, on_nonfinite: str = "stop",
                 max_consecutive_skips: int = 10, overwrite: bool = False):
        betas = check_trainer_args(
            model, steps=steps, warmup=warmup, checkpoint_every=checkpoint_every, keep=keep, log_every=log_every,
            max_consecutive_skips=max_consecutive_skips, seed=seed, lr=lr, lr_min=lr_min, weight_decay=weight_decay,
            lr_schedule=lr_schedule, ema_decay=ema_decay, grad_clip=grad_clip, betas=betas,
            on_nonfinite=on_nonfinite, out_dir=out_dir, objective=objective, amp=amp, progress=progress, resume=resume,
            callback=callback, overwrite=overwrite)
        if device is not None:  # torch's own error for a missing CUDA is an AssertionError naming no argument
            device = _checks.device_arg("device", device)

        if device is None and not distributed.launched():
            p = next(model.parameters(), None)
            device = p.device if p is not None else None  # train where the model lives
        self.ctx = distributed.setup(device)
        self.device = self.ctx.device
        if out_dir is not None and self.ctx.is_main:
            # Before any training: an unwritable folder would otherwise surface at the first checkpoint,
            # a whole interval of training later. Temp files of writers killed mid-write are removed.
            ckpt.check_writable(Path(out_dir) / "checkpoints", f"out_dir {out_dir}")
            ckpt.clean_stale_temp_files(Path(out_dir) / "checkpoints")
        self.model = model.to(self.device)
        self.objective = objective or DiffusionObjective()
        self.steps, self.seed = steps, seed
        self.batches = StepBatches(data, batch_size, seed=seed, rank=self.ctx.rank, world=self.ctx.world)
        self.batch_size = self.batches.global_batch
        check_steps(steps, self.batch_size)
        self.lr, self.lr_min, self.warmup, self.lr_schedule = lr, lr_min, warmup, lr_schedule
        self.grad_clip, self.ema_decay, self.amp = grad_clip or None, ema_decay, amp
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.checkpoint_every, self.keep = checkpoint_every, keep
        self.progress, self.log_every, self.callback = progress, log_every, callback
        self.on_nonfinite = on_nonfinite
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=betas,
                                           weight_decay=weight_decay)
        self.ema = [p.detach().clone() for p in self.model.parameters()] if ema_decay else None
        self.step = 0
        self.history: list[tuple[int, float]] = []  # (step, mean loss over the last log_every steps)
        self._nonfinite = NonFiniteGuard(max_consecutive_skips, capacity=log_every,
                                         device=self.device, world=self.ctx.world, checkpoint_dir=self.checkpoint_dir)
        self.resumed_from: Optional[Path] = None
        self._overwrite = overwrite and self.checkpoint_dir is not None  # done by fit(), under the folder's lock
        if resume:
            self._resume(resume)
        elif self._overwrite:
            pass
        elif self.checkpoint_dir is not None and (earlier := ckpt.list_checkpoints(self.checkpoint_dir)):
            # starting afresh there would prune the earlier run's checkpoints, and a later resume would mix the two
            raise ValueError(f"resume=False but out_dir {self.out_dir} holds checkpoints of an earlier run (newest: "
                             f"{earlier[0][1].name}); resume=True continues it, overwrite=True replaces it, or "
                             "choose another out_dir")
        self.ddp_model = distributed.wrap(self.model, self.ctx)

    # ---- schedule --------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if self.warmup and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.lr_schedule == "cosine":
            span = max(1, self.steps - self.warmup)
            frac = min(1.0, (step - self.warmup) / span)
            return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1.0 + math.cos(math.pi * frac))
        return self.lr

    def ema_decay_at(self, step: int) -> float:
        # An EMA that starts at the random init is dominated by it for ~1/(1 − decay) steps; this
        # ramp (as in many diffusion codebases) lets early averages follow the weights.
        return min(self.ema_decay, (1.0 + step) / (10.0 + step))

    # ---- the loop --------------------------------------------------------------------------------

    def train_step(self) -> torch.Tensor:
        """One optimizer step on global batch ``self.step``; returns the (local) loss, detached."""
        x, y = self.batches(self.step)
        x = x.to(self.device, non_blocking=True)
        if not self._batch_checked:  # the first batch of this process: clear errors before any math
            self._check_batch(x)
            self._batch_checked = True
        y = None if y is None else y.to(self.device, non_blocking=True)
        first = self.step * self.batch_size + self.ctx.rank * self.batches.local_batch
        seeds = training_seeds(self.seed, first, x.shape[0])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss = self.objective(self.ddp_model, x, y, seeds, autocast_dtype=torch.bfloat16 if self.amp else None)
        if not loss.requires_grad:  # else backward()'s error, naming neither the model nor the cause
            raise ValueError("the loss has no gradient path to the model's parameters (the model's output was "
                             "computed under torch.no_grad, detached, or without trainable parameters)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        loss = loss.detach()
        # Under DDP the norm is of the all-reduced gradients, so a non-finite loss on any rank shows in it.
        self._nonfinite.last_step_skipped = False
        if self.on_nonfinite == "skip":
            bad = self._nonfinite.bad_values(loss, norm)  # a device sync per step
            if bad is not None:  # this step changes nothing
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1  # the batch of this step is used up: the run stays a function of the step
                self._nonfinite.skip(self.step, *bad)  # raises after max_consecutive_skips in a row
                return loss
        else:
            self._nonfinite.record(loss, norm, self.step)  # on the device, checked at the next read-back
        self.optimizer.step()
        if self.ema is not None:
            w = 1.0 - self.ema_decay_at(self.step)
            with torch.no_grad():
                for e, p in zip(self.ema, self.model.parameters()):
                    e.lerp_(p.detach(), w)
        self.step += 1
        return loss

    _batch_checked = False

    # ---- non-finite losses (see fastdiff.training.nonfinite) --------------------------------------

    @property
    def skipped(self) -> list[int]:
        """Steps (1-based, as in checkpoints) skipped for a non-finite loss (on_nonfinite="skip")."""
        return self._nonfinite.skipped

    @property
    def last_step_skipped(self) -> bool:
        """Whether the newest train_step was skipped (on_nonfinite="skip")."""
        return self._nonfinite.last_step_skipped

    def check_finite(self, extra: Optional[torch.Tensor] = None):
        """With on_nonfinite="stop": raise FloatingPointError if a step since the last check had a
        non-finite loss or gradient norm. One device read, shared with ``extra`` (a 0-dim tensor,
        returned as a float; None without it)."""
        return self._nonfinite.check(self.step, extra)

    def _check_batch(self, x: torch.Tensor) -> None:
        p = next(self.model.parameters(), None)
        if not x.is_floating_point():
            raise TypeError(f"data x must be a floating-point tensor, got {x.dtype}")
        if p is not None and x.dtype == torch.float64 and p.dtype != torch.float64:
            raise TypeError(f"data x is float64 but the model's parameters are {p.dtype}: convert the data "
                            "(e.g. x.float()) or the model")

    def fit(self, steps: Optional[int] = None) -> dict:
        """Train until step ``steps`` (default: the ``steps`` given at construction); returns a summary."""
        from tqdm.auto import tqdm

        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        target = self.steps if steps is None else steps
        check_steps(target, self.batch_size)
        lock = None
        if self.checkpoint_dir is not None and self.ctx.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            lock = FolderLock(self.checkpoint_dir, "training run")  # two runs here would overwrite each other's work
        bar = tqdm(total=target, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.ctx.is_main))
        running, count, good, t0 = None, 0, 0, time.perf_counter()
        start = self.step
        self.model.train()
        try:
            while self.step < target:
                loss = self.train_step()
                if not self.last_step_skipped:
                    running = loss if running is None else running + loss
                    good += 1
                count += 1
                if count == self.log_every or self.step == target:
                    # the loss read-back syncs anyway: the non-finite check rides on it
                    total = self.check_finite(running)
                    if good:
                        mean = total / good
                        self.history.append((self.step, mean))
                        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{self.lr_at(self.step - 1):.2e}")
                    running, count, good = None, 0, 0
                bar.update(1)
                if self.out_dir is not None and (self.step == target or
                                                 (self.checkpoint_every and self.step % self.checkpoint_every == 0)):
                    self.save()
                if self.callback is not None:
                    self.callback(self)
            self.check_finite()
        finally:
            bar.close()
            if lock is not None:
                lock.release()
        seconds = time.perf_counter() - t0
        return {"step": self.step, "loss": self.history[-1][1] if self.history else None,
                "seconds": seconds, "steps_per_second": (self.step - start) / seconds if seconds > 0 else None}

    # ---- EMA -------------------------------------------------------------------------------------

    def ema_state_dict(self) -> dict:
        """The model's state dict with the EMA weights in place of the parameters."""
        state = dict(_unwrap(self.model).state_dict())
        if self.ema is not None:
            for (name, _), e in zip(_unwrap(self.model).named_parameters(), self.ema):
                state[name] = e
        return state

    # ---- checkpoints -----------------------------------------------------------------------------

    def _tensors(self) -> dict:
        model = _unwrap(self.model)
        out = {f"model/{k}": v for k, v in model.state_dict().items()}
        if self.ema is not None:
            out.update({f"ema/{n}": e for (n, _), e in zip(model.named_parameters(), self.ema)})
        for i, st in self.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                out[f"optim/{i}/{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
        out["rng/cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            out["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def _state(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]]
        return {"seed": self.seed, "batch_size": self.batch_size, "steps": self.steps,
                "model_config": getattr(_unwrap(self.model), "config", None),
                "objective": self.objective.config(), "optimizer": {"param_groups": groups},
                "trainer": {"lr": self.lr, "lr_min": self.lr_min, "warmup": self.warmup,
                            "lr_schedule": self.lr_schedule, "grad_clip": self.grad_clip,
                            "ema_decay": self.ema_decay, "amp": self.amp},
                "history": self.history, "skipped": self.skipped,
                "on_nonfinite": self.on_nonfinite}

    @property
    def checkpoint_dir(self) -> Optional[Path]:
        return None if self.out_dir is None else self.out_dir / "checkpoints"

    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current step (main process), verify it, prune old ones."""
        path = None
        self.check_finite()  # a step since the last check went bad ("stop"): its weights are not worth keeping
        if self.ctx.is_main:
            tensors = self._tensors()
            self._nonfinite.check_checkpoint(tensors, self.step)
            path = ckpt.save(self.checkpoint_dir, self.step, tensors, self._state())
            problem = ckpt.verify(path)
            if problem is not None:
                raise ckpt.CheckpointError(f"the checkpoint just written does not read back: {problem}")
            if self._overwrite:  # only now, with this run's first checkpoint written and read back: a run that
                self._overwrite = False  # fails before it (a wrong model, a NaN, a full disk) leaves them intact
                if removed := ckpt.remove_all(self.checkpoint_dir, but=path):
                    warnings.warn(f"overwrite=True: removed the {removed} checkpoints of an earlier run from "
                                  f"{self.checkpoint_dir}", RuntimeWarning, stacklevel=3)
            ckpt.prune(self.checkpoint_dir, self.keep, path)
        distributed.barrier(self.ctx)
        return path

    def _resume(self, resume) -> None:
        if resume is True:
            if self.checkpoint_dir is None:
                return
            path = ckpt.latest(self.checkpoint_dir)
            if path is None:
                if found := ckpt.list_checkpoints(self.checkpoint_dir):
                    # starting from step 0 here would overwrite and prune them, and mix two runs in the folder
                    raise ckpt.CheckpointError(
                        f"out_dir {self.out_dir} holds {len(found)} checkpoints and none verifies (newest: "
                        f"{found[0][1]}: {ckpt.verify(found[0][1])}); repair or move them, or start a new run there "
                        "with resume=False, overwrite=True (fastdiff train --overwrite)")
                return
        else:
            path = Path(resume)
            if not path.exists() and not path.with_suffix(".json").exists():
                raise ckpt.CheckpointError(f"resume = {str(resume)!r}: checkpoint {path} does not exist")
        tensors, state = ckpt.read(path)
        self.load_state(tensors, state, source=path)
        self.resumed_from = path

    def _check_compatible(self, tensors: dict, state: dict, source) -> None:
        """Refuse a checkpoint that lacks what resuming needs, or whose weights mean something else here."""
        where = f"checkpoint {source}" if source is not None else "the checkpoint"
        for key in ("step", "seed", "batch_size", "optimizer", "objective", "model_config"):
            if key not in state:
                raise ckpt.CheckpointError(f"{where} is missing the required key {key!r}")
        if not isinstance(state["optimizer"], dict) or "param_groups" not in state["optimizer"]:
            raise ckpt.CheckpointError(f"{where} is missing the required key 'optimizer.param_groups'")
        if "rng/cpu" not in tensors:
            raise ckpt.CheckpointError(f"{where} is missing the required tensor 'rng/cpu'")
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise ckpt.CheckpointError(
                f"{where} was made with seed {state['seed']} and batch_size {state['batch_size']}; "
                f"this run has seed {self.seed} and batch_size {self.batch_size}: resuming would not continue "
                "the same run (start a new out_dir, or pass the same seed and batch_size)")
        # The objective (kind, path, prediction) defines what the network's output means: continuing a
        # velocity run as eps would train on a different target and label the result eps.
        check_resumed_objective(state["objective"], self.objective.config(), where)
        saved_cfg = state["model_config"]
        my_cfg = getattr(_unwrap(self.model), "config", None)
        if isinstance(saved_cfg, dict) and isinstance(my_cfg, dict):
            my_cfg = json.loads(json.dumps(my_cfg))  # as stored: tuples become lists
            diff = [f"{k}={saved_cfg.get(k)!r} in the checkpoint, {my_cfg.get(k)!r} in this run"
                    for k in sorted(set(saved_cfg) | set(my_cfg)) if saved_cfg.get(k) != my_cfg.get(k)]
            if diff:
                raise ckpt.CheckpointError(f"{where} is of a different model: {'; '.join(diff)} (build the same "
                                           "model, or start a new out_dir)")

    def load_state(self, tensors: dict, state: dict, source=None) -> None:
        """Restore weights, EMA, optimizer, step and RNG from a checkpoint's (tensors, state); ``source``
        (its path) names it in errors."""
        self._check_compatible(tensors, state, source)
        model = _unwrap(self.model)
        prefix = "model/"
        model_state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            model.load_state_dict(model_state)
        except RuntimeError as e:
            raise ckpt.CheckpointError(f"the checkpoint's weights do not fit this model: {e}") from None
        if self.ema is not None:
            for (n, p), e in zip(model.named_parameters(), self.ema):
                e.copy_(tensors.get(f"ema/{n}", p.detach()))
        optim_state = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, i, name = k.split("/", 2)
                optim_state.setdefault(int(i), {})[name] = v
        groups = state["optimizer"]["param_groups"]
        own = self.optimizer.state_dict()["param_groups"]
        if len(groups) != len(own):
            raise ckpt.CheckpointError("the checkpoint's optimizer has a different number of parameter groups")
        for g, o in zip(groups, own):
            g["params"] = o["params"]
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
        torch.set_rng_state(tensors["rng/cpu"])
        if "rng/cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng/cuda"], self.device)
        self.step = int(state["step"])
        self.history = [tuple(h) for h in state.get("history", [])]
        self._nonfinite.skipped = list(state.get("skipped", []))  # absent in older checkpoints
