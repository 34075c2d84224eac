"""A discriminator on the teacher's own features (LADD, Sauer et al. 2024): beyond ADD.

ADD's discriminator (:mod:`minildm.discriminator`) decodes the student's latents to pixels and
reads them with a frozen ViT. Its successor, Latent Adversarial Diffusion Distillation (the
recipe behind SD3-Turbo, arXiv 2403.12015), drops the ViT: the frozen **teacher** itself is the
feature network. Real and generated latents are re-noised at a discriminator timestep t̂,

    x̂_t̂ = α_t̂·x̂₀ + σ_t̂·ε ,

the teacher's encoder half reads them (its time embedding told t̂, its cross-attention the
caption), and one trainable head per feature map turns the features into logits. The teacher
already knows, at every noise level, what a latent of *this caption* looks like — a feature
space made for the task, where ADD's borrowed ViT only knows images. Nothing is decoded.

minildm's version, and where it differs from LADD's:

* the features are the teacher UNet's encoder maps — the last map of each resolution level and
  the middle block's (8×8, 4×4, 2×2, 2×2 for the cpu profile's 8×8 latents) — as in the AMD
  re-implementation, which deletes the up blocks (LADD itself, on a transformer, takes every block);
* each head is the StyleGAN-T head of :class:`minildm.discriminator.DiscriminatorHead` over the
  map's H·W positions as tokens, projection-conditioned like ADD's (pooled caption and real
  image embedding), so that hinge loss and R1 on the heads' inputs are unchanged;
* t̂ is drawn uniformly from ``t_range`` (the AMD re-implementation: 0…750; LADD draws from a
  logit-normal biased towards high noise);
* no DiffAugment: the re-noising already blurs what a discriminator could memorise.
"""

from __future__ import annotations

import torch
from torch import nn

from minildm.diffusion import NoiseSchedule
from minildm.discriminator import DiscriminatorHead, FrozenNetwork, HeadedDiscriminator


class TeacherFeatureNetwork(FrozenNetwork):
    """The frozen teacher (a :class:`minildm.unet.TextConditionedUNet`) read at x_t̂: its encoder's
    feature maps as (B, C, H·W) tokens. Gradients flow through it to the latents, never into it."""

    def __init__(self, teacher):
        super().__init__(teacher)
        self.channels = teacher.unet.encoder_channels

    @property
    def teacher(self):
        return self.network

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> list[torch.Tensor]:
        with torch.no_grad():
            context = self.teacher.context(cond["input_ids"], cond["mask"])
        maps = self.teacher.unet.encoder_features(x_t, t, {"context": context.to(x_t.dtype), "mask": cond["mask"]})
        return [m.flatten(2) for m in maps]


class LatentDiscriminator(HeadedDiscriminator):
    """LADD's discriminator: re-noise at t̂ ~ U{t_range}, the teacher's encoder maps, one head each.
    It reads latents, and the caption's tokens (``cond``: ``input_ids`` and ``mask``, as a training
    batch holds them) for the teacher's cross-attention."""

    reads_latents = True

    def __init__(self, teacher, schedule: NoiseSchedule, c_dim: int, cmap_dim: int = 64,
                 t_range: tuple[int, int] = (0, 750)):
        super().__init__()
        self.features_net = TeacherFeatureNetwork(teacher)
        self.heads = nn.ModuleList(DiscriminatorHead(channels, c_dim, cmap_dim)
                                   for channels in self.features_net.channels)
        self.schedule, self.t_range = schedule, tuple(t_range)

    def features(self, latents: torch.Tensor, cond: dict | None = None) -> list[torch.Tensor]:
        low, high = self.t_range
        t = torch.randint(low, high + 1, (latents.shape[0],), device=latents.device)
        x_t = self.schedule.add_noise(latents, torch.randn_like(latents), t)
        return self.features_net(x_t, t, cond)
