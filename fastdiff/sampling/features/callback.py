"""``sample(callback=...)``: ``callback(step, t, x, x0)`` after each step, k-diffusion's contract: x the new state,
x0 the model's x0 estimate at the step's first evaluation (a reused buffer), and an in-place edit of x is the next
step's start (so it is copied into the state's guidance twins)."""

from __future__ import annotations



def plan(plan, callback, buffers: dict, weights, classifier, merged, backend: str) -> None:
    """Puts the callback's two hooks at the plan's points: the x0 estimate of each step's first stage (a
    prediction transform), and the call after the step."""
    stages, x, x0, grid, last = plan.stages, buffers["x"], buffers["x0"], plan.grid, len(plan.stages) - 1

    def estimate_x0(k: int, preds: list) -> list:
        st = stages[k]
        if st.input == "x":  # the step's x0, before the state is overwritten
            weights.x0_into(x0, x, preds, k, st, merged, backend)
            if classifier is not None:
                b = None
                if merged is not None:
                    B = x.shape[0]
                    b = merged.x0_rows(k, x.device)[:, 1].view(B, *([1] * (x.dim() - 1)))
                classifier.x0_add(x0, k, st, b)
        return preds

    def call(k: int) -> None:
        state = plan.result if k == last else x
        callback(stages[k].step, grid[stages[k].step + 1], state, x0)
        if k != last:  # the callback may edit x in place (k-diffusion's contract): into its twins too
            for twin in plan.x_outs[1:]:
                twin.copy_(x)

    plan.add("predictions", estimate_x0)
    plan.add("after_step", call)


