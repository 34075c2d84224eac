"""A trained diffusion model ready to sample: UNet + schedule + text encoder (+ autoencoder).

:class:`DiffusionPipeline` ties the pieces of stages 1–3 together the way LDM does (Sec. 3.3):

    caption ─ tokenizer + text encoder (frozen) ─ per-token embeddings τ(y) ─┐
    noise z_T ─ DDIM/DDPM with the UNet ε/v-prediction (+ guidance) ─────────┴→ z_0 ─ decoder D ─ image

In pixel space (the baseline of LDM's central claim) there is no autoencoder: the UNet denoises
the 32×32×3 image itself.
"""

from __future__ import annotations

import torch

from minildm import thread_share
from minildm.config import DiffusionConfig
from minildm.diffusion import NoiseSchedule
from minildm.paint_recipe import DEFAULT_RECIPE
from minildm.precision import sampling_autocast
from minildm.samplers import ClassifierFreeGuidance, ddim_sample, ddpm_sample


class DiffusionPipeline:
    def __init__(self, unet, cfg: DiffusionConfig, encoder, autoencoder=None, image_size: int = 32):
        self.unet, self.cfg, self.encoder, self.autoencoder = unet.eval(), cfg, encoder.eval(), autoencoder
        self.schedule = NoiseSchedule(zero_terminal_snr=cfg.zero_terminal_snr)
        self.image_size = image_size
        if autoencoder is not None:
            autoencoder.eval()
            factor = autoencoder.factor
            self.sample_shape = (cfg.unet.in_channels, image_size // factor, image_size // factor)
        else:
            self.sample_shape = (cfg.unet.in_channels, image_size, image_size)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def conditioning(self, captions: list[str]) -> dict:
        """The UNet's ``cond`` for ``captions``: per-token embeddings and their padding mask."""
        encoding = self.encoder.encode_text(list(captions))
        return {"context": encoding.tokens.float().to(self.device), "mask": encoding.attention_mask.to(self.device)}

    @staticmethod
    def null_like(cond: dict) -> dict:
        """The dropped condition, as in training: every embedding zeroed (the mask kept)."""
        return {k: v if k == "mask" else torch.zeros_like(v) for k, v in cond.items()}

    # ------------------------------------------------------------------ sampling
    def denoiser(self, guidance: float, cond: dict):
        """The UNet, guided with scale ``guidance`` (1: no guidance), as a sampler's denoiser."""
        def unet(x, t, c):
            with sampling_autocast(self.device):
                return self.unet(x, t, c).float()
        return ClassifierFreeGuidance(unet, guidance, self.null_like(cond))

    @torch.no_grad()
    def sample_latents(self, captions: list[str], *, steps: int = 50, guidance: float = 3.0, seed: int = 0,
                       sampler: str = "ddim", eta: float = 0.0, callback=None, paint=None,
                       paint_weight: float = 1.0, paint_recipe: str = DEFAULT_RECIPE) -> torch.Tensor:
        """z_0 (or images, in pixel space) for ``captions``; the noise is a pure function of ``seed``.
        ``paint``: ``{phrase: box or mask}`` (or one per caption) — paint-with-words
        (:mod:`minildm.paint`) with weight ``paint_weight`` (w′) and ``paint_recipe`` (a name of
        ``minildm.paint.RECIPES``)."""
        if paint:
            from minildm.paint import sample_painted

            return sample_painted(self, captions, paint, paint_weight, steps=steps, guidance=guidance, seed=seed,
                                  callback=callback, recipe=paint_recipe)[0]
        cond = self.conditioning(captions)
        return self.sample_with(self.denoiser(guidance, cond), cond, len(captions), steps=steps, seed=seed,
                                sampler=sampler, eta=eta, callback=callback)

    @torch.no_grad()
    def sample_with(self, denoiser, cond, n: int, *, steps: int = 50, seed: int = 0, sampler: str = "ddim",
                    eta: float = 0.0, callback=None, spacing: str | None = None) -> torch.Tensor:
        """Run the sampler with any ``denoiser(x_t, t, cond)`` — a guided UNet, a prompt switch,
        a painted one — from the noise of ``seed``, with this model's schedule and prediction
        (and its timestep spacing unless ``spacing`` is given: one of ``minildm.samplers.SPACINGS``)."""
        thread_share.follow()  # `minildm course --lanes`: this run's share of the cores
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((n, *self.sample_shape), generator=generator).to(self.device)
        spacing = spacing or self.spacing
        if sampler == "ddim":
            return ddim_sample(denoiser, self.schedule, noise, cond, steps=steps, eta=eta, prediction=self.cfg.prediction,
                               spacing=spacing, generator=generator, callback=callback)
        return ddpm_sample(denoiser, self.schedule, noise, cond, steps=steps, prediction=self.cfg.prediction,
                           spacing=spacing, generator=generator, callback=callback)

    @property
    def spacing(self) -> str:
        """DDIM's timestep spacing: "trailing" reaches t = T−1, which zero-terminal-SNR needs."""
        return "trailing" if self.cfg.zero_terminal_snr else "leading"

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1] (pixel space: the samples themselves, clamped).

        The decoder runs in the precision the UNet samples in (:func:`sampling_autocast`). That
        matters most for ADD, whose one step spent three quarters of its time decoding in fp32
        (``decode_share_1step``): on a 2-core AMD Zen 4, ``minildm bench`` read the 1-step student
        40.1× as fast as its teacher with the decoder in bf16, against 26.2× in fp32
        (``data/measurements/bench_cpu_amd_zen4_bf16_decode.json`` and
        ``bench_cpu_amd_zen4_alternated_sampling.json``)."""
        if self.autoencoder is None:
            return samples.clamp(-1, 1)
        device = next(self.autoencoder.parameters()).device
        with sampling_autocast(device):
            return self.autoencoder.decode(samples.to(device)).float().clamp(-1, 1)

    @torch.no_grad()
    def __call__(self, captions: list[str], batch_size: int = 128, **kwargs) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] for ``captions`` (see :meth:`sample_latents`)."""
        seed, paint = kwargs.pop("seed", 0), kwargs.pop("paint", None)
        images = []
        for k, start in enumerate(range(0, len(captions), batch_size)):
            chunk = captions[start:start + batch_size]
            chunk_paint = paint[start:start + batch_size] if isinstance(paint, (list, tuple)) else paint
            images.append(self.decode(self.sample_latents(chunk, seed=seed + k, paint=chunk_paint, **kwargs)).cpu())
        return torch.cat(images)
