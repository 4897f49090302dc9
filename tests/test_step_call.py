"""The prepared sampler_step call (fastdiff.ops.step_call; native: fastdiff._C.PreparedStep, csrc/step_call.h):
bit for bit the op it replaces, on the backend's kernel, for predictions given one by one or as one batched model
output; the run-time checks of the predictions; the bound tensors read in place; ``replaced``."""

import pytest
import torch
from conftest import BACKENDS
from sampler_step_cases import step_inputs

from fastdiff import dispatch
from fastdiff.ops.sampler_step import KERNEL_ARGS, prepare
from fastdiff.ops.step_call import StepCall, replaced, step_call

CASES = [  # B, per-sample shape, pred dtype, K1, H, D, side, per-sample rows
    (1, (16, 2), torch.float32, 2, 0, 0, False, False),
    (3, (5, 7), torch.float32, 1, 1, 1, True, False),
    (2, (67,), torch.float16, 3, 2, 2, False, True),
    (5, (3, 3, 3), torch.bfloat16, 2, 1, 1, True, True),
    (4, (1000,), torch.float32, 4, 4, 4, True, False),
    (0, (9,), torch.float32, 2, 0, 1, False, False),
]


def _args(case, device, nout=2):
    B, shape, dtype, K1, H, D, side, per = case
    kw = step_inputs(B, shape, dtype, K1, H, D, per_w=per, per_c=per, device=device)
    x = kw["x"]
    outs = [torch.full_like(x, 9.0) for _ in range(nout)]
    side_t = torch.full_like(x, 9.0) if side else None
    finite = torch.ones(B, dtype=torch.int32, device=device)
    call = prepare(x, kw["preds"], kw["weights"], kw["history"], kw["coeffs"], kw["seeds"], kw["streams"], outs,
                   side_t, finite)
    return tuple(call[name] for name in KERNEL_ARGS)


SIDE, FINITE = KERNEL_ARGS.index("side"), KERNEL_ARGS.index("finite")


def _written(args):
    side = args[SIDE]
    return [o.clone() for o in args[KERNEL_ARGS.index("outs")]], side.clone() if side is not None else None, \
        args[FINITE].clone()


def _reset(args):
    for o in args[KERNEL_ARGS.index("outs")]:
        o.fill_(9.0)
    if args[SIDE] is not None:
        args[SIDE].fill_(9.0)
    args[FINITE].fill_(1)


def _assert_same(a, b):
    for u, v in zip(a[0], b[0]):
        assert torch.equal(u, v)
    assert (a[1] is None and b[1] is None) or torch.equal(a[1], b[1])
    assert torch.equal(a[2], b[2])


def _op(backend, args, preds):
    dispatch.kernel(backend, "sampler_step")(args[0], preds, *args[2:])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-{c[2]}-K{c[3]}H{c[4]}D{c[5]}")
@pytest.mark.parametrize("backend_device", BACKENDS)
def test_a_prepared_call_is_the_op_bit_for_bit(backend_device, case):
    backend, device = backend_device
    args = _args(case, device)
    preds = args[1]
    _op(backend, args, preds)
    want = _written(args)
    for native in (True, False):
        _reset(args)
        call = step_call(backend, args, native=native)
        assert isinstance(call, StepCall) != (native and backend == "cpu" and _has_native())
        call(preds)
        _assert_same(_written(args), want)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-{c[2]}-K{c[3]}")
@pytest.mark.parametrize("backend_device", BACKENDS)
def test_one_batched_output_is_read_by_parts(backend_device, case):
    # a guided call's output: conditions first, the null branch last; prediction 0 is the null branch
    backend, device = backend_device
    args = _args(case, device)
    preds, B, K1 = args[1], args[0].shape[0], len(args[1])
    parts = [K1 - 1, *range(K1 - 1)]
    batched = torch.cat([*preds[1:], preds[0]]) if B else torch.empty((0, *preds[0].shape[1:]), dtype=preds[0].dtype)
    _op(backend, args, preds)
    want = _written(args)
    for native in (True, False):
        _reset(args)
        step_call(backend, args, parts, native)(batched)
        _assert_same(_written(args), want)


def _has_native():
    import sys
    return hasattr(sys.modules.get("fastdiff._C"), "PreparedStep")


native_only = pytest.mark.skipif(not _has_native(), reason="no fastdiff._C.PreparedStep in this build")


@native_only
def test_the_bound_tensors_are_read_in_place():
    # a plan refills seeds, rows and buffers between runs: the call sees the new values
    case = (3, (11,), torch.float32, 2, 1, 1, False, True)
    args = _args(case, "cpu")
    call = step_call("cpu", args)
    seeds, x = args[KERNEL_ARGS.index("seeds")], args[0]
    seeds.add_(17)
    x.mul_(-0.5)
    args[KERNEL_ARGS.index("sample_coeffs")].mul_(2.0)
    _op("cpu", args, args[1])
    want = _written(args)
    _reset(args)
    call(args[1])
    _assert_same(_written(args), want)


@native_only
def test_replaced_prepares_the_new_arguments_and_keeps_the_parts():
    args = _args((2, (6,), torch.float32, 2, 0, 1, False, False), "cpu")
    call = step_call("cpu", args, [1, 0])
    other = [torch.empty_like(args[0])]
    new = replaced(call, outs=other, streams=[9])
    assert new.parts == [1, 0] and new.args[KERNEL_ARGS.index("outs")] is other and not isinstance(new, StepCall)
    new(torch.cat([args[1][1], args[1][0]]))
    _op("cpu", replaced(step_call("cpu", args, native=False), outs=[want := torch.empty_like(args[0])],
                        streams=[9]).args, args[1])
    assert torch.equal(other[0], want)
    assert isinstance(replaced(step_call("cpu", args, native=False), streams=[9]), StepCall)


@native_only
def test_a_run_checks_its_predictions():
    args = _args((2, (6,), torch.float32, 2, 0, 0, False, False), "cpu")
    call = step_call("cpu", args, [1, 0])
    p = args[1]
    with pytest.raises(RuntimeError, match="preds must hold 2 tensors"):
        call([p[0]])
    with pytest.raises(RuntimeError, match=r"preds\[1\] must have x's shape"):
        call([p[0], p[1][:, :5].contiguous()])
    with pytest.raises(RuntimeError, match=r"preds\[1\] must have preds\[0\]'s dtype"):
        call([p[0], p[1].half()])
    with pytest.raises(RuntimeError, match=r"preds\[0\] must be float32, float16 or bfloat16"):
        call([p[0].double(), p[1].double()])
    with pytest.raises(RuntimeError, match=r"preds\[0\] must be contiguous"):
        call([torch.randn(6, 2).t(), p[1]])
    with pytest.raises(TypeError, match=r"preds\[1\] must be a tensor"):
        call([p[0], 1.0])
    with pytest.raises(TypeError, match="a list of tensors or one tensor"):
        call(3)
    with pytest.raises(RuntimeError, match=r"must be \[P B, \.\.\.\]"):
        call(torch.randn(3, 6))
    with pytest.raises(RuntimeError, match="is part 1 of the model output, which has 1 parts"):
        call(torch.randn(2, 6))
    with pytest.raises(RuntimeError, match="parts must have x's shape"):
        call(torch.randn(4, 5))
    out = args[KERNEL_ARGS.index("outs")][0]
    buf = torch.randn(3 * out.numel())
    shifted = buf[3:3 + out.numel()].view_as(out)
    with pytest.raises(RuntimeError, match="partially overlaps an output"):
        replaced(call, outs=[buf[:out.numel()].view_as(out)])([p[0], shifted])


@native_only
def test_preparing_checks_the_bound_arguments():
    from fastdiff._C import PreparedStep

    args = list(_args((2, (6,), torch.float32, 2, 0, 1, False, False), "cpu"))[:FINITE + 1]  # (no clip: the binding's)
    with pytest.raises(RuntimeError, match="parts must name one part per prediction"):
        PreparedStep(*args, [0])
    with pytest.raises(RuntimeError, match="seeds must be contiguous"):
        PreparedStep(*args[:3], torch.arange(4)[::2], *args[4:], [])
    with pytest.raises(RuntimeError, match="coeffs must hold"):
        PreparedStep(*args[:6], [1.0], *args[7:], [])
