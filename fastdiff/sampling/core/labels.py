"""Conditioning as a tree: what ``y``, ``null_y`` and each of ``conditions`` may be, and the operations a sampling
call does on them.

A label batch is a tensor [B, ...] or a list of B per-sample labels (class ids, prompts), as always. A dict or a
tuple of label batches is a *tree* (any nesting torch's pytree handles: SDXL's ``{"text_embeds", "time_ids"}``
next to the prompt embeddings, Flux's pooled projections and ids): each tensor leaf is batched on dim 0 and a
leaf of batch 1 is broadcast to the batch (diffusers' one negative embedding [1, 77, C] for any number of
prompts); other leaves (None, numbers, strings) are constants, the same in every branch. The model receives
the same structure: the batched guided call concatenates leaf by leaf (the conditions, then the null labels),
``cfg_batch=False`` gives each branch its own leaves. A top-level list stays a list of per-sample labels; inside
a tree, lists nest like tuples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.utils._pytree as pytree


def is_tree(y) -> bool:
    """Whether ``y`` is a tree of label batches: a dict, or a tuple holding a tensor, dict, tuple or list (a
    tuple of numbers or strings stays a sequence of per-sample labels)."""
    if isinstance(y, dict):
        return True
    return isinstance(y, tuple) and any(isinstance(v, (torch.Tensor, dict, tuple, list)) for v in y)


def tensors(y) -> list:
    """The tensor leaves of a tree (``y`` itself for a tensor; none for a list of labels)."""
    if isinstance(y, torch.Tensor):
        return [y]
    if not is_tree(y):
        return []
    return [v for v in pytree.tree_leaves(y) if isinstance(v, torch.Tensor)]


def _paths(y) -> list:
    """(the leaf's place as y[...] indices, the leaf) of a tree, for messages."""
    leaves, _ = pytree.tree_flatten_with_path(y)
    return [("".join(f"[{getattr(k, 'key', getattr(k, 'idx', k))!r}]" for k in path), leaf) for path, leaf in leaves]


def batch_of(name: str, y) -> int | None:
    """The batch size of a label batch or tree; None for a tree whose tensor leaves all have batch 1 (they follow
    the batch). Refuses 0-d tensor leaves and leaves of different batch sizes, naming the leaf."""
    if isinstance(y, torch.Tensor) or not is_tree(y):
        return len(y)
    sizes = {}
    for where, leaf in _paths(y):
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() == 0:
                raise ValueError(f"{name}{where} must be batched on dim 0 ([B, ...] or [1, ...]), got a 0-d tensor")
            if leaf.shape[0] != 1:
                sizes[where] = leaf.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the tensors of {name} must share one batch size (or have batch 1), got "
                         + ", ".join(f"{name}{w}: {s}" for w, s in sizes.items()))
    return next(iter(sizes.values()), None)


def device_of(y):
    """The device of a label batch's (first) tensor, or None."""
    leaves = tensors(y)
    return leaves[0].device if leaves else None


def to_device(y, device):
    if isinstance(y, torch.Tensor):
        return y if y.device == device else y.to(device)
    if not is_tree(y):
        return y
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v, y)


def expanded(y, B: int):
    """A tree with its batch-1 tensor leaves broadcast to B rows (contiguous copies: the batched call
    concatenates them, a refill writes into them)."""
    if not is_tree(y):
        return y
    return pytree.tree_map(lambda v: v.expand(B, *v.shape[1:]).contiguous()
                           if isinstance(v, torch.Tensor) and v.shape[0] == 1 and B != 1 else v, y)


def cloned(y):
    """Private copies of the tensors of y (a captured loop and a reused plan refill them)."""
    if isinstance(y, torch.Tensor):
        return y.clone()
    if not is_tree(y):
        return y
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, y)


def concat(a, b):
    """One call's labels after another's: tensors concatenated on dim 0, lists joined; a tree leaf by leaf
    (constants must agree)."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if not is_tree(a):
        return list(a) + list(b)
    leaves_a, spec = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec != spec_b:
        raise ValueError(f"labels of one batched call must share one structure, got {spec} and {spec_b}")
    out = []
    for (where, u), v in zip(_paths(a), leaves_b):
        if isinstance(u, torch.Tensor):
            out.append(torch.cat([u, v]))
        elif u != v:
            raise ValueError(f"the constant y{where} = {u!r} differs between branches ({v!r}): one batched call "
                             "passes it once; make it a tensor or use cfg_batch=False")
        else:
            out.append(u)
    return pytree.tree_unflatten(out, spec)


def null_like(null_y, y, B: int):
    """null_y for a tree y: the same structure, each tensor leaf in y's leaf's dtype and shape (a leaf of batch
    1, or a single per-sample value, broadcast), constants as given."""
    if not is_tree(null_y):
        raise TypeError(f"null_y must have y's structure (a {type(y).__name__} of label batches), got "
                        f"{type(null_y).__name__}")
    y_leaves, spec = pytree.tree_flatten(y)
    null_leaves, null_spec = pytree.tree_flatten(null_y)
    if spec != null_spec:
        raise ValueError(f"null_y must have y's structure {spec}, got {null_spec}")
    out = []
    for (where, v), u in zip(_paths(y), null_leaves):
        if not isinstance(v, torch.Tensor):
            out.append(u)
            continue
        u = torch.as_tensor(u, device=v.device)
        if u.is_floating_point() and not v.is_floating_point():
            raise TypeError(f"null_y{where} must be a label of y{where}'s kind ({v.dtype}), got {u.dtype}")
        u = u.to(v.dtype)
        shape = (B, *v.shape[1:])
        if u.shape == v.shape[1:] or (u.dim() == v.dim() and u.shape[0] == 1 and u.shape[1:] == v.shape[1:]):
            u = u.expand(shape)
        if u.shape != shape:
            raise ValueError(f"null_y{where} must have y{where}'s per-sample shape {tuple(v.shape[1:])} with batch "
                             f"{B} or 1, got {tuple(u.shape)}")
        out.append(u.contiguous())
    return pytree.tree_unflatten(out, spec)


def copy_into(dst, src, rows: slice | None = None) -> None:
    """Refill: each tensor leaf of ``src`` into ``dst``'s (its ``rows`` where given; a batch-1 leaf broadcast)."""
    if isinstance(dst, torch.Tensor):
        (dst if rows is None else dst[rows]).copy_(src)
        return
    dst_leaves, spec = pytree.tree_flatten(dst)
    src_leaves, src_spec = pytree.tree_flatten(src)
    if spec != src_spec:
        raise ValueError(f"labels of a reused plan must keep their structure {spec}, got {src_spec}")
    for d, s in zip(dst_leaves, src_leaves):
        if isinstance(d, torch.Tensor):
            (d if rows is None else d[rows]).copy_(s)


def structure(y) -> tuple:
    """A tree's structure with each tensor leaf's per-sample shape and dtype (what one batched call's labels
    must share), or a tensor's / list's kind."""
    if not is_tree(y):
        return (type(y).__name__,)
    leaves, spec = pytree.tree_flatten(y)
    return (str(spec), tuple((tuple(v.shape[1:]), v.dtype) if isinstance(v, torch.Tensor) else repr(v)
                             for v in leaves))


def signature(y) -> tuple:
    """What a plan bakes in of a label batch: the structure, each tensor leaf's per-sample shape, dtype and device
    and batch, each constant's value."""
    def leaf(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, str(v.device))
        return ("value", type(v).__name__, repr(v))
    if not is_tree(y):
        return leaf(y) if isinstance(y, torch.Tensor) else ("labels", len(y) if isinstance(y, Sequence) else None)
    leaves, spec = pytree.tree_flatten(y)
    return ("tree", str(spec), tuple(leaf(v) for v in leaves))
