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

    def __init__(self, classifier, scale, y, path, prediction: str, per_sample_values: dict, device,
                 check_finite: bool = True):
        if per_sample_values:
            raise ValueError("classifier guidance does not combine with per-sample churn options (yet)")
        if not callable(classifier):
            raise TypeError(f"classifier must be a callable classifier(x, t) -> logits [B, classes], got "
                            f"{type(classifier).__name__}")
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError("classifier guidance needs y: the target class of each sample, an integer tensor [B]")
        self.y = y.to(device=device, dtype=torch.long)
        self.classifier, self.scale_at = classifier, scale_schedule(scale, "classifier_scale")[0]
        self.path, self.prediction = path, prediction
        self.buffer = None  # set by the loop
        self.labels_checked = False
        self.coefficient = []  # per stage: lambda(t) s, the gradient's weight in the prediction
        # the first stage whose gradient is inf/NaN (-1: none), on the device: the step reads the gradient as a
        # history term, which its finiteness flags do not cover (a NaN would surface a step later, in the model's
        # output, or not at all after the last step)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device) if check_finite else None

    def transform(self, stages: list) -> list:
        """The stages with the gradient as their last history term (before a caller's noise buffer)."""
        out = []
        self.coefficient = []
        for st in stages:
            try:
                lam = affine_coefficients(self.path, st.t, "score", self.prediction)[1]
            except ValueError:
                raise ValueError(f"classifier guidance needs the score -> {self.prediction} conversion, which is "
                                 f"singular at t={st.t:.6g} on path {self.path!r}: start the grid after it") from None
            c = lam * self.scale_at(st.t)
            self.coefficient.append(c)
            out.append(replace(st, history=st.history + ((BUFFER, st.c_pred * c, st.s_pred * c),)))
        return out

    @property
    def key(self) -> tuple:
        return ("classifier", tuple(self.coefficient))

    def fill(self, k: int, x: torch.Tensor, t: torch.Tensor) -> None:
        """The buffer = ∇_x log softmax(classifier(x, t))[y] for stage k's input x (autograd; zeros where the
        stage's coefficient is 0)."""
        if self.coefficient[k] == 0.0:
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

    def x0_add(self, out: torch.Tensor, k: int, stage) -> None:
        """Callbacks' x0 = a x + b g gets the gradient's share b lambda s grad."""
        if self.coefficient[k]:
            out.add_(self.buffer, alpha=stage.x0[1] * self.coefficient[k])
