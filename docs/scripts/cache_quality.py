"""Step caching's error per model call on the analytic oracle (docs/guidance.md, "Step caching": its table and
docs/img/cache_quality.png).

The model: the exact velocity of fastdiff.mixtures.ring_mixture(heterogeneous=True) (eight 2-D Gaussians of
different widths and weights) under CondOT, grid torch.linspace(1e-3, 1, steps + 1), 2048 points from one fixed
noise. For each method and cache rule (fastdiff.sampling.features.caching):

- calls: the model calls the cached run makes (counted by a wrapper around the model);
- error: mean per-sample L2 distance of the cached run to the uncached run of the same steps from the same noise;
- plain: the same distance for a plain run with the same calls (steps = calls / evaluations per step: heun's 2),
  and ratio = error / plain: below 1, caching beats simply taking fewer steps.

Every rule runs with ``order=2`` (the kept outputs extrapolated in t: the default, order=None, on a deterministic
method; on a stochastic one the default is 0) and ``order=0`` (the peers' plain reuse of the last output).
Stochastic methods (euler_ancestral, dpmpp_2m_sde at their default eta) are
scored as docs/scripts/method_quality.py scores them: sliced Wasserstein-1 of 8192 samples to 65536 exact samples
of the mixture, cached against plain at the same calls (same noise and seed). LazyCache decides on the guided
prediction: at cfg = 1 (here) it is EasyCache exactly, so the picture leaves it out.

Run: pip install ".[docs]" && python docs/scripts/cache_quality.py   (5 minutes of CPU time on 2 cores;
    OMP_NUM_THREADS=1 on a loaded machine)
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
import time

import torch

import fastdiff
from fastdiff.mixtures import MixtureModel, ring_mixture
from fastdiff.sampling.features.caching import AdaptiveCache, EasyCache, get_cache

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from method_quality import sliced_w1  # noqa: E402  (the project's stochastic score)

N, N_SDE, N_EXACT = 2048, 8192, 65536
DOCS = pathlib.Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- cache-quality: begin (docs/scripts/cache_quality.py) -->", "<!-- cache-quality: end -->"
DEFAULTS = ("easycache", "lazycache", "adaptive")
# the settings measured to give >= 1.8x fewer calls at 50 steps
MEASURED = {"euler": [EasyCache(reuse_threshold=0.2)],
            # warm-up 3: one more corrector reused (1.85x at the default 4, ratio 0.51)
            "heun": [AdaptiveCache(threshold=0.3, max_skips=None, warmup=3)],
            "dpmpp_2m": [AdaptiveCache(threshold=0.3, max_skips=1), AdaptiveCache(threshold=0.3, max_skips=2)]}
ROWS = [(m, 50, MEASURED[m] + list(DEFAULTS)) for m in ("euler", "heun", "dpmpp_2m")]
ROWS += [(m, 50, [EasyCache(reuse_threshold=0.2), AdaptiveCache(threshold=0.3, max_skips=2)] + list(DEFAULTS))
         for m in ("euler_ancestral", "dpmpp_2m_sde")]
ROWS += [(m, 10, MEASURED[m] + list(DEFAULTS)) for m in ("euler", "dpmpp_2m")]
SWEEP = [EasyCache(reuse_threshold=r) for r in (0.05, 0.1, 0.2, 0.4, 0.8)]
SWEEP += [AdaptiveCache(threshold=r, max_skips=s) for r in (0.01, 0.3) for s in (1, 2, None)]
STOCHASTIC = ("euler_ancestral", "dpmpp_2m_sde")


class Counted:
    """The model, counting its calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, y=None):
        self.calls += 1
        return self.model(x, t, y)


def label(rule) -> str:
    if isinstance(rule, str):
        return f'"{rule}"'
    fields = {"easycache": ("reuse_threshold",), "lazycache": ("reuse_threshold",),
              "adaptive": ("threshold", "max_skips")}[rule.name]
    if rule.name == "adaptive" and rule.warmup != AdaptiveCache.warmup:
        fields += ("warmup",)
    return f"{type(rule).__name__}(" + ", ".join(f"{f}={getattr(rule, f)}" for f in fields) + ")"


class Bench:
    def __init__(self):
        self.mixture = ring_mixture(heterogeneous=True)
        self.model = MixtureModel(self.mixture, "condot", "velocity")
        self.noise = torch.randn(N_SDE, 2, generator=torch.Generator().manual_seed(0))
        self.exact = self.mixture.sample(N_EXACT, generator=torch.Generator().manual_seed(1))[0]
        self.floor = sliced_w1(self.mixture.sample(N_SDE, generator=torch.Generator().manual_seed(2))[0], self.exact)
        self.memo = {}

    def run(self, method: str, steps: int, cache=None) -> tuple[torch.Tensor, int]:
        key = (method, steps, cache)
        if key not in self.memo:
            counted = Counted(self.model)
            noise = self.noise if method in STOCHASTIC else self.noise[:N]
            x = fastdiff.sample(counted, None, noise=noise, path="condot", prediction="velocity", method=method,
                                timesteps=torch.linspace(1e-3, 1, steps + 1), cache=cache, seed=0)
            self.memo[key] = (x.double(), counted.calls)
        return self.memo[key]

    def error(self, method: str, steps: int, x: torch.Tensor) -> float:
        if method in STOCHASTIC:
            return sliced_w1(x, self.exact)
        return float((x - self.run(method, steps)[0]).norm(dim=1).mean())

    def plain(self, method: str, steps: int, calls: int) -> tuple[float, int]:
        """A plain run's error at (about) ``calls`` model calls, and its calls."""
        per = self.run(method, steps)[1] / steps
        x, used = self.run(method, max(1, round(calls / per)))
        return self.error(method, steps, x), used

    def measure(self, method: str, steps: int, rule) -> dict:
        x, calls = self.run(method, steps, rule)
        full = self.run(method, steps)[1]
        err = self.error(method, steps, x)
        if calls == full:
            return dict(calls=calls, fewer=1.0, err=err, plain=None, ratio=None)
        plain, used = self.plain(method, steps, calls)
        return dict(calls=calls, fewer=full / calls, err=err, plain=plain, used=used, ratio=err / plain)


def cells(r: dict) -> list[str]:
    if r["ratio"] is None:
        return [f"{r['calls']} (1x)", f"{r['err']:.3g}", "", "no reuse"]
    used = f" ({r['used']} calls)" if r["used"] != r["calls"] else ""
    mark = "**" if r["ratio"] >= 1 else ""
    return [f"{r['calls']} ({r['fewer']:.2f}x)", f"{r['err']:.3g}", f"{r['plain']:.3g}{used}",
            f"{mark}{r['ratio']:.2f}{mark}"]


def table(bench: Bench) -> str:
    out = ["| method | steps | rule (order 2) | calls (fewer) | error | plain, same calls | ratio | "
           "order 0: calls (fewer) | error | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, steps, rules in ROWS:
        what = f"`{method}` (SW1)" if method in STOCHASTIC else f"`{method}`"
        for rule in rules:
            obj = dataclasses.replace(get_cache(rule), order=2)  # explicit: order=None is 0 on a stochastic method
            two = bench.measure(method, steps, obj)
            zero = bench.measure(method, steps, dataclasses.replace(obj, order=0))
            c0 = cells(zero)
            out.append(f"| {what} | {steps} | {label(rule)} | " + " | ".join(cells(two)) + " | "
                       + " | ".join([c0[0], c0[1], c0[3]]) + " |")
            print(out[-1], file=sys.stderr)
    out.append(f"\nerror: mean distance to the uncached run of the same steps from the same noise (2048 points); "
               "(SW1): stochastic, sliced Wasserstein-1 to exact samples of the mixture (8192 against 65536; its "
               f"floor, exact against exact: {bench.floor:.3f}; uncached 50 steps: "
               + ", ".join(f"{m} {bench.error(m, 50, bench.run(m, 50)[0]):.3f}" for m in STOCHASTIC)
               + "). plain: a run of fewer steps with the same model calls (in parentheses where they differ); "
               "ratio = error / plain, **bold** where caching loses (>= 1). Quoted rules: the rule's defaults. "
               "order 0: the same rule reusing the last output as is (the peers').")
    return "\n".join(out)


def picture(bench: Bench, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    for ax, method in zip(axes, ("euler", "heun", "dpmpp_2m")):
        per = bench.run(method, 50)[1] // 50
        steps = range(10 // per, 50)
        ax.loglog([bench.run(method, s)[1] for s in steps], [bench.error(method, 50, bench.run(method, s)[0])
                                                              for s in steps], "k-", lw=1.2, label="plain, fewer steps")
        for rule in SWEEP:
            for order, marker in ((2, "o"), (0, "x")):  # explicit orders (None: 0 on a stochastic method)
                x, calls = bench.run(method, 50, dataclasses.replace(rule, order=order))
                color = "tab:blue" if rule.name == "easycache" else \
                    {1: "tab:orange", 2: "tab:red", None: "tab:purple"}[rule.max_skips]
                ax.loglog(calls, max(bench.error(method, 50, x), 1e-7), marker, color=color, ms=6,
                          mfc=color if marker == "o" else "none")
        ax.set_title(f"{method}, 50 steps")
        ax.set_xlabel("model calls")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([5, 10, 20, 30, 50, 100] if method == "heun" else [5, 10, 20, 30, 50])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mean distance to the uncached 50-step run")
    handles = [plt.Line2D([], [], color="k", label="plain, fewer steps")]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=n) for c, n in (
        ("tab:blue", "EasyCache, reuse_threshold 0.05-0.8"), ("tab:orange", "AdaptiveCache, max_skips=1"),
        ("tab:red", "AdaptiveCache, max_skips=2"), ("tab:purple", "AdaptiveCache, max_skips=None"))]
    handles += [plt.Line2D([], [], ls="", marker="o", color="grey", label="order 2 (default)"),
                plt.Line2D([], [], ls="", marker="x", color="grey", label="order 0 (plain reuse)")]
    axes[2].legend(handles=handles, fontsize=7.5)
    fig.suptitle("step caching on the 8-mode oracle: error against model calls (AdaptiveCache thresholds 0.01, 0.3; "
                 "docs/scripts/cache_quality.py)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}", file=sys.stderr)


def write_docs(path: pathlib.Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Into the markers, else at the end of a "## Step caching" section (made at the end if absent)."""
    text = path.read_text()
    block = f"{begin}\n{block}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        if "\n## Step caching" not in text:
            text = text.rstrip("\n") + "\n\n## Step caching\n"
        start = text.index("\n## Step caching") + 1
        nxt = text.find("\n## ", start)
        nxt = len(text) if nxt < 0 else nxt + 1
        text = text[:nxt].rstrip("\n") + "\n\n" + block + "\n" + ("\n" + text[nxt:] if nxt < len(text) else "")
    path.write_text(text)


def main() -> None:
    t0 = time.perf_counter()
    bench = Bench()
    block = table(bench)
    print(block)
    write_docs(DOCS / "guidance.md", block)
    picture(bench, DOCS / "img" / "cache_quality.png")
    print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
