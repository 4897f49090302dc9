"""The model calls of a plan with step caching (fastdiff.sampling.features.caching's rules decide): the kept
outputs, their extrapolation in t, and the fused replay of a reused step (docs/guidance.md, "Step caching")."""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch

from fastdiff.ops.sampler_step import KERNEL_ARGS
from fastdiff.sampling.features import cached_stats as _cached_stats

_PREDS, _WEIGHTS, _SAMPLE_WEIGHTS = (KERNEL_ARGS.index(name) for name in ("preds", "weights", "sample_weights"))


class _Proxy:
    """The model as one stage's calls see it: ``run(fn, x, t, y)`` with the model (or, bound, a perturbed rule's
    callable), the calls counted in order."""

    __slots__ = ("run", "fn", "reused")

    def __init__(self, run, fn):
        self.run, self.fn, self.reused = run, fn, False

    def __call__(self, x, t, y=None):
        return self.run(self.fn, x, t, y)

    def bind(self, fn):
        return lambda x, t, y=None: self.run(fn, x, t, y)


class CachedCalls:
    """A plan's model calls (fastdiff.sampling.core.model_calls.ModelCalls) with step caching. The rule decides at
    each step's first evaluation (its statistics read the state, not a multi-stage step's inner points); a reused
    single-stage step makes no model call, a reused multi-stage step (heun, dpm_2, ...) computes its first
    evaluation, at the state, and reuses the rest. Every computed evaluation adds its outputs (or their change over
    the input) to one series per model call ordered by time (a later evaluation at the same time replaces the
    earlier: Heun's next state after its corrector's predictor point); a reused evaluation hands its calls the
    series' Lagrange extrapolation to its own time, of order ``order``. Measured on the 8-mode oracle (heun, 50
    steps, every corrector reused, order 2): 0.47x the error of a plain 25-step run at 1.96x fewer calls; reusing
    whole Heun steps instead: 0.85x at 2x. Each stage's calls are replayed in order (one batched call, or one per
    branch), so the kept tensors match the stage's own."""

    fused_replay = True  # a reused stage's step may read the kept outputs itself (FusedReplay)
    in_step_stats = True  # the decider's statistics from the kernels' pass (cached_stats), where the plan allows

    def __init__(self, calls, rule, stages, scale_at, guided_at, B: int):
        self.calls, self.rule, self.stages, self.B = calls, rule, stages, B
        self.scale_at, self.guided_at = scale_at, guided_at
        self.first, self.position = [], []  # whether stage k opens its step; its place in the step
        p = 0
        for st in stages:
            self.first.append(p == 0)
            self.position.append(p)
            p = 0 if st.final else p + 1
        # a multi-stage step keeps its first evaluation (at the trajectory's state) and reuses the rest
        self.computes = [self.first[k] and not stages[k].final for k in range(len(stages))]
        self.window = [rule.start_percent <= st.t < rule.end_percent for st in stages]
        # order None: extrapolate a deterministic method's outputs (2), reuse a stochastic one's as they are (0)
        self.order = rule.order if rule.order is not None else 0 if any(st.noise_scale() > 0 for st in stages) else 2
        self.copies = False  # the model writes one buffer per call: keep copies
        self.firsts: dict[int, tuple] = {}
        self.fuse = None  # FusedReplay, set by plan() where the step may read the kept outputs itself
        self.views: dict = {}
        self.reset()

    # ModelCalls' interface, the planner's half
    def parts(self, k: int, n_preds: int):
        return self.calls.parts(k, n_preds)

    @property
    def whole(self):
        return self.calls.whole

    @property
    def plans(self):
        return self.calls.plans

    def reset(self) -> None:
        """A new run: no kept outputs, fresh statistics (the plan's start point)."""
        self.decider = self.rule.decider()
        self.decider.views = self.views  # the subsample views of the plan's kept inputs, made once
        self.kept: dict[int, list] = {}  # call j of an evaluation -> [(t, tensor, storage)] newest last, distinct t
        self.layout = None  # the call structure of the kept outputs
        self.spare: list = []  # copies dropped from the series, to copy the next outputs into
        self.owned: dict = {}  # id -> weak reference of those copies (never a model's own tensor)
        self.scratch: dict = {}  # call j -> the extrapolation's buffer
        self.reusing = False  # the current step's decision
        self.run_length = 0
        self.computed = self.skipped = 0

    def report(self) -> str:
        total = self.computed + self.skipped
        return (f"{self.rule.name}: {self.skipped} of {total} evaluations reused "
                f"({total / max(self.computed, 1):.2f}x fewer model calls)")

    # the executor's half
    def evaluate_whole(self, model, k: int):
        proxy = self._model_for(model, k)
        with self._perturbed_through(proxy, k):
            return self.calls.evaluate_whole(proxy, k)

    def evaluate(self, model, k: int):
        proxy = self._model_for(model, k)
        if self.calls.perturbed_model is not None and self.calls.perturbed[k] is not None:
            with self._perturbed_through(proxy, k):
                return self.calls.evaluate(proxy, k)
        if proxy.reused and self.fuse is not None and self.fuse.possible(k, self.kept):
            # the kept outputs themselves, each entry's predictions as the stage reads them; the step's call (the
            # before_step hook) blends them with the extrapolation's weights: no pass of its own
            entries = len(self.kept[0])
            if self.calls.plans[k][0] == "one":  # one call of B: the entries themselves (~3 us a step less)
                preds = [entry[1] for entry in self.kept[0]]
            else:
                preds = []
                for e in range(entries):
                    calls = iter(range(len(self.kept)))  # the stage's calls in order, entry e of each
                    preds += self.calls.evaluate(lambda x, t, y, e=e, calls=calls: self.kept[next(calls)][e][1], k)
            self.fuse.pending = (k, tuple(e[0] for e in self.kept[0]), self.stages[k].t)
            return preds
        if proxy.reused and self.order == 0 and self.rule.reuse == "output" and self.calls.plans[k][0] == "one":
            return [self.kept[0][0][1]]  # plain reuse of one call: the kept output itself, without the proxies
        return self.calls.evaluate(proxy, k)

    @contextlib.contextmanager
    def _perturbed_through(self, proxy, k: int):
        """A perturbed rule's call (features/perturbed.py) goes through the stage's proxy too, after its branches."""
        own = self.calls.perturbed_model
        if own is None or self.calls.perturbed[k] is None:
            yield
            return
        self.calls.perturbed_model = proxy.bind(own)
        try:
            yield
        finally:
            self.calls.perturbed_model = own

    def _first(self, k: int):
        """(stage k's first model input's first B rows: the first condition's branch, its time rows, the layout),
        made once per stage (the plan's inputs are kept buffers)."""
        first = self.firsts.get(k)
        if first is None:
            kind, inputs, n = self.calls.plans[k]
            args = inputs[0]
            layout = (kind, len(inputs), n, tuple(a[0].shape for a in inputs),
                      self.calls.perturbed_model is not None and self.calls.perturbed[k] is not None)
            first = self.firsts[k] = (args[0][:self.B], args[1][:self.B], layout)
        return first

    def _model_for(self, model, k: int):
        st = self.stages[k]
        x, t_rows, layout = self._first(k)
        if self.first[k]:
            reuse = False
            if self.window[k]:
                reuse = self.decider.skip(st.t, x, t_rows)
                if reuse and self.rule.max_skips is not None and self.run_length >= self.rule.max_skips:
                    reuse = False
                    self.decider.forced()
            elif st.t < self.rule.start_percent:
                self.decider.seen(x)
            self.reusing = reuse
            self.run_length = self.run_length + 1 if reuse else 0
        if self.reusing and self.layout == layout and not self.computes[k]:
            self.skipped += 1
            proxy = self._replay(k, st.t)
            proxy.reused = True
        else:
            self.computed += 1
            proxy = self._record(model, k, st.t, x, layout)
            proxy.reused = False
        return proxy

    def _record(self, model, k: int, t: float, x_first, layout):
        keep = self.order + 1
        residual = self.rule.reuse == "residual"
        if self.layout != layout:  # another call structure (a guidance interval's edge): start the series anew
            self.kept, self.layout = {}, layout
        position = [0]
        stats = self.first[k] and (self.window[k] or t < self.rule.start_percent)
        guided = self.rule.on_guided and self.guided_at(t)
        # LazyCache with one call per branch: the blend needs the null branch's call, the stage's last
        kind, _, n_calls = self.calls.plans[k]
        at = n_calls - 1 if guided and kind == "two" else 0
        cond = []

        def run(fn, xin, tin, y):
            out = fn(xin, tin, y)
            j = position[0]
            position[0] += 1
            if isinstance(out, torch.Tensor) and out.shape == xin.shape:
                # the model's own output is kept as is (no pass: a model returns a new tensor per call); a model
                # that writes one buffer each call is seen by its storage and copied from then on (the entries it
                # overwrote dropped)
                if residual:
                    value = out - xin
                    ptr = None
                else:
                    ptr = out.untyped_storage().data_ptr()
                    if self.copies or self._keeps(ptr):
                        self.copies = True
                        self.kept = {i: [e for e in v if e[2] != ptr] for i, v in self.kept.items()}
                        value = self._copy(out)
                        ptr = value.untyped_storage().data_ptr()
                    else:
                        value = out
                # one series per call over every computed evaluation, newest last, one entry (t, value, its
                # storage) per time (a later evaluation at the same time replaces it: Heun's next step at its
                # corrector's time)
                entries = self.kept.get(j, [])
                series = ([e for e in entries if e[0] != t] + [(t, value, ptr)])[-keep:]
                self.kept[j] = series
                if self.copies:  # the copies dropped from the series hold the next ones (no new allocation)
                    self.spare += [e[1] for e in entries if self._owned(e[1]) and not any(e is s for s in series)]
                if stats and j == 0 and at:
                    cond.append(out)
                elif stats and j == at:
                    measured = self.decider.stats is not None and self.decider.stats.measure_output(k)
                    self.decider.computed(x_first, None if measured else
                                          self._guided_first(out, k, *cond) if guided else
                                          out if out.shape[0] == self.B else out[:self.B])
            return out

        return _Proxy(run, model)

    def _keeps(self, ptr: int) -> bool:
        """Whether a kept entry lives in the storage at ``ptr`` (the model wrote into a buffer it returned before)."""
        for entries in self.kept.values():
            for e in entries:
                if e[2] == ptr:
                    return True
        return False

    def _owned(self, v: torch.Tensor) -> bool:
        ref = self.owned.get(id(v))
        return ref is not None and ref() is v

    def _copy(self, out: torch.Tensor) -> torch.Tensor:
        """A copy of a model output into a dropped copy's storage where one fits (a fresh 16 MB tensor costs page
        faults: 2.5 ms a copy on the CPU against 1.4 ms into a kept one)."""
        for i, spare in enumerate(self.spare):
            if spare.shape == out.shape and spare.dtype == out.dtype and spare.device == out.device:
                del self.spare[i]
                return spare.copy_(out)
        copy = out.clone()
        self.owned[id(copy)] = weakref.ref(copy)
        return copy

    def _guided_first(self, out, k, cond=None):
        """The CFG blend at the stage's scale of the first condition: from one batched output (conditions first, the
        null branch last), or from the first condition's output ``cond`` and the null branch's ``out`` (one call per
        branch)."""
        kind, inputs, n = self.calls.plans[k]
        w = self.scale_at(self.stages[k].t)
        w = w[0] if isinstance(w, tuple) else w
        if kind == "batched" and n >= 2:
            parts = out.chunk(n)
            return parts[-1] + w * (parts[0] - parts[-1])
        if cond is not None:
            return out + w * (cond - out)
        return out[:self.B]

    def _replay(self, k: int, t: float):
        residual = self.rule.reuse == "residual"
        position = [0]

        def run(fn, xin, tin, y):
            j = position[0]
            position[0] += 1
            entries = self.kept[j]
            if len(entries) > 1 and not residual:  # into a buffer of its own per call (no allocation per step)
                out = self.scratch.get(j)
                if out is None or out.shape != entries[0][1].shape or out.dtype != entries[0][1].dtype:
                    out = self.scratch[j] = torch.empty_like(entries[0][1])
                return extrapolate(entries, t, out)
            value = extrapolate(entries, t)
            return xin + value if residual else value

        return _Proxy(run, None)

    def after_run(self) -> None:
        if self.rule.verbose:
            logging.getLogger("fastdiff").info(self.report())

    def after_replay(self) -> None:  # an eager loop reports after its last step (after_run)
        pass


def lagrange_weights(times: list, t: float) -> list[float]:
    """The weights of the Lagrange polynomial through ``times`` at t (they sum to 1)."""
    weights = []
    for i, ti in enumerate(times):
        w = 1.0
        for m, tm in enumerate(times):
            if m != i:
                w *= (t - tm) / (ti - tm)
        weights.append(w)
    return weights


class FusedReplay:
    """A reused stage's step reading the kept outputs itself: the stage's call with each kept entry's predictions
    and the branch weights spread by the extrapolation's weights L_e. With the kernel's blend
    g = u_0 q_0 + Σ_r u_r (q_r − q_0) over the entries' predictions q (entry-major, each entry's null branch first)
    and the stage's weights (w_0, w_1, ...), the coefficient of entry e's branch i is c = L_e (w_0 − Σ_{i≥1} w_i)
    for i = 0 and L_e w_i else; u_r = c_r (r ≥ 1) and u_0 = Σ c = w_0 (the L_e sum to 1). Only where nothing else
    reads the predictions (no hooks at the predictions point), the stage's weights are host numbers (not per
    sample), the predictions fit the step (≤ 8) and the reuse is the output itself; else the extrapolation is one
    pass of its own."""

    def __init__(self, plan, model_calls):
        self.plan, self.model_calls = plan, model_calls
        self.pending = None
        self.calls = {}  # (stage, kept times, time, ...) -> (the stage's call, the fused call made from it)

    def possible(self, k: int, kept: dict) -> bool:
        if self.plan.points.predictions or not kept or len(kept[0]) < 2 or \
                (self.model_calls.perturbed_model is not None and self.model_calls.perturbed[k] is not None):
            return False
        n = self.model_calls.plans[k][2]  # the predictions of one evaluation
        args = self.plan.calls[self.plan.repeat][k].args
        return len(kept[0]) * n <= 8 and args[_SAMPLE_WEIGHTS] is None and len(args[_WEIGHTS]) == n

    def hook(self, k: int, preds, call):
        if self.pending is None or self.pending[0] != k:
            return call
        from fastdiff.ops.step_call import StepCall, step_call

        # (stage, the kept entries' times, the stage's time, the repeat, the branch weights): the same call in every
        # run (the Lagrange weights and the call made once: ~10 us a reused step), made from this very stage call
        # (a Sampler gives the last stage a new output tensor each run: a call made from the last run's would write
        # the samples it returned then)
        w = call.args[_WEIGHTS]
        key = (*self.pending, self.plan.repeat, tuple(w))
        self.pending = None
        made = self.calls.get(key)
        fused = made[1] if made is not None and made[0] is call else None
        if fused is None:
            args = list(call.args)
            if args[_SAMPLE_WEIGHTS] is not None:
                raise AssertionError("a fused replay needs host weights")  # possible() rules it out
            rest = sum(w[1:])
            L = lagrange_weights(list(key[1]), key[2])
            c = [v for Le in L for v in (Le * (w[0] - rest), *(Le * wi for wi in w[1:]))]
            u = (float(w[0]), *(float(v) for v in c[1:]))
            args[_PREDS] = [args[0]] * len(u)
            args[_WEIGHTS] = list(u)
            fused = step_call(call.backend, tuple(args), None, not isinstance(call, StepCall))
            if len(self.calls) > 256:
                self.calls.clear()
            self.calls[key] = (call, fused)
        return fused


def extrapolate(entries: list, t: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Lagrange polynomial through the kept (t_i, v_i) (distinct times; order = their number - 1) at t: one
    pass (the newest itself, no pass, for one entry), into ``out`` where given."""
    if len(entries) == 1:
        return entries[0][1]
    weights = lagrange_weights([e[0] for e in entries], t)
    out = entries[0][1] * weights[0] if out is None else torch.mul(entries[0][1], weights[0], out=out)
    for e, w in zip(entries[1:], weights[1:]):
        out.add_(e[1], alpha=w)
    return out


def plan(model_calls, rule, stages, guidance, B: int):
    """The cached model calls of an eager plan, or ``model_calls`` itself without a cache rule (a captured plan's:
    fastdiff.sampling.features.cached_graph.plan)."""
    if rule is None:
        return model_calls
    return CachedCalls(model_calls, rule, stages, guidance.scale_at, guidance.guided_at, B)


def add_hooks(plan, calls) -> None:
    """The cache's points: a new run starts afresh; the step of a reused stage reads the kept outputs (FusedReplay,
    host weights only: the stage's call tells); the report after the last step (eager) or the replay (captured)."""
    plan.add("start", calls.reset)
    if calls.rule.reuse == "output" and calls.fused_replay:
        calls.fuse = FusedReplay(plan, calls.calls)
        plan.add("before_step", calls.fuse.hook)
    last = len(calls.stages) - 1
    plan.add("after_step", lambda k: calls.after_run() if k == last else None)
    plan.add("after_replay", calls.after_replay)
    _cached_stats.add_hooks(plan, calls)
