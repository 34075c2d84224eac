"""Stage 3: training the latent and pixel diffusion stages, sampling, measuring; the reference."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from minildm.cli import main
from minildm.config import get_profile, with_overrides
from minildm.errors import UserError
from minildm.stages import ldm as ldm_stage
from minildm.stages import pixel as pixel_stage


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ldm") / "run"
    profile = with_overrides(get_profile("smoke"), ["ldm_train.steps=30"])
    return ldm_stage.train(profile, str(out), progress=False), out


def test_smoke_training_lowers_the_loss_and_measures_every_category(smoke_run):
    card, _ = smoke_run
    losses = [point[1] for point in card["loss_curve"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    metrics = card["metrics"]
    for category in ("single_object", "two_object", "counting", "colors", "position", "color_attr"):
        assert 0 <= metrics["alignment_by_category"][category] <= 1
    assert metrics["nfe"] == 2 * metrics["steps"] and metrics["images_per_second"] > 0 and metrics["fid"] > 0


def test_sampling_is_deterministic_and_the_cli_writes_a_png(smoke_run, tmp_path, capsys):
    _, out = smoke_run
    pipeline, _ = ldm_stage.load(out)
    a = pipeline(["a red circle", "two blue squares"], steps=3, seed=5)
    b = pipeline(["a red circle", "two blue squares"], steps=3, seed=5)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and a.abs().max() <= 1
    png = tmp_path / "red.png"
    assert main(["sample", "--model", str(out), "--prompt", "a red circle", "--steps", "3", "--n", "2",
                 "--upscale", "2", "--out", str(png)]) == 0
    assert Image.open(png).size == (2 * 32 * 2, 32 * 2)
    assert main(["sample", "--model", str(out), "--prompt", "a crimson circle", "--out", str(png)]) == 2
    assert "unknown word 'crimson'" in capsys.readouterr().err


def test_training_data_is_a_pure_function_of_the_step():
    profile = get_profile("smoke")
    from minildm.stages.clip import load as load_clip

    encoder = load_clip(None)[0]
    cache = ldm_stage.ItemCache(16, 0, 32, autoencoder=None)
    task = ldm_stage.DiffusionTask(profile.pixel, cache, encoder, 8, 0, "pixel")
    first, again = task.batch(5, 0, 1), task.batch(5, 0, 1)
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert task.model.text is not encoder.text_model, "the text tower trained with the UNet is a copy"
    epoch = sorted(cache.item_order(range(16)))
    assert epoch == list(range(16)), "each epoch visits every cached item once"
    dropped = torch.cat([task.batch(s, 0, 1)["keep"] == 0 for s in range(40)])
    assert 0.02 < dropped.float().mean() < 0.25, "about 10% of the captions are dropped"
    context = task.model.context(first["input_ids"], first["mask"])
    assert context.shape == (8, first["input_ids"].shape[1], encoder.token_dim)


def test_the_text_tower_is_fine_tuned_with_the_unet(smoke_run):
    _, out = smoke_run
    from minildm.stages.clip import load as load_clip

    pipeline, _ = ldm_stage.load(out)
    reference = load_clip(None)[0]
    with torch.no_grad():
        tuned = pipeline.encoder.encode_text(["a red circle"]).tokens
        frozen = reference.encode_text(["a red circle"]).tokens
    assert not torch.allclose(tuned, frozen), "the tower moved during training"
    assert pipeline.encoder.clip is not None and pipeline.encoder.text_model is not reference.text_model


def test_fixed_length_captions_change_nothing_but_the_shape():
    """A compiled run (``TrainConfig.compile``) pads every caption to the encoder's 32 tokens so
    that each batch has one shape; the padding is masked out of the text tower and the
    cross-attention, so the UNet's output is the same."""
    profile = get_profile("smoke")
    from minildm.stages.clip import load as load_clip

    cache = ldm_stage.ItemCache(16, 0, 32, autoencoder=None)
    encoder = load_clip(None)[0]
    task = ldm_stage.DiffusionTask(profile.pixel, cache, encoder, 8, 0, "pixel")
    padded_task = ldm_stage.DiffusionTask(profile.pixel, cache, encoder, 8, 0, "pixel", fixed_length=True)
    batch, padded = task.batch(3, 0, 1), padded_task.batch(3, 0, 1)
    assert batch["input_ids"].shape[1] < padded["input_ids"].shape[1] == encoder.tokenizer.model_max_length
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in task.model.parameters():  # away from the zero-initialised output layer
            parameter.add_(0.05 * torch.randn_like(parameter))
    task.model.eval()
    x, t = torch.randn_like(batch["x0"]), torch.randint(0, 1000, (8,))
    with torch.no_grad():
        output = task.model(x, t, task.condition(batch))
        padded_output = task.model(x, t, padded_task.condition(padded))
    assert output.abs().max() > 0.1
    torch.testing.assert_close(padded_output, output, rtol=1e-5, atol=1e-5)


def test_the_pixel_stage_trains_the_same_way(tmp_path):
    profile = with_overrides(get_profile("smoke"), ["pixel_train.steps=4"])
    card = pixel_stage.train(profile, str(tmp_path / "pixel"), progress=False)
    assert card["stage"] == "pixel" and card["config"]["diffusion"]["space"] == "pixel"
    pipeline, _ = pixel_stage.load(tmp_path / "pixel")
    assert pipeline.autoencoder is None and pipeline.sample_shape == (3, 32, 32)


def test_evaluation_prompts_are_balanced_over_categories():
    records = ldm_stage.evaluation_prompts(12)
    categories = [r["category"] for r in records]
    assert sorted(set(categories)) == sorted(categories[:6]) and all(categories.count(c) == 2 for c in set(categories))


def test_colour_swaps_are_recognised():
    from minildm.data.captions import parse
    from minildm.judge import ReadObject

    clauses = parse("a red circle and a blue square")
    swapped = [ReadObject("circle", "blue", "small", 0, 1.0), ReadObject("square", "red", "small", 4, 1.0)]
    right = [ReadObject("circle", "red", "small", 0, 1.0), ReadObject("square", "blue", "small", 4, 1.0)]
    assert ldm_stage.colour_swapped(clauses, swapped) and not ldm_stage.colour_swapped(clauses, right)


def test_wrong_inputs_are_one_line(tmp_path, capsys):
    assert main(["train", "ldm", "--profile", "smoke", "--out", str(tmp_path / "r"), "--data", "hub:x/y"]) == 2
    assert "accept only --data shapes" in capsys.readouterr().err
    assert main(["train", "ldm", "--profile", "smoke", "--out", str(tmp_path / "r2"), "--set", "ldm.unet.context_dim=32"]) == 2
    assert "context_dim" in capsys.readouterr().err
    with pytest.raises(UserError, match="at least 6"):
        ldm_stage.evaluate(None, n=3)


def test_the_reference_card_and_a_quick_eval_from_the_command_line(capsys):
    _, card = ldm_stage.load(None)
    assert card["profile"] == "cpu" and card["command"].startswith("minildm train ldm --profile cpu")
    assert card["metrics"]["alignment_single_object"] >= 0.85 and card["metrics"]["n"] == 656
    progress = card["progress"]
    assert progress[0][0] == 400 and progress[-1][0] == 3000
    assert progress[-1][2]["alignment"] > progress[0][2]["alignment"] + 0.2, "following the prompt grows with training"
    assert main(["eval", "ldm", "--n", "12", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 12 and metrics["nfe"] == 100 and set(metrics["alignment_by_category"]) == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}


def test_latent_vs_pixel_reads_the_two_cards():
    latent = {"progress": [[100, 10.0, {"fid": 900.0, "alignment": 0.1}], [200, 20.0, {"fid": 400.0, "alignment": 0.4}]],
              "metrics": {"images_per_second": 12.0}}
    pixel = {"progress": [[10, 30.0, {"fid": 950.0, "alignment": 0.0}], [20, 60.0, {"fid": 800.0, "alignment": 0.05}]],
             "metrics": {"images_per_second": 1.5}}
    figures = pixel_stage.latent_vs_pixel(latent, pixel)
    assert figures["time_share_to_pixel_final_fid"] == pytest.approx(20.0 / 60.0)  # 900 > 800, 400 ≤ 800 at 20 s
    assert figures["sampling_speedup"] == pytest.approx(8.0)
    assert figures["time_share_to_pixel_final_alignment"] == pytest.approx(10.0 / 60.0)  # 0.1 ≥ 0.05 at 10 s
    never = {**pixel, "progress": [[20, 60.0, {"fid": 100.0, "alignment": 0.9}]]}
    assert pixel_stage.latent_vs_pixel(latent, never)["time_share_to_pixel_final_fid"] is None


def test_the_decoder_decodes_in_the_sampling_precision():
    """pipeline.decode runs the decoder under the UNet's sampling autocast, and returns fp32 images."""
    from minildm.precision import cpu_sampling_in_bf16

    pipeline, _ = ldm_stage.load(None)
    dtypes = []
    pipeline.autoencoder.decoder.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    latents = torch.randn(2, pipeline.autoencoder.cfg.z_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    images = {}
    for in_bf16 in (True, False):
        with cpu_sampling_in_bf16(in_bf16):
            images[in_bf16] = pipeline.decode(latents)
    assert dtypes == [torch.bfloat16, torch.float32]
    assert all(im.dtype == torch.float32 and im.abs().max() <= 1 for im in images.values())
    assert (images[True] - images[False]).abs().mean() < 0.02, "bf16 decoding is a rounding, not another image"
