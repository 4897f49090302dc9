"""Step caching on a trained model: Fréchet distance against model calls on the digits demo model, cached and plain
(docs/guidance.md, "Step caching": its second table and docs/img/digits_cache_fid.png).

The model and score are docs/scripts/digits_method_fid.py's: the demo's class-conditional flow-matching UNet
(`fastdiff demo`'s run; an existing run folder is reused, training resumes from its last checkpoint), 100 digits per
class at cfg = 1 from the same seed, scored with the demo's Fréchet distance on the digit classifier's features
against half of the real digits (the two real halves against each other: ~0.5, the scale to read them by).

For euler, heun, dpmpp_2m and dpmpp_2m_sde at 20 and 50 steps: the uncached run, cached runs with a few settings of
each rule (fastdiff.sampling.features.caching; order 2, and EasyCache's plain reuse, order 0), and a
plain run of fewer steps with the same model calls (counted by a forward hook on the model). The picture adds plain
runs over 5..50 steps.

Training the demo model takes ~3 minutes on 2 idle CPU cores (59 minutes on 2 cores shared with four other jobs);
sampling and scoring ~340 model runs, 8.5 minutes more (there, with OMP_NUM_THREADS=1: two threads per job on a
loaded machine ran several times slower). The sample counts are digits_method_fid.py's, not cut.

Run: pip install ".[demo,docs]" && python docs/scripts/digits_cache_fid.py [RUN_FOLDER]   (default: fastdiff-demo)
"""

from __future__ import annotations

import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from cache_quality import label, write_docs  # noqa: E402

METHODS = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde")
STEPS = (20, 50)
PLAIN_STEPS = (5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50)
PER_CLASS = 100
DOCS = pathlib.Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- digits-cache: begin (docs/scripts/digits_cache_fid.py) -->", "<!-- digits-cache: end -->"


def rules():
    from fastdiff.sampling.features.caching import AdaptiveCache, EasyCache

    # order 2 explicit: the measured setting (the default order=None is 0 on dpmpp_2m_sde, since this table's 13.5)
    return [EasyCache(reuse_threshold=0.1, order=2), EasyCache(reuse_threshold=0.2, order=2),
            EasyCache(reuse_threshold=0.4, order=2), EasyCache(reuse_threshold=0.2, order=0),
            AdaptiveCache(threshold=0.3, max_skips=1, order=2), AdaptiveCache(threshold=0.3, max_skips=2, order=2)]


class Bench:
    def __init__(self, run_dir: pathlib.Path):
        from fastdiff.demo import data
        from fastdiff.demo.models import load_model
        from fastdiff.demo.run import run

        run(out=run_dir, progress=False, judged_per_class=10, log=lambda *a: print(*a, file=sys.stderr))
        self.model, _ = load_model(run_dir / "checkpoints")
        self.calls = 0
        self.model.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        self.classifier = data.digit_classifier(0)
        real = self.classifier.features(data.digits().tensors[0])
        order = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
        self.half_a, self.half_b = real[order[:len(real) // 2]], real[order[len(real) // 2:]]
        self.memo = {}

    def fd(self, features) -> float:
        from fastdiff.evaluation import frechet_distance

        return frechet_distance(features, self.half_a)

    def run(self, method: str, steps: int, cache=None) -> tuple[float, int]:
        """(Fréchet distance, model calls) of one run."""
        import fastdiff

        key = (method, steps, cache)
        if key not in self.memo:
            y = torch.arange(10).repeat_interleave(PER_CLASS)
            self.calls = 0
            with torch.no_grad():
                x = fastdiff.sample(self.model, steps, 1.0, shape=(1, 8, 8), y=y, null_y=self.model.null_label,
                                    seed=0, method=method, cache=cache)
            self.memo[key] = (self.fd(self.classifier.features(x)), self.calls)
        return self.memo[key]

    def plain_at(self, method: str, steps: int, calls: int) -> tuple[float, int]:
        per = self.run(method, steps)[1] / steps
        return self.run(method, max(1, round(calls / per)))


def table(bench: Bench) -> str:
    out = ["| method | steps | rule | calls (fewer) | FD | plain, same calls | uncached |",
           "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for steps in STEPS:
            full_fd, full = bench.run(method, steps)
            for rule in rules():
                fd, calls = bench.run(method, steps, rule)
                pfd, used = bench.plain_at(method, steps, calls)
                name = label(rule) + (" order 0" if rule.order == 0 else "")
                mark = "**" if round(fd, 3) > round(pfd, 3) else ""  # worse as printed
                out.append(f"| `{method}` | {steps} | {name} | {calls} ({full / calls:.2f}x) | {mark}{fd:.3f}{mark} | "
                           f"{pfd:.3f}" + (f" ({used} calls)" if used != calls else "") + f" | {full_fd:.3f} |")
                print(out[-1], file=sys.stderr)
    out.append(f"\nFD: Fréchet distance on the digit classifier's features against half of the real digits "
               f"({10 * PER_CLASS} samples, {PER_CLASS} per class, cfg 1); the other half against it: "
               f"{bench.fd(bench.half_b):.3f}. plain: a run "
               "of fewer steps with the same model calls (in parentheses where they differ); **bold**: the cached run "
               "is worse than it. uncached: the run of the row's steps without caching.")
    return "\n".join(out)


def picture(bench: Bench, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = ["#9ecae1", "#3182bd", "#08519c", "#000000", "tab:orange", "tab:red"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 5))
    for ax, method in zip(axes, METHODS):
        plain = [bench.run(method, s) for s in PLAIN_STEPS]
        ax.loglog([c for _, c in plain], [f for f, _ in plain], "k-", lw=1, label="plain, 5..50 steps")
        for rule, color in zip(rules(), colors):
            for steps, marker in zip(STEPS, ("^", "o")):
                fd, calls = bench.run(method, steps, rule)
                ax.loglog(calls, fd, marker, color=color, ms=7, mfc="none" if rule.order == 0 else color,
                            label=label(rule) + (" order 0" if rule.order == 0 else "") if steps == 50 else None)
        ax.axhline(bench.fd(bench.half_b), color="grey", lw=0.8, ls=":")
        ax.set_title(method)
        ax.set_xlabel("model calls")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([5, 10, 20, 30, 50, 100] if method == "heun" else [5, 10, 20, 30, 50])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("Fréchet distance (real halves: dotted)")
    axes[-1].legend(fontsize=7, title="cached (triangles: 20 steps, circles: 50)", title_fontsize=7)
    fig.suptitle("step caching on the digits demo model, cfg 1 (docs/scripts/digits_cache_fid.py)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}", file=sys.stderr)


def main(run_dir: pathlib.Path) -> None:
    t0 = time.perf_counter()
    bench = Bench(run_dir)
    t1 = time.perf_counter()
    block = table(bench)
    print(block)
    write_docs(DOCS / "guidance.md", block, BEGIN, END)
    picture(bench, DOCS / "img" / "digits_cache_fid.png")
    print(f"model ready in {t1 - t0:.0f} s, sampling and scoring {time.perf_counter() - t1:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "fastdiff-demo"))
