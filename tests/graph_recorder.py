"""A recording stand-in for CUDA-graph capture and replay, on the CPU.

``RecordingCapture`` takes the place of ``fastdiff.sampling.core.graphs.CAPTURE``. Like the real one it
runs the loop once to warm up, then "captures" it: every aten/fastdiff op of the second run is
recorded with its arguments. What a real graph would own — tensors first produced during the capture,
its private memory pool — the recording holds strongly; every other tensor the capture read or wrote
it holds only weakly, as the driver holds a raw address. A replay re-runs the recorded ops on the
same tensors (out-of-place results copied into the captured outputs, as a graph writes its pool) and
fails if any of those weakly held tensors has died: that is a replay reading freed memory.

The capture also fails on what CUDA capture forbids: a tensor made from host data (``torch.tensor``,
a host-to-device copy) and a read of a device value on the host (``.item()``).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

HOST_DATA_OPS = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}
HOST_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default}


class ReplayOfFreedMemory(AssertionError):
    pass


class CaptureViolation(AssertionError):
    pass


class _Ref:
    """A tensor argument of a recorded op: strong for graph-owned tensors, weak otherwise."""

    def __init__(self, t: torch.Tensor, owned: bool, op):
        self.strong = t if owned else None
        self.weak = None if owned else weakref.ref(t)
        self.op = op

    def get(self) -> torch.Tensor:
        if self.strong is not None:
            return self.strong
        t = self.weak()
        if t is None:
            raise ReplayOfFreedMemory(f"replay reads a tensor that no longer exists (first used by {self.op} "
                                      "during the capture)")
        return t


class RecordedGraph:
    def __init__(self):
        self.ops = []  # (func, args, kwargs, outputs) with tensors as _Ref
        self.owned = set()  # ids of tensors produced during the capture (the private pool)
        self.violations = []

    def replay(self):
        skip = 0
        for entry in self.ops:
            if skip:
                skip -= 1
                continue
            if isinstance(entry, _Conditional):  # a conditional node: its body's ops run where pred holds
                if not bool(entry.pred.get()):
                    skip = entry.length
                continue
            func, args, kwargs, outputs = entry
            a = tree_map(lambda r: r.get() if isinstance(r, _Ref) else r, args)
            k = tree_map(lambda r: r.get() if isinstance(r, _Ref) else r, kwargs)
            new = func(*a, **k)
            new_flat, _ = tree_flatten(new)
            for rec, got in zip(outputs, new_flat):
                if isinstance(rec, _Ref) and isinstance(got, torch.Tensor):
                    t = rec.get()
                    if t.data_ptr() != got.data_ptr() or t.stride() != got.stride():
                        t.copy_(got)


class _Conditional:
    """A conditional node's place in the recording: the ``length`` ops after it run where ``pred`` holds."""

    def __init__(self, pred: _Ref):
        self.pred, self.length = pred, 0


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: RecordedGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if func in HOST_DATA_OPS:
            self.graph.violations.append(f"{name}: a tensor made from host data (a host-to-device copy on CUDA)")
        if func in HOST_SYNC_OPS:
            self.graph.violations.append(f"{name}: a device value read on the host (a sync, illegal in capture)")
        out = func(*args, **kwargs)
        g = self.graph
        inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}

        def ref(t):
            if not isinstance(t, torch.Tensor):
                return t
            return _Ref(t, id(t) in g.owned, name)

        out_flat, _ = tree_flatten(out)
        for t in out_flat:
            if isinstance(t, torch.Tensor) and id(t) not in inputs:
                g.owned.add(id(t))
        g.ops.append((func, tree_map(ref, args), tree_map(ref, kwargs), [ref(t) for t in out_flat]))
        return out


class RecordingCapture:
    """Drop-in for fastdiff.sampling.core.graphs.CAPTURE on any device (see the module docstring)."""

    def __init__(self):
        self.captures = 0
        self.replays = 0
        self.conditionals = 0  # conditional nodes recorded
        self.recording = None  # the graph being captured

    def supports(self, device) -> bool:
        return True

    def capture(self, run_loop, device):
        run_loop()  # the warm-up
        graph = RecordedGraph()
        self.recording = graph
        try:
            with _Recorder(graph):
                run_loop()
        finally:
            self.recording = None
        if graph.violations:
            from collections import Counter

            raise CaptureViolation("; ".join(f"{v} (x{n})" for v, n in Counter(graph.violations).items()))
        self.captures += 1
        return graph

    def replay(self, graph, device):
        graph.replay()
        self.replays += 1

    def when(self, pred, fn):
        """A conditional node: while capturing, fn's ops recorded as its body (run here too, as the capture run's
        ops all are: a replay starts from the captured start's state); in the warm-up, a host read of pred."""
        g = self.recording
        if g is None:
            if bool(pred):
                fn()
            return
        node = _Conditional(_Ref(pred, id(pred) in g.owned, "when"))
        g.ops.append(node)
        start = len(g.ops)
        fn()
        node.length = len(g.ops) - start
        self.conditionals += 1


def empty_cache():
    """What torch.cuda.empty_cache() does to freed blocks, for the weak references here: collect."""
    import gc

    gc.collect()


class HostDataRecorder(TorchDispatchMode):
    """Records ops that make a tensor from host data or read a device value on the host."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_DATA_OPS or func in HOST_SYNC_OPS:
            self.seen.append(str(func))
        elif func is torch.ops.aten._to_copy.default:
            src = args[0]
            dst = (kwargs or {}).get("device")
            if dst is not None and src.device.type == "cpu" and torch.device(dst).type != "cpu":
                self.seen.append(f"{func} cpu -> {dst}")
        return func(*args, **(kwargs or {}))
