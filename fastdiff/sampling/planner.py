"""From sample()'s arguments to a plan (fastdiff.sampling.core.plan): the checks, the stage table and its
transforms, the buffers, the kernel calls, the model calls, then each feature at its points (features/)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from fastdiff import dispatch as _dispatch
from fastdiff.paths import check_prediction, get_path
from fastdiff.sampling.core import calls as _calls
from fastdiff.sampling.core.arguments import (FiniteFlags, batch_shape_device, check_guided_labels,
                                              check_step_noise_kind, guidance_interval_pair, is_number, langevin_steps,
                                              loop_flags, sample_seeds, sigma_function, time_grid)
from fastdiff.sampling.core.graphs import check_arguments as check_graph_arguments
from fastdiff.sampling.core.model_calls import ModelCalls, labels_of
from fastdiff.sampling.core.plan import Plan
from fastdiff.sampling.core.scratch import POOL
from fastdiff.sampling.core.tables import ModelTimes, stage_tables
from fastdiff.sampling.features import callback as _callback, corrector as _corrector, step_noise as _step_noise
from fastdiff.sampling.features import guidance as _guidance, per_sample
from fastdiff.sampling.features import tensor_rules as _tensor_rules
from fastdiff.sampling.features import cached_calls as _cached_calls, cached_graph as _cached_graph
from fastdiff.sampling.features import caching as _caching
from fastdiff.sampling.features.classifier import ClassifierGuidance, singular_at_zero
from fastdiff.sampling.features.editing import check_direction, editing, strength_grid
from fastdiff.sampling.features.conditions import guidance_arguments
from fastdiff.sampling.features.thresholding import Thresholds
from fastdiff.sampling.methods.registry import check_options, get_method


def arguments(model, steps, cfg, kw: dict) -> SimpleNamespace:
    """sample()'s arguments checked and normalized (errors name the argument), before any tensor is made."""
    a = SimpleNamespace(model=model, steps=steps, cfg=cfg, **kw)
    a.cfg_batch, a.progress, a.check_finite, a.cuda_graph = loop_flags(model, a.cfg_batch, a.progress, a.check_finite,
                                                                       a.cuda_graph, a.callback)
    a.path_arg, a.path = a.path, get_path(a.path)
    a.prediction = check_prediction(a.prediction)
    a.record = get_method(a.method)  # ValueError naming the choices
    if a.backend is not None:
        _dispatch.check_name(a.backend)
    a.guidance = guidance_arguments(a)  # y, cfg, conditions, rule, rescale, thresholding, interval
    a.cache = _caching.get_cache(a.cache)
    if a.eta is not None and (not is_number(a.eta) or not 0 <= a.eta <= 1):  # NaN fails the comparison
        raise ValueError(f"eta must be in [0, 1], got {a.eta!r}")
    a.sigma_fn = sigma_function(a.sigma)
    a.stochastic = callable(a.sigma) or a.sigma > 0
    a.options, a.per_sample_values = per_sample.split(a.record, a.options)  # e.g. s_churn per sample
    check_options(a.record, sigma=a.sigma, eta=a.eta, **a.options)  # e.g. sigma > 0 for heun, eta > 0 for euler
    a.values = a.record.option_values(sigma=a.sigma, eta=a.eta, **a.options)  # the method's defaults where not given
    check_guided_labels(a.guidance.guided, a.guidance.y, a.null_y)
    a.guidance.interval = guidance_interval_pair(a.guidance_interval)
    a.brownian = check_step_noise_kind(a.step_noise)
    a.correcting = langevin_steps("corrector_steps", a.corrector_steps) > 0  # checked here: a tensor has no truth
    return a


def build(a: SimpleNamespace, pooled: bool) -> tuple[Plan | None, SimpleNamespace]:
    """The plan of one call with arguments ``a`` (from :func:`arguments`), or None for an empty batch (then the
    namespace's ``empty`` is the result). ``pooled``: the CPU buffers come from and go back to scratch.POOL."""
    g = a.guidance
    B, shape, device = batch_shape_device(g.y, a.noise, a.init, a.batch_size, a.shape, a.device)
    a.B, a.shape, a.device = B, shape, device
    edit = editing(a.init, a.strength, a.known_mask, a.resample, a.noise, (B, *shape), device)
    a.cuda_graph = check_graph_arguments(a.cuda_graph, device, a.callback, a.step_noise, a.brownian, g.y)
    classifier = None
    if a.classifier is not None:
        classifier = ClassifierGuidance(a.classifier, a.classifier_scale, g.classifier_labels(a.classifier_y),
                                        a.path, a.prediction, device, a.check_finite)
    needed = a.record.needed_conversions(**a.values) + (("score", "x0") if a.correcting else ())
    # a rule's own stage-table transform, guided or not (epsilon_scaling: the prediction's coefficients), or None
    rule_table = getattr(g.rule, "table_transform", lambda path, prediction: None)(a.path, a.prediction)
    grid = strength_grid(time_grid(a.steps, a.timesteps, a.path, a.prediction, needed,
                                   start_late=(classifier is not None and singular_at_zero(a.path, a.prediction))
                                   or getattr(rule_table, "start_late", False),
                                   schedule=a.schedule),
                         a.strength)
    # sigma is evaluated (and checked) here, so that the builder's ValueErrors are the conversions' own
    sigma_at = {t: a.sigma_fn(t) for t in grid[:-1]} if a.stochastic else None
    a.values["sigma"] = tuple(sigma_at.values()) if a.stochastic else None  # hashable; the builders get a function
    check_direction(grid, a.record, a.values, a.step_noise)
    call_grid = grid  # the builder's; a method with steps of its own (dpm_fast) gives the plan's grid
    if a.record.step_grid is not None:
        grid = a.record.step_grid(a.path, grid, **{k: v for k, v in a.values.items() if k in a.record.options})
    # the stage-table transforms, applied to each per-sample setting's table before they merge
    transforms = [t for t in (_guidance.cfg_pp_forms(g),  # CFG++'s own form of a stage, first: it is the method's
                              _corrector.transform(a.corrector_steps, a.snr, a.path, grid, a.prediction),
                              rule_table, classifier)  # the rule's before the classifier's: it scales that term too
                  if t is not None]
    stages, merged, stage_key = stage_tables(a.record, a.path, a.path_arg, a.prediction, call_grid, a.values,
                                             a.per_sample_values, B, sigma_at, transforms)
    check_direction(grid, a.record, a.values, a.step_noise, stages)  # a decreasing grid: inversion, deterministic
    if classifier is not None:
        classifier.bind(merged, B, device)
    if edit is not None:
        edit.check(grid, stages)
    weights = g.stage_weights(stages, B, device, merged)
    seeds = sample_seeds(a.seed, B, device)
    backend = _dispatch.resolve(device, a.backend)  # None: use_backend / FASTDIFF_BACKEND, else auto
    noise = a.noise
    restart = None
    if edit is not None and B and math.prod(shape):  # the initial state: init noised through the path
        if a.cuda_graph:  # a graph reads init and the mask by address: its own copies, refilled per call
            edit.own()
        path, t0 = a.path, grid[0]

        def restart(seeds):  # a reused plan's start for its new seeds (Sampler) or init (a cached graph)
            return edit.start(path, t0, seeds, backend)

        noise = restart(seeds)
    ns = SimpleNamespace(stages=stages, given={"init": a.init, "noise": a.noise}, classifier=classifier, edit=edit,
                         restart=restart)
    if B == 0 or math.prod(shape) == 0:  # nothing to sample: no model call, no kernel
        ns.empty = torch.empty((B, *shape), dtype=torch.float32, device=device)
        return None, ns

    # ---- buffers -----------------------------------------------------------------------------------------
    # A buffer that a guided stage feeds to the model in one batch is the first part of a kept [branches, B, ...]
    # tensor, and every step that writes it writes all parts: the model input needs no torch.cat (a fresh 2B
    # tensor per step: 65 % of the loop's own time, measured on the CPU).
    x_shape = (B, *shape)
    scratch = []

    def new_buffer(buffer_shape: tuple) -> torch.Tensor:
        if not pooled or device.type != "cpu" or a.cuda_graph:
            return torch.empty(buffer_shape, dtype=torch.float32, device=device)
        scratch.append(POOL.take(buffer_shape, device))
        return scratch[-1]

    branches = g.branches
    # (with K > 1 conditions every stage's: outside the guidance interval the K conditions are one batched call)
    paired = {st.input for st in stages if a.cfg_batch and (g.guided_at(st.t) or g.K > 1)}
    pairs = {name: new_buffer((branches, *x_shape)) for name in sorted(paired)}
    buffers = {name: pair[0] for name, pair in pairs.items()}
    if "x" not in buffers:
        buffers["x"] = new_buffer(x_shape)
    for st in stages:
        for name in (st.out, st.side, st.input, *st.history_buffers()):
            if name is not None and name not in buffers:
                buffers[name] = new_buffer(x_shape)
    noise_feature = _step_noise.plan(a.step_noise, a.brownian, stages, grid)  # which stages read the noise buffer
    if noise_feature.needs_buffer:
        buffers["noise"] = new_buffer(x_shape)
        if a.brownian:  # the sums' first kernel call reads it with coefficient 0: it must be finite
            buffers["noise"].zero_()
    if classifier is not None:
        classifier.buffer = buffers[classifier.BUFFER].zero_()
    if a.callback is not None and "x0" not in buffers:
        buffers["x0"] = new_buffer(x_shape)
    labels = labels_of(g, a.null_y, B, device, a.cuda_graph or not pooled)  # refilled: private copies
    beta0 = a.path.coefficients(grid[0])[1]  # scale of the initial noise
    times = ModelTimes(stages, merged, B, device, branches)  # times(k, n): stage k's model times for n samples
    finite = FiniteFlags(len(stages), B, device, a.check_finite, reduce_at_end=a.cuda_graph)
    kernel = _calls.direct_kernel(backend, "sampler_step")

    # The last stage writes the returned samples alone: a guided loop's state is part of a pair, and returning
    # that view would keep the pair alive with the caller. Outside a CUDA graph the initial noise is drawn here
    # and its buffer, read once at the start, receives them (a fresh buffer instead made glibc return and refault
    # 16 MB per call at 2^20 elements: +8 % loop time).
    last = len(stages) - 1
    draw_initial = _calls.initial_noise(seeds, shape, device, backend)
    z = draw_initial() if noise is None and not a.cuda_graph and pooled else None  # a kept plan draws in its write
    x = buffers["x"]
    result = (z if z is not None else torch.empty_like(x)) if stages[last].out == "x" and "x" in pairs else None
    x_outs = list(pairs["x"]) if "x" in pairs else [x]
    native = not a.cuda_graph  # a captured plan calls the op: its replay runs no host code (fastdiff.ops.step_call)
    stage_calls = _calls.StageCalls(buffers, pairs, result, seeds, finite, branches, backend, native)
    thresholds = Thresholds.plan(g.thresholding, stages, merged, a.path, a.prediction, g.rule, weights, device)
    if thresholds is not None:
        thresholds.fuse_clamps(classifier)
    tensor_guide = _tensor_rules.plan(g, stages, merged, a.path, a.prediction, buffers, x_shape)  # or None
    model_calls = ModelCalls(stages, g.guided_at, a.cfg_batch, buffers, pairs, times, B, shape, branches, labels,
                             device, perturbed=(g.perturbed.model, weights.perturbed_at) if g.perturbed else None)
    # step caching (in a captured loop: decided on the device), else model_calls itself
    model_calls = (_cached_graph if a.cuda_graph else _cached_calls).plan(model_calls, a.cache, stages, g, B)
    # CFG++'s side rows on a blend of their own (the unconditional history): their calls, and the stages' without side
    side_calls = _guidance.side_calls(g, stages, weights, stage_calls, merged, thresholds)
    own_sides = side_calls.stages if side_calls else frozenset()
    calls = _build_calls(stage_calls, model_calls, stages, merged, weights, thresholds, noise_feature, g, stage_key,
                         device, own_sides)
    spans = _spans(stages)
    plan = Plan(stages=stages, grid=grid, kernel=kernel, calls=[calls], spans=spans, model_calls=model_calls,
                times=times, x=x, x_outs=x_outs, result=result if result is not None else x, seeds=seeds,
                finite=finite)
    plan.keep += [buffers, pairs, z]
    plan.labels, plan.weights = labels, weights

    # ---- the features at their points ----------------------------------------------------------------------
    start = stages[0].start_churn
    noise_buf = noise.to(device=device, dtype=torch.float32).clone() if (noise is not None and a.cuda_graph) else noise
    start_noise = noise_buf.to(device=device, dtype=torch.float32).contiguous() if start and noise_buf is not None \
        else noise_buf
    start_rows = merged.start_rows(beta0, start_noise is not None, device) if merged and start else None
    noise_calls = noise_feature.kernel_calls(buffers.get("noise"), seeds, (stage_key, weights.key, "brownian"),
                                             backend, native)
    inputs = SimpleNamespace(noise=start_noise, z=z)
    zeros = torch.zeros(x_shape, device=device) if (not pooled or a.cuda_graph) and start is None and noise is None \
        else None
    draw_call = _calls.initial_draw(backend, zeros, seeds, x_outs, beta0, native) if zeros is not None else None
    zeros_preds = [zeros]
    plan.inputs = inputs
    brownian = a.brownian  # hooks hold no reference to ``a`` (so none to the model: a captured loop dies with it)

    def write_start():
        if start is not None:  # x = scale x_0 + c xi_0: the initial state (given or beta0 z) and the draw in one pass
            x_0 = inputs.noise if inputs.noise is not None else inputs.z if inputs.z is not None else draw_initial()
            history = []
            if brownian:  # the churn draw of step 0 from the path: the sum in "noise", read as a history term
                for call in noise_calls[-1]:
                    call([buffers["noise"]])
                history = [buffers["noise"]]
            _calls.churn_write(kernel, x_0, start[0] * (1.0 if inputs.noise is not None else beta0), start,
                               start_rows, seeds, x_outs, history)
        elif inputs.noise is not None:
            for o in x_outs:
                o.copy_(inputs.noise)
        elif inputs.z is not None:
            _calls.initial_write(kernel, seeds, x_outs, beta0, inputs.z)
        else:  # a reused plan: the draw rides in the write
            draw_call(zeros_preds)
        finite.reset()
        weights.reset()

    plan.add("start", write_start)
    if a.cache is not None:
        _cached_calls.add_hooks(plan, model_calls)
    if classifier is not None:
        plan.add("predictions", classifier.hook(plan, buffers))
    if weights.per_sample:
        plan.add("predictions", lambda k, preds: weights.update(k, preds, backend))
    if side_calls is not None:  # after the per-sample weights, before thresholding replaces the predictions
        plan.add("predictions", side_calls)
    if tensor_guide is not None:  # a rule of torch ops: [p_null, p_y] -> [g], before thresholding reads g
        plan.add("predictions", tensor_guide)
    if thresholds is not None:
        plan.add("predictions", thresholds.hook(buffers, weights, classifier))
    if a.callback is not None:
        _callback.plan(plan, a.callback, buffers, weights, classifier, merged, backend)
    if a.correcting:
        plan.add("before_step", _corrector.hook(stages, backend))
    noise_feature.add_hooks(plan, buffers, noise_calls, x)
    if finite.points:  # a table too small for every stage, or a captured loop: reductions during the run
        plan.add("after_stage", finite.after_stage)
    if edit is not None:  # RePaint's repeats after the first draw in the kernel, on the editing streams
        free = None
        if edit.resample > 1 and a.step_noise is not None:
            no_noise = _step_noise.plan(None, False, stages, grid)
            free = _build_calls(stage_calls, model_calls, stages, merged, weights, thresholds, no_noise, g, stage_key,
                                device, own_sides)
        edit.plan(plan, a.path, backend, free)
    plan.keep += [noise_buf, start_rows, noise_calls, zeros]
    ns.scratch, ns.noise_buf, ns.beta0, ns.merged, ns.backend = scratch, noise_buf, beta0, merged, backend
    return plan, ns


def _build_calls(stage_calls, model_calls, stages, merged, weights, thresholds, noise_feature, g, stage_key,
                 device, own_sides=frozenset()) -> list:
    """One prepared kernel call per stage, its rows from ROW_CACHE when nothing in them is per sample; the stages in
    ``own_sides`` write no side (a call of their own does: CFG++'s side blend)."""
    row_key = (stage_key, weights.key, g.interval, noise_feature.key, thresholds.key if thresholds else None)
    cache_rows = merged is None and not weights.per_sample and not (thresholds and thresholds.per_sample)
    stage_rows = _calls.ROW_CACHE.get(row_key) if cache_rows else None
    new_rows = [] if stage_rows is None and cache_rows else None
    last = len(stages) - 1
    calls = []
    for k, st in enumerate(stages):
        one_pred = thresholds is not None and thresholds.at(k)  # the kernel gets the thresholded blend alone
        # or a tensor rule's guided prediction (fastdiff.sampling.features.tensor_rules)
        one_pred = one_pred or (_tensor_rules.is_tensor_rule(g.rule) and g.guided_at(st.t))
        two_branch = weights.branched(k) and not one_pred  # guided (or a perturbed branch: features/perturbed.py)
        host_noise = noise_feature.reads_buffer(k)
        history = st.history_buffers() + (("noise",) if host_noise else ())
        n_preds = weights.n_preds(k) if two_branch else 1 if one_pred else weights.K  # K: the conditions alone
        tensors = stage_calls.tensors(st, n_preds, history, k == last, side=k not in own_sides)
        parts = model_calls.parts(k, n_preds)
        if stage_rows is not None:
            calls.append(stage_calls.call(k, tensors, None, None, None, stage_rows[k], parts))
            continue
        stage_weights = weights.row(k, two_branch) if not one_pred else None
        if merged is not None:  # per-sample rows (churn per sample)
            rows, streams = merged.rows(k, host_noise, device), [] if host_noise else st.streams()
        elif host_noise:
            rows, streams = st.host_noise_rows(), []
        else:
            rows, streams = st.kernel_rows(), st.streams()
        clip = None
        if thresholds is not None and k in thresholds.clips:  # the clamp in the kernel (static clipping)
            rows, clip = thresholds.rows_with_x0(k, rows), thresholds.clips[k][0]
        calls.append(stage_calls.call(k, tensors, stage_weights, rows, streams, None, parts, clip))
        if new_rows is not None:
            new_rows.append(_calls.cached_rows(calls[-1]))
    if new_rows is not None:
        _calls.ROW_CACHE.put(row_key, new_rows)
    return calls


def _spans(stages) -> list[tuple[int, int]]:
    finals = [k for k, st in enumerate(stages) if st.final]
    return list(zip([0] + [k + 1 for k in finals[:-1]], [k + 1 for k in finals]))
