"""The painting canvas of notebook 05: paint phrases on a grid, sample, see where attention went.

The widget is a grid of buttons (no front-end extension needed): choose a phrase (a brush, one
colour each) or the eraser, click cells to paint them, set the weight w′ and the recipe
(:mod:`minildm.paint`), press *sample*. The image appears beside each painted phrase's
cross-attention map. Everything it shows comes from the plain functions here — :func:`paint_cell`,
:func:`canvas_regions`, :func:`render_canvas`, :func:`paint_and_sample`,
:func:`render_paint_result` — which the tests call directly.
"""

from __future__ import annotations

import numpy as np

from minildm.paint_recipe import DEFAULT_RECIPE, PAINT_GUIDANCE, RECIPES
from minildm.widgets import attention_overlay, to_png, upscale

BRUSH_COLOURS = ((0.85, 0.2, 0.2), (0.2, 0.4, 0.9), (0.2, 0.7, 0.3), (0.9, 0.7, 0.1))  # phrase 1, 2, 3, 4
CANVAS_SIDE = 6  # cells per side: each is 1/6 of the image, so a 3×3 grid cell is 2×2 canvas cells


def blank_canvas(side: int = CANVAS_SIDE) -> np.ndarray:
    """0: unpainted; k ≥ 1: painted with phrase k."""
    return np.zeros((side, side), dtype=np.int64)


def paint_cell(canvas: np.ndarray, row: int, col: int, brush: int) -> np.ndarray:
    """The canvas with one cell painted with ``brush`` (0 erases)."""
    out = canvas.copy()
    out[row, col] = brush
    return out


def canvas_regions(canvas: np.ndarray, phrases: list[str]) -> dict[str, np.ndarray]:
    """{phrase: its (side, side) 0/1 mask} for the phrases painted at least once."""
    return {phrase: (canvas == k + 1).astype(np.float32) for k, phrase in enumerate(phrases)
            if (canvas == k + 1).any()}


def render_canvas(canvas: np.ndarray, size: int = 96) -> np.ndarray:
    """The canvas as a picture: each phrase in its brush colour on white, with a light grid."""
    side = canvas.shape[0]
    picture = np.ones((side, side, 3))
    for k, colour in enumerate(BRUSH_COLOURS):
        picture[canvas == k + 1] = colour
    picture = upscale(picture, size // side)
    picture[::size // side] = 0.8
    picture[:, ::size // side] = 0.8
    return picture


def paint_and_sample(pipeline, prompt: str, regions: dict, weight: float, seed: int = 0, steps: int = 50,
                     guidance: float = PAINT_GUIDANCE, recipe: str = DEFAULT_RECIPE) -> dict:
    """One painted sample: the ``image`` (H, W, 3) in [0, 1] and, per painted phrase, its
    cross-attention map (mean over layers, heads, steps and the phrase's tokens, at the image's
    resolution). ``recipe``: one of :data:`minildm.paint.RECIPES`."""
    import torch
    import torch.nn.functional as F

    from minildm.data.datasets import to_numpy
    from minildm.paint import phrase_tokens, sample_painted

    latents, hook = sample_painted(pipeline, [prompt], regions, weight, steps=steps, guidance=guidance, seed=seed,
                                   record=bool(regions), recipe=recipe)
    image = to_numpy(pipeline.decode(latents)[0].cpu())
    maps = {}
    for phrase in regions:
        tokens = phrase_tokens(pipeline.encoder, prompt, phrase)
        per_layer = []
        for calls in hook.maps.values():
            probs = torch.stack(calls)[:, 0]  # (steps, heads, N, L) of the one image
            side = int(round(probs.shape[2] ** 0.5))
            m = probs[..., tokens].sum(-1).mean((0, 1)).view(1, 1, side, side)
            per_layer.append(F.interpolate(m, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0])
        maps[phrase] = torch.stack(per_layer).mean(0).numpy() if per_layer else np.zeros(image.shape[:2])
    return {"image": image, "maps": maps}


def render_paint_result(result: dict, size: int = 128) -> np.ndarray:
    """The sample, then one attention overlay per painted phrase, side by side."""
    image = upscale(result["image"], size // result["image"].shape[0])
    panels = [image] + [attention_overlay(image, upscale(m, size // m.shape[0])) for m in result["maps"].values()]
    return np.concatenate(panels, axis=1)


def build_paint_canvas(pipeline, prompt: str = "a red circle and a blue square",
                       phrases: tuple[str, ...] = ("red circle", "blue square"), weight: float = 0.5,
                       side: int = CANVAS_SIDE):
    """The widget (module docstring). ``panel.controls`` exposes its parts."""
    import ipywidgets as widgets

    from minildm.errors import UserError

    state = {"canvas": blank_canvas(side)}
    text = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="60%"))
    phrase_box = widgets.Text(value=", ".join(phrases), description="phrases",
                              layout=widgets.Layout(width="60%"))
    brush = widgets.Dropdown(description="brush")
    weight_slider = widgets.FloatLogSlider(value=weight, base=10, min=-1.5, max=1, step=0.1, description="w′")
    seed_box = widgets.IntText(value=0, description="seed")
    recipe_box = widgets.Dropdown(options=list(RECIPES), value=DEFAULT_RECIPE, description="recipe")
    sample_button = widgets.Button(description="sample", button_style="primary")
    clear_button = widgets.Button(description="clear")
    canvas_picture, result_picture = widgets.Image(format="png"), widgets.Image(format="png")
    message = widgets.HTML()
    cells = [widgets.Button(layout=widgets.Layout(width="28px", height="28px")) for _ in range(side * side)]

    def current_phrases() -> list[str]:
        return [p.strip() for p in phrase_box.value.split(",") if p.strip()][:len(BRUSH_COLOURS)]

    def refresh_brushes(_change=None):
        brush.options = [("eraser", 0)] + [(p, k + 1) for k, p in enumerate(current_phrases())]
        brush.value = 1 if len(brush.options) > 1 else 0

    def draw_canvas():
        canvas_picture.value = to_png(render_canvas(state["canvas"]))
        for k, cell in enumerate(cells):
            painted = state["canvas"][k // side, k % side]
            cell.style.button_color = ("#%02x%02x%02x" % tuple(int(255 * c) for c in BRUSH_COLOURS[painted - 1])
                                       if painted else "#ffffff")

    def click(k):
        def handler(_button):
            state["canvas"] = paint_cell(state["canvas"], k // side, k % side, brush.value)
            draw_canvas()
        return handler

    def clear(_button=None):
        state["canvas"] = blank_canvas(side)
        draw_canvas()

    def sample(_button=None):
        regions = canvas_regions(state["canvas"], current_phrases())
        try:
            result = paint_and_sample(pipeline, text.value, regions, weight_slider.value, seed_box.value,
                                      recipe=recipe_box.value)
        except UserError as error:
            message.value = f"<span style='color:#b00'>{error}</span>"
            return
        result_picture.value = to_png(render_paint_result(result))
        message.value = ("the sample, then each painted phrase's cross-attention (mean over layers, heads, steps)"
                         if regions else "nothing painted: the model's own layout")

    for k, cell in enumerate(cells):
        cell.on_click(click(k))
    sample_button.on_click(sample)
    clear_button.on_click(clear)
    phrase_box.observe(refresh_brushes, names="value")
    refresh_brushes()
    draw_canvas()
    grid = widgets.GridBox(cells, layout=widgets.Layout(grid_template_columns=f"repeat({side}, 30px)"))
    panel = widgets.VBox([text, phrase_box, widgets.HBox([brush, weight_slider, seed_box, recipe_box]),
                          widgets.HBox([grid, canvas_picture]), widgets.HBox([sample_button, clear_button]),
                          message, result_picture])
    panel.controls = {"prompt": text, "phrases": phrase_box, "brush": brush, "weight": weight_slider,
                      "seed": seed_box, "recipe": recipe_box, "sample": sample_button, "clear": clear_button, "cells": cells,
                      "canvas": canvas_picture, "result": result_picture, "message": message}
    panel.state = state
    return panel
