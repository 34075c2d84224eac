"""ADD's discriminator: a frozen ViT feature network with small trainable heads (StyleGAN-T).

ADD (Sauer et al. 2023, Sec. 3.2) does not train a discriminator from scratch. It reads images
with a frozen, pretrained ViT F and trains only light heads D_k, one on the tokens of each of
several layers F_k. Each head is StyleGAN-T's: 1-D convolutions over the token sequence with
spectral normalisation, a "local" batch norm, leaky ReLUs, and a projection (Miyato & Koyama
2018) onto a condition c, giving **one logit per token**:

    h = block_k1(F_k(x)) ;  h = (block_k9(h) + h)/√2 ;  logit_n = <cls(h)_n, W c> / √cmap_dim

The condition is the pooled text embedding of the caption and the embedding of the real image x₀
(ADD Table 1b: both together are best). The losses are the hinge losses of Eq. 2–3 over every
head's logits, and the R1 penalty is taken on the **heads' inputs**, the detached features of
the real image (Sec. 3.2) — not on the parameters, a bug in one public port.

Toy-scale change: the paper's F is a DINOv2 ViT-S (384 wide, 12 blocks, heads on the patch
embedding and blocks 2, 5, 8, 11), which cannot be downloaded here. minildm uses the vision tower
of its own tiny CLIP (64 wide, 3 blocks, 8×8 patches of a 32 px image): heads on the patch
embedding and on every block. Table 1a of the paper found every pretrained ViT it tried workable
(CLIP ViT-L: FID 23.3 against DINOv2's 20.6).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


class FrozenNetwork(nn.Module):
    """Reads with a frozen network held outside its module tree, so that a discriminator's
    parameters (what its optimiser steps, what its checkpoint holds) are its heads' alone; ``.to``
    moves the frozen network too. Gradients flow through it to its input, never into its weights."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self._frozen = [network.requires_grad_(False).eval()]

    @property
    def network(self) -> nn.Module:
        return self._frozen[0]

    def _apply(self, fn, recurse: bool = True):
        self._frozen[0] = self._frozen[0]._apply(fn)
        return super()._apply(fn, recurse)


class FeatureNetwork(FrozenNetwork):
    """The frozen vision tower F of a :class:`minildm.encoders.TextImageEncoder`: for images in
    [-1, 1], the token features of the patch embedding and of every block, each (B, C, N), with the
    class token added to every patch token (StyleGAN-T's ``AddReadout``). Gradients flow through it
    to the image (the student's samples), never into its weights."""

    def __init__(self, encoder):
        super().__init__(encoder)
        config = encoder.clip.config.vision_config
        self.width, self.layers = config.hidden_size, config.num_hidden_layers + 1

    @property
    def encoder(self):
        return self.network

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        out = self.encoder.clip.vision_model(pixel_values=self.encoder.pixel_values(images),
                                             output_hidden_states=True)
        features = []
        for hidden in out.hidden_states:  # (B, 1 + N, C): the class token, then the patches
            tokens = hidden[:, 1:] + hidden[:, :1]
            features.append(tokens.transpose(1, 2))
        return features


class BatchNormLocal(nn.Module):
    """StyleGAN-T's "virtual" batch norm: statistics over groups of ``virtual_batch`` samples
    (and all tokens), so that one sample's logits depend on few others."""

    def __init__(self, channels: int, virtual_batch: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_batch, self.eps = virtual_batch, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, tokens = x.shape
        groups = max(1, batch // self.virtual_batch)
        if batch % groups:
            groups = 1
        grouped = x.float().view(groups, batch // groups, channels, tokens)
        mean = grouped.mean(dim=(1, 3), keepdim=True)
        var = grouped.var(dim=(1, 3), keepdim=True, unbiased=False)
        normed = ((grouped - mean) / torch.sqrt(var + self.eps)).view(batch, channels, tokens)
        return (normed * self.weight[None, :, None] + self.bias[None, :, None]).to(x.dtype)


def spectral_conv1d(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Module:
    """Conv1d whose weight is divided by its largest singular value (one power iteration a step)."""
    conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return spectral_norm(conv)


def conv_block(channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(spectral_conv1d(channels, channels, kernel_size), BatchNormLocal(channels),
                         nn.LeakyReLU(0.2))


class DiscriminatorHead(nn.Module):
    """One head D_k: (B, C, N) features and a (B, c_dim) condition → (B, N) logits."""

    def __init__(self, channels: int, c_dim: int, cmap_dim: int = 64):
        super().__init__()
        self.block = conv_block(channels, 1)
        self.residual = conv_block(channels, 9)
        self.cls = spectral_conv1d(channels, cmap_dim, 1)
        self.cmapper = nn.Linear(c_dim, cmap_dim)
        self.cmap_dim = cmap_dim

    def forward(self, features: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        h = self.block(features)
        h = (self.residual(h) + h) / math.sqrt(2)
        cmap = self.cmapper(condition)  # the projection: how "real for this condition" reads
        return (self.cls(h) * cmap[..., None]).sum(dim=1) / math.sqrt(self.cmap_dim)


def diff_augment(images: torch.Tensor, translation: float = 0.125, cutout: float = 0.2) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020) as StyleGAN-T uses it, minus colour (colour is what the
    prompts ask for): a random shift by up to ``translation`` of the size (zero padding) and one
    zeroed square of side ``cutout``·size, per image. Differentiable in the images, so the same
    augmentation can sit in front of D for real and generated images alike."""
    b, _, h, w = images.shape
    device = images.device
    shift = int(h * translation + 0.5)
    dy = torch.randint(-shift, shift + 1, (b, 1, 1), device=device)
    dx = torch.randint(-shift, shift + 1, (b, 1, 1), device=device)
    rows = torch.arange(h, device=device)[None, :, None] - dy  # where each output pixel reads from
    cols = torch.arange(w, device=device)[None, None, :] - dx
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).to(images.dtype)
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).view(b, 1, h * w).expand(-1, images.shape[1], -1)
    shifted = images.flatten(2).gather(2, index).view_as(images) * inside[:, None]
    side = int(h * cutout + 0.5)
    cy = torch.randint(0, h, (b, 1, 1), device=device)
    cx = torch.randint(0, w, (b, 1, 1), device=device)
    r, c = torch.arange(h, device=device)[None, :, None], torch.arange(w, device=device)[None, None, :]
    hole = ((r - cy).abs() <= side // 2) & ((c - cx).abs() <= side // 2)
    return shifted * (~hole)[:, None].to(images.dtype)


class HeadedDiscriminator(nn.Module):
    """A frozen feature network read by one trainable head per feature layer (``heads``).

    ``forward(samples, condition, cond)`` → (B, heads·N) logits, every head's tokens side by side.
    ``features``/``heads_forward`` split that in two, so that R1 can differentiate with respect
    to the heads' inputs. ``reads_latents`` says what the samples are: decoded images (ADD's ViT)
    or latents (LADD's teacher, :mod:`minildm.latent_discriminator`, which also needs the
    caption's tokens ``cond`` for the teacher's cross-attention)."""

    reads_latents = False
    heads: nn.ModuleList

    def features(self, samples: torch.Tensor, cond: dict | None = None) -> list[torch.Tensor]:
        raise NotImplementedError

    def heads_forward(self, features: list[torch.Tensor], condition: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(f, condition) for head, f in zip(self.heads, features)], dim=1)

    def forward(self, samples: torch.Tensor, condition: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        return self.heads_forward(self.features(samples, cond), condition)


class ProjectedDiscriminator(HeadedDiscriminator):
    """ADD's discriminator: the frozen ViT on images (DiffAugment first), a head per layer."""

    def __init__(self, encoder, c_dim: int, cmap_dim: int = 64, augment: bool = True):
        super().__init__()
        self.features_net = FeatureNetwork(encoder)
        self.heads = nn.ModuleList(DiscriminatorHead(self.features_net.width, c_dim, cmap_dim)
                                   for _ in range(self.features_net.layers))
        self.augment = augment

    def features(self, images: torch.Tensor, cond: dict | None = None) -> list[torch.Tensor]:
        """The ViT's token features of ``images``; ``cond`` is not needed (the ViT reads no caption)."""
        if self.augment:
            images = diff_augment(images)
        return self.features_net(images)


def hinge_fake_loss(logits: torch.Tensor) -> torch.Tensor:
    """E max(0, 1 + D(x)): the hinge for what D must call fake, a mean over every logit."""
    return F.relu(1 + logits.float()).mean()


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """ADD Eq. 3 without R1: E max(0, 1 − D(x₀)) + E max(0, 1 + D(x̂)), a mean over every logit."""
    return F.relu(1 - real_logits.float()).mean() + hinge_fake_loss(fake_logits)


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """ADD Eq. 2: L_adv^G = −E D(x̂), a mean over every logit of every head."""
    return -fake_logits.float().mean()


def r1_penalty(discriminator: HeadedDiscriminator, real_features: list[torch.Tensor],
               condition: torch.Tensor) -> torch.Tensor:
    """R1 on the heads' inputs (ADD Sec. 3.2): Σ_k E‖∂ΣD_k(f_k)/∂f_k‖² with f_k = F_k(x₀) detached.

    Cheap, because no gradient goes back through the ViT; it needs a double backward
    (``create_graph``) so that the penalty itself trains the heads."""
    inputs = [f.detach().float().requires_grad_(True) for f in real_features]
    logits = discriminator.heads_forward(inputs, condition)
    grads = torch.autograd.grad(logits.float().sum(), inputs, create_graph=True)
    return sum(g.pow(2).flatten(1).sum(1).mean() for g in grads)
