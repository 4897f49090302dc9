"""The two-branch fused step (docs/design.md §2), differentiable: fastdiff.ops.sampler_step with branches
(pred_uncond, pred) and weights (1, cfg), one history buffer ``extra`` and one noise draw,

    g    = pred_uncond + cfg * (pred - pred_uncond)        (g = pred without pred_uncond)
    out  = c_x * x + c_pred * g + c_extra * extra + c_noise * noise(seeds, stream)
    side = s_x * x + s_pred * g + s_extra * extra          (optional second output)

elementwise per sample, with host-side coefficients (fastdiff.sampling.methods.coefficients: finite real
numbers, each rounded to float32 as the kernels round it) and
the noise of the spec-v1 stream (element i of sample b: seed seeds[b], stream ``stream``, offset 0).
``guided_step`` runs on the selected backend; ``guided_step_reference`` is the specification.

Tensors: x, extra, out, side float32 [B, *S]; pred, pred_uncond [B, *S] float32/float16/bfloat16
(one dtype). All math is float32. ``out`` may be ``x`` (in place) and ``side`` may be ``extra``:
each element reads its inputs before it writes.

Autograd: the step is linear in x, pred, pred_uncond and extra; every backend differentiates the
returned ``out`` when ``out`` and ``side`` are None. The kernels' in-place form (``out=``/``side=``)
refuses inputs that require grad (the reference differentiates it through ``copy_``).
"""

from __future__ import annotations


import torch

from fastdiff import _checks
from fastdiff import dispatch as _dispatch
from fastdiff.ops.sampler_step import check_like_x, run_kernel, run_reference

PRED_DTYPES = _checks.PRED_DTYPES
COEFFICIENTS = ("cfg", "c_x", "c_pred", "c_extra", "c_noise", "s_x", "s_pred", "s_extra")


_coefficient = _checks.finite_real


def _check(x, pred, pred_uncond, extra, seeds, out, side, c_noise):
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"x must be a float32 tensor (the sampler state), got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension: [B, ...]")
    if pred is None:  # the only prediction that is not optional
        raise TypeError("pred must be a tensor (the model's prediction, shaped like x), got None")
    for name, t, dtypes in (("pred", pred, PRED_DTYPES), ("pred_uncond", pred_uncond, PRED_DTYPES),
                            ("extra", extra, (torch.float32,)), ("out", out, (torch.float32,)),
                            ("side", side, (torch.float32,))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        check_like_x(name, t, x, dtypes)
    if pred_uncond is not None and pred_uncond.dtype != pred.dtype:
        raise TypeError(f"pred_uncond must have pred's dtype {pred.dtype}, got {pred_uncond.dtype}")
    if c_noise != 0:
        if seeds is None:
            raise ValueError("seeds are required when c_noise != 0")
        if seeds.shape != (x.shape[0],):
            raise ValueError(f"seeds must hold one seed per sample ({x.shape[0]}), got shape {tuple(seeds.shape)}")


def _prepare(x, pred, pred_uncond, extra, seeds, stream, out, side, coeffs):
    """(seeds, stream, coefficients as Python floats) after checking every argument."""
    coeffs = {name: _coefficient(name, coeffs[name]) for name in COEFFICIENTS}
    if seeds is not None:
        seeds = _checks.seeds_tensor(seeds, x.device)
    stream = _checks.stream_id(stream)
    _check(x, pred, pred_uncond, extra, seeds, out, side, coeffs["c_noise"])
    if seeds is None:
        seeds = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    return seeds, stream, coeffs


def stage_coefficients(k, has_extra: bool) -> list[float]:
    """sampler_step's coefficient rows of a two-branch step: (c_x, c_pred[, c_extra][, c_noise]) then
    (s_x, s_pred[, s_extra][, 0]); ``k`` maps the names of COEFFICIENTS to numbers (a dict, or an object
    with those attributes such as a sampler Stage)."""
    get = k.__getitem__ if isinstance(k, dict) else lambda name: getattr(k, name)
    noise = get("c_noise") != 0
    row = [get("c_x"), get("c_pred"), *([get("c_extra")] if has_extra else []), *([get("c_noise")] if noise else [])]
    side = [get("s_x"), get("s_pred"), *([get("s_extra")] if has_extra else []), *([0.0] if noise else [])]
    return row + side


def _sampler_call(x, pred, pred_uncond, extra, seeds, stream, out, side, k) -> dict:
    """The sampler_step call this two-branch step is (fastdiff.ops.sampler_step): branches
    (p∅, p) with weights (1, cfg), extra as the one history buffer, one draw when c_noise != 0."""
    return dict(x=x, preds=[pred] if pred_uncond is None else [pred_uncond, pred],
                history=[] if extra is None else [extra], seeds=seeds, streams=[stream] if k["c_noise"] != 0 else [],
                weights=[1.0] if pred_uncond is None else [1.0, k["cfg"]],
                coeffs=stage_coefficients(k, extra is not None), sample_weights=None, sample_coeffs=None,
                outs=[out if out is not None else torch.empty_like(x)], side=side, finite=None)


def guided_step_reference(x, pred, pred_uncond=None, *, cfg=1.0, extra=None, seeds=None, stream=0,
                          c_x=1.0, c_pred=0.0, c_extra=0.0, c_noise=0.0, s_x=0.0, s_pred=0.0, s_extra=0.0,
                          out=None, side=None):
    """Pure-PyTorch specification of :func:`guided_step` (sampler_step's, for two branches); returns ``out``
    (and writes ``side``)."""
    seeds, stream, k = _prepare(x, pred, pred_uncond, extra, seeds, stream, out, side, {
        "cfg": cfg, "c_x": c_x, "c_pred": c_pred, "c_extra": c_extra, "c_noise": c_noise, "s_x": s_x, "s_pred": s_pred,
        "s_extra": s_extra})
    # differentiable: autograd records copy_ into the output like any op
    return run_reference(**_sampler_call(x, pred, pred_uncond, extra, seeds, stream, out, side, k))


def _launch(name, x, pred, pred_uncond, extra, seeds, stream, out, side, k):
    """Runs the sampler_step kernel of backend ``name`` (writes out and side); returns out."""
    return run_kernel(name, **_sampler_call(x, pred, pred_uncond, extra, seeds, stream, out, side, k))


class _GuidedStep(torch.autograd.Function):
    """A kernel step returning a new ``out``, differentiable: the step is linear in x, pred, pred_uncond
    and extra (the noise is a constant), so the backward is the transposed combination of grad."""

    @staticmethod
    def forward(ctx, x, pred, pred_uncond, extra, seeds, stream, name, k):
        ctx.k, ctx.pred_dtype, ctx.has_uncond = k, pred.dtype, pred_uncond is not None
        out = torch.empty_like(x)
        _launch(name, x, pred, pred_uncond, extra, seeds, stream, out, None, k)
        return out

    @staticmethod
    def backward(ctx, grad):
        # The reference's autograd, op for op (grad_g = c_pred grad, then through u + cfg (p - u)), so
        # the gradients are the reference's bit for bit; linear in grad, so with create_graph these
        # ops give the double backward too.
        k, needs = ctx.k, ctx.needs_input_grad
        grad_x = k["c_x"] * grad if needs[0] else None
        grad_extra = k["c_extra"] * grad if needs[3] else None
        grad_pred = grad_uncond = None
        if needs[1] or needs[2]:
            grad_g = k["c_pred"] * grad
            if ctx.has_uncond:
                scaled = k["cfg"] * grad_g
                grad_pred = scaled.to(ctx.pred_dtype) if needs[1] else None
                grad_uncond = (grad_g - scaled).to(ctx.pred_dtype) if needs[2] else None
            else:
                grad_pred = grad_g.to(ctx.pred_dtype)
        return grad_x, grad_pred, grad_uncond, grad_extra, None, None, None, None


def guided_step(x, pred, pred_uncond=None, *, cfg=1.0, extra=None, seeds=None, stream=0,
                c_x=1.0, c_pred=0.0, c_extra=0.0, c_noise=0.0, s_x=0.0, s_pred=0.0, s_extra=0.0,
                out=None, side=None, backend=None):
    """One fused sampler step on the selected backend; see the module docstring. Returns ``out``
    (a new tensor when ``out`` is None; pass ``out=x`` to update in place)."""
    seeds, stream, k = _prepare(x, pred, pred_uncond, extra, seeds, stream, out, side, {
        "cfg": cfg, "c_x": c_x, "c_pred": c_pred, "c_extra": c_extra, "c_noise": c_noise, "s_x": s_x, "s_pred": s_pred,
        "s_extra": s_extra})
    name = _dispatch.resolve(x.device, backend)
    if name == "reference":  # differentiable as it is (autograd records the copy into out)
        return run_reference(**_sampler_call(x, pred, pred_uncond, extra, seeds, stream, out, side, k))
    inputs = {"x": x, "pred": pred, "pred_uncond": pred_uncond, "extra": extra}
    grad_inputs = [n for n, t in inputs.items() if t is not None and t.requires_grad]
    if torch.is_grad_enabled() and grad_inputs:
        if out is not None or side is not None:
            raise RuntimeError(
                f"guided_step: {grad_inputs[0]} requires grad, but the {backend or name} kernel writes out=/side= in "
                "place, which autograd cannot differentiate; call it without out= and side= (it returns a new, "
                "differentiable out), or under torch.no_grad()")
        return _GuidedStep.apply(x, pred, pred_uncond, extra, seeds, stream, name, k)
    return _launch(name, x, pred, pred_uncond, extra, seeds, stream, out, side, k)
