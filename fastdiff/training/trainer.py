"""The training loop: AdamW, EMA, bf16 autocast, gradient clipping, LR warmup, atomic checkpoints with
exact resume, a progress bar, and DDP under ``torchrun``.

Exactness: the data of step s, its noise, times and label dropout are pure functions of (seed, s)
(see :mod:`fastdiff.training.batches` and :mod:`fastdiff.training.objective`), and a checkpoint holds
everything else that evolves (weights, EMA, AdamW moments and step counts, torch's RNG state). So
a run resumed from step k performs the same arithmetic as the run that never stopped, and on the CPU
its weights are bit-identical (tests/test_training.py kills a run with SIGKILL to check).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from fastdiff.training import checkpoint as ckpt
from fastdiff.training import distributed
from fastdiff.training.batches import StepBatches
from fastdiff.training.objective import DiffusionObjective, training_seeds


def _unwrap(model):
    return getattr(model, "module", model)


class Trainer:
    """Train ``model(x, t, y)`` with the fused diffusion loss.

    Args:
        model: any ``nn.Module`` called as ``model(x_t, t, y)``; models with a ``config`` dict (those
            of :mod:`fastdiff.models`) can be rebuilt from a checkpoint alone.
        data: a map-style Dataset of ``x`` or ``(x, y)`` items, a tensor or tuple of tensors, or a
            DataLoader (its dataset, collate_fn and batch size are used).
        objective: a :class:`DiffusionObjective` (default: velocity prediction on CondOT).
        steps: total optimizer steps of the run (a resumed run continues to this number).
        batch_size: the global batch (divided among DDP processes).
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
            False: start fresh.
        progress: tqdm progress bar with the loss (main process only).
        log_every: steps between reading the loss back to the host (it synchronizes a GPU).
        callback: ``callback(trainer)`` after every optimizer step.
        device: where to train (default: the model's device; under torchrun with CUDA, the local GPU).
    """

    def __init__(self, model: torch.nn.Module, data, *, objective: Optional[DiffusionObjective] = None,
                 steps: int = 1000, batch_size: Optional[int] = 128, lr: float = 1e-3,
                 betas=(0.9, 0.999), weight_decay: float = 0.0, warmup: int = 0, lr_schedule: str = "constant",
                 lr_min: float = 0.0, grad_clip: Optional[float] = 1.0, ema_decay: float = 0.999,
                 amp: bool = False, seed: int = 0, out_dir=None, checkpoint_every: int = 0, keep: int = 2,
                 resume=True, progress: bool = True, log_every: int = 10,
                 callback: Optional[Callable] = None, device=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, v in (("steps", steps), ("warmup", warmup), ("checkpoint_every", checkpoint_every),
                        ("keep", keep), ("log_every", log_every)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if log_every < 1:
            raise ValueError("log_every must be >= 1")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive float, got {lr}")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if grad_clip is not None and grad_clip < 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        if checkpoint_every and out_dir is None:
            raise ValueError("checkpoint_every needs out_dir")

        if device is None and not distributed.launched():
            p = next(model.parameters(), None)
            device = p.device if p is not None else None  # train where the model lives
        self.ctx = distributed.setup(device)
        self.device = self.ctx.device
        self.model = model.to(self.device)
        self.objective = objective or DiffusionObjective()
        self.steps, self.seed = steps, seed
        self.batches = StepBatches(data, batch_size, seed=seed, rank=self.ctx.rank, world=self.ctx.world)
        self.batch_size = self.batches.global_batch
        self.lr, self.lr_min, self.warmup, self.lr_schedule = lr, lr_min, warmup, lr_schedule
        self.grad_clip, self.ema_decay, self.amp = grad_clip or None, ema_decay, amp
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.checkpoint_every, self.keep = checkpoint_every, keep
        self.progress, self.log_every, self.callback = progress, log_every, callback
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=tuple(betas),
                                           weight_decay=weight_decay)
        self.ema = [p.detach().clone() for p in self.model.parameters()] if ema_decay else None
        self.step = 0
        self.history: list[tuple[int, float]] = []  # (step, mean loss over the last log_every steps)
        self.resumed_from: Optional[Path] = None
        if resume:
            self._resume(resume)
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
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            w = 1.0 - self.ema_decay_at(self.step)
            with torch.no_grad():
                for e, p in zip(self.ema, self.model.parameters()):
                    e.lerp_(p.detach(), w)
        self.step += 1
        return loss.detach()

    _batch_checked = False

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

        target = self.steps if steps is None else steps
        bar = tqdm(total=target, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.ctx.is_main))
        running, count, t0 = None, 0, time.perf_counter()
        start = self.step
        self.model.train()
        try:
            while self.step < target:
                loss = self.train_step()
                running = loss if running is None else running + loss
                count += 1
                if count == self.log_every or self.step == target:
                    mean = float(running) / count
                    self.history.append((self.step, mean))
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{self.lr_at(self.step - 1):.2e}")
                    running, count = None, 0
                bar.update(1)
                if self.out_dir is not None and (self.step == target or
                                                 (self.checkpoint_every and self.step % self.checkpoint_every == 0)):
                    self.save()
                if self.callback is not None:
                    self.callback(self)
        finally:
            bar.close()
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
                "history": self.history}

    @property
    def checkpoint_dir(self) -> Optional[Path]:
        return None if self.out_dir is None else self.out_dir / "checkpoints"

    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current step (main process), verify it, prune old ones."""
        path = None
        if self.ctx.is_main:
            path = ckpt.save(self.checkpoint_dir, self.step, self._tensors(), self._state())
            problem = ckpt.verify(path)
            if problem is not None:
                raise ckpt.CheckpointError(f"the checkpoint just written does not read back: {problem}")
            ckpt.prune(self.checkpoint_dir, self.keep, path)
        distributed.barrier(self.ctx)
        return path

    def _resume(self, resume) -> None:
        if resume is True:
            if self.checkpoint_dir is None:
                return
            path = ckpt.latest(self.checkpoint_dir)
            if path is None:
                return
        else:
            path = Path(resume)
        tensors, state = ckpt.read(path)
        self.load_state(tensors, state)
        self.resumed_from = path

    def load_state(self, tensors: dict, state: dict) -> None:
        """Restore weights, EMA, optimizer, step and RNG from a checkpoint's (tensors, state)."""
        if state.get("seed") != self.seed or state.get("batch_size") != self.batch_size:
            raise ckpt.CheckpointError(
                f"the checkpoint was made with seed {state.get('seed')} and batch_size {state.get('batch_size')}; "
                f"this run has seed {self.seed} and batch_size {self.batch_size}: resuming would not continue "
                "the same run (start a new out_dir, or pass the same seed and batch_size)")
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
