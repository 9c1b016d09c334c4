"""Robust image loading: any PNG/JPEG, any size or mode, with one-line errors for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import TernvlmError


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB; transparent pixels are composited on white."""
    p = Path(path)
    if not p.exists():
        raise TernvlmError(f"image not found: {p}")
    if p.is_dir():
        raise TernvlmError(f"image path is a directory: {p}")
    if p.stat().st_size == 0:
        raise TernvlmError(f"image file is empty (0 bytes): {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise TernvlmError(f"cannot read image {p}: {exc}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def to_square(im: Image.Image, size: int, resize: str, mean: tuple[float, ...]) -> Image.Image:
    """``size`` x ``size`` RGB image, bicubic, as transformers' PIL image processors do it.

    ``stretch``: resize to the square. ``crop``: resize the shortest edge to ``size`` (aspect
    kept), then center crop (CLIP). ``pad``: pad to a square with the ``mean`` colour, centred,
    then resize (LLaVA ``do_pad``).
    """
    im = to_rgb(im)
    w, h = im.size
    if resize == "pad" and w != h:
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in mean))
        square.paste(im, ((side - w) // 2, (side - h) // 2))
        im, w, h = square, side, side
    if resize == "crop" and w != h:
        if w < h:
            w, h = size, int(size * h / w)
        else:
            w, h = int(size * w / h), size
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        top, left = (h - size) // 2, (w - size) // 2
        return im.crop((left, top, left + size, top + size))
    return im if im.size == (size, size) else im.resize((size, size), Image.Resampling.BICUBIC)


def to_pixels(
    images: list[Image.Image],
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resize: str = "stretch",
) -> torch.Tensor:
    """Resize (bicubic, see :func:`to_square`) and normalise images to [B, 3, size, size]."""
    arrs = []
    for im in images:
        im = to_square(im, size, resize, mean)
        arrs.append(np.asarray(im, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (x - m) / s
