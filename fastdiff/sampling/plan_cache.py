"""``fastdiff.sample`` keeps the plans of its last few small calls: a call with the same model and settings (the same
values, the same callables, labels and noise of the same layout) reuses one, refilling the seeds, the noise and the
labels, as a ``fastdiff.Sampler`` does. Building a plan costs ~200-300 us at batch 1 (the checks, the stage table
lookup, the buffers, the prepared kernel calls); reusing it, ~20 us.

What makes a call cacheable: every argument is a number, string, bool, None, a tuple of those, a hashable record
(a path, a rule), a callable (kept by identity: the cached plan holds it, so its id is not reused), or, for y,
null_y, noise and seed, a tensor (refilled: its shape, dtype and device are the key; y and null_y also as a dict /
tuple of tensors, refilled leaf by leaf). Any other tensor argument
(init, known_mask, conditions, per-sample options, timesteps as a tensor) is the caller's data: such calls plan
anew. A plan holds the model only weakly (it is handed the model per call), and is cached only when its buffers
are small (MAX_BYTES): at large sizes planning is a negligible part of a call, and scratch.POOL keeps the buffers.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict

import torch

from fastdiff import _backends
from fastdiff import dispatch as _dispatch
from fastdiff.sampling.core import labels
from fastdiff.sampling.methods.registry import get_method

MAX_ENTRIES = 8
MAX_BYTES = 16 << 20  # buffers of a cached plan: state, guidance pairs and scratch, ~(branches + 4) copies
REFILLED = ("seed", "noise", "y", "null_y")



def _value_key(name: str, v):
    """A hashable stand-in for argument ``v``, or raises TypeError (not cacheable)."""
    if name == "seed":  # refilled: only its kind is planned
        return ("seed", len(v)) if isinstance(v, (list, tuple, torch.Tensor)) else ("seed", type(v))
    if v is None or isinstance(v, (bool, int, float, str, torch.device, torch.dtype)):
        return (type(v), v)
    if isinstance(v, torch.Tensor):
        if name in REFILLED:
            return ("tensor", tuple(v.shape), v.dtype, v.device)
        raise TypeError(name)
    if name in ("y", "null_y") and labels.is_tree(v):  # refilled leaf by leaf: its layout is the key
        return labels.signature(v)
    if isinstance(v, tuple):
        return tuple(_value_key(name, item) for item in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _value_key(k, item)) for k, item in v.items()))
    if callable(v):
        return ("id", id(v))
    if isinstance(v, list):
        raise TypeError(name)
    hash(v)  # a hashable record (a frozen rule, a path)
    return v


def key_of(model, steps, cfg, kwargs: dict):
    """The cache key of a sample() call, or None when it is not cacheable (module docstring)."""
    if kwargs.get("cuda_graph", False) is not False or not _small(kwargs):  # a graph's own cache; or a bad flag
        return None
    try:
        model_ref(model)
        model_id = (id(model.__self__), id(model.__func__)) if _bound(model) else id(model)
        # the method's record (a method registered again under its name plans anew; the cached plan keeps the old
        # record alive, so its id is not reused) and the backend in force when none is given (use_backend)
        method = get_method(kwargs.get("method", "euler"))
        return (model_id, _value_key("steps", steps), _value_key("cfg", cfg), id(method),
                _dispatch.current() if kwargs.get("backend") is None else None, _kernels(),
                tuple(sorted((k, _value_key(k, v)) for k, v in kwargs.items())))
    except (TypeError, ValueError):  # not cacheable, or an argument error that planning will name
        return None


def _kernels() -> tuple:
    """The step kernels registered now (a plan holds the one it resolved: a kernel registered anew plans anew)."""
    return tuple(id(_backends.get(name).kernels.get("sampler_step")) for name in _backends.names())


def _small(kwargs: dict) -> bool:
    """Whether the call's buffers fit MAX_BYTES, judged from its arguments (False when they do not tell)."""
    noise, shape, y = kwargs.get("noise"), kwargs.get("shape"), kwargs.get("y")
    if isinstance(noise, torch.Tensor):
        n = noise.numel()
    else:
        B = kwargs.get("batch_size")
        if B is None and isinstance(y, torch.Tensor) and y.dim() > 0:
            B = y.shape[0]
        elif B is None and labels.is_tree(y):
            B = labels.batch_of("y", y) or 1
        if not isinstance(B, int) or not isinstance(shape, (tuple, list)) or \
                not all(isinstance(s, int) for s in shape):
            return False
        n = B * math.prod(shape)
    branches = 1 + len(kwargs["conditions"]) if isinstance(kwargs.get("conditions"), (list, tuple)) else 2
    return 4 * n * (branches + 4) <= MAX_BYTES


class ModelKeyedCache:
    """A small LRU of values planned for a model, each entry holding the model weakly (it goes with the model).
    ``take`` removes the entry while a call runs (concurrent calls never share one); ``give`` puts it back."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key, model):
        """(the model's weak reference, the value) of ``key`` for ``model``, or None."""
        with self._lock:
            entry = self._entries.pop(key, None)
        return entry if entry is not None and entry[0]() == model else None

    def give(self, key, model, value, ref=None) -> None:
        """Keeps ``value`` for ``key`` (``ref``: the entry's reference from :meth:`take`, else a new one)."""
        if ref is None:
            def drop(_ref, key=key):
                with self._lock:
                    if key in self._entries and self._entries[key][0] is _ref:
                        del self._entries[key]

            ref = model_ref(model, drop)
        with self._lock:
            self._entries[key] = (ref, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_CACHE = ModelKeyedCache(MAX_ENTRIES)


def take(key, model):
    """The cached (reference, sampler) of ``key`` for ``model``, or None."""
    return _CACHE.take(key, model)


def give(key, model, sampler, ref=None) -> None:
    """Keeps ``sampler`` for calls with ``key``; it holds the model weakly (only the plan cache's reference)."""
    sampler._model = None
    sampler._a.model = None
    _CACHE.give(key, model, sampler, ref)


def _bound(model) -> bool:
    return hasattr(model, "__self__") and hasattr(model, "__func__")


def model_ref(model, callback=None):
    """A weak reference to the model (TypeError for objects that take none): bound methods through WeakMethod."""
    return weakref.WeakMethod(model, callback) if _bound(model) else weakref.ref(model, callback)


CLEARERS: list = []  # other plan caches cleared with this one (the k-diffusion adapter's registers itself)


def clear() -> None:
    """Drop every cached plan (fastdiff.clear_scratch), and the other caches in CLEARERS."""
    _CACHE.clear()
    for clear_other in CLEARERS:
        clear_other()
