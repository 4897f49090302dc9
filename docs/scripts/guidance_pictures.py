"""docs/img/guidance_rules.png and docs/img/editing.png: the guidance rules and the editing modes of
fastdiff.sample on the digits demo model (fastdiff.demo: a class-conditional flow-matching UNet on
scikit-learn's 8x8 digits, trained on the CPU).

- guidance_rules.png: one row per guidance rule, two digits per class (columns), the same seeds in
  every row, so that the rows differ only by the rule.
- editing.png: inpainting (top half known, plain replacement and RePaint) and img2img (real digits
  sampled toward the next class at four strengths) from the same ten real digits.

The model is trained once by ``fastdiff.demo.run.run`` into ``--work`` (default ~/.cache/fastdiff-docs)
and its checkpoint reused on later runs.

Run: pip install scikit-learn pillow && python docs/scripts/guidance_pictures.py
     (~6 minutes on 2 CPU cores the first time, mostly training; ~15 seconds with the cached model)
"""

from __future__ import annotations

import argparse
import pathlib

import torch

import fastdiff
from fastdiff.demo import data, images
from fastdiff.demo.models import load_model
from fastdiff.demo.run import run
from fastdiff.sampling.features.guidance import APG
from fastdiff.training import checkpoint

TRAIN_STEPS = 2000
SAMPLE_STEPS = 40
PER_CLASS = 2
INK = {"vmin": 1.0, "vmax": -1.0}  # pixel 1 (full ink) black on white, 0 mid grey, as the demo draws


def trained_model(work: pathlib.Path):
    """The demo's EMA model, trained into ``work`` by fastdiff.demo.run.run unless already there."""
    newest = checkpoint.latest(work / "checkpoints", warn=False) if (work / "checkpoints").is_dir() else None
    if newest is None or int(checkpoint.read(newest)[1]["step"]) < TRAIN_STEPS:
        run(out=work, steps=TRAIN_STEPS, judged_per_class=10)  # resumes an interrupted run
    model, _ = load_model(work / "checkpoints")
    return model


def guidance_rows(model) -> list[tuple[str, torch.Tensor]]:
    """(label, samples [10 * PER_CLASS, 1, 8, 8]) per guidance rule, the same labels and seeds in every row."""
    y = torch.arange(model.num_classes).repeat_interleave(PER_CLASS)
    common = {"shape": (1, 8, 8), "null_y": model.null_label, "seed": 0, "method": "heun"}
    rules = [
        ("no guidance (cfg 1)", 1.0, {}),
        ("cfg 4", 4.0, {}),
        ("cfg 4 + rescale 0.7", 4.0, {"guidance_rescale": 0.7}),
        ("cfg-zero* 4", 4.0, {"guidance": "cfg_zero_star"}),
        # guidance="apg" has diffusers' defaults (eta 1, norm threshold 15): on 8x8 digits |p_y - p_null| is
        # ~1-3, so the threshold never binds and the result is plain cfg; the paper's eta 0 and a threshold
        # that binds early (|update| ~2.5-2.9 for t < 0.3) show what APG does
        ("apg 4 (eta 0, threshold 2)", 4.0, {"guidance": APG(eta=0.0, norm_threshold=2.0)}),
        ("cfg++ 0.8 (ddim)", 0.8, {"guidance": "cfg_pp", "method": "ddim"}),
        ("cfg 4 + dynamic thresholding", 4.0, {"dynamic_thresholding": True}),
        ("cfg schedule 1 + 12 t(1 - t)", lambda t: 1.0 + 12.0 * t * (1.0 - t), {}),
    ]
    rows = [(label, fastdiff.sample(model, SAMPLE_STEPS, cfg, **{**common, "y": y, **extra}))
            for label, cfg, extra in rules]
    rows.append(("cfg 4, away from y+1 (-1)",
                 fastdiff.sample(model, SAMPLE_STEPS, [4.0, -1.0], conditions=[y, (y + 1) % 10], **common)))
    return rows


def draw_rules(rows, path: pathlib.Path) -> None:
    """One panel per class (PER_CLASS columns each, titled with the class), one row per rule."""
    stacked = torch.stack([x for _, x in rows])  # [rules, 10 * PER_CLASS, 1, 8, 8]
    per_class = stacked.unflatten(1, (-1, PER_CLASS))  # [rules, 10, PER_CLASS, 1, 8, 8]
    panels = [(str(c), per_class[:, c]) for c in range(per_class.shape[1])]
    images.labelled_grid(panels, row_labels=[label for label, _ in rows], path=path, scale=3, pad=1, **INK)


def one_real_digit_per_class():
    """The first real digit of each class, scaled to [-1, 1]: images [10, 1, 8, 8], labels [10]."""
    x, y = data.digits().tensors
    first = torch.stack([(y == c).nonzero()[0, 0] for c in range(data.DIGITS_NUM_CLASSES)])
    return x[first], y[first]


def editing_rows(model):
    """(inpainting rows, img2img rows) of (label, images [10, 1, 8, 8]) from the same real digits."""
    real, labels = one_real_digit_per_class()
    known = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    known[..., :4, :] = True  # the top half is known
    common = {"null_y": model.null_label, "seed": 0, "init": real}
    inpaint = [("real digit", real), ("input (grey: unknown)", real.masked_fill(~known, 0.0))]
    for resample in (1, 10):
        x = fastdiff.sample(model, SAMPLE_STEPS, 2.0, y=labels, method="euler", known_mask=known,
                            resample=resample, **common)
        inpaint.append((f"inpainted, resample {resample}" + (" (RePaint)" if resample > 1 else ""), x))
    target = (labels + 1) % 10
    img2img = [("real digit", real)]
    for strength in (0.3, 0.5, 0.7, 0.9):
        x = fastdiff.sample(model, SAMPLE_STEPS, 4.0, y=target, method="heun", strength=strength, **common)
        img2img.append((f"to y+1, strength {strength}", x))
    return inpaint, img2img


def draw_editing(inpaint, img2img, path: pathlib.Path) -> None:
    """The two grids one above the other, right-aligned so that their columns line up."""
    from PIL import Image

    grids = [images.labelled_grid((title, torch.stack([x for _, x in rows])[:, :, 0]),
                                  row_labels=[label for label, _ in rows], scale=4, **INK)
             for title, rows in (("inpainting (cfg 2, euler, 40 steps): classes 0-9", inpaint),
                                 ("img2img toward the next class (cfg 4, heun, 40 steps)", img2img))]
    width = max(g.width for g in grids)
    canvas = Image.new("L", (width, sum(g.height for g in grids)), 255)
    top = 0
    for g in grids:
        canvas.paste(g, (width - g.width, top))
        top += g.height
    canvas.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path.home() / ".cache" / "fastdiff-docs",
                        help="where the trained model is cached (default: %(default)s)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[1] / "img",
                        help="folder of the pictures (default: docs/img)")
    args = parser.parse_args()
    model = trained_model(args.work)
    args.out.mkdir(parents=True, exist_ok=True)
    draw_rules(guidance_rows(model), args.out / "guidance_rules.png")
    draw_editing(*editing_rows(model), args.out / "editing.png")
    for name in ("guidance_rules.png", "editing.png"):
        path = args.out / name
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
