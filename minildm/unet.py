"""The denoising UNet with cross-attention (LDM Sec. 3.3, CompVis ``openaimodel.UNetModel``).

::

    x_t ─ conv_in ─┬─ level 0: [ResBlock (+ SpatialTransformer)] × n ── Downsample ─┐
                   │  level 1: …                                                   │
                   │  middle: ResBlock → SpatialTransformer → ResBlock             │
                   └─ levels back up, each block taking the matching skip ─ GN → SiLU → conv_out (zero init)

* Every ResBlock gets the **timestep embedding**: sinusoidal (cos first) → Linear → SiLU →
  Linear to 4× the base width, added after the first conv (:class:`TimestepResBlock`).
* At the levels in ``attention_levels`` (indices of the resolution levels, 0 = full size — the
  "downsampling rates" 1, 2, 4 of CompVis' ``attention_resolutions``) a :class:`SpatialTransformer`
  lets the pixels attend to each other and to the condition's tokens (**cross-attention**).
* LDM's second conditioning route, **concatenation**: ``cond["concat"]`` (B, concat_channels,
  H, W) — a layout, a mask — is stacked onto the input channels.
* An optional **pooled** vector (``pooled_dim`` > 0: eDiff-I's CLIP embeddings) is projected and
  added to the timestep embedding.

The UNet is itself a denoiser for :mod:`minildm.samplers`: ``unet(x_t, t, cond)`` with ``cond`` a
dict holding ``context`` (B, L, D), ``mask`` (B, L), ``concat`` and ``pooled`` as configured.
CompVis' initialisation: the last conv of every ResBlock, every ``proj_out`` and ``conv_out``
start at zero, so the untrained network is close to the identity on every path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minildm.attention import Attention, SpatialTransformer
from minildm.config import UNetConfig
from minildm.diffusion import timestep_embedding
from minildm.nn import Downsample, Upsample, normalization


class TimestepResBlock(nn.Module):
    """GN → SiLU → conv, + Linear(emb), GN → SiLU → dropout → conv (zero init), + skip."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = normalization(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels)
        self.norm2 = normalization(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight), nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        base, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.pooled_embed = nn.Linear(cfg.pooled_dim, emb_dim) if cfg.pooled_dim else None
        context_dim = cfg.context_dim or None

        def transformer(channels):
            return SpatialTransformer(channels, context_dim, cfg.heads, channels // cfg.heads,
                                      cfg.transformer_depth, cfg.dropout)

        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.concat_channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        skips, channels = [base], base
        self.level_ends = []  # which skip is each level's last feature map (before its downsampling)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                block = nn.ModuleList([TimestepResBlock(channels, base * mult, emb_dim, cfg.dropout)])
                channels = base * mult
                if level in cfg.attention_levels:
                    block.append(transformer(channels))
                self.down.append(block)
                skips.append(channels)
            self.level_ends.append(len(skips) - 1)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(channels)]))
                skips.append(channels)
        self.encoder_channels = [skips[i] for i in self.level_ends] + [channels]  # of encoder_features' maps
        self.middle = nn.ModuleList([TimestepResBlock(channels, channels, emb_dim, cfg.dropout), transformer(channels),
                                     TimestepResBlock(channels, channels, emb_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                block = nn.ModuleList([TimestepResBlock(channels + skips.pop(), base * mult, emb_dim, cfg.dropout)])
                channels = base * mult
                if level in cfg.attention_levels:
                    block.append(transformer(channels))
                if level > 0 and i == cfg.num_res_blocks:
                    block.append(Upsample(channels))
                self.up.append(block)
        self.norm_out = normalization(channels)
        self.conv_out = nn.Conv2d(channels, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight), nn.init.zeros_(self.conv_out.bias)
        for name, module in self.named_modules():  # names for attention hooks
            if isinstance(module, Attention):
                module.name = name

    def _run(self, block: nn.ModuleList, h, emb, context, mask):
        for layer in block:
            if isinstance(layer, TimestepResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, mask)
            else:  # Downsample / Upsample
                h = layer(h)
        return h

    def _encode(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None):
        """The encoder half and the middle: (h, skips, (emb, context, mask))."""
        cond = cond or {}
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        if self.pooled_embed is not None and cond.get("pooled") is not None:
            emb = emb + self.pooled_embed(cond["pooled"].to(emb.dtype))
        if self.cfg.concat_channels:
            x = torch.cat([x, cond["concat"].to(x.dtype)], dim=1)
        context, mask = cond.get("context"), cond.get("mask")
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb, context, mask)
            skips.append(h)
        h = self._run(self.middle, h, emb, context, mask)
        return h, skips, (emb, context, mask)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        h, skips, (emb, context, mask) = self._encode(x, t, cond)
        for block in self.up:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, mask)
        return self.conv_out(F.silu(self.norm_out(h)))

    def encoder_features(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> list[torch.Tensor]:
        """The encoder's feature maps at x_t: each level's last one and the middle's, finest first
        (what a LADD discriminator reads, :mod:`minildm.latent_discriminator`). The decoder never runs."""
        h, skips, _ = self._encode(x, t, cond)
        return [skips[i] for i in self.level_ends] + [h]


class TextConditionedUNet(nn.Module):
    """The UNet together with the text tower τθ that feeds its cross-attention, trained as one
    model when ``train_text`` (LDM trains its text transformer jointly with the UNet:
    ``cond_stage_trainable``); otherwise the tower is frozen and only carried along.

    ``forward(x_t, t, cond)`` takes the token ids: ``cond = {"input_ids", "mask", "keep"}``, where
    ``keep`` (B,) is 0 for the samples whose caption is dropped (their context is zeroed).
    """

    def __init__(self, unet: UNet, text_model: nn.Module, train_text: bool):
        super().__init__()
        self.unet, self.text = unet, text_model
        self.text.requires_grad_(train_text)

    def context(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        context = self.context(cond["input_ids"], cond["mask"]) * cond["keep"][:, None, None].to(x.dtype)
        return self.unet(x, t, {"context": context, "mask": cond["mask"]})
