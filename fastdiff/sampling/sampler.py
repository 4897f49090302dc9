"""``fastdiff.sample``: a drop-in sampler for any ``model(x, t, y)``; one fused kernel per stage."""

from __future__ import annotations

import math
import operator

import torch

from fastdiff import dispatch as _dispatch
from fastdiff.ops.sampler_step import KERNEL_ARGS, ROW_ARGS, prepare, prepare_tensors, with_rows
from fastdiff.ops.randn import randn
from fastdiff.paths import check_prediction, get_path
from fastdiff.sampling.core import graphs
from fastdiff.sampling.features import per_sample
from fastdiff.sampling.features.guidance import StageWeights, condition_branches, guidance_settings, scale_schedule
from fastdiff.sampling.features.thresholding import threshold_conversions
from fastdiff.sampling.features.classifier import BUFFER as CLASSIFIER_BUFFER, ClassifierGuidance, singular_at_zero
from fastdiff.sampling.features.editing import check_direction, editing, strength_grid
from fastdiff.sampling.features.brownian import kernel_calls as brownian_kernel_calls
from fastdiff.sampling.core.arguments import (MAX_STEPS, T_MIN_SINGULAR, batch_shape_device,  # noqa: F401
                                         FiniteFlags, check_guided_labels, check_step_noise, check_step_noise_kind,
                                         batched_labels, guidance_interval_pair, is_number, loop_flags, null_labels,
                                         sample_seeds, sigma_function, time_grid)
from fastdiff.sampling.core.stage import Stage, draw_stream
from fastdiff.sampling.core.tables import STAGE_CACHE, ModelTimes, stage_tables
from fastdiff.sampling.core.model_calls import ModelCalls
from fastdiff.sampling.core.scratch import POOL, StageCache
from fastdiff.sampling.methods import check_options, get_method
from fastdiff.sampling.features.corrector import corrector_args, correctors
from fastdiff.sampling.core.arguments import langevin_steps


_STAGE_CACHE = STAGE_CACHE  # stage tables (fastdiff.sampling.core.tables)
_kernel_args = operator.itemgetter(*KERNEL_ARGS)  # a prepared call's dict → the kernel's positional arguments
# Per stage, the checked coefficient rows of its sampler_step call (with_rows' host half: weights,
# coefficients, streams), keyed by the stage table and the guidance: ~30 us of checks per stage.
_ROW_CACHE = StageCache()


@torch.no_grad()  # a sampler never backpropagates: model calls keep no activations for backward
def sample(model, steps: int | None = 50, cfg: float = 1.0, *, shape=None, y=None, null_y=None, seed=0,
           noise: torch.Tensor | None = None, path="condot", prediction: str = "velocity", method: str = "euler",
           sigma=0.0, eta: float | None = None, timesteps=None, guidance_interval=None, cfg_batch: bool = True,
           batch_size: int | None = None, backend: str | None = None, progress: bool = False, callback=None,
           device=None, check_finite: bool = True, cuda_graph: bool = False, step_noise=None,
           guidance=None, guidance_rescale: float = 0.0, conditions=None, dynamic_thresholding=None,
           classifier=None, classifier_scale=1.0, init=None, strength=None, known_mask=None, resample: int = 1,
           corrector_steps: int = 0, snr: float = 0.16, **options) -> torch.Tensor:
    """Sample ``[B, *shape]`` from ``model(x, t, y)`` by integrating from t = 0 (noise) to t = 1 (data).

    Args:
        model: callable ``model(x, t, y)`` → prediction of type ``prediction`` (same shape as x); t is
            a float32 tensor [B] in flow time.
        steps: number of steps (grid of steps + 1 times, uniform in t unless ``timesteps`` is given).
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
        prediction: what the model returns: "velocity", "eps", "score" or "x0".
        method: "euler" (ODE; Euler–Maruyama when sigma > 0), "heun", "ddim" (with ``eta``), "dpmpp_2m",
            or any method registered with fastdiff.sampling.register_method (``fastdiff.sampling.METHODS``).
        sigma: diffusion coefficient (float or callable t → sigma_t) of the SDE (methods that take it: euler).
        eta: the noise fraction in [0, 1] of the methods that take it (ddim: default 0, deterministic).
        **options: further options of the chosen method (fastdiff.sampling.methods(); docs/sampling.md);
            EDM's churn options (s_churn, s_tmin, s_tmax, s_noise of euler, heun, dpm_2) also per sample, as
            a list or 1-D tensor of B values (per-sample model times and coefficient rows).
        timesteps: explicit increasing grid in [0, 1] (steps + 1 times); a decreasing one integrates from data
            to noise (inversion: fastdiff.invert) with a deterministic method registered with inverts=True.
        guidance_interval: (t_lo, t_hi): guidance only for t_lo <= t <= t_hi, one pass elsewhere.
        guidance: the guidance rule: None or "cfg" (g = p_null + w (p_y - p_null)), "cfg_zero_star" (CFG-Zero*:
            the unconditional branch scaled by its per-sample optimal factor, zero prediction at the first
            step), or a rule object of fastdiff.sampling.features.guidance (e.g. CFGZeroStar(zero_init_steps=2)).
        guidance_rescale: CFG rescale phi in [0, 1] (diffusers' guidance_rescale; Lin et al. 2024): the blend
            is scaled toward the conditional prediction's standard deviation per sample, fused (one
            per-sample reduction pass per guided evaluation, no host sync; fastdiff.sampling.features.guidance).
        classifier, classifier_scale: classifier guidance: ``classifier(x, t)`` → logits [B, classes] of a
            noise-aware classifier; the score gets classifier_scale · ∇_x log softmax(logits)[y] (autograd, one
            forward and backward per evaluation), fused into the step (fastdiff.sampling.features.classifier). y holds
            the target classes (an unconditional model ignores it); the scale may be a callable of t.
        init, strength, known_mask, resample: editing (fastdiff.sampling.features.editing; docs/guidance.md). ``init``
            [B, *shape]: the data to start from. ``strength`` in (0, 1] (img2img / SDEdit): run the grid's last
            int(steps * strength) steps from init noised to their start. ``known_mask`` (bool, broadcast to the
            samples; true = known): inpainting, the known region re-imposed from init at each step's end time;
            ``resample`` = r > 1 repeats each step r times (RePaint) so the rest agrees with it.
        corrector_steps, snr: predictor-corrector sampling (score_sde): before each step, corrector_steps
            Langevin steps at its start time, each sample's step size 2 (snr ‖ξ‖ / ‖score‖)² (docs/score_based.md).
        dynamic_thresholding: Imagen's dynamic thresholding of each evaluation's x0 estimate (diffusers'
            thresholding=True): True (ratio 0.995, max_value 1), a ratio, or a DynamicThresholding.
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
    # ---- arguments ---------------------------------------------------------------------------------
    cfg_batch, progress, check_finite, cuda_graph = loop_flags(model, cfg_batch, progress, check_finite, cuda_graph,
                                                               callback)
    path_arg, path = path, get_path(path)
    prediction = check_prediction(prediction)
    method_record = get_method(method)  # ValueError naming the choices
    if backend is not None:
        _dispatch.check_name(backend)
    y, cfg, multi = condition_branches(y, conditions, cfg)  # multi: several conditions' (labels, weights)
    cfg_at, guided = scale_schedule(cfg)  # t -> w (a number, or a schedule), and whether guidance applies
    rescale, rule, thresholding = guidance_settings(guidance, guidance_rescale, dynamic_thresholding, guided, multi,
                                                    guidance_interval, cuda_graph, classifier)
    branches = 1 + (len(multi[0]) if multi else 1)  # model branches of a guided evaluation (null first)
    if eta is not None and (not is_number(eta) or not 0 <= eta <= 1):  # NaN fails the comparison
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    sigma_fn = sigma_function(sigma)
    stochastic = callable(sigma) or sigma > 0
    options, per_sample_values = per_sample.split(method_record, options)  # e.g. s_churn per sample
    check_options(method_record, sigma=sigma, eta=eta, **options)  # e.g. sigma > 0 for heun, eta > 0 for euler
    values = method_record.option_values(sigma=sigma, eta=eta, **options)  # the method's defaults where not given
    check_guided_labels(guided, y, null_y)
    guidance_interval = guidance_interval_pair(guidance_interval)

    B, shape, device = batch_shape_device(y, noise, init, batch_size, shape, device)
    brownian = check_step_noise_kind(step_noise)
    edit = editing(init, strength, known_mask, resample, noise, (B, *shape), device)
    cuda_graph = graphs.check_arguments(cuda_graph, device, callback, step_noise, brownian, y)
    if classifier is not None:
        classifier = ClassifierGuidance(classifier, classifier_scale, y, path, prediction, per_sample_values, device,
                                        check_finite)
    correcting = langevin_steps("corrector_steps", corrector_steps) > 0  # checked here: a tensor has no truth
    needed = method_record.needed_conversions(**values) + (("score", "x0") if correcting else ())
    grid = strength_grid(time_grid(steps, timesteps, path, prediction, needed,
                                   start_late=classifier is not None and singular_at_zero(path, prediction)),
                         strength)
    # sigma is evaluated (and checked) here, so that the builder's ValueErrors are the conversions' own
    sigma_at = {t: sigma_fn(t) for t in grid[:-1]} if stochastic else None
    values["sigma"] = tuple(sigma_at.values()) if stochastic else None  # hashable; the builders get a function
    check_direction(grid, method_record, values, step_noise)
    # per-sample options (churn): one table per distinct setting, merged into per-sample rows and times
    stages, merged, stage_key = stage_tables(method_record, path, path_arg, prediction, grid, values,
                                             per_sample_values, B, sigma_at)
    stages, stage_key = correctors(stages, stage_key, corrector_steps, snr, path, grid, prediction, per_sample=merged,
                                   classifier=classifier, step_noise=step_noise)
    if classifier is not None:  # its gradient as one more history term of every stage
        stages, stage_key = classifier.transform(stages), (stage_key, classifier.key)
    check_direction(grid, method_record, values, step_noise, stages)  # a decreasing grid: inversion, deterministic
    if edit is not None:
        edit.check(grid, stages, step_noise, merged, cuda_graph)
    # each stage's branch weights: its guidance scale, the rule's zero steps, per-sample weights (rescale, rules)
    scales = [multi[1] if multi else cfg_at(st.t) for st in stages]
    step_scales = [rule.stage_scale(w, st) for w, st in zip(scales, stages)] if guided and rule.name == "cfg_pp" \
        else scales  # CFG++: the blend's weight times the share through the clean estimate
    weights = StageWeights(rule, rescale, step_scales,
                           [st.step < rule.zero_init_steps for st in stages], guided, B, device, x0_scales=scales)
    seeds = sample_seeds(seed, B, device)
    step_backend = _dispatch.resolve(device, backend)  # None: use_backend / FASTDIFF_BACKEND, else auto
    if edit is not None and B and math.prod(shape):  # the initial state: init noised through the path
        noise = edit.start(path, grid[0], seeds, step_backend)
    if B == 0 or math.prod(shape) == 0:  # nothing to sample: no model call, no kernel
        return torch.empty((B, *shape), dtype=torch.float32, device=device)

    def in_interval(t: float) -> bool:
        return guidance_interval is None or guidance_interval[0] <= t <= guidance_interval[1]

    # ---- buffers -----------------------------------------------------------------------------------
    # A buffer that a guided stage feeds to the model in one batch of 2B is the first half of a kept
    # [2, B, ...] pair, and every step that writes it writes both halves: the model input needs no
    # torch.cat (a fresh 2B tensor per step: 65 % of the loop's own time, measured on the CPU).
    x_shape = (B, *shape)
    scratch = []  # this call's buffers; on the CPU they come from and go back to scratch.POOL

    def new_buffer(buffer_shape: tuple) -> torch.Tensor:
        if device.type != "cpu" or cuda_graph:
            return torch.empty(buffer_shape, dtype=torch.float32, device=device)
        scratch.append(POOL.take(buffer_shape, device))
        return scratch[-1]

    paired = {st.input for st in stages if cfg_batch and guided and in_interval(st.t)}
    pairs = {name: new_buffer((branches, *x_shape)) for name in sorted(paired)}
    buffers = {name: pair[0] for name, pair in pairs.items()}
    if "x" not in buffers:
        buffers["x"] = new_buffer(x_shape)
    x = buffers["x"]
    for st in stages:
        for name in (st.out, st.side, st.input, *st.history_buffers()):
            if name is not None and name not in buffers:
                buffers[name] = new_buffer(x_shape)
    # The caller's noise (step_noise): stage k reads it from one kept buffer as a last history term;
    # host_noise[k] = j, the stage's index among the noisy stages of its step (None: no noise)
    host_noise = [None] * len(stages)
    start = stages[0].start_churn
    if step_noise is not None:
        noisy_in_step = {}
        for k, st in enumerate(stages):
            if st.streams():
                host_noise[k] = noisy_in_step[st.step] = noisy_in_step.get(st.step, -1) + 1
        if any(j is not None for j in host_noise) or (brownian and start is not None):
            buffers["noise"] = new_buffer(x_shape)
            if brownian:  # the sums' first kernel call reads it with coefficient 0: it must be finite
                buffers["noise"].zero_()
    if classifier is not None:
        classifier.buffer = buffers[CLASSIFIER_BUFFER].zero_()
    if callback is not None and "x0" not in buffers:
        buffers["x0"] = new_buffer(x_shape)
    if isinstance(y, torch.Tensor) and y.device != device:
        y = y.to(device)
    null = null_labels(null_y, y, B) if guided else None
    if cuda_graph:  # the capture reads these tensors; later calls refill private copies, never the caller's
        y = y.clone() if isinstance(y, torch.Tensor) else y
        null = null.clone() if isinstance(null, torch.Tensor) else null
    # the conditions (y, or several) and, for one batched call, all of them then the null labels
    conds, y2 = batched_labels(multi[0] if multi else [y], null, device, guided and cfg_batch)
    beta0 = path.coefficients(grid[0])[1]  # scale of the initial noise

    t_tensor = ModelTimes(stages, merged, B, device, branches)  # t_tensor(k, n): stage k's model times for n samples

    # inf/NaN predictions are flagged by the step itself, reduced on the device, read once after the loop
    finite = FiniteFlags(len(stages), B, device, check_finite)

    # One sampler_step call per stage, its arguments checked once here (fastdiff.ops.sampler_step);
    # each step only adds the model's predictions and calls the backend's kernel.
    step_kernel = _dispatch.kernel(step_backend, "sampler_step")

    # The last stage writes the returned samples alone: a guided loop's state is half of a pair, and
    # returning that view would keep the 2B buffer alive with the caller. Outside a CUDA graph the
    # initial noise is drawn here and its buffer, read once at the start, receives them (a fresh
    # buffer instead made glibc return and refault 16 MB per call at 2^20 elements: +8 % loop time).
    last = len(stages) - 1
    z = randn(seeds, 0, shape, device=device, backend=step_backend) if noise is None and not cuda_graph else None
    if stages[last].out == "x" and "x" in pairs:
        result = z if z is not None else torch.empty_like(x)
    else:
        result = x
    checked = {}  # the tensor half of a call, checked once per distinct set of buffers
    row_key = (stage_key, weights.key, guidance_interval, step_noise is not None, brownian, thresholding)
    cache_rows = merged is None and not weights.per_sample  # per-sample rows and weights are this call's tensors
    stage_rows = _ROW_CACHE.get(row_key) if cache_rows else None
    new_rows = [] if stage_rows is None and cache_rows else None

    def stage_call(k: int, st: Stage, two_branch: bool) -> tuple:
        # a thresholded stage's kernel gets one prediction: the blend whose x0 is the thresholded one
        two_branch = two_branch and thresholds[k] is None
        stage_weights = weights.row(k, two_branch) if thresholds[k] is None else None
        history = st.history_buffers() + (("noise",) if host_noise[k] is not None else ())
        outs = ("result",) if k == last and result is not x else (st.out,)
        key = (st.input, two_branch, history, outs, st.side)
        if key not in checked:
            out_tensors = [result] if outs == ("result",) else list(pairs[st.out]) if st.out in pairs else \
                [buffers[st.out]]
            checked[key] = prepare_tensors(
                buffers[st.input], [buffers[st.input]] * (branches + weights.extra if two_branch else 1), [buffers[h] for h in history],
                seeds, out_tensors, buffers[st.side] if st.side else None, finite.row(0))
        if stage_rows is not None:
            call = dict(checked[key], **stage_rows[k])
        elif merged is not None:  # per-sample rows (churn per sample)
            call = with_rows(checked[key], stage_weights, merged.rows(k, host_noise[k] is not None, device),
                             [] if host_noise[k] is not None else st.streams())
        else:
            if host_noise[k] is not None:
                call = with_rows(checked[key], stage_weights, st.host_noise_rows(), [])
            else:
                call = with_rows(checked[key], stage_weights, st.kernel_rows(), st.streams())
            if new_rows is not None:
                new_rows.append({name: call[name] for name in ROW_ARGS})
        if check_finite:  # the stage's own row of the table (rows are alike: checked with row 0)
            call["finite"] = finite.row(k)
        return _kernel_args(call)  # the kernel's positional arguments

    thresholds = threshold_conversions(stages, path, prediction, thresholding, merged)
    calls = [stage_call(k, st, guided and in_interval(st.t)) for k, st in enumerate(stages)]
    if new_rows is not None:
        _ROW_CACHE.put(row_key, new_rows)
    # step_noise="brownian": per noisy stage, the kernel calls that sum its Brownian draws into "noise"
    noise_calls = brownian_kernel_calls(stages, host_noise, grid, buffers.get("noise"), seeds, _ROW_CACHE,
                                        (row_key, "brownian")) if brownian else None

    plans = ModelCalls(stages, lambda t: guided and in_interval(t), cfg_batch, buffers, pairs, t_tensor, B, shape,
                       branches, (y, y2, conds, null), device)

    noise_buf = noise.to(device=device, dtype=torch.float32).clone() if (noise is not None and cuda_graph) else noise

    x_outs = list(pairs["x"]) if "x" in pairs else [x]  # the state and its guidance twin

    # EDM churn at the first step (Stage.start_churn): the initial state is scaled and noised in its write
    start_noise = noise_buf.to(device=device, dtype=torch.float32).contiguous() if start and noise_buf is not None \
        else noise_buf

    # per-sample churn at the first step: a [B, 6] tensor of rows, made before any capture
    start_rows = merged.start_rows(beta0, start_noise is not None, device) if merged and start else None

    def run_loop(bar=None):
        if start is not None:  # x = scale x_0 + c xi_0: the initial state (given or beta0 z) and the draw in one pass
            x_0 = start_noise if start_noise is not None else \
                z if z is not None else randn(seeds, 0, shape, device=device, backend=step_backend)
            c_0 = start[0] * (1.0 if start_noise is not None else beta0)
            start_row = [c_0, 0.0, start[1], 0.0, 0.0, 0.0] if start_rows is None else start_rows
            if brownian:  # the churn draw of step 0 from the path: the sum in "noise", read as a history term
                for args in noise_calls[-1]:
                    step_kernel(*args)
                history, streams = [buffers["noise"]], []
            else:
                history, streams = [], [draw_stream(0)]
            step_kernel(*_kernel_args(prepare(x_0, [x_0], [1.0], history, start_row, seeds, streams, x_outs, None, None)))
        elif noise_buf is not None:
            for o in x_outs:
                o.copy_(noise_buf)
        else:  # beta0 z into the state and its twin in one pass: out = beta0 z + 0 g
            z0 = z if z is not None else randn(seeds, 0, shape, device=device, backend=step_backend)
            step_kernel(z0, [z0], [], seeds, [], [1.0], [beta0, 0.0, 0.0, 0.0], None, None, x_outs, None, None)
        finite.reset()
        weights.reset()
        for first, end in spans:  # the stages of each step (RePaint: repeated, the editing after each)
            for repeat, step_calls in enumerate(repeat_calls):
                for k in range(first, end):
                    run_stage(k, stages[k], step_calls[k])
                if edit is not None:
                    i = stages[end - 1].step
                    edit.after_step(i, repeat, grid[i], grid[i + 1], path, seeds, result if end - 1 == last else x,
                                    x_outs, step_backend)
            if callback is not None:
                callback(stages[end - 1].step, grid[stages[end - 1].step + 1], result if end - 1 == last else x,
                         buffers["x0"])
                if end - 1 != last:  # the callback may edit x in place (k-diffusion's contract): into its twins too
                    for twin in x_outs[1:]:
                        twin.copy_(x)
            if bar is not None:
                bar.update(1)

    def run_stage(k: int, st: Stage, args: tuple) -> None:
        preds = plans.evaluate(model, k, st)
        if classifier is not None:  # ∇ log p(y | x) of the stage's input, read by the step as history
            classifier.fill(k, buffers[st.input], t_tensor(k, B))
        preds = weights.update(k, preds, step_backend)  # rescale, rules: a reduction pass, the weights on the device
        if thresholds[k] is not None:  # dynamic thresholding: the prediction whose x0 is thresholded
            preds = [thresholding.prediction(thresholds[k], buffers[st.input], weights.blend(k, preds))]
        if callback is not None and st.input == "x":  # the step's x0, before the state is overwritten
            weights.x0_into(buffers["x0"], buffers["x"], preds, k, st, merged, step_backend)
            if classifier is not None:
                classifier.x0_add(buffers["x0"], k, st)
        if st.corrector is not None:  # Langevin corrector: its per-sample rows from a reduction pass
            args = corrector_args(args, preds, st, step_backend)
        if noise_calls is not None:
            for noise_args in noise_calls[k]:
                step_kernel(*noise_args)
        elif host_noise[k] is not None:
            buffers["noise"].copy_(check_step_noise(step_noise(st.step, host_noise[k]), x, st))
        step_kernel(args[0], preds, *args[2:])
        finite.after(k, last)

    finals = [k for k, st in enumerate(stages) if st.final]
    spans = list(zip([0] + [k + 1 for k in finals[:-1]], [k + 1 for k in finals]))
    repeat_calls = edit.repeat_calls(calls, stages, edit.resample) if edit is not None else [calls]

    first_bad = finite.first_bad
    if cuda_graph:
        labels = tuple(graphs.label_signature(v) for v in (y, null, y2))
        key = graphs.key(model, stages=stages, beta0=beta0, batch=B, shape=shape, device=device, cfg=weights.key,
                         cfg_batch=cfg_batch, guidance_interval=guidance_interval, backend=step_backend,
                         noise_given=noise is not None, check_finite=check_finite, labels=labels, brownian=brownian,
                         per_sample=merged.key if merged else None)
        entry = graphs.CACHE.get(key, model)
        if entry is None:
            graph = graphs.CAPTURE.capture(run_loop, device)
            # The entry owns every tensor made outside the capture that the graph reads or writes.
            entry = graphs.CACHE.put(key, model, graphs.CapturedLoop(
                graph=graph, statics=dict(seeds=seeds, noise=noise_buf, y=y, null=null, y2=y2), x=result,
                first_bad=finite.first_bad, stages=stages,
                keepalive=(buffers, pairs, result, x_outs, calls, plans, t_tensor, seeds, noise_buf, y, null, y2,
                           finite, weights, start_rows, noise_calls)))
        else:
            graphs.refill(entry, seeds=seeds, noise=noise, y=y, null=null, y2=y2)
        entry.first_bad.fill_(-1)
        graphs.CAPTURE.replay(entry.graph, device)
        result, first_bad, stages = entry.x.clone(), entry.first_bad, entry.stages
    elif progress:
        from tqdm.auto import tqdm

        with tqdm(total=len(grid) - 1, desc=f"fastdiff {method}", unit="step") as bar:
            run_loop(bar)
    else:
        run_loop()
    returned = result.untyped_storage().data_ptr()
    POOL.give(t for t in scratch if t.untyped_storage().data_ptr() != returned)
    if check_finite:  # the one synchronization, after the loop (classifier guidance: two)
        if classifier is not None:
            classifier.raise_first_bad(first_bad, stages)
        finite.raise_first_bad(first_bad, stages, {"init": init, "noise": noise}, step_noise)  # init made noise
    return result
