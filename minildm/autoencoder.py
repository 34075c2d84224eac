"""The KL autoencoder: LDM's first stage (Rombach et al. 2022, §3.1 and App. G).

An encoder E maps an image x (B, 3, H, W) in [-1, 1] to the parameters of a diagonal Gaussian
posterior q(z|x) over latents (B, z, H/f, W/f); a decoder D maps a latent back to an image. The
diffusion model of later stages lives in this latent space, f² times smaller than pixel space.

Structure, as CompVis' ``AutoencoderKL`` (``ldm/models/autoencoder.py``): ResBlocks with
stride-2 downsampling; a middle block ResBlock → self-attention → ResBlock; ``double_z`` (the
encoder outputs 2·z channels: mean and log-variance) with 1×1 convs around the latent
(``quant_conv``, ``post_quant_conv``); the decoder mirrors it with nearest + conv upsampling.

**The scale factor.** The KL term is weighted ~1e-6, so the latents are nowhere near unit
variance. LDM rescales them by 1/std measured on posterior samples ("scale_by_std"; SD's 0.18215
is that number for SD's autoencoder, not ours). :meth:`AutoencoderKL.measure_scale_factor`
measures it and stores it as a buffer, so it travels with the checkpoint; :meth:`encode`
returns *scaled* latents and :meth:`decode` takes them: no later stage repeats the arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minildm.config import AutoencoderConfig
from minildm.nn import Downsample, ResBlock, SelfAttention2d, Upsample, normalization


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), logvar clamped to [-30, 20] as in LDM."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over latent elements → (B,)."""
        return 0.5 * (self.mean**2 + self.var - 1.0 - self.logvar).flatten(1).sum(1)


class Encoder(nn.Module):
    """(B, 3, H, W) → (B, 2·z, H/f, W/f): posterior mean and log-variance."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        blocks, current = [], widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(current, width))
                current = width
            if level < len(widths) - 1:
                blocks.append(Downsample(current))
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(ResBlock(current), SelfAttention2d(current), ResBlock(current))
        self.norm_out = normalization(current)
        self.conv_out = nn.Conv2d(current, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z, H/f, W/f) → (B, 3, H, W); num_res_blocks + 1 ResBlocks per level, as LDM."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        current = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, current, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(current), SelfAttention2d(current), ResBlock(current))
        blocks = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(current, widths[level]))
                current = widths[level]
            if level > 0:
                blocks.append(Upsample(current))
        self.up = nn.Sequential(*blocks)
        self.norm_out = normalization(current)
        self.conv_out = nn.Conv2d(current, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: AutoencoderConfig = AutoencoderConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.register_buffer("scale_factor", torch.tensor(1.0))

    @property
    def factor(self) -> int:
        return self.cfg.factor

    def latent_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        side = (image_size or self.cfg.image_size) // self.factor
        return (self.cfg.z_channels, side, side)

    def check_images(self, x: torch.Tensor) -> None:
        """A clear error for images this autoencoder cannot take."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"the autoencoder takes images (B, 3, H, W) in [-1, 1]; got shape {tuple(x.shape)}")
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the autoencoder's "
                             f"downsampling factor f = {self.factor}")

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) for raw (unscaled) latents."""
        self.check_images(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior): what the training loss needs."""
        posterior = self.posterior(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode_raw(z), posterior

    def encode(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images → *scaled* latents (B, z, H/f, W/f) of about unit variance: what diffusion sees."""
        posterior = self.posterior(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images (B, 3, H, W)."""
        if latents.ndim != 4 or latents.shape[1] != self.cfg.z_channels:
            raise ValueError(f"the decoder takes latents (B, {self.cfg.z_channels}, h, w); got {tuple(latents.shape)}")
        return self.decode_raw(latents / self.scale_factor)

    @torch.no_grad()
    def measure_scale_factor(self, images: torch.Tensor, generator: torch.Generator | None = None) -> float:
        """Set ``scale_factor`` = 1 / std of posterior samples of ``images`` (LDM's scale_by_std)."""
        z = self.posterior(images).sample(generator)
        self.scale_factor.fill_(1.0 / z.float().flatten().std())
        return float(self.scale_factor)
