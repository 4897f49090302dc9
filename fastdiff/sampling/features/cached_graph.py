"""Step caching inside a captured loop (cuda_graph=True): the decision on the device, each evaluation's two
branches as CUDA graph conditional nodes (torch's CUDAGraph.begin_capture_to_if_node, through
fastdiff.sampling.core.graphs.CAPTURE.when), no host read per step (docs/guidance.md, "Step caching").

The eager loop (fastdiff.sampling.features.cached_calls) keeps the model's own outputs and decides on the host;
a graph has fixed addresses and no host code, so here every piece of state is a device tensor made in the warm-up
run and reset by the captured start: the rule's statistics (:class:`DeviceChangeRate`, :class:`DeviceThirdDifference`,
:class:`DeviceIndicator`), the run of skips, and per call of a stage layout a ring of the last ``order + 1``
computed outputs with their times. An evaluation's calls each hand the step one fixed buffer: the computed branch
copies the model's output into it and into the ring (two passes), the reused branch writes the ring's Lagrange
extrapolation there (weights from the kept times, on the device). The fused replay of the eager loop (the step
reading the kept outputs itself) is not used here: its weights are data-dependent."""

from __future__ import annotations

import torch

from fastdiff.sampling.features.cached_calls import CachedCalls, _Proxy
from fastdiff.sampling.features.caching import AdaptiveCache, CacheIndicator, _subsample, l1_tensor as _l1


def _when(pred: torch.Tensor, fn) -> None:
    from fastdiff.sampling.core import graphs

    graphs.CAPTURE.when(pred, fn)


class _State:
    """Device scalars made on first use (the warm-up run), zeroed by reset()."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            t = self.tensors[name] = torch.zeros((), dtype=dtype, device=like.device)
        return t

    def reset(self) -> None:
        for t in self.tensors.values():
            t.zero_()


class _DeviceDecider:
    """A rule's decision on the device: its state (device scalars) zeroed by reset(); the points a rule may skip."""

    def __init__(self, rule):
        self.rule, self.s = rule, _State()

    def reset(self) -> None:
        self.s.reset()

    def forced(self, forced: torch.Tensor) -> None:
        """max_skips turned the reuse ``forced`` (a 0-d bool) into a computed evaluation: a running sum restarts."""
        total = self.s.tensors.get("total")
        if total is not None:
            total.copy_(torch.where(forced, torch.zeros_like(total), total))

    def computed(self, x: torch.Tensor, o: torch.Tensor) -> None:
        """A computed evaluation's input and output (inside its conditional node)."""

    def seen(self, x: torch.Tensor) -> None:
        """An evaluation before the window, which runs and may feed the statistics."""


class DeviceChangeRate(_DeviceDecider):
    """EasyCache's decision (caching._ChangeRate) on the device."""

    def __init__(self, rule):
        super().__init__(rule)
        self.x_prev = self.o_prev = None

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        s, xs = self.s, _subsample(x, self.rule.subsample_factor)
        if self.x_prev is None:
            self.x_prev = torch.zeros(xs.shape, dtype=torch.float32, device=xs.device)
        has_x, has_rate = s.get("has_x", x, torch.bool), s.get("has_rate", x, torch.bool)
        change = _l1(xs, self.x_prev)
        s.get("input_change", x).copy_(change)
        s.get("has_change", x, torch.bool).copy_(has_x)
        can = has_x & has_rate
        total = s.get("total", x)
        new = total + s.get("rate", x) * change / s.get("o_norm", x)
        reuse = can & (new < self.rule.reuse_threshold)
        total.copy_(torch.where(can, torch.where(reuse, new, torch.zeros_like(new)), total))
        return reuse

    def computed(self, x: torch.Tensor, o: torch.Tensor) -> None:
        s = self.s
        xs, os_ = _subsample(x, self.rule.subsample_factor), _subsample(o, self.rule.subsample_factor)
        if self.o_prev is None:  # in the output's dtype, as the eager loop keeps it
            self.o_prev = torch.zeros(os_.shape, dtype=os_.dtype, device=os_.device)
        if self.x_prev is None:
            self.x_prev = torch.zeros(xs.shape, dtype=torch.float32, device=xs.device)
        has_x = s.get("has_x", x, torch.bool)
        change = _l1(os_, self.o_prev)
        s.get("o_norm", x).copy_(_l1(os_))
        self.o_prev.copy_(os_)
        ok = has_x & s.get("has_change", x, torch.bool)
        rate = s.get("rate", x)
        rate.copy_(torch.where(ok, change / s.get("input_change", x), rate))
        s.get("has_rate", x, torch.bool).logical_or_(ok)
        self.x_prev.copy_(xs)
        has_x.fill_(True)
        s.get("has_change", x, torch.bool).fill_(False)


class DeviceThirdDifference(_DeviceDecider):
    """AdaptiveDiffusion's criterion (caching._ThirdDifference) on the device: the last three input changes."""

    def __init__(self, rule):
        super().__init__(rule)
        self.x_last = self.diffs = None

    def _observe(self, x: torch.Tensor) -> None:
        s, xs = self.s, _subsample(x, self.rule.subsample_factor)
        if self.x_last is None:
            self.x_last = torch.zeros(xs.shape, dtype=torch.float32, device=xs.device)
            self.diffs = torch.zeros(3, dtype=torch.float32, device=xs.device)
        has_x, n = s.get("has_x", x, torch.bool), s.get("n", x, torch.int64)
        shifted = torch.cat([self.diffs[1:], _l1(xs, self.x_last).view(1)])
        self.diffs.copy_(torch.where(has_x, shifted, self.diffs))
        n.add_(has_x.long())
        self.x_last.copy_(xs)
        has_x.fill_(True)
        s.get("count", x, torch.int64).add_(1)

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        self._observe(x)
        pp, prev, cur = self.diffs.unbind(0)
        small = (0.5 * (cur + pp) - prev).abs() <= self.rule.threshold * prev
        return (self.s.get("count", x, torch.int64) > self.rule.warmup) & (self.s.get("n", x, torch.int64) >= 3) & small

    def seen(self, x: torch.Tensor) -> None:
        self._observe(x)


class DeviceIndicator(_DeviceDecider):
    """The caller's indicator (caching._Indicator) on the device: ``indicator(x, t)`` must return a tensor (device
    ops only, as the model); an estimate that is negative or NaN computes the evaluation (a graph cannot raise)."""

    def skip(self, x: torch.Tensor, t_rows) -> torch.Tensor:
        change = torch.as_tensor(self.rule.indicator(x, t_rows), device=x.device).float().reshape(())
        total, primed = self.s.get("total", x), self.s.get("primed", x, torch.bool)
        valid = primed & (change >= 0.0)
        new = total + change
        reuse = valid & (new < self.rule.threshold)
        total.copy_(torch.where(valid & ~reuse, torch.zeros_like(new), torch.where(reuse, new, total)))
        return reuse

    def computed(self, x: torch.Tensor, o: torch.Tensor) -> None:
        self.s.get("primed", x, torch.bool).fill_(True)


def device_decider(rule):
    if isinstance(rule, AdaptiveCache):
        return DeviceThirdDifference(rule)
    if isinstance(rule, CacheIndicator):
        return DeviceIndicator(rule)
    return DeviceChangeRate(rule)


class _Ring:
    """The last ``keep`` computed outputs of one call (slots written in turn) and their times, on the device."""

    def __init__(self, like: torch.Tensor, keep: int):
        self.keep = keep
        self.values = torch.zeros((keep, *like.shape), dtype=like.dtype, device=like.device)
        self.times = torch.zeros(keep, dtype=torch.float64, device=like.device)
        self.n = torch.zeros((), dtype=torch.int64, device=like.device)  # entries written (same time: replaced)
        self.slots = torch.arange(keep, device=like.device)

    def reset(self) -> None:
        self.n.zero_()

    def add(self, t: float, value: torch.Tensor) -> None:
        """value at time t: into the next slot, or the newest's where it has time t (Heun's next step at its
        corrector's time replaces it, as the eager series does)."""
        last = (self.n - 1).remainder(self.keep)
        same = (self.n > 0) & (self.times.gather(0, last.view(1)).view(()) == t)
        slot = torch.where(same, last, self.n.remainder(self.keep)).view(1)
        self.values.index_copy_(0, slot, value.to(self.values.dtype).unsqueeze(0))
        self.times.index_copy_(0, slot, torch.full((1,), t, dtype=torch.float64, device=self.times.device))
        self.n.copy_(torch.where(same, self.n, self.n + 1))

    def extrapolate(self, t: float, out: torch.Tensor) -> torch.Tensor:
        """The Lagrange polynomial through the kept entries at t (order: their number - 1), into ``out``."""
        valid = self.slots < self.n  # slots 0..n-1 hold entries until the ring is full
        T = self.times
        num = t - T.view(1, -1)  # [i, m]: (t - T_m) / (T_i - T_m) over valid m != i
        den = T.view(-1, 1) - T.view(1, -1)
        skip = torch.eye(self.keep, dtype=torch.bool, device=T.device) | ~valid.view(1, -1) | (den == 0)
        factors = torch.where(skip, torch.ones_like(den), num / torch.where(skip, torch.ones_like(den), den))
        w = torch.where(valid, factors.prod(1), torch.zeros_like(T))
        flat = self.values.view(self.keep, -1)
        torch.matmul(w.to(flat.dtype).view(1, -1), flat, out=out.view(1, -1))
        return out


class CapturedCachedCalls(CachedCalls):
    """CachedCalls for a captured loop (the module docstring): the same decisions, as device tensors."""

    fused_replay = False  # the kept times, so a replay's weights, are data on the device
    in_step_stats = False  # its deciders' statistics are device ops of their own (no host read to save)

    def __init__(self, calls, rule, stages, scale_at, guided_at, B: int):
        self.device_decider = device_decider(rule)
        self.rings: dict = {}  # (layout, call j) -> _Ring
        # (stage, call j) -> the buffer the stage's call reads: float32 (a bfloat16 or float16 model's outputs exactly,
        # the extrapolation without rounding to the model's dtype, as the eager loop's fused replay blends them)
        self.outs: dict = {}
        self.flags = None  # [reusing the step, run length, computed, skipped] on the device
        super().__init__(calls, rule, stages, scale_at, guided_at, B)
        # a layout's series starts anew where the stage before had another (a guidance interval's edge)
        self.restart = [k == 0 or self._first(k)[2] != self._first(k - 1)[2] for k in range(len(stages))]

    def reset(self) -> None:
        """The captured start: every device state zeroed (nothing kept, no skips)."""
        super().reset()
        self.device_decider.reset()
        for ring in self.rings.values():
            ring.reset()
        if self.flags is not None:
            self.flags.zero_()

    def report(self) -> str:
        if self.flags is None:
            return f"{self.rule.name}: not run"
        computed, skipped = int(self.flags[2]), int(self.flags[3])
        return (f"{self.rule.name}: {skipped} of {computed + skipped} evaluations reused "
                f"({(computed + skipped) / max(computed, 1):.2f}x fewer model calls)")

    def after_run(self) -> None:  # a graph reads nothing back while it runs
        pass

    def after_replay(self) -> None:  # verbose: the device counters, read once the replay is done
        CachedCalls.after_run(self)

    def evaluate(self, model, k: int):
        proxy = self._model_for(model, k)
        with self._perturbed_through(proxy, k):
            return self.calls.evaluate(proxy, k)

    def _model_for(self, model, k: int):
        st = self.stages[k]
        x, t_rows, layout = self._first(k)
        if self.flags is None:
            self.flags = torch.zeros(4, dtype=torch.int64, device=x.device)
        reusing, run = self.flags[0], self.flags[1]
        d = self.device_decider
        if self.first[k]:
            if self.window[k]:
                reuse = d.skip(x, t_rows) if isinstance(d, DeviceIndicator) else d.skip(x)
                if self.rule.max_skips is not None:
                    forced = reuse & (run >= self.rule.max_skips)
                    d.forced(forced)
                    reuse = reuse & ~forced
            else:
                if st.t < self.rule.start_percent:
                    d.seen(x)
                reuse = torch.zeros((), dtype=torch.bool, device=x.device)
            reusing.copy_(reuse)
            run.copy_(torch.where(reuse, run + 1, torch.zeros_like(run)))
        if self.restart[k] or self.computes[k]:
            compute = torch.ones((), dtype=torch.bool, device=x.device)
        else:
            compute = reusing == 0
        self.flags[2].add_(compute.long())
        self.flags[3].add_((~compute).long())
        stats = self.first[k] and (self.window[k] or st.t < self.rule.start_percent)
        guided = self.rule.on_guided and self.guided_at(st.t)
        # LazyCache with one call per branch: the blend at the null branch's call (the stage's last), as eager
        at = self.calls.plans[k][2] - 1 if guided and self.calls.plans[k][0] == "two" else 0
        keep, residual = self.order + 1, self.rule.reuse == "residual"
        position = [0]

        def run_call(fn, xin, tin, y):
            j = position[0]
            position[0] += 1
            out = self.outs.get((k, j))
            ring = self.rings.get((layout, j))
            if self.restart[k] and j == 0 and ring is not None:
                for (lay, _), r in self.rings.items():
                    if lay == layout:
                        r.reset()  # the series of this layout starts anew

            def computed():
                nonlocal out, ring
                o = fn(xin, tin, y)
                value = o - xin if residual else o
                if out is None:  # made in the warm-up run (every call's first stage computes there)
                    out = self.outs[(k, j)] = torch.empty(o.shape, dtype=torch.float32, device=o.device)
                if ring is None:
                    ring = self.rings[(layout, j)] = _Ring(out, keep)
                out.copy_(o)
                ring.add(st.t, value)
                if j == at and stats:
                    d.computed(x, self._guided_first(o, k, self.outs[(k, 0)] if at else None) if guided else
                               o[:self.B])

            if out is None and ring is not None:  # made in the warm-up run, which visits every stage
                out = self.outs[(k, j)] = torch.empty(xin.shape, dtype=torch.float32, device=xin.device)
            _when(compute, computed)

            def reused():
                if ring is None:  # a stage layout's first stage always computes (restart)
                    raise AssertionError("cache with cuda_graph=True: a reused evaluation before its call's first "
                                         "computed one")
                ring.extrapolate(st.t, out)
                if residual:
                    out.add_(xin)

            _when(~compute, reused)
            return out

        proxy = _Proxy(run_call, model)
        proxy.reused = False
        return proxy


def plan(model_calls, rule, stages, guidance, B: int):
    """The cached model calls of a captured plan (cuda_graph=True), or ``model_calls`` itself without a cache rule."""
    if rule is None:
        return model_calls
    return CapturedCachedCalls(model_calls, rule, stages, guidance.scale_at, guidance.guided_at, B)
