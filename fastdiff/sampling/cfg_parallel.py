"""CFG-parallel sampling: the branches of a guided evaluation on different processes (``torchrun``).

``fastdiff.cfg_parallel(model, group=None, group_size=None)`` wraps a model; ``fastdiff.sample`` (and the other
sampling entry points that call ``model(x, t, y)``: Sampler, generate, invert) runs unchanged on every rank of
the group with the same arguments (seeds, labels). Sampling only: the all-gather carries no gradient, so a call
that differentiates through the model (log_likelihood) is refused. Each model call is evaluated in shares: rank r
of W evaluates a contiguous block of about N / W of the call's N rows, and one all-gather of the outputs gives
every rank the whole prediction, so every rank takes the same step and the ranks stay in lockstep.

What is split. A guided stage (cfg_batch=True, the default) makes one call of (K + 1)·B rows, the K condition
blocks first and the null block last (fastdiff/sampling/core/model_calls.py). With W = 2 and one condition the
row split is exactly "conditional branch on rank 0, unconditional on rank 1"; whenever W divides K + 1 each rank
holds whole branches; otherwise (3 branches on 2 ranks) a branch is cut between two ranks, which balances the
work better (1.5 B rows each instead of 2 B and B) and changes nothing for a row-wise model. The wrapper
needs no knowledge of B or K, so it does not hook into the sampler, and every feature that post-processes the
predictions (rules, rescale, editing, caching, thresholding, per-sample weights) sees the same tensors as in one
process. Unguided calls (B rows; K·B outside the guidance interval; cfg_batch=False's per-branch calls) are split
by rows too rather than computed on every rank: the same all-gather, half the compute on 2 ranks, and the same
bit-identity condition as the guided calls. A call of fewer rows than ranks (a batch of 1, unguided) is
computed whole on every rank: nothing to share, no communication. Uneven splits: rank r gets
N // W + (r < N % W) rows; the outputs are padded to ceil(N / W) rows for one all_gather of equal chunks
(gloo and nccl both need equal sizes) and the padding cut out (one copy, only when W does not divide N).

Bit identity. The samples equal one process's bit for bit when each output row of the model is a function of
its own input row alone, independent of the batch it is computed in (fastdiff.mixtures' exact mixture models:
float64 per row, then float32). A network whose kernels round differently with the batch size (GEMM blocking,
cuDNN algorithm choice, thread count) gives samples equal up to that rounding (a few ulps per call), as it does
for another batch size in one process. Every rank must use the same backend and device type (the fused step is
deterministic on one backend).

Process groups. ``group=None``: all ranks of the default group share every call. ``group_size=G``: contiguous
groups of G ranks (torch.distributed.new_subgroups; W / G groups), each sharing its own calls; under
``fastdiff.generate`` the W / G groups take different batches (batch sharding), so world 4 with group_size=2 is
2 batch shards x 2 branch ranks. ``group``: a process group of the caller's (for generate its ranks must be a
contiguous block g·G … g·G + G − 1). The default group must be initialized first (torchrun and
``torch.distributed.init_process_group``, or ``fastdiff.training.distributed.setup()``: gloo on the CPU, nccl
on GPUs, where each process uses its own GPU). Every rank of a group must make the same sample() calls; a rank
that fails stops the job (torchrun ends the others).
"""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from fastdiff.sampling.core import labels as label_trees

# torch 2.13 renames all_gather_into_tensor (same arguments); older torch has only the old name
_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _rows(v, lo: int, hi: int, n: int):
    """Rows lo … hi − 1 of a model argument: tensors (and a tree's tensor leaves) batched on dim 0 with n rows,
    a list/tuple of n per-sample labels; anything else (a float t, None, a tree's constants) as it is."""
    if isinstance(v, torch.Tensor):
        return v[lo:hi] if v.dim() and v.shape[0] == n else v
    if label_trees.is_tree(v):
        return pytree.tree_map(lambda u: u[lo:hi] if isinstance(u, torch.Tensor) and u.dim() and u.shape[0] == n
                               else u, v)
    if isinstance(v, (list, tuple)) and len(v) == n:
        return v[lo:hi]
    return v


class CFGParallel:
    """``model`` whose calls are evaluated in row shares across the ranks of ``group`` (module docstring)."""

    def __init__(self, model, group, rank: int, size: int):
        self.model, self.group, self.group_rank, self.group_size = model, group, rank, size

    def share(self, n: int) -> tuple[int, int]:
        """The rows [lo, hi) of a call of n rows that this rank evaluates."""
        base, extra = divmod(n, self.group_size)
        lo = self.group_rank * base + min(self.group_rank, extra)
        return lo, lo + base + (self.group_rank < extra)

    def __call__(self, x, t, y=None, **kwargs):
        n, size = x.shape[0], self.group_size
        if size == 1 or n < size:  # nothing to share: every rank computes the call itself
            return self.model(x, t, y, **kwargs)
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("cfg_parallel is for sampling: its all-gather carries no gradient to x (a call that "
                               "differentiates through the model, such as log_likelihood, needs the bare model)")
        lo, hi = self.share(n)
        out = self.model(x[lo:hi], _rows(t, lo, hi, n), _rows(y, lo, hi, n),
                         **{k: _rows(v, lo, hi, n) for k, v in kwargs.items()})
        if not isinstance(out, torch.Tensor) or out.shape != (hi - lo, *x.shape[1:]):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"cfg_parallel: the model returned {got} for its share of {hi - lo} rows of a call "
                             f"of {n} rows of shape {tuple(x.shape[1:])}; it must return a tensor like its x")
        chunk = -(-n // size)
        if hi - lo < chunk:  # equal chunks for the all-gather; the padding rows are cut out below
            padded = out.new_zeros((chunk, *out.shape[1:]))
            padded[:hi - lo] = out
            out = padded
        gathered = out.new_empty((size * chunk, *out.shape[1:]))
        _gather(gathered, out.contiguous(), group=self.group)
        if n == size * chunk:
            return gathered
        base, extra = divmod(n, size)  # rank r's rows sit at r·chunk, base + (r < extra) of them
        return torch.cat([gathered[r * chunk:r * chunk + base + (r < extra)] for r in range(size)])

    def __getattr__(self, name):  # the wrapped model's attributes (num_classes, eval, ...)
        if name == "model":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"cfg_parallel({self.model!r}, rank {self.group_rank} of {self.group_size})"


def cfg_parallel(model, group=None, group_size: int | None = None) -> CFGParallel:
    """``model`` with each call's rows shared among the ranks of a process group and the outputs all-gathered:
    under ``torchrun``, the branches of a guided call (conditions and null) on different ranks, the samples those
    of one process (bit for bit for a row-wise model; module docstring). ``group``: a torch.distributed process
    group (default: all ranks); ``group_size``: contiguous groups of that many ranks instead (composes with
    fastdiff.generate's batch sharding: the groups take different batches). Needs an initialized default group."""
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, y), got {type(model).__name__}")
    if isinstance(model, CFGParallel):
        raise TypeError("model is already a cfg_parallel model; wrap the model itself once")
    if group is not None and group_size is not None:
        raise ValueError("give group (a process group) or group_size (contiguous groups of that many ranks), not both")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if group_size is not None and (not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool)
                                   or group_size < 1):
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("cfg_parallel needs an initialized torch.distributed process group: launch with torchrun "
                           "and call torch.distributed.init_process_group() (gloo on the CPU, nccl on GPUs) or "
                           "fastdiff.training.distributed.setup() first")
    world = dist.get_world_size()
    if group_size is not None:
        if world % group_size:
            raise ValueError(f"group_size={group_size} must divide the world size {world} (contiguous groups of "
                             "group_size ranks)")
        group = dist.new_subgroups(group_size=int(group_size))[0] if group_size > 1 else None
        if group is None:  # groups of one rank: every call computed whole, no communication
            return CFGParallel(model, None, 0, 1)
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group must hold this process's rank (each rank wraps the model with its own group)")
    return CFGParallel(model, group, rank, dist.get_world_size(group))


def batch_layout(model, rank: int, world: int, device) -> tuple[int, int, bool, object]:
    """fastdiff.generate's view of a job of ``world`` processes: (this process's batch-shard index, the number of
    batch shards, whether it writes the shards, the branch group or None). Without a cfg_parallel model: (rank,
    world, True, None). With one whose groups have G ranks: W / G shards, shard g made by the contiguous ranks
    g·G … g·G + G − 1 together, its group rank 0 writing. Checked on every rank at once (one all-reduce), so a
    layout that some ranks refuse fails on all of them instead of leaving the others waiting."""
    size = model.group_size if isinstance(model, CFGParallel) else 1
    ok = True
    if size > 1:
        ranks = dist.get_process_group_ranks(model.group)
        first = ranks[0]
        ok = world % size == 0 and first % size == 0 and ranks == list(range(first, first + size))
    if world > 1:
        # every rank's group size (max of G and of -G) and whether its group is a contiguous block
        flags = torch.tensor([size, -size, 0 if ok else 1], dtype=torch.int64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        same, ok = int(flags[0]) == -int(flags[1]), int(flags[2]) == 0
        if not same:
            raise ValueError(f"generate: the ranks wrap the model in cfg_parallel groups of different sizes (from "
                             f"{-int(flags[1])} to {int(flags[0])} ranks; this rank: {size}); every rank must wrap it "
                             "with the same group size (1: no cfg_parallel)")
    if not ok:
        raise ValueError(f"generate: cfg_parallel groups must be contiguous blocks of G ranks dividing the world size "
                         f"{world} (cfg_parallel(model, group_size=G)); this rank's group holds ranks "
                         f"{dist.get_process_group_ranks(model.group) if size > 1 else [rank]}")
    if size == 1:
        return rank, world, True, None
    return rank // size, world // size, model.group_rank == 0, model.group
