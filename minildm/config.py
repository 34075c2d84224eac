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
    twin_share: float = 0.0  # share of each batch that is the shape twins of the rest (hard negatives)


@dataclass(frozen=True)
class UNetConfig:
    """The denoising UNet (``minildm.unet``) of a diffusion stage."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one resolution level each; all but the last halve
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (0, 1)  # levels with a SpatialTransformer (the middle always has one)
    heads: int = 4
    transformer_depth: int = 1
    context_dim: int = 64  # width of the text encoder's token embeddings; 0: no cross-attention
    concat_channels: int = 0  # spatial conditioning maps stacked onto the input
    pooled_dim: int = 0  # a pooled embedding added to the timestep embedding; 0: none
    dropout: float = 0.0


@dataclass(frozen=True)
class DiffusionConfig:
    """A diffusion stage: its UNet, schedule, target and conditioning (``minildm.stages.ldm``)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    space: str = "latent"  # "latent": the reference autoencoder's latents; "pixel": images
    prediction: str = "v"  # "eps" | "v" | "x0"
    zero_terminal_snr: bool = False
    cond_drop: float = 0.1  # the share of training samples with the caption dropped (for guidance)
    train_text_encoder: bool = True  # fine-tune the text tower with the UNet (LDM: cond_stage_trainable)
    full_caption_prob: float = 0.25  # per training pair: the full caption, else the category one
    sample_steps: int = 50  # DDIM steps in evaluation
    guidance: float = 3.0  # classifier-free guidance scale in evaluation
    samples_per_prompt: int = 2  # images per evaluation prompt


@dataclass(frozen=True)
class AddConfig:
    """Adversarial Diffusion Distillation (``minildm.add``, ``minildm.stages.add``): the student's
    timesteps, the two losses and the discriminator (ADD Sec. 3–4; the paper's value in brackets)."""

    student_timesteps: tuple[int, ...] = (999, 749, 499, 249)  # diffusers' "trailing" 4 steps
    top_share: float = 0.0  # share of samples at the top timestep; 0: uniform over the four [uniform]
    losses: str = "both"  # "both" | "adversarial" | "distillation" (Table 1d's ablation)
    distill_weight: float = 2.5  # λ [2.5]
    weighting: str = "exponential"  # c(t): "exponential" (α_t) [default] | "sds" (α_t / 2σ_t)
    distill_space: str = "pixel"  # "pixel" (through the decoder, as the paper) | "latent"
    # the teacher's classifier-free guidance in the target: the paper names none (the diffusers port
    # draws w ~ U[1, 8]); at 400 steps 6 gave 1-step alignment 0.50 where 3 gave 0.46 (120 images), but
    # measured again on one machine with 328 images, 3 / 6 / 9 / 12 gave 0.51 / 0.50 / 0.51 / 0.48, one
    # draw's spread (add_levers.json's "teacher_guidance_sweep"); 6 is kept
    teacher_guidance: float = 6.0
    r1_gamma: float = 1e-5  # R1 on the heads' inputs [1e-5]
    disc_lr: float = 2e-4
    disc_betas: tuple[float, float] = (0.0, 0.99)  # StyleGAN-T's Adam
    cmap_dim: int = 64  # the projection's width [64]
    image_condition: bool = True  # condition D on the real image's CLIP embedding too [text + image]
    diff_augment: bool = True  # translation + cutout on D's inputs (StyleGAN-T's DiffAugment)
    # beyond ADD: real images shown to D with another sample's caption count as fake (a
    # "matching-aware" discriminator, Reed et al. 2016); 0 leaves the paper's D
    mismatch_weight: float = 0.0
    teacher_t_range: tuple[int, int] = (0, 999)  # the re-noising timesteps t of Eq. 4 [U{0…999}, Fig. 2]
    # beyond ADD: "teacher" is LADD's discriminator (minildm.latent_discriminator), heads on the
    # frozen teacher's encoder features of latents re-noised at t̂ ~ U{disc_t_range}; "vit" is ADD's
    discriminator: str = "vit"
    disc_t_range: tuple[int, int] = (0, 750)  # LADD's t̂ (the AMD re-implementation's range)


# the precisions a run may ask for (TrainConfig.mixed_precision; what each means: minildm.precision)
MIXED_PRECISIONS = ("no", "bf16", "fp16", "auto", "auto-native")


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
    # "no" | "bf16" | "fp16" (CUDA only) | "auto": bf16 where this machine computes it faster
    # (a CUDA GPU with bf16, a CPU with AMX tiles, an AMD CPU with AVX-512 BF16), else fp32 |
    # "auto-native": bf16 also on any CPU with AVX-512 BF16 — minildm.precision
    mixed_precision: str = "no"
    checkpoint_every: int = 500  # 0: a checkpoint at the last step only
    # Where a task measures its progress (``progress_eval``, kept in the card's ``progress``): at every
    # checkpoint (True), or only at the run's last step (False), for a run whose curve nobody reads
    # (the course's pixel baseline: minildm.course.course_profile). Training is the same either way.
    progress_at_every_checkpoint: bool = True
    seed: int = TRAIN_SEED
    # Gradient accumulation: each process computes a step's gradient as ``accumulate`` micro-batches
    # in turn, each the batch and randomness of one "virtual rank" (its share of the global batch),
    # and averages them. ``N`` processes with ``accumulate = k`` train exactly like ``N·k``
    # processes: the global batch and the model do not depend on how the work is split.
    accumulate: int = 1
    # Compile the model's training forward and backward with ``torch.compile`` (TorchInductor:
    # fused C++ kernels on the CPU, Triton on a GPU) — a speed option, not part of any paper;
    # it needs a C++ compiler, and its first step compiles for minutes (``minildm.train``).
    compile: bool = False
    # Worker processes that draw the coming steps' batches of the stages that render them (judge,
    # autoencoder, CLIP, pixel baseline) while the model trains: None, as many as a GPU machine's
    # cores allow (up to 8) on a GPU and none on a CPU, whose cores are training; the batches,
    # and so the model, are the same either way (minildm.prefetch).
    render_workers: int | None = None
    # A cap on the training seconds (progress measurements not counted, resumed calls summed): the
    # run stops at ``steps`` or when it has trained this long, whichever comes first, and its card
    # says which (``stopped_by_time_budget``). None: no cap. The learning rate keeps the schedule of
    # ``steps``, so a run the cap stops ends before its rate has decayed. For a budget that is a
    # length of time rather than an amount of work: the pixel baseline's "as long as the LDM".
    max_train_seconds: float | None = None

    def __post_init__(self):
        """Refuse values no run can train with (``--set ldm_train.batch_size=0``) before anything is
        written, rather than failing at the first step."""
        wrong = [f"{name} must be at least 1" for name in ("steps", "batch_size", "accumulate") if getattr(self, name) < 1]
        wrong += [f"{name} must be at least 0" for name in ("warmup_steps", "checkpoint_every") if getattr(self, name) < 0]
        wrong += [f"seed must be from 0 to {2**32 - 1}"] if not 0 <= self.seed < 2**32 else []
        wrong += ["lr must be above 0"] if self.lr <= 0 else []
        wrong += ["ema_decay must be at least 0 and below 1"] if not 0 <= self.ema_decay < 1 else []
        wrong += ([f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}"]
                  if self.mixed_precision not in MIXED_PRECISIONS else [])
        if wrong:
            raise ValueError("; ".join(wrong))


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
    ldm: DiffusionConfig
    ldm_train: TrainConfig
    pixel: DiffusionConfig
    pixel_train: TrainConfig
    experts_train: TrainConfig  # one expert's fine-tuning (eDiff-I); the tree has five
    add_train: TrainConfig  # the ADD student (its discriminator's optimiser: ``add``)
    eval_n: int  # held-out renders scored by `minildm eval`
    train_eval_n: int  # renders scored at the end of `minildm train` for the card
    extras: dict = field(default_factory=dict)
    add: AddConfig = field(default_factory=AddConfig)
    # The ``--set`` assignments that changed this profile from the named one (:func:`with_overrides`):
    # what a course's job needs to rebuild it in a process of its own, and its cards' command names.
    overrides: tuple[str, ...] = ()

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
        clip=ClipConfig(image_size=size, vision_width=16, vision_layers=1, text_width=64, text_layers=1,  # text_width: the LDM's context_dim
                        heads=2, projection_dim=16, twin_share=0.5),
        clip_train=TrainConfig(steps=20, batch_size=16, lr=2e-3, warmup_steps=5, ema_decay=0.9,
                               checkpoint_every=10),
        ldm=DiffusionConfig(unet=UNetConfig(model_channels=16, channel_mult=(1, 2), heads=2, context_dim=64),
                            sample_steps=5),
        ldm_train=TrainConfig(steps=10, batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9, checkpoint_every=5),
        pixel=DiffusionConfig(unet=UNetConfig(in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2),
                                              attention_levels=(1,), heads=2, context_dim=64),
                              space="pixel", sample_steps=5),
        pixel_train=TrainConfig(steps=10, batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.9, checkpoint_every=5),
        experts_train=TrainConfig(steps=4, batch_size=8, lr=3e-4, warmup_steps=1, ema_decay=0.9, checkpoint_every=2),
        add_train=TrainConfig(steps=4, batch_size=8, lr=1e-4, warmup_steps=1, ema_decay=0.9, checkpoint_every=2),
        eval_n=64,
        train_eval_n=64,
        extras={"cache_size": 64, "diffusion_eval_n": 12, "progress_eval_n": 6, "paint_eval_n": 4,
                "add_cache_size": 64},
    )


def _cpu() -> Profile:
    size = 32
    return Profile(
        name="cpu",
        shapes=ShapesConfig(image_size=size),
        judge=JudgeConfig(image_size=size, widths=(32, 64, 128), feature_dim=256),
        judge_train=TrainConfig(steps=1500, batch_size=64, lr=2e-3, warmup_steps=100,
                                ema_decay=0.995, mixed_precision="auto", checkpoint_every=500),
        ae=AutoencoderConfig(image_size=size, channels=32, disc_start=1000, perceptual_weight=1.0),
        # 3000 steps, not 2000: at seed 0 with the reference judge, 2000 steps gave 26.98 dB and 3000
        # gave 31.06 (data/measurements/ae_draws.json); course runs at 2000 read 27.1-28.8 (target 30)
        ae_train=TrainConfig(steps=3000, batch_size=32, lr=1e-3, betas=(0.5, 0.9), warmup_steps=100,
                             ema_decay=0.999, mixed_precision="auto", checkpoint_every=500),
        clip=ClipConfig(image_size=size, twin_share=0.25),
        # 2400 steps, not 1600: seed 0 is a slow draw, retrieving 0.856 at 1600 steps and 0.973 at
        # 2400 (data/measurements/clip_draws.json; target 0.9). CLIP trains beside the autoencoder.
        clip_train=TrainConfig(steps=2400, batch_size=128, lr=3e-3, betas=(0.9, 0.98), warmup_steps=100,
                               ema_decay=0.995, mixed_precision="auto", checkpoint_every=500),
        ldm=DiffusionConfig(unet=UNetConfig(model_channels=48, channel_mult=(1, 2, 2), attention_levels=(0, 1),
                                            heads=4, context_dim=64)),
        # lr 2e-3 and EMA 0.998 (rather than 1e-3 and 0.999) brought two-object alignment from
        # 0.43 to 0.68 in the same 3000 steps: binding appears sooner, and the average forgets faster
        ldm_train=TrainConfig(steps=3000, batch_size=128, lr=2e-3, warmup_steps=200, ema_decay=0.998,
                              mixed_precision="auto", checkpoint_every=400),
        # the same UNet on 32×32×3 pixels: one more level, so that attention sits at the same 8×8 and 4×4
        pixel=DiffusionConfig(unet=UNetConfig(in_channels=3, out_channels=3, model_channels=48,
                                              channel_mult=(1, 2, 2, 2), attention_levels=(2, 3), heads=4,
                                              context_dim=64), space="pixel"),
        # equal wall clock with the latent run: a pixel step took 2.08 s on this CPU, a latent one
        # 0.40 s, so 576 steps fill the latent run's 20 minutes. "auto-native": bf16 also on a CPU
        # with AVX-512 BF16 but no AMX (Intel's), where this step alone of the course's ran faster in bf16.
        # That count holds only where it was measured: on an AVX2 CPU in fp32 (a 2-core AMD Zen 3) a pixel
        # step took 5.3× as long, a latent one 1.65×, so 576 steps took about an hour and the baseline
        # got far more time than the LDM. The 25-minute cap keeps it near the LDM's time on any CPU; on
        # the Xeon the steps end the run first (1235 and 1346 s in its two course runs)
        pixel_train=TrainConfig(steps=576, batch_size=128, lr=1e-3, warmup_steps=40, ema_decay=0.995,
                                mixed_precision="auto-native", checkpoint_every=96, max_train_seconds=1500),
        # five fine-tunings of the reference LDM (four tree nodes and the middle expert), each on its
        # interval with the text tower frozen, and the equal-cost baseline: 2 × 5 × 225 steps. Halved from
        # 450, which had left the experts' gain over one model within noise of zero all the same
        # (reference: +0.011 [−0.014, +0.034] at 450, +0.000 [−0.023, +0.021] at 225)
        experts_train=TrainConfig(steps=225, batch_size=128, lr=3e-4, warmup_steps=30, ema_decay=0.995,
                                  mixed_precision="auto", checkpoint_every=75),
        # the ADD student, fine-tuned from the reference LDM against its discriminator
        add_train=TrainConfig(steps=1000, batch_size=32, lr=1e-4, warmup_steps=50, ema_decay=0.99,
                              mixed_precision="auto", checkpoint_every=200),
        eval_n=1000,
        train_eval_n=1000,
        extras={"cache_size": 40_000, "diffusion_eval_n": 656, "progress_eval_n": 120, "pixel_eval_n": 120,
                # the several-embeddings model: at 900 steps its image route was still weak (an image
                # alone gave its object 13% of the time against 4% with nothing); 1800 steps, 23%
                "multi_embedding_steps": 1800, "paint_eval_n": 160,
                # how the experts are grown: "tree" (eDiff-I's) or "flat" (its control: minildm.experts.flat_experts)
                "experts_split": "tree",
                "add_cache_size": 8192},
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
                        text_layers=4, projection_dim=128, twin_share=0.5),
        clip_train=TrainConfig(steps=4000, batch_size=256, lr=2e-3, betas=(0.9, 0.98), warmup_steps=200,
                               ema_decay=0.995, mixed_precision="bf16", checkpoint_every=1000),
        ldm=DiffusionConfig(unet=UNetConfig(model_channels=128, channel_mult=(1, 2, 2), attention_levels=(0, 1),
                                            heads=8, context_dim=128)),
        ldm_train=TrainConfig(steps=8000, batch_size=256, lr=5e-4, warmup_steps=500, ema_decay=0.9995,
                              mixed_precision="bf16", checkpoint_every=1000),
        pixel=DiffusionConfig(unet=UNetConfig(in_channels=3, out_channels=3, model_channels=128,
                                              channel_mult=(1, 2, 2, 2), attention_levels=(2, 3), heads=8,
                                              context_dim=128), space="pixel"),
        pixel_train=TrainConfig(steps=8000, batch_size=256, lr=5e-4, warmup_steps=500, ema_decay=0.9995,
                                mixed_precision="bf16", checkpoint_every=1000),
        experts_train=TrainConfig(steps=1500, batch_size=256, lr=2e-4, warmup_steps=100, ema_decay=0.998,
                                  mixed_precision="bf16", checkpoint_every=500),
        add_train=TrainConfig(steps=3000, batch_size=64, lr=1e-4, warmup_steps=200, ema_decay=0.995,
                              mixed_precision="bf16", checkpoint_every=500),
        eval_n=1000,
        train_eval_n=1000,
        extras={"cache_size": 100_000, "diffusion_eval_n": 656, "progress_eval_n": 240},
    )


_PROFILES = {"smoke": _smoke, "cpu": _cpu, "gpu": _gpu}


def with_training_seed(profile: Profile, seed: int) -> Profile:
    """``profile`` with every training run's seed (each ``*_train`` config's) set to ``seed``: other
    initial weights, batches and noise, so another draw of every stage. The evaluation streams keep
    their own seed, so runs at two training seeds are measured on the same prompts and renders."""
    changes = {f.name: dataclasses.replace(getattr(profile, f.name), seed=seed)
               for f in dataclasses.fields(profile) if isinstance(getattr(profile, f.name), TrainConfig)}
    return dataclasses.replace(profile, **changes)


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
    import typing

    hints = typing.get_type_hints(cls)  # resolves the string annotations of `from __future__`
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            value = config_from_dict(hints[f.name], value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def with_overrides(profile: Profile, assignments: list[str]) -> Profile:
    """The profile with ``SECTION.FIELD=VALUE`` assignments applied (``--set`` on the CLI).

    ``VALUE`` is read as JSON when it parses (numbers, lists, true/false), else as a string:
    ``ae.disc_start=1000000`` turns the autoencoder's GAN off, ``ae.channel_mult=[1,2]`` makes f = 2,
    ``ldm.unet.model_channels=96`` reaches into a nested config, and ``extras.KEY=VALUE`` sets one of
    the profile's extras (``extras.multi_embedding_steps=900``). A value of the wrong type
    (``ldm_train.steps=abc``) or one the config refuses (``ldm_train.batch_size=0``) is a
    :class:`~minildm.errors.UserError` naming the field and what it takes, before anything runs.
    """
    import typing

    from minildm.errors import UserError

    def replace(config, path: list[str], raw: str, assignment: str, where: str):
        names = [f.name for f in dataclasses.fields(config)]
        if path[0] not in names:
            raise UserError(f"--set {assignment}: {where} has no field {path[0]!r}; fields: {', '.join(names)}")
        present = getattr(config, path[0])
        if len(path) > 1:
            if not dataclasses.is_dataclass(present):
                raise UserError(f"--set {assignment}: {where}.{path[0]} has no fields")
            value = replace(present, path[1:], raw, assignment, f"{where}.{path[0]}")
        elif dataclasses.is_dataclass(present):
            raise UserError(f"--set {assignment}: {where}.{path[0]} is a section; set one of its fields: "
                            f"{', '.join(f.name for f in dataclasses.fields(present))}")
        else:
            hint = typing.get_type_hints(type(config))[path[0]]  # resolves `from __future__` annotations
            value = _typed_value(raw, hint, present, assignment, f"{where}.{path[0]}")
        try:
            return dataclasses.replace(config, **{path[0]: value})
        except ValueError as refused:  # a TrainConfig value no run can train with
            raise UserError(f"--set {assignment}: {refused}") from None

    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        section_name, _, field_path = key.partition(".")
        if sep and section_name == "extras":
            examples = {k: v for make in (_smoke, _cpu, _gpu) for k, v in make().extras.items()}
            if field_path not in examples:
                raise UserError(f"--set {assignment}: no profile has an extra {field_path!r}; "
                                f"extras: {', '.join(sorted(examples))}")
            value = _typed_value(raw, type(examples[field_path]), examples[field_path], assignment, key)
            profile = dataclasses.replace(profile, extras={**profile.extras, field_path: value})
            continue
        sections = [f.name for f in dataclasses.fields(profile) if dataclasses.is_dataclass(getattr(profile, f.name))]
        if not sep or section_name not in sections or not field_path:
            raise UserError(f"--set {assignment}: expected SECTION.FIELD=VALUE with SECTION one of: {', '.join(sections)}")
        section = replace(getattr(profile, section_name), field_path.split("."), raw, assignment, section_name)
        profile = dataclasses.replace(profile, **{section_name: section})
    return dataclasses.replace(profile, overrides=profile.overrides + tuple(assignments))


def _typed_value(raw: str, hint, present, assignment: str, name: str):
    """A ``--set`` value for a field annotated ``hint``: JSON when it parses (a list becomes a
    tuple), the text as typed for a text field; a value of another type is a UserError that
    shows the field's present value as an example."""
    import json

    from minildm.errors import UserError

    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if isinstance(value, list):
        value = tuple(value)
    if str in _members(hint) and not _fits(value, hint):
        value = raw  # a text field given something JSON reads as a number: the text as typed
    if not _fits(value, hint):
        raise UserError(f"--set {assignment}: {name} takes {_type_words(hint)}, like its present value "
                        f"{json.dumps(present)}")
    return float(value) if float in _members(hint) and type(value) is int else value  # lr=1 → 1.0


def _members(hint) -> tuple:
    """The types an annotation admits: ``(int, NoneType)`` for ``int | None``, ``(int,)`` for ``int``."""
    import types
    import typing

    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return typing.get_args(hint) if union else (hint,)


def _fits(value, hint) -> bool:
    """Whether ``value`` (as JSON reads it, lists made tuples) is a value of the annotation ``hint``."""
    import typing

    for member in _members(hint):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if isinstance(value, bool):  # JSON's true/false: a bool, never a number
            if member is bool:
                return True
        elif member is type(None) and value is None or member is int and isinstance(value, int):
            return True
        elif member is float and isinstance(value, (int, float)) or member in (str, dict) and isinstance(value, member):
            return True
        elif origin is tuple and isinstance(value, tuple):
            if len(args) == 2 and args[1] is Ellipsis:
                return all(_fits(v, args[0]) for v in value)
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    return False


def _type_words(hint) -> str:
    """An annotation in words: ``int | None`` → "a whole number or null"."""
    import typing

    words = []
    for member in _members(hint):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if origin is tuple:
            items = _type_words(args[0]).removeprefix("a ") + "s"
            words.append(f"a list of {items}" if len(args) == 2 and args[1] is Ellipsis
                         else f"a list of {len(args)} {items}")
        else:
            words.append({int: "a whole number", float: "a number", bool: "true or false", str: "text",
                          dict: "a JSON object", type(None): "null"}.get(member, str(member)))
    return " or ".join(words)
