"""Fréchet distance on the digits demo model at 10 and 20 model evaluations for the most used sampling methods
(docs/sampling.md's second quality table).

Trains the demo's class-conditional flow-matching UNet (`fastdiff demo`'s run, ~3 minutes on 2 CPU cores; an
existing run folder is reused), then samples 100 digits per class at cfg = 1 with each method from the same seeds
and scores them with the demo's Fréchet distance on the digit classifier's features against half of the real
digits (between the two real halves: ~0.5, the scale to read them against; fastdiff.demo.run).

Run: pip install ".[demo]" && python docs/scripts/digits_method_fid.py [RUN_FOLDER]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

METHODS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "unipc", "res_multistep")
BUDGETS = (10, 20)


def main(run_dir: Path) -> str:
    import fastdiff
    from fastdiff.demo import data
    from fastdiff.demo.models import load_model
    from fastdiff.demo.run import run
    from fastdiff.evaluation import frechet_distance

    run(out=run_dir, progress=False, judged_per_class=10, log=lambda *a: print(*a, file=sys.stderr))
    model, _ = load_model(run_dir / "checkpoints")
    model.eval()
    classifier = data.digit_classifier(0)
    real = classifier.features(data.digits().tensors[0])
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    half_a, half_b = real[order[:len(real) // 2]], real[order[len(real) // 2:]]
    y = torch.arange(10).repeat_interleave(100)
    rows = ["| method | " + " | ".join(f"{b} evaluations" for b in BUDGETS) + " |", "|---|" + "---|" * len(BUDGETS)]
    for method in METHODS:
        per = fastdiff.sampling.get_method(method).evals()
        cells = []
        for budget in BUDGETS:
            steps = max(1, round(budget / per))
            with torch.no_grad():
                x = fastdiff.sample(model, steps, 1.0, shape=(1, 8, 8), y=y, null_y=model.null_label, seed=0,
                                    method=method)
            cells.append(f"{frechet_distance(classifier.features(x), half_a):.3f}"
                         + (f" ({steps * per})" if steps * per != budget else ""))
        rows.append(f"| `{method}` | " + " | ".join(cells) + " |")
        print(rows[-1], file=sys.stderr)
    rows.append(f"| (real digits, one half against the other) | {frechet_distance(half_b, half_a):.3f} | |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "fastdiff-demo")))
