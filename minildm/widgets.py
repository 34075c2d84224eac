"""Inspectors for the notebooks: pure render functions, and thin ipywidgets wiring around them.

The render functions return numpy arrays and strings, so the tests call them directly; the
``build_*`` functions only lay out controls and call a render function when a control moves.
"""

from __future__ import annotations

import io

import numpy as np

from minildm.config import ShapesConfig
from minildm.data.shapes import CATEGORIES, GRID, render_item

# distinct outline colours for the objects of one scene (RGB in [0, 1])
OVERLAY_COLOURS = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling (H, W, C) → (H·f, W·f, C): pixels stay visible as pixels."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def overlay_ground_truth(image: np.ndarray, masks: np.ndarray, boxes, factor: int = 8,
                         show_masks: bool = True, show_grid: bool = True) -> np.ndarray:
    """The image upscaled, with each object's mask tinted and its box outlined; (H·f, W·f, 3)."""
    out = upscale(image, factor).copy()
    for k, (mask, box) in enumerate(zip(masks, boxes)):
        colour = OVERLAY_COLOURS[k % len(OVERLAY_COLOURS)]
        if show_masks:
            m = upscale(mask[..., None], factor)[..., 0]
            out[m] = 0.55 * out[m] + 0.45 * colour
        x0, y0, x1, y1 = (v * factor for v in box)
        out[y0:y1, [x0, x1 - 1]] = colour
        out[[y0, y1 - 1], x0:x1] = colour
    if show_grid:
        side = out.shape[0]
        for k in range(1, GRID):
            line = int(round(k * side / GRID))
            out[line, :] = 0.5 * out[line, :] + 0.5
            out[:, line] = 0.5 * out[:, line] + 0.5
    return out


def describe_scene(item: dict, reads=None) -> str:
    """Caption, full caption and a ground-truth table (and the judge's reading) as HTML."""
    rows = "".join(
        f"<tr><td>{k}</td><td>{o.shape}</td><td>{o.colour}</td><td>{o.size}</td><td>{o.cell}</td>"
        f"<td>{box}</td></tr>"
        for k, (o, box) in enumerate(zip(item["scene"].objects, item["boxes"])))
    html = (f"<b>category</b> {item['scene'].category}<br><b>caption</b> {item['caption']}<br>"
            f"<b>full caption</b> {item['full_caption']}<br>"
            "<table><tr><th>#</th><th>shape</th><th>colour</th><th>size</th><th>cell</th><th>box</th></tr>"
            f"{rows}</table>")
    if reads is not None:
        found = ", ".join(f"{o.size} {o.colour} {o.shape} @ {o.cell} ({o.confidence:.2f})" for o in reads)
        html += f"<b>the judge reads</b> {found or 'nothing'}"
    return html


def render_scene_view(seed: int, index: int, image_size: int = 32, show_masks: bool = True,
                      show_grid: bool = True, judge=None) -> tuple[np.ndarray, str]:
    """One scene of the world as the browser shows it: (overlay image, HTML description)."""
    item = render_item(seed, index, ShapesConfig(image_size=image_size))
    factor = max(1, 256 // image_size)
    picture = overlay_ground_truth(item["image"], item["masks"], item["boxes"], factor, show_masks, show_grid)
    reads = None
    if judge is not None:
        from minildm.data.datasets import to_tensor

        reads = judge.read(to_tensor(item["image"])[None])[0]
    return picture, describe_scene(item, reads)


def to_png(image: np.ndarray) -> bytes:
    """(H, W, 3) float in [0, 1] → PNG bytes for an ``ipywidgets.Image``."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def build_scene_browser(seed: int = 0, image_size: int = 32, judge=None):
    """A scene browser: seed, index, masks and grid toggles → picture and ground truth."""
    import ipywidgets as widgets

    seed_box = widgets.IntText(value=seed, description="seed")
    index = widgets.IntSlider(value=0, min=0, max=999, description="item", continuous_update=False)
    masks = widgets.Checkbox(value=True, description="masks")
    grid = widgets.Checkbox(value=True, description="grid")
    picture = widgets.Image(format="png", width=256, height=256)
    text = widgets.HTML()

    def update(_change=None):
        image, html = render_scene_view(seed_box.value, index.value, image_size, masks.value, grid.value, judge)
        picture.value, text.value = to_png(image), html

    for control in (seed_box, index, masks, grid):
        control.observe(update, names="value")
    update()
    panel = widgets.VBox([widgets.HBox([seed_box, index, masks, grid]), widgets.HBox([picture, text])])
    panel.controls = {"seed": seed_box, "index": index, "masks": masks, "grid": grid,
                      "picture": picture, "text": text}
    return panel


def category_examples(seed: int = 0, per_category: int = 4, image_size: int = 32):
    """A few items of each category: (images (N, H, W, 3), captions) for a grid figure."""
    images, captions, found = [], [], {c: 0 for c in CATEGORIES}
    index = 0
    while min(found.values()) < per_category:
        item = render_item(seed, index, ShapesConfig(image_size=image_size))
        category = item["scene"].category
        if found[category] < per_category:
            found[category] += 1
            images.append((CATEGORIES.index(category), item["image"], item["caption"]))
        index += 1
    images.sort(key=lambda t: t[0])
    return np.stack([t[1] for t in images]), [t[2] for t in images]
