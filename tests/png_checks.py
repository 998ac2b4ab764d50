"""What a written figure must be: a PNG that decodes, of the size drawn, with something drawn on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def drawn_png(
    path: Path,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """The pixels of ``path`` (RGB) after checking that it decodes as a PNG of ``size`` (width,
    height; None: any) and is not blank: several colours (axes, text and coloured lines), and a
    share of pixels off the background that a figure with no lines or an empty canvas lacks."""
    with Image.open(path) as img:
        assert img.format == "PNG", img.format
        if size is not None:
            assert img.size == size, (img.size, size)
        pixels = np.asarray(img.convert("RGB"))
    colour = np.ravel_multi_index(pixels.reshape(-1, 3).T, (256, 256, 256))
    assert len(np.unique(colour)) >= 16, f"{path}: {len(np.unique(colour))} colours, a blank or flat image"
    drawn = (colour != np.bincount(colour).argmax()).mean()  # off the most common colour, the background
    assert 0.01 < drawn < 0.9, f"{path}: {drawn:.3f} of the pixels drawn"
    return pixels


# accuracy_vs_latency.png (colln.report.plots.plot_pareto): 7.5 x 5 inches at 110 dpi.
PARETO_SIZE = (825, 550)
