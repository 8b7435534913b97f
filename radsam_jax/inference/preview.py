"""A PNG montage to eyeball a segmentation: the prompted slice and its neighbours.

Each panel is the slice `array[:, :, k].T` of the array it is given, the file's with its S/I axis
last (`SliceFrame.axial`: the frame of the voxel coordinates of `radsam segment`, x to the right,
y down), grey,
through the window the model saw (the caller's resolved window, stated on the first panel), every
object's mask contour in its colour, and the prompt (box in yellow, positive points green, negative
points red; edit points on their slices). Small slices are enlarged (nearest neighbour) so that
panels are at least 256 pixels wide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from radsam_jax.io import save_png_atomically
from radsam_jax.intensity import window_caption, window_unit

COLOURS = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (200, 64, 255), (0, 220, 160), (255, 128, 0), (160, 255, 64)]


def mask_contour(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D binary mask that touch the background (4-neighbourhood; outside the array counts
    as background, so a mask cut by the image edge is outlined there too)."""
    m = mask.astype(bool)
    p = np.pad(m, 1)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def preview_slices(center: int, bounds: tuple[int, int], count: int = 5) -> list[int]:
    """`count` slices around `center`, spread over the bounds, sorted and unique."""
    lo, hi = bounds
    step = max(1, (hi - lo) // (2 * max(1, count - 1)) or 1)
    half = count // 2
    picks = sorted({min(hi, max(lo, center + step * d)) for d in range(-half, half + 1)})
    return picks


def save_predictor_preview(path, predictor, labels: np.ndarray, objects: Sequence) -> Path:
    """`save_preview` of the predictor's volume as the model saw it (its intensities and window) and
    `labels` on the file's grid, on the grid its prompts address (the slice axis last)."""
    axial = predictor.frame.axial
    return save_preview(path, axial(predictor.intensities), axial(labels), objects, window=predictor.window,
                        intensity=predictor.intensity)


def save_preview(path, volume_array: np.ndarray, labels: np.ndarray, objects: Sequence, *, window: tuple[float, float],
                 intensity: str = "hu", slices: Optional[Sequence[int]] = None, min_panel: int = 256) -> Path:
    """Writes the montage PNG atomically; `objects` are prompt_file.ObjectPrompt (label, slice, prompts);
    `volume_array` in the units of `intensity` ("hu", or "percentile": VolumePredictor.intensities) and
    `window` (level, width) in them, the one the model was given (VolumePredictor.window)."""
    from PIL import Image, ImageDraw

    first = objects[0]
    if slices is None:
        slices = preview_slices(first.slice, first.bounds)
    n0, n1 = volume_array.shape[:2]
    scale = max(1, int(np.ceil(min_panel / max(n0, n1))))
    panels = []
    for k in slices:
        img = window_unit(volume_array[:, :, k].T, window) * 255
        rgb = np.repeat(img.astype(np.uint8)[..., None], 3, axis=-1)
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
        for i, obj in enumerate(objects):
            mask = (labels[:, :, k].T == obj.label)
            big = np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)
            rgb[mask_contour(big)] = COLOURS[i % len(COLOURS)]
        pil = Image.fromarray(rgb)
        draw = ImageDraw.Draw(pil)
        c = lambda v: (float(v) + 0.5) * scale  # voxel centre -> panel pixel
        for obj in objects:
            marks = []
            if obj.slice == k:
                if obj.box is not None:
                    x0, y0, x1, y1 = obj.box
                    draw.rectangle([c(x0), c(y0), c(x1), c(y1)], outline=(255, 255, 0), width=2)
                if obj.points is not None:
                    marks += list(zip(obj.points, obj.point_labels))
            for e in obj.edits:
                if e.slice == k:
                    marks += list(zip(e.points, e.point_labels))
            for (x, y), lab in marks:
                r = max(3, scale)
                colour = (0, 255, 0) if lab == 1 else (255, 0, 0)
                draw.ellipse([c(x) - r, c(y) - r, c(x) + r, c(y) + r], outline=(255, 255, 255), fill=colour)
        draw.text((4, 4), f"slice {k}" + (" (prompt)" if k == first.slice else ""), fill=(255, 255, 255))
        if not panels:  # the window once, on the first panel
            draw.text((4, 16), window_caption(window, intensity), fill=(255, 255, 255))
        panels.append(pil)
    gap = 4
    w = sum(p.width for p in panels) + gap * (len(panels) - 1)
    h = max(p.height for p in panels)
    montage = Image.new("RGB", (w, h), (0, 0, 0))
    x = 0
    for p in panels:
        montage.paste(p, (x, 0))
        x += p.width + gap
    return save_png_atomically(path, montage)
