"""The executor: runs a plan (fastdiff.sampling.core.plan), eagerly or inside a CUDA graph capture. Per stage:
the model call, the prediction hooks, the stage's prepared kernel call; per step: its repeats and the step hooks."""

from __future__ import annotations


def run(plan, model) -> None:
    """One run of ``plan`` with ``model``: the state ends in plan.result."""
    points, calls_of_repeat = plan.points, plan.calls
    for hook in points.start:
        hook()
    # without hooks that read the predictions one by one, a batched model output goes to the call whole
    evaluate = plan.model_calls.evaluate_whole if not (points.predictions or points.before_step) else \
        plan.model_calls.evaluate
    for first, end in plan.spans:
        for repeat, calls in enumerate(calls_of_repeat):
            plan.repeat = repeat
            for k in range(first, end):
                preds = evaluate(model, k)
                for hook in points.predictions:
                    preds = hook(k, preds)
                call = calls[k]
                for hook in points.before_step:
                    call = hook(k, preds, call)
                call(preds)
                for hook in points.after_stage:
                    hook(k)
            for hook in points.after_repeat:
                hook(end - 1, repeat)
        for hook in points.after_step:
            hook(end - 1)
