"""Profiles: the single source of truth for every size, step count and seed in minildm.

Three profiles, as the course's design asks:

* ``smoke`` — seconds per stage; CI and nbval use it. Proves the code runs, nothing more.
* ``cpu``   — a laptop with 2 cores and no GPU: 32 px images, each stage in minutes.
* ``gpu``   — one modern GPU: 64 px images, larger models, each stage in minutes.

Notebooks pick the profile from ``MINILDM_PROFILE`` (default: ``gpu`` when CUDA is available,
else ``cpu``). Every stage's config is a frozen dataclass so that it can be stored in a
checkpoint's card and compared when the checkpoint is loaded again.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

PROFILE_NAMES = ("smoke", "cpu", "gpu")

# Seeds of the two disjoint streams of shapes-world scenes. Item i of a stream is a pure
# function of (seed, i), so "held out" simply means "drawn from the evaluation stream".
TRAIN_SEED = 0
EVAL_SEED = 1_000_003


@dataclass(frozen=True)
class ShapesConfig:
    """The procedural shapes world (``minildm.data.shapes``)."""

    image_size: int = 32
    small_size: float = 0.22  # object extent as a fraction of the image side (7 px at 32 px)
    large_size: float = 0.31  # (10 px at 32 px)
    jitter: float = 0.02  # uniform position jitter around the grid-cell centre, fraction of side
    supersample: int = 4  # anti-aliasing: coverage is averaged over supersample² sub-pixels


@dataclass(frozen=True)
class JudgeConfig:
    """The judge network (``minildm.judge``): reads an image back into objects per grid cell."""

    image_size: int = 32
    widths: tuple[int, ...] = (32, 64, 128)  # one conv stage per width; all but the first halve
    feature_dim: int = 256  # penultimate features, the space of the Fréchet distance


@dataclass(frozen=True)
class AutoencoderConfig:
    """The KL autoencoder (``minildm.autoencoder``) and its loss (``minildm.losses``).

    f = 2 ** (len(channel_mult) - 1): (1, 2, 2) gives f = 4, 32×32×3 → 8×8×4.
    """

    image_size: int = 32
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    z_channels: int = 4
    # the loss: L1 + kl_weight·KL + adaptive-weighted hinge GAN after disc_start (LDM §1.4)
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 500
    disc_channels: int = 32
    disc_layers: int = 2
    disc_lr: float = 2e-4
    perceptual_weight: float = 0.0  # > 0: features of the frozen judge stand in for LPIPS

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class ClipConfig:
    """The tiny CLIP (``minildm.encoders``): two small transformers and their projections."""

    image_size: int = 32
    patch_size: int = 4  # 32 px → 8×8 = 64 patches (+ the class token)
    vision_width: int = 64
    vision_layers: int = 3
    text_width: int = 64
    text_layers: int = 3
    heads: int = 4
    projection_dim: int = 64
    max_length: int = 32  # tokens, <bos> and <eos> included (the longest full caption has 28)
    full_caption_prob: float = 0.75  # per training pair: the full caption, else the category one


@dataclass(frozen=True)
class TrainConfig:
    """One training run of any stage (``minildm.train``)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (fp16 on CUDA only)
    checkpoint_every: int = 500
    seed: int = TRAIN_SEED


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: ShapesConfig
    judge: JudgeConfig
    judge_train: TrainConfig
    ae: AutoencoderConfig
    ae_train: TrainConfig
    clip: ClipConfig
    clip_train: TrainConfig
    eval_n: int  # held-out renders scored by `minildm eval`
    train_eval_n: int  # renders scored at the end of `minildm train` for the card
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _smoke() -> Profile:
    size = 32
    return Profile(
        name="smoke",
        shapes=ShapesConfig(image_size=size),
        judge=JudgeConfig(image_size=size, widths=(8, 16, 16), feature_dim=32),
        judge_train=TrainConfig(steps=30, batch_size=16, lr=2e-3, warmup_steps=5,
                                ema_decay=0.9, checkpoint_every=10),
        ae=AutoencoderConfig(image_size=size, channels=8, disc_channels=8, disc_start=10, perceptual_weight=1.0),
        ae_train=TrainConfig(steps=20, batch_size=8, lr=1e-3, betas=(0.5, 0.9), warmup_steps=2,
                             ema_decay=0.9, checkpoint_every=10),
        clip=ClipConfig(image_size=size, vision_width=16, vision_layers=1, text_width=16, text_layers=1,
                        heads=2, projection_dim=16),
        clip_train=TrainConfig(steps=20, batch_size=16, lr=2e-3, warmup_steps=5, ema_decay=0.9,
                               checkpoint_every=10),
        eval_n=64,
        train_eval_n=64,
    )


def _cpu() -> Profile:
    size = 32
    return Profile(
        name="cpu",
        shapes=ShapesConfig(image_size=size),
        judge=JudgeConfig(image_size=size, widths=(32, 64, 128), feature_dim=256),
        judge_train=TrainConfig(steps=1500, batch_size=64, lr=2e-3, warmup_steps=100,
                                ema_decay=0.995, mixed_precision="bf16", checkpoint_every=500),
        ae=AutoencoderConfig(image_size=size, channels=32, disc_start=1000, perceptual_weight=1.0),
        ae_train=TrainConfig(steps=2000, batch_size=32, lr=1e-3, betas=(0.5, 0.9), warmup_steps=100,
                             ema_decay=0.999, mixed_precision="bf16", checkpoint_every=500),
        clip=ClipConfig(image_size=size),
        clip_train=TrainConfig(steps=1400, batch_size=128, lr=3e-3, betas=(0.9, 0.98), warmup_steps=100,
                               ema_decay=0.995, mixed_precision="bf16", checkpoint_every=500),
        eval_n=1000,
        train_eval_n=1000,
    )


def _gpu() -> Profile:
    size = 64
    return Profile(
        name="gpu",
        shapes=ShapesConfig(image_size=size),
        judge=JudgeConfig(image_size=size, widths=(32, 64, 128, 192), feature_dim=256),
        judge_train=TrainConfig(steps=4000, batch_size=128, lr=2e-3, warmup_steps=100,
                                ema_decay=0.995, mixed_precision="bf16", checkpoint_every=1000),
        ae=AutoencoderConfig(image_size=size, channels=64, disc_channels=64, disc_start=3000),
        ae_train=TrainConfig(steps=6000, batch_size=64, lr=5e-4, betas=(0.5, 0.9), warmup_steps=200,
                             ema_decay=0.999, mixed_precision="bf16", checkpoint_every=1000),
        clip=ClipConfig(image_size=size, patch_size=8, vision_width=128, vision_layers=4, text_width=128,
                        text_layers=4, projection_dim=128),
        clip_train=TrainConfig(steps=4000, batch_size=256, lr=2e-3, betas=(0.9, 0.98), warmup_steps=200,
                               ema_decay=0.995, mixed_precision="bf16", checkpoint_every=1000),
        eval_n=1000,
        train_eval_n=1000,
    )


_PROFILES = {"smoke": _smoke, "cpu": _cpu, "gpu": _gpu}


def get_profile(name: str | None = None) -> Profile:
    """The named profile; ``None`` reads ``MINILDM_PROFILE`` or picks gpu/cpu by hardware."""
    if name is None:
        name = default_profile_name()
    if name not in _PROFILES:
        from minildm.errors import UserError

        raise UserError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILE_NAMES)}")
    return _PROFILES[name]()


def default_profile_name() -> str:
    name = os.environ.get("MINILDM_PROFILE")
    if name:
        return name
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def config_from_dict(cls, values: dict):
    """Rebuild a (possibly nested) config dataclass from ``dataclasses.asdict`` output."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if dataclasses.is_dataclass(f.type) if not isinstance(f.type, str) else False:
            value = config_from_dict(f.type, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def with_overrides(profile: Profile, assignments: list[str]) -> Profile:
    """The profile with ``SECTION.FIELD=VALUE`` assignments applied (``--set`` on the CLI).

    ``VALUE`` is read as JSON when it parses (numbers, lists, true/false), else as a string:
    ``ae.disc_start=1000000`` turns the autoencoder's GAN off, ``ae.channel_mult=[1,2]`` makes f = 2.
    """
    import json

    from minildm.errors import UserError

    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        section_name, _, field_name = key.partition(".")
        sections = [f.name for f in dataclasses.fields(profile) if dataclasses.is_dataclass(getattr(profile, f.name))]
        if not sep or section_name not in sections:
            raise UserError(f"--set {assignment}: expected SECTION.FIELD=VALUE with SECTION one of: {', '.join(sections)}")
        section = getattr(profile, section_name)
        names = [f.name for f in dataclasses.fields(section)]
        if field_name not in names:
            raise UserError(f"--set {assignment}: {section_name} has no field {field_name!r}; fields: {', '.join(names)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, list):
            value = tuple(value)
        profile = dataclasses.replace(profile, **{section_name: dataclasses.replace(section, **{field_name: value})})
    return profile
