"""One prepared call of the fused sampler step (fastdiff.ops.sampler_step): the representation a sampling plan
holds per stage, from the plan down to the kernel.

``step_call(backend, args, parts)`` takes the kernel's positional arguments (``KERNEL_ARGS``, checked once by
``prepare``) and returns a call object; ``call(preds)`` runs it with this run's predictions, given as a list of K1
tensors shaped like x, or as one batched model output [P·B, ...] whose part ``parts[i]`` is prediction i (a
guided call's output read without splitting it). ``call.args`` are the arguments it was made from;
``replaced(call, name=value)`` is the same call with other arguments.

On the native backends the object is ``fastdiff._C.PreparedStep`` (csrc/step_call.h): the tensors are bound and
checked once in C++, and a run checks only its predictions and calls the kernel, without the dispatcher
(at batch 1 on the CPU: 0.3 µs against 5.1 µs through ``torch.ops.fastdiff.sampler_step``). Elsewhere (Triton,
the reference, a build without the module) and with ``native=False`` it is :class:`StepCall`, which calls the
backend's kernel: a plan captured in a CUDA graph asks for that, since a replay runs no host code and the
dispatcher is paid once, at capture, where the CPU stand-in of a capture (tests/graph_recorder.py) sees the op.

``args`` may stop before the trailing ``clip`` and ``stats`` (the twelve arguments before them: neither).
"""

from __future__ import annotations

import sys

import torch

from fastdiff import dispatch as _dispatch
from fastdiff.ops.sampler_step import KERNEL_ARGS

PREDS = KERNEL_ARGS.index("preds")
CLIP = KERNEL_ARGS.index("clip")
STATS = KERNEL_ARGS.index("stats")


class StepCall:
    """A prepared call on a backend without a native one: the backend's kernel with the stored arguments."""

    __slots__ = ("args", "parts", "backend", "kernel", "tail")

    def __call__(self, preds) -> None:
        if isinstance(preds, torch.Tensor):  # one batched output: its parts
            B = self.args[0].shape[0]
            split = preds.split(B) if B else [preds] * (max(self.parts) + 1)
            preds = [split[i] for i in self.parts]
        self.kernel(self.args[0], preds, *self.args[PREDS + 1:CLIP], *self.tail)


def _native_type(backend: str):
    record = _dispatch.kernel(backend, "sampler_step")
    module = sys.modules.get("fastdiff._C")
    native = getattr(record, "direct", None) is not None and module is not None
    return getattr(module, "PreparedStep", None) if native else None, record


def step_call(backend: str, args: tuple, parts=None, native: bool = True):
    """The prepared call of ``args`` (KERNEL_ARGS, checked) on ``backend``; ``parts``: for a run on one batched
    model output, the part that is each prediction (None: part i is prediction i); ``native=False``: through the
    op even where a native call exists."""
    parts = list(range(len(args[PREDS]))) if parts is None else list(parts)
    args = tuple(args) + (None,) * (len(KERNEL_ARGS) - len(args))  # (no clip where args stop before it)
    clip, stats = args[CLIP], args[STATS]
    prepared, record = _native_type(backend)
    if native and prepared is not None:
        named = {} if clip is None else {"clip": list(clip)}
        if stats is not None:
            named.update(stats=list(stats[0]), stats_pick=list(stats[1]))
        call = prepared(*args[:CLIP], parts, **named)
    else:
        call = StepCall()
        call.kernel = getattr(record, "direct", lambda: record)()
        # a kernel of the twelve arguments before clip keeps working
        call.tail = () if clip is None and stats is None else \
            (None if clip is None else list(clip),) + (() if stats is None else (stats,))
    call.args, call.parts, call.backend = args, parts, backend
    return call


def replaced(call, **named):
    """``call`` with the arguments ``named`` (KERNEL_ARGS names) replaced, prepared anew."""
    args = list(call.args)
    for name, value in named.items():
        args[KERNEL_ARGS.index(name)] = value
    return step_call(call.backend, tuple(args), call.parts, not isinstance(call, StepCall))
