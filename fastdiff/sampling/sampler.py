"""``fastdiff.Sampler`` and ``fastdiff.sample``: a drop-in sampler for any ``model(x, t, y)``, one fused kernel per
stage. A Sampler plans a call once (fastdiff.sampling.planner) and runs the plan (fastdiff.sampling.core.executor)
for each batch of seeds, noise and labels; ``sample()`` is a Sampler used once."""

from __future__ import annotations

import torch

from fastdiff.sampling.core import executor, graphs
from fastdiff.sampling.core import labels as label_trees
from fastdiff.sampling.core.arguments import MAX_STEPS, T_MIN_SINGULAR, sample_seeds  # noqa: F401
from fastdiff.sampling.core.calls import with_outs
from fastdiff.sampling import plan_cache
from fastdiff.sampling.core.scratch import POOL
from fastdiff.sampling.planner import arguments, build

ARGUMENTS = """Sample ``[B, *shape]`` from ``model(x, t, y)`` by integrating from t = 0 (noise) to t = 1 (data).

    Args:
        model: callable ``model(x, t, y)`` → prediction of type ``prediction`` (same shape as x); t is
            a float32 tensor [B] in flow time.
        steps: number of steps (grid of steps + 1 times, uniform in t unless ``schedule`` or ``timesteps`` is
            given).
        cfg: classifier-free guidance scale w: p = p_null + w (p_y - p_null); 1 means one pass. A callable
            t -> w is a schedule, evaluated at each model evaluation's time (two branches throughout).
        shape: per-sample shape (taken from ``noise`` when given).
        y, null_y: conditioning batch and the unconditional label (required when cfg != 1).
        conditions: instead of y, K condition batches [y_1, ..., y_K] (K <= 7) blended as
            g = p_null + Σ_k w_k (p_k - p_null) in one model call of (K+1) B; cfg is one weight for all
            or one per condition (negative: away from it). K = 1 is y's path, bit for bit.
        seed: int (sample b uses seed + b) or per-sample seeds (sequence or int64 tensor).
        noise: explicit initial state [B, *shape] at the first grid point.
        path: "condot", "vp", "vp-cosine" or a fastdiff.paths.GaussianPath.
        prediction: what the model returns: "velocity", "eps", "score", "x0" or "v" (alpha eps - beta x0; diffusers'
            names "epsilon", "v_prediction" and "sample" too).
        method: "euler" (ODE; Euler–Maruyama when sigma > 0), "heun", "ddim" (with ``eta``), "dpmpp_2m",
            or any method registered with fastdiff.sampling.register_method (``fastdiff.sampling.METHODS``).
        sigma: diffusion coefficient (float or callable t → sigma_t) of the SDE (methods that take it: euler).
        eta: the noise fraction in [0, 1] of the methods that take it (ddim: default 0, deterministic).
        **options: further options of the chosen method (fastdiff.sampling.methods(); docs/sampling.md);
            EDM's churn options (s_churn, s_tmin, s_tmax, s_noise of euler, heun, dpm_2) also per sample, as
            a list or 1-D tensor of B values (per-sample model times and coefficient rows).
        schedule: the grid's schedule by name, with its defaults: ComfyUI's "normal", "karras", "exponential",
            "sgm_uniform", "simple", "ddim_uniform", "beta", "linear_quadratic", "kl_optimal"; diffusers'
            timestep_spacing "leading", "trailing", "linspace"; "align_your_steps" ("ays_sd15", "ays_sdxl",
            "ays_svd"), "gits"; k-diffusion's "polyexponential", "vp", "laplace"; "shifted" (diffusers' FlowMatch
            shift, dynamic mu, time_shift_type, shift_terminal) — or a schedule object with options, e.g.
            fastdiff.schedules.Karras(rho=7.0), Beta(alpha=0.6, beta=0.6), Shifted(image_seq_len=4096). Computed in
            the peer's noise coordinate and mapped to flow time on ``path`` (docs/schedules.md). Not with timesteps.
        timesteps: explicit increasing grid in [0, 1] (steps + 1 times); a decreasing one integrates from data
            to noise (inversion: fastdiff.invert) with a deterministic method registered with inverts=True.
        guidance_interval: (t_lo, t_hi): guidance only for t_lo <= t <= t_hi, one pass elsewhere.
        guidance: the guidance rule: None or "cfg" (g = p_null + w (p_y - p_null)), "cfg_zero_star" (CFG-Zero*:
            the unconditional branch scaled by its per-sample optimal factor, zero prediction at the first
            step), or a rule object of fastdiff.sampling.features.guidance (e.g. CFGZeroStar(zero_init_steps=2));
            "pag", "slg", "seg" (a third branch from ``perturbed_model``: g = p_null + w (p_y - p_null)
            + s (p_y - p_perturbed) in the rule's window of steps), "autoguidance" (``perturbed_model`` a weaker
            model in place of the unconditional branch), "perp_neg" (conditions=[positive, negative], null_y the
            empty prompt); "cfg_norm", "mahiro", "mimic" (ComfyUI's CFGNorm and Mahiro, sd-dynamic-thresholding's
            mimic scale: torch ops on the clean estimates), "fdg" (frequency-decoupled guidance: per pyramid level
            scales of its own, cfg left at 1); "mambo_g" (MAMBO-G: the scale damped per sample by
            |p_y - p_null| / |p_null|), "apg_mix" (CFG, then APG after adaptive_projected_guidance_start_step:
            HunyuanImage 2.1's), "epsilon_scaling" (the noise estimate divided by a factor, also with cfg = 1);
            docs/guidance.md.
        cache: step caching (fastdiff.sampling.features.caching; docs/guidance.md, "Step caching"): "easycache",
            "lazycache", "adaptive" or a rule object (EasyCache(reuse_threshold=0.2, ...), LazyCache, AdaptiveCache,
            CacheIndicator(indicator, threshold)): a step whose model input has barely changed reuses the last
            outputs, extrapolated in t (order 2; plain reuse on a stochastic method; a multi-stage step computes its
            first evaluation); fewer model calls, one small host read per step (with cuda_graph: none, decided on
            the device in conditional nodes). Off by default: it trades accuracy for calls (docs/guidance.md says
            where it loses).
        perturbed_model: ``perturbed_model(x, t, y)`` with the model's signature, called on the conditional
            input by guidance="pag" / "slg" / "seg" (the network perturbed, e.g. a functools.partial reading a
            flag) and "autoguidance" (a weaker model): one more call of B per stage that uses it.
        guidance_rescale: CFG rescale phi in [0, 1] (diffusers' guidance_rescale; Lin et al. 2024): the blend
            is scaled toward the conditional prediction's standard deviation per sample, fused (one
            per-sample reduction pass per guided evaluation, no host sync; fastdiff.sampling.features.guidance).
        classifier, classifier_scale, classifier_y: classifier guidance: ``classifier(x, t)`` → logits [B, classes] of a
            noise-aware classifier; the score gets classifier_scale · ∇_x log softmax(logits)[y] (autograd, one
            forward and backward per evaluation), fused into the step (fastdiff.sampling.features.classifier).
            classifier_y (default: y) holds the target classes; the scale may be a callable of t.
        init, strength, known_mask, resample: editing (fastdiff.sampling.features.editing; docs/guidance.md). ``init``
            [B, *shape]: the data to start from. ``strength`` in (0, 1] (img2img / SDEdit): run the grid's last
            int(steps * strength) steps from init noised to their start. ``known_mask`` (bool, broadcast to the
            samples; true = known): inpainting, the known region re-imposed from init at each step's end time;
            ``resample`` = r > 1 repeats each step r times (RePaint) so the rest agrees with it.
        corrector_steps, snr: predictor-corrector sampling (score_sde): before each step, corrector_steps
            Langevin steps at its start time, each sample's step size 2 (snr ‖ξ‖ / ‖score‖)² (docs/score_based.md).
        dynamic_thresholding: Imagen's dynamic thresholding of each evaluation's x0 estimate (diffusers'
            thresholding=True): True (ratio 0.995, max_value 1), a ratio, or a DynamicThresholding.
        clip_sample: c > 0 clamps each evaluation's x0 estimate to [-c, c] (diffusers' clip_sample with
            clip_sample_range c; True: 1): the step takes the clamped x0 and the unclipped eps, as diffusers' DDIM
            and DDPM steps do (fastdiff.sampling.StaticClipping(c, use_clipped_model_output=True): eps recomputed
            from the clamped x0). With dynamic_thresholding: thresholded, then clamped.
        cfg_batch: run conditional and unconditional inputs as one batch of 2B (default) or two calls.
        backend: "auto", "cuda", "triton", "cpu" or "reference" for the fused step; None (default): the one in
            force (fastdiff.use_backend, else FASTDIFF_BACKEND, else "auto").
        progress: show a tqdm progress bar.
        callback: ``callback(step, t, x, x0)`` after each step (x = the new state, x0 = the model's
            x0 prediction at that step's first evaluation); the tensors are reused buffers. An in-place edit of x
            is the next step's start (k-diffusion's contract).
        check_finite: fail with the step and t if the model returns inf/NaN (checked on the device,
            read once at the end).
        cuda_graph: capture the model and the loop in a CUDA graph (CUDA tensors only). Later calls
            with the same model object and settings replay it (seeds, noise and labels are refilled).
            Up to 4 loops stay cached with everything they read; fastdiff.clear_cuda_graphs()
            frees them, and a model's loops are dropped when the model is garbage-collected. The
            model's parameters must stay where they are (in-place updates are seen; ``.to()`` or
            reassigned parameters need clear_cuda_graphs()).
        step_noise: the noise of the steps. None: independent in-kernel draws (docs/design.md §3).
            "brownian": increments of one Brownian path per sample over flow time, a pure function of
            (seed, element), so that a seed's samples converge as steps grow (k-diffusion's
            BrownianTreeNoiseSampler; fastdiff.sampling.features.brownian, in the kernels). A callable: the caller's
            noise, ``step_noise(step, j)`` → a standard normal [B, *shape] for the j-th noisy stage of step
            ``step`` (one call per stage that adds noise; k-diffusion's ``noise_sampler`` through
            fastdiff.adapters.k_diffusion). The stage's whole noise term (its draws, e.g. dpmpp_sde's
            Brownian combination) becomes its scale times that tensor.

    On the CPU the loop's scratch buffers (not the returned samples) are kept for the next call, up to
    256 MiB (fastdiff.clear_scratch() frees them). Runs under torch.no_grad().
    """

# sample()'s keyword arguments and their defaults (any other keyword is a method option)
DEFAULTS = dict(shape=None, y=None, null_y=None, seed=0, noise=None, path="condot", prediction="velocity",
                method="euler", sigma=0.0, eta=None, timesteps=None, schedule=None, guidance_interval=None,
                cfg_batch=True, batch_size=None, backend=None, progress=False, callback=None, device=None,
                check_finite=True, cuda_graph=False, step_noise=None, guidance=None, guidance_rescale=0.0,
                conditions=None, dynamic_thresholding=None, clip_sample=None, classifier=None, classifier_scale=1.0,
                classifier_y=None, init=None, strength=None, known_mask=None, resample=1, corrector_steps=0, snr=0.16,
                cache=None, perturbed_model=None)


def _run_of(method):
    """The ``run`` of a registered method that chooses its steps while it samples (dpm_adaptive), else None."""
    from fastdiff.sampling.methods.registry import _REGISTRY

    record = _REGISTRY.get(method) if isinstance(method, str) else None
    return None if record is None else record.run


class Sampler:
    """A sampling call planned once and run many times: ``Sampler(model, steps, cfg, shape=..., batch_size=...,
    **sample_arguments)`` checks the arguments and builds the plan (stage table, buffers, kernel calls, model
    calls); ``sampler(seed=..., noise=..., y=..., null_y=...)`` runs it, refilling only those (a new batch size,
    device or label layout builds a new plan). Returns a new tensor each call. The arguments are sample()'s."""

    def __init__(self, model, steps: int | None = 50, cfg: float = 1.0, **kwargs):
        self._run_method = _run_of(kwargs.get("method"))
        if self._run_method is not None:  # steps chosen while sampling: no plan to keep, each call hands them over
            self._model, self._steps, self._cfg, self._run_kw = model, steps, cfg, dict(kwargs)
            return
        self._kw = {**DEFAULTS, **{k: v for k, v in kwargs.items() if k in DEFAULTS}}
        self._kw["options"] = {k: v for k, v in kwargs.items() if k not in DEFAULTS}
        self._model, self._steps, self._cfg = model, steps, cfg
        self._plan = self._ns = self._signature = None
        self._graph = self._last_y = self._last_y_version = None
        if kwargs.get("cuda_graph", False) is True:  # a graph plans on its first call; the checks run now
            self._a = arguments(model, steps, cfg, dict(self._kw))
        else:  # planned now (the checks included): its errors are the constructor's
            self._plan_for(model, {})

    def _plan_for(self, model, changes: dict) -> None:
        self._a = arguments(model, self._steps, self._cfg, {**self._kw, **changes})
        with torch.no_grad():
            self._plan, self._ns = build(self._a, pooled=False)
        self._signature, self._graph, self._last_y = _signature({**self._kw, **changes}), None, None
        if self._plan is not None:
            self._fresh_result()

    def __call__(self, *, seed=None, noise=None, y=None, null_y=None, batch_size=None) -> torch.Tensor:
        if self._run_method is not None:
            changes = {k: v for k, v in (("seed", seed), ("noise", noise), ("y", y), ("null_y", null_y),
                                         ("batch_size", batch_size)) if v is not None}
            return self._run_method(self._model, self._steps, self._cfg, DEFAULTS, **{**self._run_kw, **changes})
        return self._call(self._model, seed, noise, y, null_y, batch_size)

    def _call(self, model, seed=None, noise=None, y=None, null_y=None, batch_size=None, trusted=False):
        """A run with ``model``; ``trusted``: the caller knows the layout is the plan's (plan_cache's key)."""
        changes = {k: v for k, v in (("seed", seed), ("noise", noise), ("y", y), ("null_y", null_y),
                                     ("batch_size", batch_size)) if v is not None}
        signature = self._signature
        if changes.keys() - {"seed"} and not trusted:  # a new layout needs a new plan
            signature = _signature({**self._kw, **changes})
        if self._ns is None or signature != self._signature:
            self._plan_for(model, changes)
        elif self._plan is not None:
            self._refill(seed, noise, y, null_y)
        if self._plan is None:  # an empty batch
            return self._ns.empty.clone()
        return self._run(model)

    def _fresh_result(self) -> None:
        """The last stage writes a new tensor each call (the caller keeps it)."""
        plan, last = self._plan, len(self._plan.stages) - 1
        if self._a.cuda_graph or plan.stages[last].out != "x":
            return
        result = torch.empty_like(plan.x)
        plan.result = result
        for calls in plan.calls:
            calls[last] = with_outs(calls[last], [result])

    def _refill(self, seed, noise, y, null_y) -> None:
        plan, a = self._plan, self._a
        if seed is not None:
            if seed.__class__ is int and 0 <= seed and seed + a.B < 1 << 63:  # the common case, one op
                torch.arange(seed, seed + a.B, out=plan.seeds)
            else:
                plan.seeds.copy_(sample_seeds(seed, a.B, a.device))
        if noise is not None:
            if a.cuda_graph:  # the captured start reads the kept copy
                self._ns.noise_buf.copy_(noise)
            else:
                plan.inputs.noise = noise.to(device=a.device, dtype=torch.float32).contiguous()
        elif seed is not None and self._ns.restart is not None:  # editing: init noised with this call's seeds
            start = self._ns.restart(plan.seeds)
            if a.cuda_graph:
                self._ns.noise_buf.copy_(start)
            else:
                plan.inputs.noise = start
        labels = plan.labels
        if isinstance(y, torch.Tensor) and (y is not self._last_y or y._version != self._last_y_version):
            labels.y.copy_(y)  # (the same tensor, unchanged since the last call, is there already)
            if labels.batched is not None:
                labels.batched[:a.B].copy_(y)
            if self._ns.classifier is not None and self._kw["classifier_y"] is None:  # its targets are y too
                self._ns.classifier.y.copy_(y)
            self._last_y, self._last_y_version = y, y._version
        elif label_trees.is_tree(y):  # leaf by leaf (a batch-1 leaf broadcast)
            label_trees.copy_into(labels.y, y)
            if labels.batched is not None:
                label_trees.copy_into(labels.batched, y, slice(0, a.B))
        if null_y is not None and (isinstance(labels.null, torch.Tensor) or label_trees.is_tree(labels.null)):
            _refill_null(labels, null_y, a.B)
        plan.inputs.z = None  # the start draws each call's initial noise
        self._fresh_result()

    def _run(self, model) -> torch.Tensor:
        plan, ns, a = self._plan, self._ns, self._a
        if plan.finite.reduced:  # the last run may have set it
            plan.finite.first_bad.fill_(-1)
        if a.cuda_graph:  # captured on the first call, replayed after (the plan's tensors are the graph's)
            with torch.no_grad():
                if self._graph is None:
                    self._graph = graphs.CAPTURE.capture(lambda: executor.run(plan, model), a.device)
                plan.finite.first_bad.fill_(-1)
                graphs.CAPTURE.replay(self._graph, a.device)
            for hook in plan.points.after_replay:
                hook()
            _raise_first_bad(plan, ns, a, plan.finite.first_bad, plan.stages)
            return plan.result.clone()
        grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)  # (torch.no_grad() as a context costs ~1.5 us a call)
        try:
            if a.progress:
                _run_with_bar(plan, a, model)
            else:
                executor.run(plan, model)
        finally:
            torch.set_grad_enabled(grad)
        _raise_first_bad(plan, ns, a)
        return plan.result if plan.result is not plan.x else plan.x.clone()  # a last stage not writing x: a copy


def clear_scratch() -> None:
    """Free what fastdiff.sample keeps between calls: the CPU scratch buffers and the plans of small calls."""
    POOL.clear()
    plan_cache.clear()


def _signature(kw: dict) -> tuple:
    """What a plan depends on beyond the refilled values: the batch size, the device, the label layout."""
    def describe(v):
        if label_trees.is_tree(v):
            return label_trees.signature(v)
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, str(v.device))
        if isinstance(v, (list, tuple)):
            return ("list", len(v), tuple(map(repr, v)))
        return ("value", type(v).__name__, repr(v) if not callable(v) else id(v))
    return tuple((k, describe(kw.get(k))) for k in ("noise", "y", "null_y", "batch_size"))


def _refill_null(labels, null_y, B: int) -> None:
    if label_trees.is_tree(labels.null):
        label_trees.copy_into(labels.null, label_trees.null_like(null_y, labels.null, B))
        if labels.batched is not None:
            label_trees.copy_into(labels.batched, labels.null, slice(-B, None))
        return
    null = torch.as_tensor(null_y, device=labels.null.device).to(labels.null.dtype)
    labels.null.copy_(null.expand(labels.null.shape))
    if labels.batched is not None:
        labels.batched[-B:].copy_(labels.null)


def _run_with_bar(plan, a, model) -> None:
    from tqdm.auto import tqdm

    with tqdm(total=len(plan.grid) - 1, desc=f"fastdiff {a.method}", unit="step") as bar:
        plan.add("after_step", lambda k: bar.update(1))
        try:
            executor.run(plan, model)
        finally:
            plan.points.after_step.pop()


def _raise_first_bad(plan, ns, a, first_bad=None, stages=None) -> None:
    """The one synchronization, after the loop (classifier guidance: two)."""
    if not a.check_finite:
        return
    if first_bad is None:
        plan.finite.settle(len(plan.stages) - 1)
        if not plan.finite.reduced and ns.classifier is None:  # a clean run: nothing to read (settle read it)
            return
    first_bad = plan.finite.first_bad if first_bad is None else first_bad
    stages = plan.stages if stages is None else stages
    if ns.classifier is not None:
        ns.classifier.raise_first_bad(first_bad, stages)
    plan.finite.raise_first_bad(first_bad, stages, ns.given, a.step_noise)  # init made noise


def _edit_key(edit) -> tuple | None:
    """What of an editing call a captured loop is made for (its tensors' values are refilled): none, img2img or
    inpainting, the mask's shape (it broadcasts), RePaint's repeats."""
    if edit is None:
        return None
    return edit.strength is None, None if edit.mask is None else tuple(edit.mask.shape), edit.resample


def _edit_statics(ns) -> dict:
    """A captured loop's editing and classifier tensors, refilled per call: init, the mask, the classifier's targets
    (classifier_y, or y), each the plan's own copy (None where absent)."""
    edit, classifier = ns.edit, ns.classifier
    return dict(init=None if edit is None else edit.init, mask=None if edit is None else edit.mask,
                classifier_y=None if classifier is None else classifier.y)


def _run_graph(plan, ns, a) -> tuple:
    """sample(cuda_graph=True): capture the plan's run, or replay the cached capture of the same settings."""
    g = a.guidance
    labels = plan.labels
    signature = tuple(None if v is None else label_trees.signature(v)
                      for v in (labels.y, labels.null, labels.batched, *labels.conds))
    key = graphs.key(a.model, stages=plan.stages, beta0=ns.beta0, batch=a.B, shape=a.shape, device=a.device,
                     cfg=plan.weights.key, cfg_batch=a.cfg_batch, guidance_interval=g.interval,
                     backend=ns.backend, noise_given=a.noise is not None, check_finite=a.check_finite,
                     labels=signature, brownian=a.brownian, per_sample=ns.merged.key if ns.merged else None,
                     features=(g.thresholding, a.classifier, a.classifier_scale, _edit_key(ns.edit),
                               a.corrector_steps, a.snr, a.perturbed_model, a.cache))
    entry = graphs.CACHE.get(key, a.model)
    if entry is None:
        graph = graphs.CAPTURE.capture(lambda: executor.run(plan, a.model), a.device)
        entry = graphs.CACHE.put(key, a.model, graphs.CapturedLoop(
            graph=graph, statics=dict(seeds=plan.seeds, noise=ns.noise_buf, y=labels.y, null=labels.null,
                                      y2=labels.batched, **{f"c{i}": c for i, c in enumerate(labels.conds)},
                                      **_edit_statics(ns)),
            x=plan.result, first_bad=plan.finite.first_bad, stages=plan.stages, keepalive=(plan, ns)))
    else:
        # an editing call's start is init noised with its seeds (its plan made it), refilled as given noise is
        graphs.refill(entry, seeds=plan.seeds, noise=a.noise if ns.edit is None else ns.noise_buf, y=labels.y,
                      null=labels.null, y2=labels.batched, **{f"c{i}": c for i, c in enumerate(labels.conds)},
                      **_edit_statics(ns))
    entry.first_bad.fill_(-1)
    graphs.CAPTURE.replay(entry.graph, a.device)
    for hook in entry.keepalive[0].points.after_replay:  # the captured plan's (the graph ran its tensors)
        hook()
    return entry.x.clone(), entry.first_bad, entry.stages


@torch.no_grad()  # a sampler never backpropagates: model calls keep no activations for backward
def sample(model, steps: int | None = 50, cfg: float = 1.0, **kwargs) -> torch.Tensor:
    run = _run_of(kwargs.get("method"))
    if run is not None:  # a method that chooses its steps while it samples
        return run(model, steps, cfg, DEFAULTS, **kwargs)
    key = plan_cache.key_of(model, steps, cfg, kwargs)
    if key is not None:  # a small call: its plan is kept and reused by the next one like it (plan_cache)
        entry = plan_cache.take(key, model)
        if entry is None:
            ref, sampler, refills = None, Sampler(model, steps, cfg, **kwargs), {}
        else:  # the key holds null_y's value when it is a number: only tensors are refilled
            ref, sampler = entry
            refills = {"seed": kwargs.get("seed", 0), **{k: kwargs[k] for k in ("noise", "y", "null_y")
                                                          if isinstance(kwargs.get(k), torch.Tensor)
                                                          or label_trees.is_tree(kwargs.get(k))}}
        try:
            return sampler._call(model, trusted=True, **refills)
        finally:
            plan_cache.give(key, model, sampler, ref)
    kw = {**DEFAULTS, **{k: v for k, v in kwargs.items() if k in DEFAULTS}}
    kw["options"] = {k: v for k, v in kwargs.items() if k not in DEFAULTS}
    a = arguments(model, steps, cfg, kw)
    plan, ns = build(a, pooled=True)
    if plan is None:
        return ns.empty
    if a.cuda_graph:
        result, first_bad, stages = _run_graph(plan, ns, a)
        _raise_first_bad(plan, ns, a, first_bad, stages)
        return result
    if a.progress:
        _run_with_bar(plan, a, model)
    else:
        executor.run(plan, model)
    returned = plan.result.untyped_storage().data_ptr()
    POOL.give(t for t in ns.scratch if t.untyped_storage().data_ptr() != returned)
    _raise_first_bad(plan, ns, a)
    return plan.result


sample.__doc__ = ARGUMENTS  # the arguments' documentation, shared with Sampler
Sampler.__doc__ += "\n\n" + ARGUMENTS

__all__ = ["DEFAULTS", "Sampler", "clear_scratch", "sample"]
