"""How each stage of a sample() call calls the model: planned once, before the loop."""

from __future__ import annotations

from fastdiff.sampling.core.arguments import check_model_output
from fastdiff.sampling.core.stage import Stage


class ModelCalls:
    """Per stage, the model's inputs: one call of B (unguided stages), one batched call of branches · B whose
    input is a kept pair buffer (no torch.cat), or one call per branch (cfg_batch=False). Made once: in the
    loop, every Python operation after a memory-bound step runs on cold caches (~20 us each at 2^20 elements
    on the CPU), so a step does as few as it can."""

    def __init__(self, stages: list[Stage], guided_at, cfg_batch: bool, buffers: dict, pairs: dict, t_tensor, B: int,
                 shape: tuple, branches: int, labels: tuple, device):
        y, y2, conds, null = labels
        self.branches, self.device = branches, device
        self.plans = []
        for k, st in enumerate(stages):
            xin = buffers[st.input]
            if not guided_at(st.t):
                plan = "one", ((xin, t_tensor(k, B), y),)
            elif cfg_batch:
                plan = "batched", ((pairs[st.input].view(branches * B, *shape), t_tensor(k, branches * B), y2),)
            else:
                plan = "two", tuple((xin, t_tensor(k, B), c) for c in conds) + ((xin, t_tensor(k, B), null),)
            self.plans.append(plan)

    def evaluate(self, model, k: int, st: Stage) -> list:
        """Stage k's predictions: [p] or [p_null, p_y] ([p_null, p_1, ..., p_K] with several conditions)."""
        kind, inputs = self.plans[k]
        outs = [model(*args) for args in inputs]
        for out, args in zip(outs, inputs):
            check_model_output(out, args[0].shape, self.device, st)
        if kind == "batched":
            *cond, uncond = outs[0].contiguous().chunk(self.branches)  # views of one output (y first, null last)
            return [uncond, *cond]
        if kind == "two":
            return [outs[-1].contiguous(), *(o.contiguous() for o in outs[:-1])]
        return [outs[0].contiguous()]
