"""``fastdiff.sample``: a drop-in sampler for any ``model(x, t, y)``; one fused kernel per stage."""

from __future__ import annotations

import math
import warnings

import torch

from fastdiff import _checks
from fastdiff import dispatch as _dispatch
from fastdiff.ops.guided_step import guided_step
from fastdiff.ops.randn import randn
from fastdiff.paths import check_prediction, get_path
from fastdiff.sampling import graphs
from fastdiff.sampling.arguments import (MAX_STEPS, T_MIN_SINGULAR, batch_size_of, check_model_output,  # noqa: F401
                                         concat_labels, guidance_interval_pair, is_number, null_labels, sample_seeds,
                                         sigma_function, time_grid)
from fastdiff.sampling.coefficients import Stage
from fastdiff.sampling.methods import check_options, get_method


def _refill(entry: graphs.CapturedLoop, **values):
    """Copy this call's inputs into the tensors a captured loop reads."""
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            entry.statics[name].copy_(value)


@torch.no_grad()  # a sampler never backpropagates: model calls keep no activations for backward
def sample(model, steps: int | None = 50, cfg: float = 1.0, *, shape=None, y=None, null_y=None, seed=0,
           noise: torch.Tensor | None = None, path="condot", prediction: str = "velocity", method: str = "euler",
           sigma=0.0, eta: float = 0.0, timesteps=None, guidance_interval=None, cfg_batch: bool = True,
           batch_size: int | None = None, backend: str = "auto", progress: bool = False, callback=None,
           device=None, check_finite: bool = True, cuda_graph: bool = False) -> torch.Tensor:
    """Sample ``[B, *shape]`` from ``model(x, t, y)`` by integrating from t = 0 (noise) to t = 1 (data).

    Args:
        model: callable ``model(x, t, y)`` → prediction of type ``prediction`` (same shape as x); t is
            a float32 tensor [B] in flow time.
        steps: number of steps (grid of steps + 1 times, uniform in t unless ``timesteps`` is given).
        cfg: classifier-free guidance scale w: p = p_null + w (p_y - p_null); 1 means one pass.
        shape: per-sample shape (taken from ``noise`` when given).
        y, null_y: conditioning batch and the unconditional label (required when cfg != 1).
        seed: int (sample b uses seed + b) or per-sample seeds (sequence or int64 tensor).
        noise: explicit initial state [B, *shape] at the first grid point.
        path: "condot", "vp", "vp-cosine" or a fastdiff.paths.GaussianPath.
        prediction: what the model returns: "velocity", "eps", "score" or "x0".
        method: "euler" (ODE; Euler–Maruyama when sigma > 0), "heun", "ddim" (with ``eta``), "dpmpp_2m",
            or any method registered with fastdiff.sampling.register_method (``fastdiff.sampling.METHODS``).
        sigma: diffusion coefficient (float or callable t → sigma_t) of the SDE (methods that take it: euler).
        eta: DDIM's noise fraction in [0, 1] (methods that take it: ddim).
        timesteps: explicit increasing grid in [0, 1] (steps + 1 times).
        guidance_interval: (t_lo, t_hi): guidance only for t_lo <= t <= t_hi, one pass elsewhere.
        cfg_batch: run conditional and unconditional inputs as one batch of 2B (default) or two calls.
        backend: "auto", "cuda", "triton", "cpu" or "reference" for the fused step.
        progress: show a tqdm progress bar.
        callback: ``callback(step, t, x, x0)`` after each step (x = the new state, x0 = the model's
            x0 prediction at that step's first evaluation); the tensors are reused buffers.
        check_finite: fail with the step and t if the model returns inf/NaN (checked on the device,
            read once at the end).
        cuda_graph: capture the model and the loop in a CUDA graph (CUDA tensors only). Later calls
            with the same model object and settings replay it (seeds, noise and labels are refilled).
            Up to 4 loops stay cached with everything they read; fastdiff.clear_cuda_graphs()
            frees them, and a model's loops are dropped when the model is garbage-collected. The
            model's parameters must stay where they are (in-place updates are seen; ``.to()`` or
            reassigned parameters need clear_cuda_graphs()).

    Runs under torch.no_grad().
    """
    # ---- arguments ---------------------------------------------------------------------------------
    path = get_path(path)
    prediction = check_prediction(prediction)
    method_record = get_method(method)  # ValueError naming the choices
    _dispatch.check_name(backend)
    if not is_number(cfg) or not math.isfinite(cfg):
        raise ValueError(f"cfg must be a finite number, got {cfg!r}")
    if not is_number(eta) or not 0 <= eta <= 1:  # NaN fails the comparison
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    sigma_fn = sigma_function(sigma)
    stochastic = callable(sigma) or sigma > 0
    check_options(method_record, sigma=sigma, eta=eta)  # e.g. sigma > 0 for heun, eta > 0 for euler
    guided = cfg != 1.0
    if guided and null_y is None:
        raise ValueError("cfg != 1 needs null_y, the label of the unconditional branch")
    if guided and y is None:
        raise ValueError("cfg != 1 needs y, the conditioning of the conditional branch")
    guidance_interval = guidance_interval_pair(guidance_interval)

    B = batch_size_of(y, noise, batch_size)
    if noise is not None:
        if shape is not None and tuple(noise.shape[1:]) != tuple(_checks.shape_tuple(shape)):
            raise ValueError(f"noise has per-sample shape {tuple(noise.shape[1:])} but shape={tuple(shape)}")
        shape = tuple(noise.shape[1:])
        device = noise.device if device is None else torch.device(device)
    if shape is None:
        raise ValueError("shape (the per-sample shape) is required unless noise is given")
    shape = _checks.shape_tuple(shape)
    if device is None:
        device = y.device if isinstance(y, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if cuda_graph and not graphs.CAPTURE.supports(device):
        warnings.warn("cuda_graph=True needs CUDA tensors; running the loop without a graph", RuntimeWarning,
                      stacklevel=3)
        cuda_graph = False

    if cuda_graph and callback is not None:
        raise ValueError("cuda_graph=True cannot call a Python callback inside the captured loop; pass callback=None")
    if cuda_graph and y is not None and not isinstance(y, torch.Tensor):
        raise TypeError("cuda_graph=True needs y as a tensor (its values are refilled between replays)")
    grid = time_grid(steps, timesteps, path, prediction, method_record.needed_conversions(sigma=sigma, eta=eta))
    # sigma is evaluated (and checked) here, so that the builder's ValueErrors are the conversions' own
    sigma_at = {t: sigma_fn(t) for t in grid[:-1]} if stochastic else None
    try:
        options = dict(sigma=sigma_at.__getitem__ if stochastic else None, eta=eta)  # the builders' forms
        stages = method_record.stages(path, grid, prediction,
                                      **{k: v for k, v in options.items() if k in method_record.options})
    except ValueError as exc:
        raise ValueError(f"{exc} (method={method!r}, prediction={prediction!r}, path={path!r}); "
                         "start the grid after the singular point") from None
    seeds = sample_seeds(seed, B, device)
    with _dispatch.use_backend(backend):
        step_backend = _dispatch.resolve(device)
    if B == 0 or math.prod(shape) == 0:  # nothing to sample: no model call, no kernel
        return torch.empty((B, *shape), dtype=torch.float32, device=device)

    # ---- buffers -----------------------------------------------------------------------------------
    x = torch.empty((B, *shape), dtype=torch.float32, device=device)
    buffers = {"x": x}
    for st in stages:
        for name in (st.out, st.side, st.extra, st.input):
            if name is not None and name not in buffers:
                buffers[name] = torch.empty_like(x)
    if callback is not None and "x0" not in buffers:
        buffers["x0"] = torch.empty_like(x)
    if isinstance(y, torch.Tensor) and y.device != device:
        y = y.to(device)
    null = null_labels(null_y, y, B) if guided else None
    if cuda_graph:  # the capture reads these tensors; later calls refill private copies, never the caller's
        y = y.clone() if isinstance(y, torch.Tensor) else y
        null = null.clone() if isinstance(null, torch.Tensor) else null
    y2 = concat_labels(y, null) if guided and cfg_batch else None
    x_shape = (B, *shape)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first stage with inf/NaN output

    def in_interval(t: float) -> bool:
        return guidance_interval is None or guidance_interval[0] <= t <= guidance_interval[1]

    beta0 = path.coefficients(grid[0])[1]  # scale of the initial noise

    t_values = {}  # [n] time tensors, made once per distinct stage time

    def t_tensor(t: float, n: int) -> torch.Tensor:
        if (t, n) not in t_values:
            t_values[(t, n)] = torch.full((n,), t, dtype=torch.float32, device=device)
        return t_values[(t, n)]

    def track_finite(k: int, *outs):
        # On the device, no host sync inside the loop (read once after it). min/max propagate NaN and
        # ±inf, so one aminmax pass decides: 15x cheaper on the CPU than isfinite(o).all(), which
        # took 42 % of a 50-step loop with a cheap model (measured, 2^20 elements).
        ok = torch.isfinite(torch.stack([v.float() for o in outs for v in torch.aminmax(o)])).all()
        first_bad.masked_fill_(~ok & (first_bad < 0), k)

    def evaluate(k: int, st: Stage):
        """(pred, pred_uncond or None) at the stage's input and time."""
        xin = buffers[st.input]
        checked = None  # the tensor(s) the finiteness check reads: the 2B output in one pass
        if not (guided and in_interval(st.t)):
            outs = [model(xin, t_tensor(st.t, B), y)]
            check_model_output(outs[0], x_shape, device, st)
        elif cfg_batch:
            both = model(torch.cat([xin, xin]), t_tensor(st.t, 2 * B), y2)
            check_model_output(both, (2 * B, *shape), device, st)
            both = both.contiguous()
            outs = [both[:B], both[B:]]  # views of one contiguous output: no copy
            checked = [both]
        else:
            outs = [model(xin, t_tensor(st.t, B), y), model(xin, t_tensor(st.t, B), null)]
            for o in outs:
                check_model_output(o, x_shape, device, st)
        if check_finite:
            track_finite(k, *(checked or outs))
        outs = [o.contiguous() for o in outs]
        return outs[0], outs[1] if len(outs) == 2 else None

    noise_buf = noise.to(device=device, dtype=torch.float32).clone() if (noise is not None and cuda_graph) else noise

    def run_loop(bar=None):
        if noise_buf is not None:
            x.copy_(noise_buf)
        else:
            torch.mul(randn(seeds, 0, shape, device=device, backend=step_backend), beta0, out=x)
        for k, st in enumerate(stages):
            pred, pred_uncond = evaluate(k, st)
            w = cfg if pred_uncond is not None else 1.0
            xin = buffers[st.input]
            if callback is not None and st.input == "x":
                # x0 of the step's first evaluation, before the state buffer is overwritten
                guided_step(xin, pred, pred_uncond, cfg=w, c_x=st.x0[0], c_pred=st.x0[1], out=buffers["x0"],
                            backend=step_backend)
            guided_step(xin, pred, pred_uncond, cfg=w, extra=buffers[st.extra] if st.extra else None,
                        seeds=seeds, stream=st.stream, c_x=st.c_x, c_pred=st.c_pred, c_extra=st.c_extra,
                        c_noise=st.c_noise, s_x=st.s_x, s_pred=st.s_pred, s_extra=st.s_extra,
                        out=buffers[st.out], side=buffers[st.side] if st.side else None, backend=step_backend)
            if st.final:
                if callback is not None:
                    callback(st.step, grid[st.step + 1], x, buffers["x0"])
                if bar is not None:
                    bar.update(1)

    if cuda_graph:
        labels = tuple(graphs.label_signature(v) for v in (y, null, y2))
        key = graphs.key(model, stages=stages, beta0=beta0, batch=B, shape=shape, device=device, cfg=cfg,
                         cfg_batch=cfg_batch, guidance_interval=guidance_interval, backend=step_backend,
                         noise_given=noise is not None, check_finite=check_finite, labels=labels)
        entry = graphs.CACHE.get(key, model)
        if entry is None:
            graph = graphs.CAPTURE.capture(run_loop, device)
            # The entry owns every tensor made outside the capture that the graph reads or writes.
            entry = graphs.CACHE.put(key, model, graphs.CapturedLoop(
                graph=graph, statics=dict(seeds=seeds, noise=noise_buf, y=y, null=null, y2=y2), x=x,
                first_bad=first_bad, stages=stages, keepalive=(buffers, t_values, seeds, noise_buf, y, null, y2,
                                                               first_bad)))
        else:
            _refill(entry, seeds=seeds, noise=noise, y=y, null=null, y2=y2)
        entry.first_bad.fill_(-1)
        graphs.CAPTURE.replay(entry.graph, device)
        x, first_bad, stages = entry.x.clone(), entry.first_bad, entry.stages
    elif progress:
        from tqdm.auto import tqdm

        with tqdm(total=len(grid) - 1, desc=f"fastdiff {method}", unit="step") as bar:
            run_loop(bar)
    else:
        run_loop()
    if check_finite:
        k = int(first_bad.item())  # the one synchronization, after the loop
        if k >= 0:
            st = stages[k]
            raise FloatingPointError(f"model output is not finite at step {st.step} (t={st.t:.6g}); check the "
                                     "model, the path/prediction pair and the time grid")
    return x
