"""Several embeddings at once (eDiff-I Sec. 4.2): text tokens, pooled text and an image embedding.

eDiff-I conditions its denoisers on T5 text tokens, CLIP text tokens and the CLIP image
embedding together: "we add the projected conditional embeddings to the time embedding and
additionally perform cross-attention". At the course's scale there is one text encoder (the
tiny CLIP of notebook 02, in place of T5 + CLIP-L), so the three conditions are:

* its **per-token** text embeddings → cross-attention (as in the LDM);
* its **pooled** text embedding (CLIP's projection at ``<eos>``) and
* the CLIP **image** embedding of a reference image (:func:`image_condition`), both
  L2-normalised, concatenated and projected onto the timestep embedding (the UNet's ``pooled``
  route, zero-initialised so that fine-tuning starts exactly at the base model).

Training drops each condition independently (its whole tensor set to zero), and with
``joint_drop`` all of them at once: the unconditional model that guidance needs. At sampling
time any subset can be used — text only, image only, both — and a reference image's
embedding carries what the captions never describe (here the background's brightness) into a
new caption's sample: eDiff-I's style transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CONDITIONS = ("tokens", "pooled", "image")


@dataclass(frozen=True)
class DropRates:
    """Per-sample probabilities of zeroing each condition, and all of them together."""

    tokens: float = 0.2
    pooled: float = 0.2
    image: float = 0.5
    joint: float = 0.1

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
        """keep masks (n,) per condition: 1 kept, 0 dropped."""
        joint = rng.random(n) < self.joint
        return {name: torch.from_numpy(~(joint | (rng.random(n) < getattr(self, name)))).float()
                for name in CONDITIONS}


class MultiEmbeddingUNet(nn.Module):
    """The UNet with its three conditions computed from token ids and an image embedding.

    ``forward(x_t, t, cond)`` with ``cond = {"input_ids", "mask", "image_embedding", "keep"}``,
    ``keep`` = {condition: (B,) 0/1}. The text tower and its projection are frozen (the base
    LDM's fine-tuned tower); only the UNet, with its new pooled projection, trains.
    """

    def __init__(self, unet: nn.Module, text_model: nn.Module, text_projection: nn.Module):
        super().__init__()
        self.unet, self.text, self.text_projection = unet, text_model, text_projection
        self.text.requires_grad_(False)
        self.text_projection.requires_grad_(False)

    def conditions(self, input_ids, mask, image_embedding, keep: dict) -> dict:
        """The UNet's ``cond``: context (zeroed where tokens are dropped) and the pooled vector
        [pooled text ‖ image], each half zeroed where dropped."""
        out = self.text(input_ids=input_ids, attention_mask=mask)
        dtype = out.last_hidden_state.dtype
        context = out.last_hidden_state * keep["tokens"][:, None, None].to(dtype)
        pooled = F.normalize(self.text_projection(out.pooler_output).float(), dim=-1) * keep["pooled"][:, None]
        image = F.normalize(image_embedding.float(), dim=-1) * keep["image"][:, None]
        return {"context": context, "mask": mask, "pooled": torch.cat([pooled, image], dim=-1)}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.unet(x, t, self.conditions(cond["input_ids"], cond["mask"], cond["image_embedding"], cond["keep"]))


def keep_only(names, n: int) -> dict[str, torch.Tensor]:
    """keep masks that use exactly the conditions ``names`` for a batch of ``n``."""
    unknown = set(names) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"unknown conditions {sorted(unknown)}; choose from {CONDITIONS}")
    return {name: torch.full((n,), float(name in names)) for name in CONDITIONS}


def image_condition(encoder, images: torch.Tensor) -> torch.Tensor:
    """The image embedding the multi-embedding model is given for images (B, 3, H, W) in [-1, 1]:
    the tiny CLIP's projected image embedding ‖ the mean of its vision tower's last-layer patch
    tokens, each L2-normalised, the pair scaled to unit norm: (B, P + W).

    Toy-scale change: eDiff-I gives its denoisers the projected CLIP-L image embedding alone. That
    vector holds style because CLIP learnt from web captions that name styles and colours; the
    course's captions never name the background, so the tiny CLIP's projection keeps little of it
    (:func:`minildm.stages.embeddings.background_probe` on the reference CLIP: a linear probe reads
    dark against light backgrounds from its normalised projection 67% of the time, from the
    patch-token mean 95%). The mean of the patch tokens is the same network's reading of the whole
    picture, before the projection throws away what no caption asked for.
    """
    projected, patches = encoder.encode_image_and_patches(images)
    projected, patches = projected.float(), patches.mean(dim=1).float()
    return torch.cat([F.normalize(projected, dim=-1), F.normalize(patches, dim=-1)], dim=-1) / math.sqrt(2)


def image_condition_dim(encoder) -> int:
    """The width of :func:`image_condition`: the projection's plus the vision tower's."""
    return encoder.pooled_dim + encoder.clip.config.vision_config.hidden_size


def background_brightness(images: torch.Tensor, border: int = 2) -> torch.Tensor:
    """The median brightness of each image's outer frame of ``border`` pixels — the background,
    which the captions never describe. Images in [-1, 1]; result in [0, 1]."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    frame = torch.ones(x.shape[-2:], dtype=torch.bool)
    frame[border:-border, border:-border] = False
    return x.mean(1)[:, frame].median(dim=1).values
