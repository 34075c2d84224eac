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


def _tiny_autoencoder():
    import torch

    from minildm.autoencoder import AutoencoderKL
    from minildm.config import AutoencoderConfig

    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(channels=8)).eval()


def test_latent_edit_changes_the_decoded_image_and_only_one_cell():
    from minildm.data.datasets import to_tensor
    from minildm.widgets import render_latent_edit

    model = _tiny_autoencoder()
    image = to_tensor(render_item(0, 3)["image"])
    original, reconstruction, edited, latent, edited_latent = render_latent_edit(model, image, 1, 2, 5, 3.0)
    assert original.shape == reconstruction.shape == edited.shape == (32, 32, 3)
    assert latent.shape == (4, 8, 8) and np.count_nonzero(edited_latent - latent) == 1
    assert not np.allclose(edited, reconstruction)


def test_interpolation_ends_at_both_reconstructions():
    from minildm.data.datasets import to_tensor
    from minildm.widgets import render_interpolation, render_latent_edit

    model = _tiny_autoencoder()
    a, b = (to_tensor(render_item(0, i)["image"]) for i in (1, 2))
    strip = render_interpolation(model, a, b, steps=5)
    assert strip.shape == (5, 32, 32, 3)
    assert np.allclose(strip[0], render_latent_edit(model, a, 0, 0, 0, 0.0)[1], atol=1e-5)
    assert np.allclose(strip[-1], render_latent_edit(model, b, 0, 0, 0, 0.0)[1], atol=1e-5)


def test_latent_heatmaps_and_inspector_controls():
    from minildm.widgets import build_latent_inspector, latent_heatmaps

    heat = latent_heatmaps(np.stack([np.full((8, 8), -1.0), np.zeros((8, 8)), np.full((8, 8), 2.0)]), 64)
    assert heat.shape == (64, 192, 3)
    assert np.allclose(heat[0, 0], [0, 0, 1]) and np.allclose(heat[0, 64], [1, 1, 1]) and np.allclose(heat[0, 128], [1, 0, 0])
    panel = build_latent_inspector(_tiny_autoencoder())
    before = panel.controls["pictures"].value
    panel.controls["delta"].value = -5.0
    assert panel.controls["pictures"].value != before
    before = panel.controls["strip"].value
    panel.controls["partner"].value = 7
    assert panel.controls["strip"].value != before


def test_caption_explorer_ranks_images_and_reports_unknown_words():
    from minildm.config import get_profile
    from minildm.data.datasets import shapes_batch
    from minildm.encoders import tiny_encoder
    from minildm.widgets import build_caption_explorer, render_caption_view, text_attention

    encoder = tiny_encoder(get_profile("smoke").clip, attention="eager").eval()
    images, _ = shapes_batch(0, range(8))
    weights, tokens = text_attention(encoder, "two green crosses", 0, 1)
    assert tokens == ["<bos>", "two", "green", "crosses", "<eos>"] and weights.shape == (5, 5)
    assert np.allclose(np.triu(weights, 1), 0), "the text tower is causal"
    ranking, attention, html = render_caption_view(encoder, "a red circle", images)
    assert ranking[:4] == b"\x89PNG" and attention[:4] == b"\x89PNG" and "best match" in html
    panel = build_caption_explorer(encoder, images)
    controls = panel.controls
    before = controls["attention"].value
    controls["caption"].value = "two green crosses"
    assert controls["attention"].value != before and "two green crosses" in controls["message"].value
    controls["caption"].value = "a crimson circle"
    assert "unknown word &#x27;crimson&#x27;" in controls["message"].value or "unknown word 'crimson'" in controls["message"].value


def test_sampling_inspector_scrubs_steps_and_shows_attention(tmp_path):
    from minildm.config import get_profile, with_overrides
    from minildm.stages import ldm as ldm_stage
    from minildm.widgets import build_sampling_inspector, render_attention, sampling_trajectory

    profile = with_overrides(get_profile("smoke"), ["ldm_train.steps=2"])
    ldm_stage.train(profile, str(tmp_path / "run"), progress=False)
    pipeline, _ = ldm_stage.load(tmp_path / "run")
    trajectory = sampling_trajectory(pipeline, "a red circle above a blue square", steps=4)
    assert trajectory["x_t"].shape == (4, 4, 8, 8) and trajectory["decoded_x0"].shape == (4, 3, 32, 32)
    assert trajectory["tokens"][:3] == ["<bos>", "a", "red"] and trajectory["timesteps"][0] > trajectory["timesteps"][-1]
    layer = next(iter(trajectory["maps"]))
    assert trajectory["maps"][layer].shape[0] == 4 and trajectory["maps"][layer].shape[-1] == 9
    assert render_attention(trajectory, layer, 2, 3).shape == (128, 128, 3)
    panel = build_sampling_inspector(pipeline, "a red circle", steps=4)
    controls = panel.controls
    first = controls["trajectory"].value
    controls["step"].value = 0
    assert controls["trajectory"].value != first
    before = controls["attention"].value
    controls["token"].value = 3
    assert controls["attention"].value != before
    controls["prompt"].value = "a crimson circle"
    assert "crimson" in controls["message"].value


def test_student_explorer_shows_each_step_and_the_teacher():
    from minildm.stages import add as add_stage
    from minildm.stages import ldm as ldm_stage
    from minildm.widgets import build_student_explorer, student_steps

    teacher, _ = ldm_stage.load(None)
    student = add_stage.StudentPipeline(teacher.unet, teacher.cfg, teacher.encoder, teacher.autoencoder, 32,
                                        (999, 749, 499, 249))  # a student before training: the teacher's weights
    assert len(student_steps(student, "a red circle", 4)) == 4
    panel = build_student_explorer(student, teacher)
    controls = panel.controls
    one = controls["picture"].value
    controls["steps"].value = 4
    assert controls["picture"].value != one and "4 step(s)" in controls["message"].value
    controls["prompt"].value = "a red hexagon"
    assert "hexagon" in controls["message"].value and controls["message"].value.startswith("<span")
