"""What the Trainer does about a step whose loss or gradient norm is NaN or infinite.

Such a step would otherwise poison the weights, every later checkpoint and, through pruning, the good
checkpoints. :class:`NonFiniteGuard` (owned by :class:`fastdiff.training.Trainer`, chosen by its
``on_nonfinite``) implements the two modes:

- "stop": every step writes its (loss, gradient norm) into a small buffer on the device (one kernel,
  no sync). The buffer is inspected where the host already waits (the loss read-back every
  ``log_every`` steps, checkpoints, the end of ``fit``), so it adds no synchronization per step, and
  FloatingPointError names the first bad step before a checkpoint of a later step is written.
- "skip": the decision must be taken before the update, so the pair is read back every step (a device
  sync per step); a bad step changes nothing, is listed in ``skipped``, and ``max_consecutive_skips``
  of them in a row raise FloatingPointError.

Under DDP the decision is the same on every rank (an all-reduce of the verdict). Independently of the
mode, :meth:`NonFiniteGuard.check_checkpoint` refuses checkpoint tensors that are not all finite. Every
error ends with a note on the newest checkpoint on disk, so the user knows what is left to resume from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from fastdiff.training import checkpoint as ckpt

ON_NONFINITE = ("stop", "skip")


def _describe(step: int, loss: float, norm: float) -> str:
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    return f"non-finite {what} at step {step} (loss {loss}, gradient norm {norm})"


class NonFiniteGuard:
    """The non-finite bookkeeping of one Trainer: :meth:`record` and :meth:`check` for "stop",
    :meth:`bad_values` and :meth:`skip` for "skip" (the Trainer calls the pair of its mode; :meth:`check`
    also carries ``fit``'s loss read-back in either mode).

    Args:
        max_consecutive_skips: "skip" raises when this many steps in a row were skipped.
        capacity: rows of the device buffer of unchecked (loss, norm) pairs ("stop"; the Trainer's
            ``log_every``, so a check at each loss read-back keeps it from filling).
        device: where the buffer lives.
        world: the number of DDP processes (above 1 the verdict is all-reduced).
        checkpoint_dir: where the Trainer's checkpoints go (None: none), named in error messages.
    """

    def __init__(self, max_consecutive_skips: int, *, capacity: int, device, world: int = 1,
                 checkpoint_dir: Optional[Path] = None):
        self.max_consecutive_skips = max_consecutive_skips
        self.device, self.world, self.checkpoint_dir = device, world, checkpoint_dir
        self.skipped: list[int] = []  # steps (1-based, as in checkpoints) skipped for a non-finite loss
        self.last_step_skipped = False
        self._consecutive_skips = 0
        self._last_skip = None  # (step, loss, norm) of the newest skipped step
        # (loss, grad norm) of the _n_unchecked steps since the last check, oldest first; written on the
        # device, read where the host waits anyway ("stop": no sync per step)
        self._unchecked = torch.zeros(capacity, 2, dtype=torch.float32, device=device)
        self._n_unchecked = 0

    # ---- "stop" ----------------------------------------------------------------------------------

    def record(self, loss: torch.Tensor, norm: torch.Tensor, step: int) -> None:
        """Buffer the (loss, norm) of step ``step + 1`` (1-based) on the device (no sync)."""
        if self._n_unchecked == self._unchecked.shape[0]:  # train_step called outside fit: keep it bounded
            self.check(step)
        torch.stack([loss.float(), norm.float().to(loss.device)], out=self._unchecked[self._n_unchecked])
        self._n_unchecked += 1

    def check(self, step: int, extra: Optional[torch.Tensor] = None):
        """Raise FloatingPointError if a buffered step had a non-finite loss or gradient norm; ``step``:
        the steps done so far. One device read, shared with ``extra`` (a 0-dim tensor, returned as a
        float; None without it)."""
        n = self._n_unchecked
        rows = self._unchecked[:n].flatten().double()
        if extra is not None:
            rows = torch.cat([rows, extra.detach().to(rows.device, torch.float64).view(1)])
        values = rows.tolist() if rows.numel() else []
        first = step - n  # row i is step first + i + 1 (1-based, as checkpoints count)
        self._n_unchecked = 0
        bad = next((i for i in range(n) if not (math.isfinite(values[2 * i]) and math.isfinite(values[2 * i + 1]))),
                   None)
        bad_step = 0 if bad is None else first + bad + 1
        if self.world > 1:
            # the first bad step of any rank, so that all ranks stop together (MIN; none = +inf)
            t = torch.tensor([bad_step or math.inf], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            bad_step = 0 if math.isinf(t.item()) else int(t.item())
        if bad_step:
            if bad is not None and first + bad + 1 == bad_step:
                what = _describe(bad_step, values[2 * bad], values[2 * bad + 1])
            else:
                what = f"non-finite loss or gradient norm at step {bad_step} (in another process)"
            raise FloatingPointError(f"training stopped: {what} (detected at step {step})"
                                     f"{self.last_checkpoint_note()}; lower the lr, use grad_clip or check the data")
        return None if extra is None else values[-1]

    # ---- "skip" ----------------------------------------------------------------------------------

    def bad_values(self, loss: torch.Tensor, norm: torch.Tensor) -> Optional[list[float]]:
        """None if this step's loss and norm are finite on every process (resetting the count of
        consecutive skips), else this process's [loss, norm]. Reads back: the per-step sync of "skip"."""
        pair = torch.stack([loss.float(), norm.float().to(loss.device)])
        bad = (~torch.isfinite(pair).all()).to(torch.int32)
        if self.world > 1:  # every rank must take the same decision
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if not bad.item():
            self._consecutive_skips = 0
            return None
        return pair.tolist()

    def skip(self, step: int, loss: float, norm: float) -> None:
        """Record that step ``step`` (1-based) was skipped; raise FloatingPointError on the
        ``max_consecutive_skips``-th skip in a row."""
        self.skipped.append(step)
        self.last_step_skipped = True
        self._consecutive_skips += 1
        self._last_skip = (step, loss, norm)
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise FloatingPointError(
                f"{self._consecutive_skips} consecutive steps (up to step {step}) had a non-finite loss or "
                f"gradient norm (on_nonfinite='skip', max_consecutive_skips={self.max_consecutive_skips}); the "
                f"last: {_describe(*self._last_skip)}{self.last_checkpoint_note()}")

    # ---- either mode -----------------------------------------------------------------------------

    def check_checkpoint(self, tensors: dict, step: int) -> None:
        """Never write a checkpoint with non-finite weights, EMA or optimizer moments: it would become the
        "newest valid" checkpoint and pruning would delete the good ones."""
        floats = [(k, v) for k, v in tensors.items() if v.is_floating_point() and not k.startswith("rng/")]
        if not floats:
            return
        ok = torch.stack([torch.isfinite(v).all().to(self.device) for _, v in floats]).all()
        if bool(ok):
            return
        names = [k for k, v in floats if not bool(torch.isfinite(v).all())]
        raise FloatingPointError(f"refusing to write the checkpoint of step {step}: non-finite values in "
                                 f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                                 f"{self.last_checkpoint_note()}")

    def last_checkpoint_note(self) -> str:
        if self.checkpoint_dir is None:
            return ""
        found = ckpt.list_checkpoints(self.checkpoint_dir)
        if not found:
            return "; no checkpoint was written"
        return f"; the last checkpoint, {found[0][1]}, is intact"
