"""The painting canvas of notebook 05 (minildm.canvas): its plain functions and the widget."""

import numpy as np

from minildm import canvas
from minildm.stages import ldm as ldm_stage


def test_painting_cells_makes_one_region_per_phrase():
    c = canvas.blank_canvas(6)
    c = canvas.paint_cell(c, 0, 0, 1)
    c = canvas.paint_cell(c, 5, 5, 2)
    c = canvas.paint_cell(c, 5, 4, 2)
    c = canvas.paint_cell(c, 5, 4, 0)  # erased
    regions = canvas.canvas_regions(c, ["red circle", "blue square", "green cross"])
    assert set(regions) == {"red circle", "blue square"}, "an unused brush paints nothing"
    assert regions["red circle"].sum() == 1 and regions["blue square"][5, 5] == 1 and regions["blue square"].sum() == 1
    picture = canvas.render_canvas(c, size=96)
    assert picture.shape == (96, 96, 3)
    assert np.allclose(picture[5, 5], canvas.BRUSH_COLOURS[0]) and np.allclose(picture[90, 90], canvas.BRUSH_COLOURS[1])


def test_the_widget_samples_and_shows_each_phrase_attention():
    pipeline, _ = ldm_stage.load(None)
    result = canvas.paint_and_sample(pipeline, "a red circle and a blue square",
                                     {"red circle": np.pad(np.ones((2, 2)), ((0, 4), (0, 4)))}, 1.0, steps=4)
    assert result["image"].shape == (32, 32, 3) and set(result["maps"]) == {"red circle"}
    assert canvas.render_paint_result(result).shape == (128, 256, 3)
    panel = canvas.build_paint_canvas(pipeline)
    controls = panel.controls
    controls["cells"][0].click()
    assert panel.state["canvas"][0, 0] == 1
    controls["brush"].value = 2
    controls["cells"][35].click()
    assert panel.state["canvas"][5, 5] == 2
    before = controls["canvas"].value
    controls["clear"].click()
    assert controls["canvas"].value != before and panel.state["canvas"].sum() == 0
    controls["cells"][7].click()
    controls["prompt"].value = "a red circle"
    controls["phrases"].value = "blue square"
    controls["cells"][7].click()
    controls["sample"].click()
    assert "not in the prompt" in controls["message"].value
