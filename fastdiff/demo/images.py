"""Image grids for the demos: panels of grayscale samples side by side, titled, with row labels.

Needs Pillow (``pip install pillow`` or ``pip install 'fastdiff[demo]'``), imported only when used.
"""

from __future__ import annotations

import math
import os

import torch

__all__ = ["image_format", "labelled_grid"]


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as exc:
        raise ImportError("image grids need Pillow: pip install pillow (or pip install 'fastdiff[demo]')") from exc
    return Image, ImageDraw, ImageFont


def image_format(path, what: str = "path") -> str:
    """The Pillow format that ``path``'s suffix names ("PNG" for .png, "JPEG" for .jpg/.jpeg, ...); a
    ValueError naming ``what`` for a suffix Pillow cannot write. No suffix: PNG."""
    Image = _pil()[0]
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if not suffix:
        return "PNG"
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        writable = sorted(e for e, f in Image.registered_extensions().items() if f in Image.SAVE)
        common = [e for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".gif") if e in writable]
        raise ValueError(f"{what} {os.fspath(path)!r}: cannot write images with the suffix {suffix!r} "
                         f"(use one of {', '.join(common or writable)})")
    return fmt


def _font(ImageFont, size: int):
    try:  # Pillow >= 10.1: a scalable default font
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # older Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _panel_images(images, index: int) -> torch.Tensor:
    x = torch.as_tensor(images).detach().cpu()
    if x.dim() == 5 and x.shape[2] == 1:  # [rows, cols, 1, H, W]: one channel
        x = x[:, :, 0]
    if x.dim() != 4 or min(x.shape) < 1:
        raise ValueError(f"panels[{index}] images must have shape [rows, cols, H, W] (or "
                         f"[rows, cols, 1, H, W]), got {tuple(x.shape)}")
    return x.float()


def labelled_grid(panels, row_labels=None, path=None, scale: int = 4, pad: int = 2,
                  vmin: float = -1.0, vmax: float = 1.0, font_size: int = 12):
    """Draw ``panels`` side by side on a white background and return a grayscale PIL image.

    Args:
        panels: list of ``(title, images)``, images a tensor [rows, cols, H, W] (every panel has the
            same rows and H). Values map linearly from ``vmin`` (black) to ``vmax`` (white), clamped;
            ``vmin > vmax`` inverts.
        row_labels: optional list of ``rows`` labels drawn left of the rows (e.g. digit classes).
        path: where to save the picture (optional), in the format its suffix names (.png, .jpg, ...;
            PNG without a suffix); an unknown suffix is a ValueError, raised before drawing. A
            file object gets PNG.
        scale: nearest-neighbour upscaling of every image (8x8 digits become 32x32 at scale 4).
        pad: pixels between images; panels are ``max(6 * pad, 12)`` apart and the border is
            ``max(2 * pad, 4)`` wide.
    """
    Image, ImageDraw, ImageFont = _pil()
    fmt = image_format(path) if isinstance(path, (str, os.PathLike)) else "PNG"
    if isinstance(panels, tuple) and len(panels) == 2 and isinstance(panels[0], str):
        panels = [panels]  # one (title, images) pair
    panels = list(panels)
    if not panels:
        raise ValueError("panels must hold at least one (title, images) pair")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmin == vmax:
        raise ValueError(f"vmin and vmax must be finite and differ, got {vmin}, {vmax}")
    titles, grids = [], []
    for i, item in enumerate(panels):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"panels[{i}] must be a (title, images) pair")
        titles.append(str(item[0]))
        grids.append(_panel_images(item[1], i))
    rows, h = grids[0].shape[0], grids[0].shape[2]
    for i, g in enumerate(grids):
        if g.shape[0] != rows or g.shape[2] != h:
            raise ValueError(f"every panel needs the same rows and image height; panels[0] has "
                             f"rows={rows}, H={h}, panels[{i}] has rows={g.shape[0]}, H={g.shape[2]}")
    labels = [] if row_labels is None else [str(v) for v in row_labels]
    if row_labels is not None and len(labels) != rows:
        raise ValueError(f"row_labels has {len(labels)} labels for {rows} rows")

    font = _font(ImageFont, font_size)
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    margin, gap, space = max(2 * pad, 4), max(6 * pad, 12), 4
    cell_h = h * scale
    grid_h = rows * cell_h + (rows - 1) * pad
    label_w = max((_text_size(measure, s, font)[0] for s in labels), default=0)
    label_w = label_w + space if label_w else 0
    title_h = max(_text_size(measure, s, font)[1] for s in titles)
    title_h = title_h + space if title_h else 0
    # Each panel's slot is as wide as its grid or its title; the grid is centred in the slot.
    grid_ws = [g.shape[1] * g.shape[3] * scale + (g.shape[1] - 1) * pad for g in grids]
    slot_ws = [max(gw, _text_size(measure, s, font)[0]) for gw, s in zip(grid_ws, titles)]
    width = 2 * margin + label_w + sum(slot_ws) + gap * (len(grids) - 1)
    height = 2 * margin + title_h + grid_h
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)

    top = margin + title_h
    for r, s in enumerate(labels):  # right-aligned, vertically centred on the row
        tw, th = _text_size(measure, s, font)
        left, t0 = draw.textbbox((0, 0), s, font=font)[:2]
        y = top + r * (cell_h + pad) + (cell_h - th) // 2 - t0
        draw.text((margin + label_w - space - tw - left, y), s, fill=0, font=font)
    x0 = margin + label_w
    for title, g, gw, sw in zip(titles, grids, grid_ws, slot_ws):
        if title:
            tw = _text_size(measure, title, font)[0]
            left, t0 = draw.textbbox((0, 0), title, font=font)[:2]
            draw.text((x0 + (sw - tw) // 2 - left, margin - t0), title, fill=0, font=font)
        pixels = ((g - vmin) / (vmax - vmin)).nan_to_num(0.0).clamp(0, 1).mul(255).round().to(torch.uint8)
        gx = x0 + (sw - gw) // 2
        cell_w = g.shape[3] * scale
        for r in range(g.shape[0]):
            for c in range(g.shape[1]):
                img = Image.frombytes("L", (g.shape[3], g.shape[2]), pixels[r, c].contiguous().numpy().tobytes())
                img = img.resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(img, (gx + c * (cell_w + pad), top + r * (cell_h + pad)))
        x0 += sw + gap
    if path is not None:
        try:
            canvas.save(path, format=fmt)
        except OSError as e:
            if "mode" not in str(e):  # "cannot write mode L as ...": a format without grayscale
                raise
            canvas.convert("RGB").save(path, format=fmt)
    return canvas
