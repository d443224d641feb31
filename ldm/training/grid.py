"""Image grids for validation samples (atomic PNG writes)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from PIL import Image

from ldm.formats.atomic import atomic_write


def save_grid(
    images: list, path: str | os.PathLike, rows: int | None = None, captions: list[str] | None = None, pad: int = 2
) -> Path:
    """Tile PIL images (same size) row by row; captions (one per column's first image) are written
    into the PNG's `captions` text chunk rather than drawn, so pixels stay the model's."""
    from PIL.PngImagePlugin import PngInfo

    if not images:
        raise ValueError("save_grid: no images")
    path = Path(path)
    w, h = images[0].size
    n = len(images)
    rows = rows or max(1, int(math.sqrt(n)))
    cols = math.ceil(n / rows)
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    info = PngInfo()
    if captions:
        info.add_text("captions", "\n".join(captions))
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG", pnginfo=info))
