"""Quality per model evaluation for every registered sampling method (docs/sampling.md's table and
docs/img/method_quality.png), on the analytic oracle: the exact model of a 2-D Gaussian mixture with eight
modes of different widths and weights (fastdiff.mixtures.ring_mixture(heterogeneous=True)), CondOT with a
velocity model, grids uniform in flow time from t = 1e-3 to 1.

- Deterministic methods: mean distance to a 1000-evaluation reference (heun, 500 steps) from the same initial
  noise (4096 points).
- Stochastic methods: sliced Wasserstein-1 distance (256 directions) of 8192 samples to 65536 exact samples of
  the mixture; the floor of that estimate (exact against exact) is printed with the table.

Budgets of 5, 10, 20 and 50 evaluations: the most steps whose evaluations (the stage count of the method's table)
stay within the budget, at least one step. dpm_fast reads the grid as its budget and stops at the grid's last
nonzero noise level: its grid ends 1e-3 before the data (t = 0.999, then 1). dpm_adaptive chooses its steps: its
row gives the distance at tolerances rtol = atol x 10 of 0.2, 0.05, 0.01, 0.002 with the mean evaluations it used.
Deterministic or stochastic: whether two seeds give different samples from the same initial noise.
Langevin-only methods (annealed_langevin, reverse_diffusion: docs/score_based.md) are left out.

Run: pip install ".[docs]" && python docs/scripts/method_quality.py   (a few minutes on 2 CPU cores)
"""

from __future__ import annotations

import math
import pathlib
import re
import sys

import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, ring_mixture
from fastdiff.sampling.methods import get_method, method_names

BUDGETS = (5, 10, 20, 50)
T0 = 1e-3
SKIP = ("annealed_langevin", "reverse_diffusion")
N_ODE, N_SDE, N_EXACT = 4096, 8192, 65536
DOCS = pathlib.Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- method-quality: begin (docs/scripts/method_quality.py) -->", "<!-- method-quality: end -->"


def sliced_w1(a: torch.Tensor, b: torch.Tensor, directions: int = 256) -> float:
    """Sliced Wasserstein-1 between two 2-D point sets (quantiles of the projections on fixed directions)."""
    angles = torch.arange(directions, dtype=torch.float64) * math.pi / directions
    dirs = torch.stack([angles.cos(), angles.sin()], 1)
    qs = torch.linspace(0.0005, 0.9995, 2000, dtype=torch.float64)
    pa = torch.quantile(a.double() @ dirs.T, qs, dim=0)
    pb = torch.quantile(b.double() @ dirs.T, qs, dim=0)
    return float((pa - pb).abs().mean())


def grid_for(method: str, steps: int) -> list[float]:
    if method == "dpm_fast":  # its result is the state at the grid's last nonzero level
        inner = [T0 + (0.999 - T0) * i / (steps - 1) for i in range(steps)] if steps > 1 else [T0]
        return inner + [1.0]
    return [T0 + (1.0 - T0) * i / steps for i in range(steps + 1)]


def evaluations(method: str, steps: int) -> int:
    """The model evaluations of ``steps`` steps: the stage count of the method's table (methods that take fewer on
    their last steps, e.g. heunpp2 and k-diffusion's two-stage ones on the step to sigma = 0, count those)."""
    from fastdiff.paths import get_path

    return len(get_method(method).stages(get_path("condot"), grid_for(method, steps), "velocity"))


def steps_for(method: str, budget: int) -> int:
    """The most steps whose evaluations stay within ``budget`` (at least one step; dpm_fast: the budget itself)."""
    if method == "dpm_fast":
        return budget
    steps = 1
    while evaluations(method, steps + 1) <= budget:
        steps += 1
    return steps


def run(model, method: str, budget: int, noise: torch.Tensor, seed: int) -> tuple[torch.Tensor, int]:
    steps = steps_for(method, budget)
    x = fastdiff.sample(model, None, noise=noise, path="condot", prediction="velocity", method=method,
                        timesteps=grid_for(method, steps), seed=seed)
    return x, evaluations(method, steps)


def is_stochastic(model, method: str, noise: torch.Tensor) -> bool:
    a, _ = run(model, method, 10, noise[:64], seed=1)
    b, _ = run(model, method, 10, noise[:64], seed=2)
    return not torch.equal(a, b)


def main(picture: pathlib.Path, docs: pathlib.Path) -> None:
    mixture = ring_mixture(heterogeneous=True)
    model = MixtureModel(mixture, "condot", "velocity")
    g = torch.Generator().manual_seed(0)
    noise = (1.0 - T0) * torch.randn(N_SDE, 2, generator=g)
    reference = fastdiff.sample(model, None, noise=noise[:N_ODE], path="condot", prediction="velocity",
                                method="heun", timesteps=[T0 + (1 - T0) * i / 500 for i in range(501)])
    exact = mixture.sample(N_EXACT, generator=torch.Generator().manual_seed(1))[0]  # (samples, component)
    floor = sliced_w1(mixture.sample(N_SDE, generator=torch.Generator().manual_seed(2))[0], exact)
    rows = {"deterministic": [], "stochastic": []}
    for method in method_names():
        if method in SKIP:
            continue
        if method == "dpm_adaptive":  # deterministic at its default eta = 0
            points = []
            for rtol in (0.2, 0.05, 0.01, 0.002):
                x, info = fastdiff.sample(model, None, noise=noise[:N_ODE], path="condot", prediction="velocity",
                                          method=method, timesteps=[T0, 1 - 1e-3], rtol=rtol, atol=rtol / 10,
                                          return_info=True)
                err = float((x.double() - reference.double()).norm(dim=1).mean())
                points.append((float(info.nfe.double().mean()), err, f"rtol {rtol}"))
            rows["deterministic"].append((method, points))
            print(method, points, file=sys.stderr)
            continue
        kind = "stochastic" if is_stochastic(model, method, noise) else "deterministic"
        points = []
        for budget in BUDGETS:
            if kind == "deterministic":
                x, evals = run(model, method, budget, noise[:N_ODE], seed=0)
                err = float((x.double() - reference.double()).norm(dim=1).mean())
            else:
                x, evals = run(model, method, budget, noise, seed=0)
                err = sliced_w1(x, exact)
            points.append((evals, err, ""))
        rows[kind].append((method, points))
        print(method, kind, [(e, f"{v:.3g}") for e, v, _ in points], file=sys.stderr)
    table = _table(rows, floor)
    print(table)
    _write_docs(docs, table)
    _picture(rows, floor, picture)


def _table(rows, floor) -> str:
    out = [f"| method | kind | {' | '.join(f'{b} evaluations' for b in BUDGETS)} |",
           "|---|---|" + "---|" * len(BUDGETS)]
    for kind, what in (("deterministic", "ODE"), ("stochastic", "SDE")):
        for method, points in sorted(rows[kind], key=lambda r: r[1][-1][1]):
            if method == "dpm_adaptive":
                cells = [f"{err:.3g} ({evals:.0f}, {note})" for evals, err, note in points]
            else:
                cells = [f"{err:.3g}" + (f" ({evals})" if evals != b else "") for (evals, err, _), b in
                         zip(points, BUDGETS)]
            out.append(f"| `{method}` | {what} | " + " | ".join(cells) + " |")
    out.append(f"\nODE: mean distance to the 1000-evaluation reference from the same noise; SDE: sliced W1 to exact "
               f"samples (its floor, exact against exact: {floor:.3f}). A figure in parentheses: the evaluations used "
               "where they differ from the column's (the most steps within the budget; dpm_adaptive: the mean "
               "over samples at the tolerance named).")
    return "\n".join(out)


def _write_docs(docs: pathlib.Path, table: str) -> None:
    text = docs.read_text()
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text += "\n" + block + "\n"
    docs.write_text(text)


def _picture(rows, floor, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    for ax, kind in zip(axes, ("deterministic", "stochastic")):
        n = len(rows[kind])
        ax.set_prop_cycle(color=[plt.cm.tab20(i % 20) for i in range(n)],
                          linestyle=(["-", "--", "-.", ":"] * n)[:n])
        for method, points in rows[kind]:
            ax.loglog([p[0] for p in points], [p[1] for p in points], "o-", ms=3, label=method)
        ax.set_xlabel("model evaluations")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, ncol=2)
    axes[0].set_title("deterministic: mean distance to a 1000-evaluation reference")
    axes[1].set_title("stochastic: sliced W1 to exact samples")
    axes[1].axhline(floor, color="grey", lw=0.8)
    fig.suptitle("fastdiff methods on an 8-mode 2-D Gaussian mixture, CondOT velocity, t = 1e-3 -> 1 "
                 "(docs/scripts/method_quality.py)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main(DOCS / "img" / "method_quality.png", DOCS / "sampling.md")
