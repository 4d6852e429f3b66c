"""Side-by-side comparison grids: one column per image (input | restored | target, or any panels), the
whole image on top with the detail box drawn in, the box zoomed below it, as the KiT paper's figures do.

The detail box is where the target has the most texture (largest gradient energy), so the crop shows the
fine structure a restoration keeps or loses rather than a flat patch of sky.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PANEL_WIDTH = 320  # overview width of each column in pixels
BOX_COLOUR = (230, 30, 30)
LABEL_HEIGHT = 22
GAP = 6


def detail_box(target: np.ndarray, side: int | None = None) -> tuple[int, int, int]:
    """(top, left, side) of the square window with the largest gradient energy in `target` (HWC)."""
    height, width = target.shape[:2]
    side = side or int(np.clip(min(height, width) // 4, 16, 96))
    side = min(side, height, width)
    gray = target.astype(np.float64).mean(axis=2)
    energy = np.zeros_like(gray)
    energy[:, 1:] += np.diff(gray, axis=1) ** 2
    energy[1:, :] += np.diff(gray, axis=0) ** 2
    summed = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # integral image
    windows = summed[side:, side:] - summed[:-side, side:] - summed[side:, :-side] + summed[:-side, :-side]
    top, left = np.unravel_index(int(np.argmax(windows)), windows.shape)
    return int(top), int(left), side


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(pixels, 0, 1) * 255.0).round().astype(np.uint8), "RGB")


def _column(
    pixels: np.ndarray, box: tuple[int, int, int], label: str, font: ImageFont.ImageFont
) -> Image.Image:
    """One panel: label, overview with the box, the box zoomed to the panel width (nearest neighbour)."""
    top, left, side = box
    full = _to_image(pixels)
    scale = PANEL_WIDTH / full.width
    overview = full.resize((PANEL_WIDTH, max(1, round(full.height * scale))), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(overview)
    corners = [round(v * scale) for v in (left, top, left + side, top + side)]
    draw.rectangle(corners, outline=BOX_COLOUR, width=2)
    zoom = full.crop((left, top, left + side, top + side)).resize(
        (PANEL_WIDTH, PANEL_WIDTH), Image.Resampling.NEAREST
    )
    column = Image.new("RGB", (PANEL_WIDTH, LABEL_HEIGHT + overview.height + GAP + PANEL_WIDTH), "white")
    ImageDraw.Draw(column).text((4, 3), label, fill="black", font=font)
    column.paste(overview, (0, LABEL_HEIGHT))
    column.paste(zoom, (0, LABEL_HEIGHT + overview.height + GAP))
    return column


def comparison_grid(
    panels: Sequence[tuple[str, np.ndarray]], box: tuple[int, int, int] | None = None
) -> bytes:
    """PNG bytes of the panels (label, float HWC RGB in [0, 1], all the same size) side by side; the detail
    box defaults to the most textured window of the last panel (the target)."""
    shapes = {pixels.shape for _, pixels in panels}
    if len(shapes) != 1:
        raise ValueError(f"comparison panels differ in shape: {sorted(shapes)}")
    box = box or detail_box(panels[-1][1])
    font = ImageFont.load_default(size=14)
    columns = [_column(pixels, box, label, font) for label, pixels in panels]
    grid = Image.new("RGB", (len(columns) * (PANEL_WIDTH + GAP) - GAP, columns[0].height), "white")
    for index, column in enumerate(columns):
        grid.paste(column, (index * (PANEL_WIDTH + GAP), 0))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()
