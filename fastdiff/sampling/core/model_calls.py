"""How each stage of a sample() call calls the model: planned once, before the loop."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fastdiff.sampling.core import labels as labels_module
from fastdiff.sampling.core.arguments import batched_labels, check_model_output, concat_labels, null_labels
from fastdiff.sampling.core.stage import Stage


def labels_of(guidance, null_y, B: int, device, private: bool) -> SimpleNamespace:
    """The labels the model calls read: ``conds`` (the K condition batches on the device), ``null``, ``batched``
    (one guided call's: the conditions in order, then the null labels) and ``conditions_only`` (the K conditions
    of a stage outside the guidance interval). ``private``: copies the caller never sees (a captured loop and a
    reused plan refill them)."""
    y = labels_module.expanded(labels_module.to_device(guidance.y, device), B)  # a tree's batch-1 leaves: B rows
    null = null_labels(null_y, y, B) if guidance.guided else None
    if private:
        y, null = labels_module.cloned(y), labels_module.cloned(null)
    conditions = [labels_module.expanded(c, B) for c in guidance.conditions] if guidance.conditions else None
    conds, batched = batched_labels(conditions or [y], null, device, guidance.guided)
    if private and conditions:
        conds = [labels_module.cloned(c) for c in conds]
    conditions_only = None
    if len(conds) > 1:
        conditions_only = conds[0]
        for c in conds[1:]:
            conditions_only = concat_labels(conditions_only, c)
    return SimpleNamespace(y=conds[0] if conditions else y, null=null, conds=conds, batched=batched,
                           conditions_only=conditions_only)


class ModelCalls:
    """Per stage, the model's inputs: one call of B (unguided stages), one batched call of branches · B whose
    input is a kept pair buffer (no torch.cat), or one call per branch (cfg_batch=False); outside the guidance
    interval with K conditions, the K conditions alone; where a perturbed rule asks (features/perturbed.py), one more
    call to the perturbed callable on the conditional input (B samples; with K conditions K·B, or one call per
    condition). Made once: in the loop, every Python operation after a memory-bound step runs on cold caches (~20 us
    each at 2^20 elements on the CPU), so a step does as few as it can."""

    def __init__(self, stages: list[Stage], guided_at, cfg_batch: bool, buffers: dict, pairs: dict, t_tensor, B: int,
                 shape: tuple, branches: int, labels: SimpleNamespace, device, perturbed=None):
        """``perturbed``: (sample()'s perturbed_model, whether each stage calls it), or None."""
        self.branches, self.device, self.stages = branches, device, stages
        K = len(labels.conds)
        self.plans = []
        for k, st in enumerate(stages):
            xin = buffers[st.input]
            if not guided_at(st.t):
                if K == 1:
                    plan = "one", ((xin, t_tensor(k, B), labels.y),), 1
                elif cfg_batch:
                    plan = "batched", ((pairs[st.input][:K].view(K * B, *shape), t_tensor(k, K * B),
                                        labels.conditions_only),), K
                else:
                    plan = "conditions", tuple((xin, t_tensor(k, B), c) for c in labels.conds), K
            elif cfg_batch:
                plan = "batched", ((pairs[st.input].view(branches * B, *shape), t_tensor(k, branches * B),
                                    labels.batched),), branches
            else:
                plan = "two", tuple((xin, t_tensor(k, B), c) for c in labels.conds) + ((xin, t_tensor(k, B),
                                                                                     labels.null),), branches
            self.plans.append(plan)
        self.whole = [False] * len(stages)  # stage k's call reads the one model output itself (parts)
        # stage k's perturbed calls: (the conditional input, its times, labels) of each condition, or one batched call
        # of K·B; None without
        self.perturbed_model = perturbed[0] if perturbed else None
        self.perturbed = [None] * len(stages)
        for k, st in enumerate(stages):
            if not (perturbed and perturbed[1][k]):
                continue
            xin = buffers[st.input]
            if K == 1:
                self.perturbed[k] = ((xin, t_tensor(k, B), labels.y),)
            elif cfg_batch:
                self.perturbed[k] = ((pairs[st.input][:K].view(K * B, *shape), t_tensor(k, K * B),
                                      labels.conditions_only),)
            else:
                self.perturbed[k] = tuple((xin, t_tensor(k, B), c) for c in labels.conds)
        self.K = K

    def parts(self, k: int, n_preds: int) -> list[int] | None:
        """For stage k's call of ``n_preds`` predictions, which part of its one model output is each (the null
        branch is prediction 0 and the output's last part); None where the call needs them one by one."""
        kind, _, n = self.plans[k]
        self.whole[k] = kind in ("one", "batched") and n == n_preds
        if not self.whole[k]:
            return None
        return [n - 1, *range(n - 1)] if kind == "batched" and n == self.branches else list(range(n))

    def evaluate_whole(self, model, k: int):
        """Stage k's model output as its call reads it: the one (batched) output itself where it can."""
        if not self.whole[k]:
            return self.evaluate(model, k)
        args = self.plans[k][1][0]
        return self._checked(model(*args), args, k).contiguous()

    def evaluate(self, model, k: int) -> list:
        """Stage k's predictions: [p] or [p_null, p_y] ([p_null, p_1, ..., p_K] with several conditions; the
        conditions alone outside the guidance interval: [p_1, ..., p_K]); with perturbed calls, their predictions
        (one per condition) last ([p_null, p_y, p_s]), or first where the stage has no null branch ([p_s, p_y])."""
        preds = self._evaluate(model, k)
        if self.perturbed[k] is not None:
            perturbed = self._perturbed_calls(k, preds[0].dtype)
            kind, _, n = self.plans[k]
            null = kind == "two" or (kind == "batched" and n == self.branches)  # a guided stage
            preds = [*preds, *perturbed] if null else [*perturbed, *preds]
        return preds

    def _perturbed_calls(self, k: int, dtype) -> list:
        """Stage k's perturbed predictions: perturbed_model(x, t, y) of B samples per condition, or of K·B at once
        (cfg_batch), each in the model output's dtype (which the step reads for every prediction)."""
        outs = []
        for args in self.perturbed[k]:
            out = self.perturbed_model(*args)
            if out.__class__ is not torch.Tensor or out.dtype is not dtype or out.shape != args[0].shape or \
                    out.device != self.device:
                try:
                    check_model_output(out, args[0].shape, self.device, self.stages[k])
                except (TypeError, ValueError) as e:
                    raise type(e)(f"perturbed_model: {e}") from None
                out = out.to(dtype)
            outs.append(out.contiguous())
        if len(self.perturbed[k]) == 1 and self.K > 1:
            return list(outs[0].chunk(self.K))  # views of the batched call's output, the conditions in order
        return outs

    def _evaluate(self, model, k: int) -> list:
        kind, inputs, n = self.plans[k]
        if kind == "two" or kind == "conditions":
            outs = [self._checked(model(*args), args, k).contiguous() for args in inputs]
            return [outs[-1], *outs[:-1]] if kind == "two" else outs
        args = inputs[0]
        out = self._checked(model(*args), args, k).contiguous()
        if kind == "one":
            return [out]
        parts = out.chunk(n)  # views of one output (conditions first, null last)
        return [parts[-1], *parts[:-1]] if n == self.branches else list(parts)

    def _checked(self, out, args: tuple, k: int):
        if out.__class__ is not torch.Tensor or out.dtype is not torch.float32 or out.shape != args[0].shape or \
                out.device != self.device:  # the common case in one test, the rest explained
            check_model_output(out, args[0].shape, self.device, self.stages[k])
        return out
