import numpy as np

from minildm.data.shapes import render_item
from minildm.widgets import (build_scene_browser, category_examples, overlay_ground_truth,
                             render_scene_view, to_png)


def test_overlay_marks_masks_and_boxes():
    item = render_item(0, 4)
    plain = overlay_ground_truth(item["image"], item["masks"], item["boxes"], 8, show_masks=False, show_grid=False)
    tinted = overlay_ground_truth(item["image"], item["masks"], item["boxes"], 8, show_masks=True, show_grid=False)
    assert plain.shape == (256, 256, 3)
    mask = item["masks"][0].repeat(8, 0).repeat(8, 1)
    assert not np.allclose(plain[mask], tinted[mask]) and np.allclose(plain[~mask & (tinted.sum(-1) < 3)][:10],
                                                                       tinted[~mask & (tinted.sum(-1) < 3)][:10])
    x0, y0, _, _ = item["boxes"][0]
    assert np.allclose(plain[y0 * 8, x0 * 8], [0, 1, 1]), "box outline in the first overlay colour"


def test_render_scene_view_and_description():
    picture, html = render_scene_view(0, 9)
    item = render_item(0, 9)
    assert picture.shape == (256, 256, 3) and item["caption"] in html and item["full_caption"] in html
    assert to_png(picture)[:4] == b"\x89PNG"


def test_browser_updates_when_a_control_moves():
    panel = build_scene_browser()
    controls = panel.controls
    first, caption = controls["picture"].value, controls["text"].value
    controls["index"].value = 5
    assert controls["picture"].value != first and controls["text"].value != caption
    assert render_item(0, 5)["caption"] in controls["text"].value
    controls["seed"].value = 1
    assert render_item(1, 5)["caption"] in controls["text"].value


def test_category_examples_are_sorted_by_category():
    images, captions = category_examples(per_category=2)
    assert images.shape == (12, 32, 32, 3) and len(captions) == 12
