"""Stage 4, part 2 — one model conditioned on several embeddings at once (eDiff-I Sec. 4.2).

Trained by ``minildm train experts`` after the expert tree (``RUN/multi_embedding``): the base
LDM fine-tuned with the conditions of :mod:`minildm.multi_embedding` — per-token text, pooled
text and the CLIP image embedding of the training image (:func:`~minildm.multi_embedding.image_condition`)
— each dropped independently.
:func:`evaluate` measures what each embedding does alone and together:

* ``alignment_text`` — tokens + pooled text (the judge's verdict on the caption);
* ``alignment_both`` — text and the image embedding of a render of that caption;
* ``image_match`` — image embedding alone: the sample holds the reference's object (shape and
  colour), against ``image_match_unconditional`` (nothing given) as the chance level;
* style transfer — a new caption sampled with the embedding of a reference whose background is
  dark or light (a property no caption names): ``background_distance_text`` (caption alone) and
  ``background_distance_reference`` (caption + reference): the mean |brightness difference|
  between the sample's background and the reference's, with a paired-bootstrap interval of their
  difference, and ``alignment_style`` (is the caption still followed).

:func:`background_probe` asks what each image vector can carry: how well a linear probe reads
"dark or light background" out of the tiny CLIP's projected image embedding, out of its patch
tokens and out of the pixels.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch

from minildm.checkpoints import load_checkpoint, load_state_into
from minildm.config import EVAL_SEED, DiffusionConfig, ShapesConfig, config_from_dict
from minildm.multi_embedding import (DropRates, MultiEmbeddingUNet, background_brightness, image_condition,
                                     image_condition_dim, keep_only)
from minildm.pipeline import DiffusionPipeline
from minildm.stages import ldm
from minildm.stages.items import ItemCache
from minildm.unet import UNet

STAGE = "multi_embedding"


PROJECTION = "unet.pooled_embed."  # the new pooled projection's parameters
PROJECTION_LR_SCALE = 10.0  # see MultiEmbeddingTask


class MultiEmbeddingTask(ldm.DiffusionTask):
    """The diffusion task with three independently dropped conditions.

    The new pooled projection starts at zero (so fine-tuning starts exactly at the base model)
    and learns at ``projection_lr_scale`` × the UNet's rate: at the UNet's own rate it had barely
    moved after 900 steps (mean |w| 0.015) and the image embedding changed nothing measurable.
    """

    def __init__(self, cfg: DiffusionConfig, cache: ItemCache, encoder, batch_size: int, seed: int,
                 autoencoder, drops: DropRates = DropRates(), projection_lr_scale: float = PROJECTION_LR_SCALE):
        super().__init__(cfg, cache, encoder, batch_size, seed, STAGE, autoencoder)
        self.drops = drops
        self.projection_lr_scale = projection_lr_scale
        self.model = MultiEmbeddingUNet(UNet(cfg.unet), copy.deepcopy(encoder.text_model),
                                        copy.deepcopy(encoder.clip.text_projection))

    def batch(self, step: int, rank: int, world_size: int) -> dict:
        batch = super().batch(step, rank, world_size)
        indices = self.batch_indices(step, rank, world_size)
        batch["image_embedding"] = self.cache.image_embeddings[indices]
        batch["keep"] = self.drops.sample(np.random.default_rng([self.seed, step, rank, 13]), len(indices))
        return batch

    def condition(self, batch: dict) -> dict:
        return {"input_ids": batch["input_ids"], "mask": batch["mask"], "image_embedding": batch["image_embedding"],
                "keep": batch["keep"]}

    @property
    def lr_scales(self) -> dict[str, float]:
        """Read by the training loop: the projection's learning-rate factor."""
        return {PROJECTION: self.projection_lr_scale}

    def card_config(self) -> dict:
        return {"diffusion": dataclasses.asdict(self.cfg), "drops": dataclasses.asdict(self.drops),
                "projection_lr_scale": self.projection_lr_scale}


def multi_config(base_cfg: DiffusionConfig, encoder) -> DiffusionConfig:
    """The base LDM's configuration with the pooled route: [pooled text ‖ image embedding]."""
    unet = dataclasses.replace(base_cfg.unet, pooled_dim=encoder.pooled_dim + image_condition_dim(encoder))
    return dataclasses.replace(base_cfg, unet=unet, train_text_encoder=False)


def initial_state(base_state: dict, model: MultiEmbeddingUNet) -> dict:
    """The base LDM's weights, with the new pooled projection zero (so it starts as the base)."""
    state = {k: v for k, v in base_state.items()}
    for name, tensor in model.state_dict().items():
        if name.startswith(PROJECTION) or name.startswith("text_projection."):
            state[name] = torch.zeros_like(tensor) if name.startswith("unet.") else tensor
    return state


def train(cfg, train_cfg, cache, encoder, autoencoder, base_state: dict, out: Path,
          projection_lr_scale: float = PROJECTION_LR_SCALE, **loop_kwargs) -> dict:
    """Fine-tune the multi-embedding model from the base LDM into ``out``; its card."""
    from minildm.train import train as train_loop

    task = MultiEmbeddingTask(cfg, cache, encoder, train_cfg.batch_size, train_cfg.seed, autoencoder,
                              projection_lr_scale=projection_lr_scale)
    load_state_into(task.model, initial_state(base_state, task.model), "the base LDM")
    return train_loop(task, train_cfg, out, **loop_kwargs)


def load(path: str | Path):
    """(model, pipeline, card) of a multi-embedding run."""
    state, card = load_checkpoint(path)
    cfg = config_from_dict(DiffusionConfig, card["config"]["diffusion"])
    encoder, autoencoder = ldm._parts(cfg.space, card.get("image_size", 32), card.get("parts"))
    model = MultiEmbeddingUNet(UNet(cfg.unet), copy.deepcopy(encoder.text_model),
                               copy.deepcopy(encoder.clip.text_projection))
    load_state_into(model, state, str(path))
    model.eval()
    pipeline = DiffusionPipeline(model.unet, cfg, encoder.with_text_model(model.text), autoencoder,
                                 card.get("image_size", 32))
    return model, pipeline, card


@torch.no_grad()
def sample(model: MultiEmbeddingUNet, pipeline: DiffusionPipeline, captions: list[str], references: torch.Tensor | None,
           use=("tokens", "pooled", "image"), seed: int = EVAL_SEED, steps: int | None = None,
           guidance: float | None = None) -> torch.Tensor:
    """Images for ``captions`` (any caption when the text is unused) and reference images
    (B, 3, H, W) in [-1, 1] (None when the image is unused), with only the conditions ``use``."""
    encoder = pipeline.encoder
    tokens = encoder.tokenize(captions)
    n = len(captions)
    image_embedding = (image_condition(encoder, references) if references is not None
                       else torch.zeros(n, image_condition_dim(encoder)))
    cond = model.conditions(tokens["input_ids"], tokens["attention_mask"], image_embedding, keep_only(use, n))
    cond = {k: v.float() if k != "mask" else v for k, v in cond.items()}
    steps, guidance = steps or pipeline.cfg.sample_steps, guidance or pipeline.cfg.guidance
    latents = pipeline.sample_with(pipeline.denoiser(guidance, cond), cond, n, steps=steps, seed=seed)
    return pipeline.decode(latents).cpu()


def style_references(n: int, seed: int = EVAL_SEED + 3, image_size: int = 32) -> tuple[torch.Tensor, list]:
    """``n`` renders with the darkest or lightest backgrounds of the stream (alternating)."""
    from minildm.data.datasets import shapes_batch

    images, scenes = shapes_batch(seed, range(8 * n), ShapesConfig(image_size=image_size))
    brightness = background_brightness(images)
    order = torch.argsort(brightness)
    picks = [int(order[k // 2]) if k % 2 == 0 else int(order[-1 - k // 2]) for k in range(n)]
    return images[picks], [scenes[i] for i in picks]


@torch.no_grad()
def background_probe(encoder, n: int = 2000, fit: int = 1500, seed: int = EVAL_SEED + 7) -> dict:
    """How much of the background each image vector holds: the test accuracy of a linear probe
    (:func:`minildm.metrics.linear_probe`) telling backgrounds darker than the median from lighter
    ones (chance 0.5), fitted on ``fit`` of ``n`` renders and tested on the rest —

    * ``probe_background_embedding``: read from the tiny CLIP's projected image embedding, eDiff-I's
      image condition as the paper defines it;
    * ``probe_background_patches``: read from the mean of the vision tower's last-layer patch tokens;
    * ``probe_background_condition``: read from the two together
      (:func:`~minildm.multi_embedding.image_condition`), what the multi-embedding model is given;
    * ``probe_background_pixels``: read from the render average-pooled to 4×4 pixels, which holds it
      plainly (an upper bound for a linear read-out).

    No caption names the background, so CLIP's contrastive objective gives the projection no
    reason to keep it; the patch tokens, read before the projection, still do.
    """
    from minildm.data.datasets import shapes_batch
    from minildm.metrics import linear_probe

    images, _ = shapes_batch(seed, range(n), ShapesConfig(image_size=encoder.image_size))
    brightness = background_brightness(images)
    darker_or_lighter = (brightness > brightness[:fit].median()).long()
    condition = image_condition(encoder, images).detach()  # [projected ‖ patch mean], each part normalised
    features = {"embedding": condition[:, :encoder.pooled_dim], "patches": condition[:, encoder.pooled_dim:],
                "condition": condition,
                "pixels": torch.nn.functional.avg_pool2d(images.float(), images.shape[-1] // 4).flatten(1)}
    return {f"probe_background_{name}": linear_probe(x[:fit], darker_or_lighter[:fit], x[fit:], darker_or_lighter[fit:])
            for name, x in features.items()}


@torch.no_grad()
def evaluate(model: MultiEmbeddingUNet, pipeline: DiffusionPipeline, judge, n: int = 96, seed: int = EVAL_SEED) -> dict:
    """The experiments of the module docstring, ``n`` images each."""
    from minildm.data.captions import category_caption, parse
    from minildm.data.datasets import shapes_batch
    from minildm.metrics import bootstrap_alignment, clauses_hold

    def alignment(captions, images):
        return float(np.mean([clauses_hold(parse(c), r) for c, r in zip(captions, judge.read(images))]))

    images, scenes = shapes_batch(seed + 2, range(n), ShapesConfig(image_size=pipeline.image_size))
    captions = [category_caption(s) for s in scenes]
    text_only = sample(model, pipeline, captions, None, ("tokens", "pooled"), seed)
    both = sample(model, pipeline, captions, images, ("tokens", "pooled", "image"), seed)

    from minildm.data.datasets import render_scenes
    from minildm.data.shapes import make_scene

    single_scenes = [make_scene(seed + 4, i, ShapesConfig(image_size=pipeline.image_size), category="single_object")
                     for i in range(n)]
    singles = render_scenes(single_scenes)
    blank = [""] * n

    def holds_reference(samples):
        reads = judge.read(samples)
        return float(np.mean([any(o.shape == s.objects[0].shape and o.colour == s.objects[0].colour for o in r)
                              for s, r in zip(single_scenes, reads)]))

    image_only = sample(model, pipeline, blank, singles, ("image",), seed)
    unconditional = sample(model, pipeline, blank, None, (), seed)

    references, _ = style_references(n, image_size=pipeline.image_size)
    new_captions = [r["prompt"] for r in ldm.evaluation_prompts(n)]
    styled = sample(model, pipeline, new_captions, references, ("tokens", "pooled", "image"), seed)
    plain = sample(model, pipeline, new_captions, None, ("tokens", "pooled"), seed)
    target = background_brightness(references)
    distance_reference = (background_brightness(styled) - target).abs()
    distance_text = (background_brightness(plain) - target).abs()
    return {
        "n": n,
        "alignment_text": alignment(captions, text_only),
        "alignment_both": alignment(captions, both),
        "image_match": holds_reference(image_only),
        "image_match_unconditional": holds_reference(unconditional),
        "background_distance_text": float(distance_text.mean()),
        "background_distance_reference": float(distance_reference.mean()),
        # paired over the references (same caption, same noise): reference minus caption alone
        "background_distance_difference_ci": bootstrap_alignment(distance_reference.tolist(), distance_text.tolist(),
                                                                 ["all"] * n)["difference"],
        "alignment_style": alignment(new_captions, styled),
        "alignment_style_text": alignment(new_captions, plain),
    }
