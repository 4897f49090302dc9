"""Classifier guidance (Dhariwal & Nichol 2021; the seed lectures' guidance chapter): the score gets
``s ∇_x log p_φ(y | x_t)`` of a noise-aware classifier, so at scale 1 an unconditional model samples the
class-conditional distribution (Bayes: ∇ log p_t(x | y) = ∇ log p_t(x) + ∇ log p_t(y | x)).

A prediction p of any type is affine in the score, p = a x + λ(t) score (fastdiff.paths), so the guided
prediction is p + λ(t) s ∇ log p(y | x). The gradient enters the fused step as one more history buffer
whose coefficients are the stage's own prediction coefficients times λ(t) s: no extra pass over the state.
Its cost is the classifier's forward and backward per model evaluation (autograd), on the evaluation's input.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fastdiff.paths import affine_coefficients
from fastdiff.sampling.features.guidance import scale_schedule

BUFFER = "classifier_grad"  # the loop buffer holding ∇ log p(y | x) of the current evaluation


def singular_at_zero(path, prediction: str) -> bool:
    """Whether the score → prediction conversion is singular at t = 0 (e.g. velocity under CondOT, alpha_0 = 0):
    the default grid then starts at T_MIN_SINGULAR."""
    try:
        affine_coefficients(path, 0.0, "score", prediction)
    except ValueError:
        return True
    return False


class ClassifierGuidance:
    """The classifier term of one sample() call: stage tables with the gradient buffer as a history term, and
    the gradient of each evaluation."""

    BUFFER = BUFFER

    def __init__(self, classifier, scale, y, path, prediction: str, device, check_finite: bool = True):
        if not callable(classifier):
            raise TypeError(f"classifier must be a callable classifier(x, t) -> logits [B, classes], got "
                            f"{type(classifier).__name__}")
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError("classifier guidance needs y (or classifier_y): the target class of each sample, an "
                             "integer tensor [B]")
        # its own copy: a Sampler refills it per call, a captured loop reads it by address (the caller's y was
        # overwritten by the next call's targets when this aliased it)
        self.y = y.to(device=device, dtype=torch.long, copy=True)
        self.classifier, self.scale_at = classifier, scale_schedule(scale, "classifier_scale")[0]
        self.path, self.prediction = path, prediction
        self.buffer = None  # set by the plan
        self.labels_checked = False
        self.tables = []  # per transformed table (one per per-sample setting), per stage: lambda(t) s
        self.coefficient = []  # per stage: lambda(t) s (numbers; [B, 1, ...] tensors where samples differ)
        # the first stage whose gradient is inf/NaN (-1: none), on the device: the step reads the gradient as a
        # history term, which its finiteness flags do not cover (a NaN would surface a step later, in the model's
        # output, or not at all after the last step)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device) if check_finite else None

    def __call__(self, stages: list) -> list:
        """The stage-table transform: the stages with the gradient as their last history term (before a caller's
        noise buffer); a corrector stage gets it in its score (Stage.corrector)."""
        out, coefficients = [], []
        for st in stages:
            try:
                lam = affine_coefficients(self.path, st.t, "score", self.prediction)[1]
            except ValueError:
                raise ValueError(f"classifier guidance needs the score -> {self.prediction} conversion, which is "
                                 f"singular at t={st.t:.6g} on path {self.path!r}: start the grid after it") from None
            c = lam * self.scale_at(st.t)
            coefficients.append(c)
            if st.corrector is not None:  # the score s = a x + b g + Σ h_j buffer_j: the gradient's is b c
                snr, a, b, h = st.corrector
                out.append(replace(st, history=st.history + ((BUFFER, 0.0, 0.0),), corrector=(snr, a, b, h + (b * c,))))
            else:
                out.append(replace(st, history=st.history + ((BUFFER, st.c_pred * c, st.s_pred * c),)))
        self.tables.append(coefficients)
        return out

    @property
    def key(self) -> tuple:
        return ("classifier", self.scale_at if self.tables == [] else tuple(map(tuple, self.tables)))

    def bind(self, merged, B: int, device) -> None:
        """After the tables merged: each stage's coefficient, per sample where the settings' tables differ."""
        self.coefficient = []
        for k in range(len(self.tables[0])):
            values = [table[k] for table in self.tables]
            if merged is None or len(set(values)) == 1:
                self.coefficient.append(values[0])
            else:
                per = torch.tensor(values, dtype=torch.float32)[torch.tensor(merged.index)]
                self.coefficient.append(per.to(device))

    def hook(self, plan, buffers: dict):
        """The prediction transform that fills the gradient buffer for stage k's input (the step reads it)."""
        stages, B = plan.stages, plan.x.shape[0]
        t_of = plan.times

        def fill(k: int, preds: list) -> list:
            self.fill(k, buffers[stages[k].input], t_of(k, B))
            return preds

        return fill

    def add_to(self, g: torch.Tensor, k: int) -> torch.Tensor:
        """g + lambda s grad (the guided prediction whole, for thresholding); the buffer is then zeroed, so that
        the step's history term adds nothing more."""
        c = self._at(k, g)
        out = g + c * self.buffer if not (isinstance(c, float) and c == 0.0) else g
        self.buffer.zero_()
        return out

    def _at(self, k: int, like: torch.Tensor):
        c = self.coefficient[k]
        if isinstance(c, torch.Tensor):
            return c.view((like.shape[0],) + (1,) * (like.dim() - 1))
        return float(c)

    def fill(self, k: int, x: torch.Tensor, t: torch.Tensor) -> None:
        """The buffer = ∇_x log softmax(classifier(x, t))[y] for stage k's input x (autograd; zeros where the
        stage's coefficient is 0)."""
        c = self.coefficient[k]
        if not isinstance(c, torch.Tensor) and c == 0.0:
            self.buffer.zero_()
            return
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.classifier(xg, t)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"classifier(x, t) must return logits [B, classes] with B = {x.shape[0]}, got "
                                 f"{getattr(logits, 'shape', type(logits).__name__)}")
            if not self.labels_checked:  # once per call (a host read of y's range)
                if int(self.y.min()) < 0 or int(self.y.max()) >= logits.shape[1]:
                    raise ValueError(f"y holds classes in [{int(self.y.min())}, {int(self.y.max())}] but the "
                                     f"classifier returns {logits.shape[1]} classes")
                self.labels_checked = True
            picked = torch.log_softmax(logits.float(), dim=-1).gather(1, self.y.view(-1, 1)).sum()
            grad = torch.autograd.grad(picked, xg, allow_unused=True)[0] if picked.requires_grad else None
        if grad is None:
            raise ValueError("the logits of classifier(x, t) do not depend on x (no gradient path: detached, made "
                             "under torch.no_grad, or constant); classifier guidance needs the gradient of "
                             "log p(y | x) with respect to x")
        self.buffer.copy_(grad)
        if self.first_bad is not None:  # no host read: raise_first_bad reads it after the loop
            self.first_bad.masked_fill_((self.first_bad < 0) & ~torch.isfinite(grad).all(), k)

    def raise_first_bad(self, model_first_bad: torch.Tensor, stages) -> None:
        """FloatingPointError naming the classifier and the step of its first non-finite gradient, when that
        comes before the model's first non-finite output (which it would cause one step later)."""
        k, m = int(self.first_bad.item()), int(model_first_bad.item())
        if k >= 0 and not 0 <= m <= k:
            st = stages[k]
            raise FloatingPointError(f"classifier guidance: the gradient of log softmax(classifier(x, t))[y] is not "
                                     f"finite at step {st.step} (t={st.t:.6g}); check the classifier")

    def x0_add(self, out: torch.Tensor, k: int, stage, b=None) -> None:
        """Callbacks' x0 = a x + b g gets the gradient's share b lambda s grad (``b``: per-sample [B, 1, ...] with
        churn per sample, else the stage's)."""
        c = self._at(k, out)
        if isinstance(c, float) and b is None:
            if c:
                out.add_(self.buffer, alpha=stage.x0[1] * c)
            return
        out.add_((stage.x0[1] if b is None else b) * c * self.buffer)
