"""Score-based sampling in ``fastdiff.sample`` (docs/score_based.md): annealed Langevin dynamics (NCSN),
score_sde's reverse-diffusion predictor and Langevin corrector steps around any method.

- ``method="annealed_langevin"`` (Song & Ermon 2019, Algorithm 1): at each of the grid's first ``steps``
  times t_i (the noise levels, most noise first), ``n_steps_each`` Langevin steps on the marginal p_{t_i}

      x ← x + (a_i / 2) s(x, t_i) + sqrt(a_i) ξ,        a_i = step_lr · β_i² / β_L²

  (β_L: the last level's; on the VE path β = σ, NCSN's α_i = ε σ_i² / σ_L²); then, with ``denoise``, one
  Tweedie step x ← x0(x, t_L) (NCSNv2's final denoising). The last grid time only closes the grid.
- ``method="reverse_diffusion"`` (score_sde's ReverseDiffusionPredictor, on any path): the path's forward
  transition from t' to t is x_t = r x_t' + sqrt(v) n with r = α_t / α_t', v = β_t² − r² β_t'²; the reverse
  step of its discretized SDE is

      x' = (2 − r) x + v s(x, t) + sqrt(v) ξ

  (VE: x + (σ² − σ'²) s + sqrt(σ² − σ'²) ξ; VP on its own grid: score_sde's DDPM form). The last step
  returns its mean, as score_sde does with denoise=True.
- ``corrector_steps=n, snr=r`` (score_sde's LangevinCorrector): before each step's predictor, n Langevin
  steps at t_i with the step size of the signal-to-noise rule, per sample:

      ε_b = 2 (r ‖ξ_b‖ / ‖s_b‖)²,   x ← x + ε_b s + sqrt(2 ε_b) ξ

  The norms come from one reduction pass over (x, the branch predictions, ξ) (fastdiff.ops.sample_gram),
  the step is the fused step with per-sample coefficient rows: no host synchronization. score_sde takes
  the batch means of the norms (a sample then depends on its batch) and, on VP paths, scales ε by the
  discrete α_i = 1 − β_i (≈ 1); fastdiff uses each sample's own norms and 1 on every path, so a sample is
  the same in any batch. With one sample per batch on the VE path the two agree.

Langevin step j at grid point i draws the normal of stream langevin_stream(i, j) (docs/design.md §3).
"""

from __future__ import annotations

import math


from fastdiff import _checks
from fastdiff.paths import affine_coefficients
from fastdiff.sampling.core.arguments import langevin_steps, positive_number
from fastdiff.sampling.core.stage import Stage, draw_stream, langevin_stream
from fastdiff.sampling.methods.registry import register_method

@register_method("annealed_langevin", options={"n_steps_each": 100, "step_lr": 2e-5, "denoise": True},
                 evals_per_step="n_steps_each", conversions=("score", "x0"),
                 description="NCSN's annealed Langevin dynamics: n_steps_each Langevin steps at each noise level "
                             "(a_i = step_lr β_i² / β_L²), then a Tweedie denoising step")
def _annealed_langevin(path, grid, prediction, n_steps_each=100, step_lr=2e-5, denoise=True) -> list[Stage]:
    denoise = _checks.flag("denoise", denoise)
    n = langevin_steps("n_steps_each", n_steps_each)
    if n < 1:
        raise ValueError("n_steps_each must be >= 1")
    step_lr = positive_number("step_lr", step_lr)
    levels = grid[:-1]
    beta_last = path.coefficients(levels[-1])[1]
    if not beta_last > 0:
        raise ValueError(f"annealed_langevin: the last noise level (t = {levels[-1]}) has no noise (β = 0); "
                         "its levels are the grid's first steps times, the last time only closes the grid")
    stages = []
    for i, t in enumerate(levels):
        a = step_lr * (path.coefficients(t)[1] / beta_last) ** 2
        a_s, b_s = affine_coefficients(path, t, prediction, "score")
        x0 = affine_coefficients(path, t, prediction, "x0")
        for j in range(n):
            last = j == n - 1 and not (denoise and i == len(levels) - 1)
            stages.append(Stage(i, t, "x", "x", 1.0 + 0.5 * a * a_s, 0.5 * a * b_s, c_noise=math.sqrt(a),
                                stream=langevin_stream(i, j), x0=x0, final=last))
    if denoise:  # Tweedie: E[z | x] at the last level
        t = levels[-1]
        x0 = affine_coefficients(path, t, prediction, "x0")
        stages.append(Stage(len(levels) - 1, t, "x", "x", x0[0], x0[1], x0=x0, final=True))
    return stages


@register_method("reverse_diffusion", evals_per_step=1, conversions=("score",),
                 description="score_sde's reverse-diffusion predictor: the reverse of the path's discretized "
                             "forward SDE; the last step returns its mean")
def _reverse_diffusion(path, grid, prediction) -> list[Stage]:
    stages = []
    for i in range(len(grid) - 1):
        t, t1 = grid[i], grid[i + 1]
        (al, be), (al1, be1) = path.coefficients(t)[:2], path.coefficients(t1)[:2]
        r = al / al1
        v = max(0.0, be * be - (r * be1) ** 2)
        a_s, b_s = affine_coefficients(path, t, prediction, "score")
        noise = math.sqrt(v) if i < len(grid) - 2 else 0.0
        stages.append(Stage(i, t, "x", "x", 2.0 - r + v * a_s, v * b_s, c_noise=noise, stream=draw_stream(i),
                            x0=affine_coefficients(path, t, prediction, "x0"), final=True))
    return stages
