"""The branch weights of each stage of a sampling call (fastdiff.ops.sampler_step's ``weights``): host numbers for
a fixed blend, or one [B, n] device buffer rewritten before each guided step from a reduction pass (rescale,
CFG-Zero*, APG, TCFG, ...: the rules of fastdiff.sampling.features.guidance).

With K > 1 conditions (fastdiff.sampling.features.conditions) a rule acts on (p_null, p_c) with scale W = Σ w_k and
p_c = Σ a_k p_k, a_k = w_k / W: the Gram matrix of (1, p_null, p_1..p_K[, r]) is projected to that of
(1, p_null, p_c[, r]) (P G Pᵀ), the rule's weights v over (p_null, p_c[, r]) are spread back over the branches as
v_c a_k. Stages outside the guidance interval take p_c alone: K branches, weights (1, a_2, ..., a_K) over p_1.
"""

from __future__ import annotations

import torch

from fastdiff.sampling.features.guidance import branch_weights


class StageWeights:
    """Per stage: ``scales[k]`` (a number, or a tuple of K condition weights), ``zero[k]`` (a rule's zero-prediction
    steps), ``guided_at[k]``; ``x0_scales``: the weights of the x0 estimate (CFG++ steps with a share of them)."""

    def __init__(self, rule, phi: float, scales: list, zero: list[bool], guided: bool, B: int, device,
                 x0_scales: list | None = None, guided_at: list[bool] | None = None, shares: list | None = None,
                 per_sample_values: dict | None = None, stage_rules: list | None = None):
        """``per_sample_values``: {stage: (each sample's step scale, x0 scale, share)} where the samples' own
        times (churn per sample) give them different values (a schedule's, CFG++'s share); else the stage's.
        ``stage_rules``: each stage's blend where the rule's depends on the stage (a rule's ``stage_rule``), or
        None: ``rule`` at every stage."""
        from fastdiff.ops.sample_gram import sample_gram

        self.B, self.device = B, device
        self.sample_values = {}  # stage -> (step rows [B, n] float32, x0 weights [B, n], shares [B] float64)
        for k, (steps, x0s, rhos) in (per_sample_values or {}).items():
            self.sample_values[k] = (self._rows(steps, device), self._rows(x0s, device),
                                     None if rhos[0] is None else torch.tensor(rhos, dtype=torch.float64,
                                                                                device=device))

        self.rule, self.phi, self.scales, self.zero = rule, phi, scales, zero
        self.stage_rules = stage_rules
        self.x0_scales = scales if x0_scales is None else x0_scales
        self.guided_at = guided_at if guided_at is not None else [guided] * len(scales)
        self.K = len(scales[0]) if scales and isinstance(scales[0], tuple) else 1
        self.per_sample = guided and (bool(phi) or rule.needs_gram)
        self.extra = int(self.per_sample and getattr(rule, "running", False))  # branches beyond the model's
        n = 1 + self.K + self.extra
        self.buffer = torch.ones((B, n), dtype=torch.float32, device=device) if self.per_sample else None
        # CFG++ with per-sample weights (rescale): each stage's share rho through the clean estimate; the step reads
        # (1 - rho) p_null + rho g, g the rescaled blend (``buffer``, also the x0 estimate's)
        self.shares = shares if self.per_sample and shares and any(r is not None for r in shares) else None
        self.step_buffer = torch.ones_like(self.buffer) if self.shares else None
        self.running = None  # APG's running average (momentum), in the predictions' dtype, made at the first update
        self.key = (tuple(scales), phi, rule)  # what the rows and a captured loop depend on
        # K > 1 with per-sample weights: each stage's projection of the Gram matrix onto (1, p_null, p_c[, r]),
        # made here (a captured loop may not copy host data)
        self.projections = {}
        if self.per_sample and self.K > 1:
            for k, w in enumerate(self.x0_scales):
                if not self.zero[k] and self.guided_at[k]:
                    self.projections[w] = self._projection([wk / sum(w) for wk in w], device)
        # churn per sample with a cfg schedule and K > 1: each sample's (W [B], a_k [B, K], projection [B, 3, n])
        self.sample_means = {}
        if self.per_sample and self.K > 1:
            for k, (_, x0s, _) in (per_sample_values or {}).items():
                if any(sum(w) == 0.0 for w in x0s):
                    raise ValueError(f"the condition weights sum to 0 for some sample at stage {k} (its own time under "
                                     "per-sample churn): the rule acts on their weighted mean, which needs a non-zero "
                                     "sum")
                means = [[wk / sum(w) for wk in w] for w in x0s]
                self.sample_means[k] = (torch.tensor([sum(w) for w in x0s], dtype=torch.float64, device=device),
                                        torch.tensor(means, dtype=torch.float64, device=device),
                                        torch.stack([self._projection(m, device) for m in means]))
        self._gram = sample_gram

    @staticmethod
    def _rows(values: list, device) -> torch.Tensor:
        """Each sample's kernel weights [1, w_1, ...] as a float32 [B, n] tensor."""
        return torch.tensor([[1.0, *(w if isinstance(w, tuple) else (w,))] for w in values], dtype=torch.float32,
                            device=device)

    def share(self, k: int, stage, like: torch.Tensor):
        """CFG++'s share rho of stage k: the stage's, or each sample's as [B, 1, ...]."""
        values = self.sample_values.get(k)
        if values is not None and values[2] is not None:
            return values[2].to(like.dtype).view((like.shape[0],) + (1,) * (like.dim() - 1))
        return stage.cfg_pp

    def branched(self, k: int) -> bool:
        """Whether stage k's kernel blends several predictions (a guided stage; a perturbed rule's: its own)."""
        return self.guided_at[k]

    def n_preds(self, k: int) -> int:
        """The predictions stage k's kernel reads when guided: the branches and the running average."""
        return 1 + self.K + self.extra

    def side_weights(self, k: int, a: float, b: float, guided: bool):
        """The branch weights of a p_null + b g for stage k's side call (CFG++'s side blend, Stage.side_blend; g the
        blend of its x0 estimate): host numbers, or a [B, n] buffer that fastdiff.sampling.features.guidance.SideCalls
        fills from ``buffer`` after the reduction pass (per-sample weights). Unguided (outside the interval):
        g = p_null = the conditions' mean."""
        if not guided:
            w = self.x0_scales[k]
            return [(a + b) * v for v in ([1.0, *(wk / sum(w) for wk in w[1:])] if self.K > 1 else [1.0])]
        n = self.n_preds(k)
        if self.per_sample and b != 0.0:
            return torch.empty((self.B, n), dtype=torch.float32, device=self.device)
        w = self.x0_scales[k]
        g = [1.0, *w] if isinstance(w, tuple) else [1.0, w]
        return [a + b, *(b * v for v in g[1:])] + [0.0] * (n - len(g))

    def reset(self) -> None:
        """At a loop's start: the running average starts at 0."""
        if self.running is not None:
            self.running.zero_()

    def row(self, k: int, two_branch: bool):
        """sampler_step's ``weights`` for stage k (None: the one-branch default)."""
        w = self.scales[k]
        if not two_branch:
            if self.K > 1 and not self.zero[k]:  # the conditions alone: their weighted mean, over p_1 (of the scales
                w = self.x0_scales[k]  # themselves: CFG++'s share may be 0 there)
                return [1.0, *(wk / sum(w) for wk in w[1:])]
            return [0.0] * self.K if self.zero[k] else None
        if self.zero[k]:
            return [0.0] * self.n_preds(k)
        if self.per_sample:
            return self.step_buffer if self.shares and self.shares[k] is not None else self.buffer
        if k in self.sample_values:  # each sample's own (its time under per-sample churn)
            return self.sample_values[k][0]
        return [1.0, *w] if isinstance(w, tuple) else [1.0, w]

    def update(self, k: int, preds: list, backend: str) -> list:
        """Before guided stage k's step: its per-sample weights from one reduction pass over its predictions (and
        the running average, updated first: r = p_c - p_null + m r). Returns the step's predictions."""
        if not self.guided_at[k]:
            return preds
        w = self.x0_scales[k] if self.shares else self.scales[k]
        if k in self.sample_values and self.K == 1:  # each sample's scale, a [B] tensor the rule reads elementwise
            w = self.sample_values[k][1][:, 1].to(torch.float64)
        mean = None if self.K == 1 else [wk / sum(w) for wk in w]  # p_c = Σ a_k p_k
        own = self.sample_means.get(k)  # each sample's W and a_k (churn per sample, a cfg schedule)
        if own is not None:
            view = (-1,) + (1,) * (preds[0].dim() - 1)
            mean = [own[1][:, j].to(preds[0].dtype).view(view) for j in range(self.K)]
        if self.extra:
            if self.running is None:
                self.running = torch.zeros_like(preds[1])
            if mean is None:
                torch.add(preds[1], self.running, alpha=self.rule.momentum, out=self.running).sub_(preds[0])
            else:
                self.running.mul_(self.rule.momentum).sub_(preds[0])
                for a_k, p in zip(mean, preds[1:]):
                    if isinstance(a_k, torch.Tensor):
                        self.running.addcmul_(p, a_k)
                    else:
                        self.running.add_(p, alpha=a_k)
            preds = [*preds, self.running]
        if not self.zero[k]:
            gram = self._gram(preds, backend=backend)
            rule = self.rule if self.stage_rules is None else self.stage_rules[k]
            if mean is None:
                branch_weights(gram, rule, w, self.phi, self.buffer)
            elif own is not None:
                self._spread(gram, own[1].unbind(1), own[0], own[2], rule)
            else:
                self._spread(gram, mean, sum(w), self.projections[w], rule)
            if self.shares and self.shares[k] is not None:  # CFG++: (1 - rho) p_null + rho g
                rho = self.shares[k]
                values = self.sample_values.get(k)
                if values is not None and values[2] is not None:
                    rho = values[2].view(-1, 1).to(self.buffer.dtype)
                torch.mul(self.buffer, rho, out=self.step_buffer)
                self.step_buffer[:, 0].add_(1.0 - rho[:, 0] if isinstance(rho, torch.Tensor) else 1.0 - rho)
        return preds

    def _projection(self, mean: list[float], device) -> torch.Tensor:
        n = 2 + self.K + self.extra  # the Gram matrix of (1, p_null, p_1..p_K[, r])
        P = torch.zeros((3 + self.extra, n), dtype=torch.float64)
        P[0, 0] = P[1, 1] = 1.0
        P[2, 2:2 + self.K] = torch.tensor(mean, dtype=torch.float64)
        if self.extra:
            P[3, n - 1] = 1.0
        return P.to(device)

    def _spread(self, gram: torch.Tensor, mean: list, W, P: torch.Tensor, rule=None) -> None:
        """The rule on (p_null, p_c[, r]) from the full Gram matrix, its weights spread over the K conditions (a_k,
        W and the projection P the stage's, or each sample's: [B] and [B, 3, n])."""
        small = P @ gram.to(P.dtype) @ P.transpose(-1, -2)
        two = torch.empty((gram.shape[0], 2 + self.extra), dtype=torch.float32, device=gram.device)
        rule = self.rule if rule is None else rule
        branch_weights(small, rule, W, self.phi, two)  # (Σ v, v_c[, v_r]) over (p_null, p_c[, r])
        self.buffer[:, 0].copy_(two[:, 0])
        for j, a_k in enumerate(mean):
            self.buffer[:, 1 + j].copy_(two[:, 1] * a_k)
        if self.extra:
            self.buffer[:, -1].copy_(two[:, 2])

    def host_blend(self, k: int, preds: list) -> bool:
        """Whether stage k's blend is p_null + scales[k] (p_y - p_null) (or the one prediction)."""
        return not self.zero[k] and not (self.per_sample and self.guided_at[k]) and len(preds) <= 2 and self.K == 1 \
            and k not in self.sample_values

    def blend(self, k: int, preds: list) -> torch.Tensor:
        """Stage k's blend g of its x0 estimate as a float32 tensor, by torch ops (callbacks, thresholding)."""
        per = (preds[0].shape[0], *([1] * (preds[0].dim() - 1)))
        if self.zero[k]:
            return torch.zeros(preds[0].shape, dtype=torch.float32, device=preds[0].device)
        if len(preds) == 1:
            return preds[0].float()
        w = self.x0_scales[k]
        if k in self.sample_values and not (self.per_sample and self.guided_at[k]) and self.guided_at[k]:
            rows = self.sample_values[k][1]  # each sample's x0 weights
            weights = [rows[:, j].view(per) for j in range(rows.shape[1])]
            g = weights[0] * preds[0].float()
            for wj, p in zip(weights[1:], preds[1:]):
                g = g + wj * (p.float() - preds[0].float())
            return g
        if not self.guided_at[k]:  # the conditions alone
            weights = [1.0, *(wk / sum(w) for wk in w[1:])]
        elif self.per_sample:  # w_0 p_0 + Σ w_j (p_j - p_0), the weights per sample
            weights = [self.buffer[:, j].view(per) for j in range(len(preds))]
        else:
            weights = [1.0, *w] if isinstance(w, tuple) else [1.0, w]
        g = weights[0] * preds[0].float()
        for wj, p in zip(weights[1:], preds[1:]):
            g = g + wj * (p.float() - preds[0].float())
        return g

    def x0_into(self, out, x, preds, k: int, stage, merged, backend: str) -> None:
        """out = the x0 estimate a x + b g of stage k (a step's first stage: Stage.x0, or per sample with churn
        per sample): the fused two-branch op for a host blend, else torch ops (callbacks: not the hot path)."""
        if merged is None and self.host_blend(k, preds):
            from fastdiff.ops.guided_step import guided_step

            guided_step(x, preds[-1], preds[0] if len(preds) == 2 else None, cfg=self.x0_scales[k],
                        c_x=stage.x0[0], c_pred=stage.x0[1], out=out, backend=backend)
            return
        B = x.shape[0]
        a, b = merged.x0_rows(k, x.device)[:, :2].view(B, 2, *([1] * (x.dim() - 1))).unbind(1) if merged else stage.x0
        torch.add(a * x, b * self.blend(k, preds), out=out)
