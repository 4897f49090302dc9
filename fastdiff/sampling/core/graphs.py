"""Whole sampling loops captured as CUDA graphs, and the bounded cache that keeps them.

A captured graph holds raw device addresses. It reads and writes three kinds of memory:
- what it allocated while capturing (model activations, noise, the 2B batch): the graph's private
  memory pool, which lives exactly as long as the graph;
- the model's parameters and any state the model keeps: alive as long as the model;
- everything the sampler made before the capture: the state and scratch buffers ("x", "stage",
  "side0", "side1", "x0"), the per-time ``t`` tensors made during the warm-up, the seeds, the noise,
  label copies and the finiteness flag.
A :class:`CapturedLoop` owns the third kind (``keepalive``) for as long as it is cached, and it holds
the model only weakly: when the model is garbage-collected its entries are dropped, so neither a
replay of freed parameters nor a new model that happens to reuse the old one's ``id`` can occur.

The cache key is what the graph baked in (:func:`key`): the stage coefficient records themselves
(not the repr of a path or schedule, which two different schedules can share), the initial noise
scale, batch, shape, device, guidance, backend, and which inputs were given.

Bound: at most ``CACHE.capacity`` (default 4) loops, least recently used dropped first. One entry
holds its buffers (the state, up to 2 scratch tensors — Heun's stage and partial sum, DPM-Solver++'s
two x0 histories — and the noise copy: at most 4 · B · prod(shape) float32 values), its labels and
time tensors (negligible), and its graph's private pool (about one model forward at the loop's batch
— 2B with batched CFG — since blocks freed during capture are reused within it). :func:`clear_cuda_graphs` releases them all.

Capture and replay go through ``CAPTURE`` so that tests can put a recording stand-in in place of the
CUDA driver (tests/graph_recorder.py) and check on the CPU that a replay touches only live tensors.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from fastdiff.sampling.core import labels


class CudaCapture:
    """Capture and replay with the CUDA driver, on the sampling device's own streams (not the current
    device's: with tensors on cuda:1 and current device 0 the capture must open on cuda:1)."""

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def capture(self, run_loop, device: torch.device):
        with torch.cuda.device(device):
            # Warm up once on a side stream: lazy initializations (cuBLAS handles, autotuning, the
            # time tensors) happen outside the capture.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                run_loop()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # An explicit capture stream: torch.cuda.graph's default one is made once, on whichever
            # device was current the first time, and would be reused for every later device.
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
                run_loop()
        return graph

    def replay(self, graph, device: torch.device) -> None:
        with torch.cuda.device(device):
            graph.replay()

    def when(self, pred: torch.Tensor, fn) -> None:
        """fn() where the 0-d bool ``pred`` holds: while capturing, a CUDA graph conditional IF node (torch's
        CUDAGraph.begin_capture_to_if_node; CUDA >= 12.4) whose body is what fn launches; in the warm-up run, a
        host read of pred."""
        if torch.cuda.is_current_stream_capturing():
            graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
            graph.begin_capture_to_if_node(pred)
            try:
                fn()
            finally:
                graph.end_capture_to_conditional_node()
        elif bool(pred):
            fn()


CAPTURE = CudaCapture()


@dataclass
class CapturedLoop:
    graph: object
    statics: dict  # refilled before each replay: seeds, noise, y, null, y2, init, mask, classifier_y (or None)
    x: torch.Tensor  # the state buffer the graph leaves the samples in
    first_bad: torch.Tensor  # first stage with a non-finite model output, -1 if none
    stages: list
    keepalive: tuple  # every tensor made outside the capture that the graph reads or writes
    model_ref: object = field(default=None, repr=False)  # weak (or, for objects without weakrefs, strong)

    def model(self):
        return self.model_ref() if callable(self.model_ref) else None


def check_arguments(cuda_graph: bool, device, callback, step_noise, brownian: bool, y) -> bool:
    """Whether sample() captures its loop: cuda_graph=True on a device that supports it (a warning and no graph
    elsewhere), refusing what a captured loop cannot do."""
    if cuda_graph and not CAPTURE.supports(device):
        warnings.warn("cuda_graph=True needs CUDA tensors; running the loop without a graph", RuntimeWarning,
                      stacklevel=4)
        return False
    if cuda_graph and callback is not None:
        raise ValueError("cuda_graph=True cannot call a Python callback inside the captured loop; pass callback=None")
    if cuda_graph and step_noise is not None and not brownian:
        raise ValueError("cuda_graph=True cannot call step_noise inside the captured loop; pass step_noise=None")
    if cuda_graph and y is not None and not isinstance(y, torch.Tensor) and not labels.is_tree(y):
        raise TypeError("cuda_graph=True needs y as a tensor or a dict / tuple of tensors (their values are refilled "
                        "between replays)")
    return bool(cuda_graph)


def key(model, *, stages, beta0, batch, shape, device, cfg, cfg_batch, guidance_interval, backend, noise_given,
        check_finite, labels, brownian=False, per_sample=None, features=()) -> tuple:
    """Everything a captured loop baked in. ``labels``: a description of each label batch the loop reads (None,
    or labels.signature: the structure, each tensor leaf's shape and dtype) — values are refilled, layouts baked."""
    return (id(model), tuple(dataclasses.astuple(st) for st in stages), float(beta0), int(batch), tuple(shape),
            str(device), cfg, bool(cfg_batch), None if guidance_interval is None else tuple(guidance_interval),
            backend, bool(noise_given), bool(check_finite), labels, bool(brownian), per_sample, features)


def _model_ref(model, on_death):
    """A weak reference to the model (bound methods through WeakMethod); a strong one, wrapped in a
    callable, for objects that take no weak references."""
    try:
        if hasattr(model, "__self__") and hasattr(model, "__func__"):
            return weakref.WeakMethod(model, on_death)
        return weakref.ref(model, on_death)
    except TypeError:
        return lambda: model


class GraphCache:
    """Captured loops, least recently used first out, at most ``capacity``."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._entries: OrderedDict[tuple, CapturedLoop] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, k: tuple, model) -> CapturedLoop | None:
        entry = self._entries.get(k)
        if entry is None:
            return None
        if entry.model() is not model:  # the key's id belongs to another (dead) model: never replay
            self._entries.pop(k, None)
            return None
        self._entries.move_to_end(k)
        return entry

    def put(self, k: tuple, model, entry: CapturedLoop) -> CapturedLoop:
        cache = weakref.ref(self)

        def on_death(_ref, k=k):
            c = cache()
            if c is not None and c._entries.get(k) is entry_ref():
                c._entries.pop(k, None)

        entry_ref = weakref.ref(entry)
        entry.model_ref = _model_ref(model, on_death)
        self._entries[k] = entry
        self._entries.move_to_end(k)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()


CACHE = GraphCache()


def clear_cuda_graphs() -> None:
    """Drop every cached captured sampling loop (their buffers and graph memory pools are freed)."""
    CACHE.clear()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def refill(entry: CapturedLoop, **values):
    """Copy this call's inputs into the tensors a captured loop reads."""
    for name, value in values.items():
        if isinstance(value, torch.Tensor) or labels.is_tree(value):  # a tree leaf by leaf
            labels.copy_into(entry.statics[name], value)
