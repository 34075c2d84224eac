"""Several embeddings at once (minildm.multi_embedding): drops, the pooled route, the background."""

import numpy as np
import torch

from minildm.config import UNetConfig
from minildm.multi_embedding import (DropRates, MultiEmbeddingUNet, background_brightness, image_condition,
                                     image_condition_dim, keep_only)
from minildm.stages import clip as clip_stage
from minildm.stages.embeddings import PROJECTION, PROJECTION_LR_SCALE, background_probe, initial_state
from minildm.train import parameter_groups
from minildm.unet import UNet


def test_drops_are_independent_with_a_joint_drop():
    keep = DropRates(tokens=0.2, pooled=0.3, image=0.5, joint=0.1).sample(np.random.default_rng(0), 20000)
    rates = {k: 1 - float(v.mean()) for k, v in keep.items()}
    # a condition is dropped by its own coin or the joint one: 1 − (1 − p)(1 − 0.1)
    for name, p in (("tokens", 0.2), ("pooled", 0.3), ("image", 0.5)):
        assert abs(rates[name] - (1 - (1 - p) * 0.9)) < 0.015, name
    all_dropped = float(((keep["tokens"] + keep["pooled"] + keep["image"]) == 0).float().mean())
    assert abs(all_dropped - (0.1 + 0.9 * 0.2 * 0.3 * 0.5)) < 0.01


def test_dropped_conditions_are_zero_and_the_new_route_starts_at_the_base():
    encoder = clip_stage.load(None)[0]
    cfg = UNetConfig(model_channels=16, channel_mult=(1, 2), heads=2, context_dim=encoder.token_dim,
                     pooled_dim=encoder.pooled_dim + image_condition_dim(encoder))
    model = MultiEmbeddingUNet(UNet(cfg), encoder.text_model, encoder.clip.text_projection)
    base = UNet(UNetConfig(model_channels=16, channel_mult=(1, 2), heads=2, context_dim=encoder.token_dim))
    base_state = {f"unet.{k}": v for k, v in base.state_dict().items()}
    base_state.update({f"text.{k}": v for k, v in encoder.text_model.state_dict().items()})
    model.load_state_dict(initial_state(base_state, model))
    tokens = encoder.tokenize(["a red circle", "two blue squares"])
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    embedding = image_condition(encoder, images)
    assert embedding.shape == (2, image_condition_dim(encoder))  # [projected ‖ patch mean], each part of norm 1/√2
    torch.testing.assert_close(embedding[:, :encoder.pooled_dim].norm(dim=-1), torch.full((2,), 0.5 ** 0.5))
    cond = model.conditions(tokens["input_ids"], tokens["attention_mask"], embedding, keep_only(("image",), 2))
    assert cond["context"].abs().sum() == 0 and cond["pooled"][:, :encoder.pooled_dim].abs().sum() == 0
    assert torch.allclose(cond["pooled"][:, encoder.pooled_dim:].norm(dim=-1), torch.ones(2))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    full = {"input_ids": tokens["input_ids"], "mask": tokens["attention_mask"], "image_embedding": embedding,
            "keep": keep_only(("tokens", "pooled", "image"), 2)}
    context = encoder.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    with torch.no_grad():
        expected = base(x, t, {"context": context, "mask": tokens["attention_mask"]})
        torch.testing.assert_close(model(x, t, full), expected)  # zero-initialised pooled route
    # the new projection (and only it) gets its own, larger learning rate; the text tower is frozen
    default, projection = parameter_groups(model, 1e-4, {PROJECTION: PROJECTION_LR_SCALE})
    emb_dim = 4 * cfg.model_channels  # the timestep embedding's width
    assert projection["lr"] == 1e-3 and default["lr"] == 1e-4
    assert [p.shape for p in projection["params"]] == [(emb_dim, cfg.pooled_dim), (emb_dim,)]
    assert len(default["params"]) == len(list(model.unet.parameters())) - 2


def test_background_brightness_reads_the_frame():
    images = torch.full((2, 3, 32, 32), -1.0)
    images[1] = 1.0
    images[:, :, 8:24, 8:24] = 0.3  # an object in the middle does not count
    assert background_brightness(images).tolist() == [0.0, 1.0]


def test_the_projected_embedding_holds_the_background_weakly_and_the_patch_tokens_plainly():
    """Why the image condition adds the patch tokens: dark against light backgrounds, read linearly."""
    probe = background_probe(clip_stage.load(None)[0])
    assert probe["probe_background_pixels"] >= 0.9, "4x4 pixels hold the background plainly"
    assert 0.55 <= probe["probe_background_embedding"] <= probe["probe_background_pixels"] - 0.15, probe
    assert probe["probe_background_patches"] >= probe["probe_background_embedding"] + 0.15, probe
    assert probe["probe_background_condition"] >= probe["probe_background_patches"] - 0.03, probe
