"""Stage 6 — Adversarial Diffusion Distillation: a 1–4 step student of the latent diffusion teacher.

``minildm train add --teacher RUN`` (default: the reference LDM) copies the teacher into a
student and trains it with ADD's two losses (:mod:`minildm.add`, :mod:`minildm.discriminator`):
the adversarial loss against a discriminator made of the frozen tiny-CLIP vision tower and
StyleGAN-T heads, and the distillation loss toward the teacher's guided one-step denoising of
the re-noised student sample, in pixel space through the decoder. The student's text tower is
the teacher's, frozen; only its UNet trains.

The training loop's *critic* is the discriminator: after each student step it takes one step of
the hinge loss (+ R1 on its heads' inputs) with Adam betas (0, 0.99). The student's step reuses
the images it generated for the critic's, so each step generates once.

``minildm eval add`` measures the student at 1, 2 and 4 steps (no guidance) against the teacher
at 50 guided DDIM steps — and the teacher forced to 1 and 4 DDIM steps, which is what the
student is for — on the evaluation prompts, with the judge: alignment, fid, and the 50-step
teacher's sampling time over the 1-step student's, both measured in the same run. The teacher's
50-step figures are read from its card where its own stage measured exactly them (the same
prompts, seed, judge and sampling precision: :func:`teacher_figures_from_card`), as the course's
LDM has just done; elsewhere they are measured here.

Toy-scale changes, each named where it is made: the discriminator's ViT is the tiny CLIP's
(DINOv2 cannot be downloaded); the student timesteps' top input is pure noise instead of a
zero-terminal-SNR schedule (the teacher was trained without one); 32 px images, a few hundred
steps.

Beyond ADD, ``add.discriminator=teacher`` swaps the ViT discriminator for its successor LADD's
(:mod:`minildm.latent_discriminator`): heads on the frozen teacher's own encoder features of
re-noised latents, so nothing is decoded for it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minildm.add import (WEIGHTINGS, add_sample, distillation_loss, distillation_weight, sampling_timesteps,
                         student_input)
from minildm.checkpoints import (CARD, atomic_write_file, load_checkpoint, load_stage_checkpoint, load_state_into,
                                 save_json)
from minildm.config import EVAL_SEED, AddConfig, DiffusionConfig, Profile, ShapesConfig, config_from_dict
from minildm.data.datasets import shapes_batch
from minildm.discriminator import (ProjectedDiscriminator, generator_adversarial_loss, hinge_discriminator_loss,
                                   hinge_fake_loss, r1_penalty)
from minildm.diffusion import NoiseSchedule
from minildm.errors import UserError
from minildm.latent_discriminator import LatentDiscriminator
from minildm.pipeline import DiffusionPipeline
from minildm.precision import sampling_autocast
from minildm.samplers import ClassifierFreeGuidance
from minildm.stages import ldm
from minildm.stages.items import ItemCache, item_cache
from minildm.unet import TextConditionedUNet, UNet

REFERENCE = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "add"
MEASUREMENTS = Path(__file__).resolve().parents[2] / "data" / "measurements"
ABLATION, LEVERS = MEASUREMENTS / "add_ablation.json", MEASUREMENTS / "add_levers.json"
STAGE = "add"
LOSSES = ("both", "adversarial", "distillation")
SPACES = ("pixel", "latent")
DISCRIMINATORS = ("vit", "teacher")
TARGETS = {"alignment_ratio_1step": (">=", 0.9), "fid_ratio_1step": ("<=", 1.5), "speedup_1step": (">=", 25.0),
           "alignment_4step_minus_1step": (">=", 0.0),  # iterative refinement helps
           # "far ahead of the teacher's own 1- and 4-step DDIM": ten points of alignment
           "alignment_1step_minus_teacher_ddim_1step": (">=", 0.1),
           "alignment_4step_minus_teacher_ddim_4step": (">=", 0.1)}


def check_config(cfg: AddConfig) -> None:
    """One clear line for a setting ADD does not have."""
    if cfg.losses not in LOSSES:
        raise UserError(f"add.losses={cfg.losses!r}; choose one of: {', '.join(LOSSES)}")
    if cfg.weighting not in WEIGHTINGS:
        raise UserError(f"add.weighting={cfg.weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")
    if not 0 <= cfg.top_share <= 1:
        raise UserError(f"add.top_share={cfg.top_share}: give a share between 0 and 1")
    if cfg.distill_space not in SPACES:
        raise UserError(f"add.distill_space={cfg.distill_space!r}; choose one of: {', '.join(SPACES)}")
    if cfg.discriminator not in DISCRIMINATORS:
        raise UserError(f"add.discriminator={cfg.discriminator!r}; choose one of: {', '.join(DISCRIMINATORS)}")
    for name in ("teacher_t_range", "disc_t_range"):
        low_high = list(getattr(cfg, name))
        if len(low_high) != 2 or not 0 <= low_high[0] <= low_high[1] <= 999:
            raise UserError(f"add.{name}={low_high}: give [low, high] with 0 <= low <= high <= 999")
    if cfg.mismatch_weight < 0:
        raise UserError(f"add.mismatch_weight={cfg.mismatch_weight}: give a weight >= 0 (0: the paper's D)")
    steps = list(cfg.student_timesteps)
    if not steps or any(not isinstance(s, int) or not 0 < s < 1000 for s in steps) or len(set(steps)) != len(steps):
        raise UserError(f"add.student_timesteps={steps}: give distinct timesteps in 1…999, e.g. [999, 749, 499, 249]")


# ----------------------------------------------------------------------------------- sampling
class StudentPipeline(DiffusionPipeline):
    """The distilled student as a pipeline: ``steps`` of ADD's sampler (predict x₀, re-noise to
    the next student timestep with fresh noise), no guidance."""

    def __init__(self, unet, cfg: DiffusionConfig, encoder, autoencoder, image_size: int,
                 student_timesteps: tuple[int, ...]):
        super().__init__(unet, cfg, encoder, autoencoder, image_size)
        self.student_timesteps = tuple(student_timesteps)

    def denoise_x0(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        with sampling_autocast(self.device):
            out = self.unet(x, t, cond).float()
        return self.schedule.predicted_x0(self.cfg.prediction, out, x, t)

    @torch.no_grad()
    def sample_latents(self, captions: list[str], *, steps: int = 1, guidance: float = 1.0, seed: int = 0,
                       callback=None, paint=None, **_) -> torch.Tensor:
        if guidance != 1.0:
            raise UserError(f"guidance {guidance}: the ADD student samples without guidance; use --guidance 1")
        if paint:
            raise UserError("paint-with-words is for the DDIM-sampled models (ldm, experts), not the ADD student")
        if not 1 <= steps <= 1000:
            raise UserError(f"--steps {steps}: the student takes 1 to 1000 steps (it was trained for 1–4)")
        cond = self.conditioning(captions)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(captions), *self.sample_shape), generator=generator).to(self.device)
        timesteps = sampling_timesteps(self.student_timesteps, steps)
        return add_sample(self.denoise_x0, self.schedule, noise, cond, timesteps, generator, callback)


# ----------------------------------------------------------------------------------- training
class AddTask:
    """The student (model) and the discriminator (critic) as a :class:`minildm.train.TrainingTask`."""

    stage = STAGE

    def __init__(self, cfg: AddConfig, diffusion: DiffusionConfig, teacher_state: dict, encoder, autoencoder,
                 cache: ItemCache, text_embeddings: dict, batch_size: int, seed: int, progress_n: int = 0,
                 teacher_source: str = "teacher", fixed_length: bool = False):
        check_config(cfg)
        self.fixed_length = fixed_length  # captions padded to the encoder's length: for a compiled student
        self.cfg, self.diffusion, self.encoder, self.autoencoder = cfg, diffusion, encoder, autoencoder
        self.cache, self.text_embeddings, self.batch_size, self.seed = cache, text_embeddings, batch_size, seed
        self.progress_n, self.judge = progress_n, None
        self.autoencoder.requires_grad_(False)
        self.model = TextConditionedUNet(UNet(diffusion.unet), copy.deepcopy(encoder.text_model), False)
        load_state_into(self.model, teacher_state, teacher_source)  # the student starts as the teacher
        self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.schedule = NoiseSchedule(zero_terminal_snr=diffusion.zero_terminal_snr)
        self.student_timesteps = torch.tensor(sorted(cfg.student_timesteps, reverse=True))
        self.adversarial = cfg.losses in ("both", "adversarial")
        self.distill = cfg.losses in ("both", "distillation")
        self.critic = None
        if self.adversarial:
            with torch.random.fork_rng(devices=[]):  # the heads' initial weights: a function of the seed alone
                torch.manual_seed(seed)
                if cfg.discriminator == "teacher":
                    self.critic = LatentDiscriminator(self.teacher, self.schedule, c_dim=2 * encoder.pooled_dim,
                                                      cmap_dim=cfg.cmap_dim, t_range=cfg.disc_t_range)
                else:
                    self.critic = ProjectedDiscriminator(encoder, c_dim=2 * encoder.pooled_dim,
                                                         cmap_dim=cfg.cmap_dim, augment=cfg.diff_augment)
            self.critic_lr, self.critic_betas = cfg.disc_lr, tuple(cfg.disc_betas)

    def batch(self, step: int, rank: int, world_size: int) -> dict:
        per_rank = self.batch_size // world_size
        positions = range(step * self.batch_size + rank * per_rank, step * self.batch_size + (rank + 1) * per_rank)
        indices = self.cache.item_order(positions)
        rng = np.random.default_rng([self.seed, step, rank, 13])
        use_full = rng.random(per_rank) < self.diffusion.full_caption_prob
        captions = [self.cache.full[i] if f else self.cache.category[i] for i, f in zip(indices, use_full)]
        tokens = self.encoder.tokenize(captions, fixed_length=self.fixed_length)
        text = torch.stack([self.text_embeddings["full" if f else "category"][i] for i, f in zip(indices, use_full)])
        images, _ = shapes_batch(self.cache.seed, indices, ShapesConfig(image_size=self.cache.image_size))
        return {"x0": self.cache.latents[indices], "images": images, "input_ids": tokens["input_ids"],
                "mask": tokens["attention_mask"], "keep": torch.ones(per_rank),
                "c_text": text, "c_image": self.cache.image_embeddings[indices]}

    def condition(self, batch: dict) -> torch.Tensor:
        """The discriminator's projection condition: the caption's pooled CLIP embedding and the real
        image's (zeroed where the student saw pure noise: there it carries nothing to be faithful to;
        and everywhere when ``image_condition`` is off)."""
        image = batch["c_image"] * batch["sees_image"][:, None] if self.cfg.image_condition else batch["c_image"] * 0
        return torch.cat([batch["c_text"], image], dim=1).float()

    def mismatched_condition(self, batch: dict) -> torch.Tensor:
        """Each real image's condition with the next sample's caption and no image embedding (which
        would give the mismatch away without looking at the image): D must read the image to
        tell that it does not show what the caption says."""
        text = batch["c_text"].roll(1, dims=0)
        return torch.cat([text, torch.zeros_like(batch["c_image"])], dim=1).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)

    def loss(self, model, batch):
        z0 = batch["x0"]
        b = z0.shape[0]
        cond = {"input_ids": batch["input_ids"], "mask": batch["mask"], "keep": batch["keep"]}
        timesteps = self.student_timesteps.to(z0.device)
        s = timesteps[self.student_timestep_indices(b, z0.device)]
        x_s = student_input(self.schedule, z0, torch.randn_like(z0), s, int(timesteps[0]))
        x0_hat = self.schedule.predicted_x0(self.diffusion.prediction, model(x_s, s, cond).float(), x_s, s)
        batch["sees_image"] = (s != timesteps[0]).float()
        stats, loss = {}, torch.zeros((), device=z0.device)
        reads_pixels = self.adversarial and not self.critic.reads_latents
        fake = self.decode(x0_hat).float() if (reads_pixels or self.cfg.distill_space == "pixel") else None
        if self.distill:
            distill = self.distillation(x0_hat, fake, cond)
            loss = loss + self.cfg.distill_weight * distill
            stats["distill"] = float(distill.detach())
        if self.adversarial:
            generated = fake if reads_pixels else x0_hat
            g_adv = generator_adversarial_loss(self.critic(generated, self.condition(batch), batch))
            loss = loss + g_adv
            stats["g_adv"] = float(g_adv.detach())
            batch["fake"] = generated.detach()  # what the critic's step compares with the real images
        return loss, stats

    def student_timestep_indices(self, b: int, device) -> torch.Tensor:
        """Which student timestep each sample gets: uniform over the four (the paper), or the top
        one for a share ``top_share`` and uniform over the others otherwise (LADD's weighting,
        which favours the one-step sampler)."""
        n = len(self.student_timesteps)
        uniform = torch.randint(n, (b,), device=device)
        if self.cfg.top_share <= 0 or n == 1:
            return uniform
        lower = torch.randint(1, n, (b,), device=device)
        return torch.where(torch.rand(b, device=device) < self.cfg.top_share, torch.zeros_like(lower), lower)

    def distillation(self, x0_hat: torch.Tensor, fake: torch.Tensor | None, cond: dict) -> torch.Tensor:
        """Eq. 4: re-noise sg(x̂_θ) at t ~ U{low…high} (``teacher_t_range``; the paper: all of
        0…T−1), the guided teacher's x₀ under stop-gradient."""
        low, high = self.cfg.teacher_t_range
        t = torch.randint(low, high + 1, (x0_hat.shape[0],), device=x0_hat.device)
        with torch.no_grad():
            x_t = self.schedule.add_noise(x0_hat.detach(), torch.randn_like(x0_hat), t)
            null = {**cond, "keep": torch.zeros_like(cond["keep"])}
            teacher = ClassifierFreeGuidance(lambda x, tt, c: self.teacher(x, tt, c).float(),
                                             self.cfg.teacher_guidance, null)
            target = self.schedule.predicted_x0(self.diffusion.prediction, teacher(x_t, t, cond), x_t, t)
        if self.cfg.distill_space == "pixel":
            with torch.no_grad():
                target = self.decode(target).float()
            student = fake
        else:
            student = x0_hat
        return distillation_loss(student, target, distillation_weight(self.schedule, t, self.cfg.weighting, student))

    def critic_loss(self, critic, batch):
        condition = self.condition(batch)
        real_features = critic.features(batch["x0"] if critic.reads_latents else batch["images"], batch)
        real = critic.heads_forward(real_features, condition)
        fake = critic(batch["fake"], condition, batch)
        loss = hinge_discriminator_loss(real, fake)
        stats = {"d_loss": float(loss.detach()), "d_real_positive": float((real > 0).float().mean()),
                 "d_fake_positive": float((fake > 0).float().mean())}
        if self.cfg.mismatch_weight > 0:
            mismatched = critic.heads_forward(real_features, self.mismatched_condition(batch))
            loss = loss + self.cfg.mismatch_weight * hinge_fake_loss(mismatched)
            stats["d_mismatch_positive"] = float((mismatched > 0).float().mean())
        if self.cfg.r1_gamma > 0:
            r1 = r1_penalty(critic, real_features, condition)
            loss = loss + self.cfg.r1_gamma * r1
            stats["r1"] = float(r1.detach())
        return loss, stats

    def progress_eval(self, ema_model) -> dict:
        """1-step alignment and fid of the EMA student on a small balanced set."""
        if not self.progress_n:
            return {}
        from minildm.stages import judge as judge_stage

        if self.judge is None:
            self.judge = judge_stage.load(None)[0]
        pipeline = StudentPipeline(ema_model.unet, self.diffusion, self.encoder.with_text_model(ema_model.text),
                                   self.autoencoder, self.cache.image_size, self.cfg.student_timesteps)
        figures = ldm.evaluate(pipeline, self.progress_n, steps=1, guidance=1.0, judge=self.judge)
        return {k: figures[k] for k in ("alignment", "fid")}

    def card_config(self) -> dict:
        return {"diffusion": dataclasses.asdict(self.diffusion), "add": dataclasses.asdict(self.cfg)}


def pooled_text(encoder, captions: list[str], batch_size: int = 512) -> torch.Tensor:
    """L2-normalised pooled CLIP text embeddings (the discriminator's text condition)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(captions), batch_size):
            pooled = encoder.encode_text(captions[start:start + batch_size]).pooled.float()
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def _teacher(base: str | None) -> tuple[Path, dict, dict]:
    path = Path(base) if base is not None else ldm.REFERENCE
    state, card = load_checkpoint(path)
    if card.get("stage") != "ldm":
        raise UserError(f"--teacher {path} holds a {card.get('stage')!r} checkpoint; the ADD teacher is a "
                        "latent diffusion model (stage ldm)")
    return path, state, card


def make_task(profile: Profile, train_cfg, base: str | None = None, cache_size: int | None = None,
              out: str | None = None) -> tuple[AddTask, Path, dict]:
    """The ADD task — student initialised from the teacher ``base`` (default: the reference LDM),
    its discriminator, the encoded item cache — and the teacher's path and card. The items'
    latents are read from the run ``out`` or the teacher's run when one holds them (the first
    items of the teacher's own), and are otherwise encoded and kept in ``out``."""
    check_config(profile.add)
    teacher_path, teacher_state, teacher_card = _teacher(base)
    diffusion = config_from_dict(DiffusionConfig, teacher_card["config"]["diffusion"])
    diffusion = dataclasses.replace(diffusion, train_text_encoder=False)
    image_size = teacher_card.get("image_size", profile.shapes.image_size)
    encoder, autoencoder = ldm._parts(diffusion.space, image_size, teacher_card.get("parts"))
    if autoencoder is None:
        raise UserError(f"--teacher {teacher_path} is a pixel-space model; ADD distils the latent one")
    cache = item_cache(cache_size or profile.extras.get("add_cache_size", 8192), train_cfg.seed, image_size,
                       autoencoder, (out, teacher_path) if out is not None else (), embed_images=encoder.encode_image)
    cache.image_embeddings = torch.nn.functional.normalize(cache.image_embeddings, dim=-1)
    text_embeddings = {"category": pooled_text(encoder, cache.category), "full": pooled_text(encoder, cache.full)}
    task = AddTask(profile.add, diffusion, teacher_state, encoder, autoencoder, cache, text_embeddings,
                   train_cfg.batch_size, train_cfg.seed, profile.extras.get("progress_eval_n", 0), str(teacher_path),
                   fixed_length=train_cfg.compile)
    return task, teacher_path, teacher_card


def train(profile: Profile, out: str, *, base: str | None = None, resume=False, steps=None, device=None,
          data=None, command=None, progress=True, eval_n: int | None = None) -> dict | None:
    """Distil the teacher ``base`` (default: the reference LDM) into a few-step student; measure it."""
    from minildm.train import is_main_process, train as train_loop

    if data not in (None, "shapes"):
        raise UserError(f"--data {data}: the ADD student is measured by the judge on the shapes world's "
                        "prompts, so it accepts only --data shapes")
    train_cfg = profile.add_train if steps is None else dataclasses.replace(profile.add_train, steps=steps)
    started = time.perf_counter()
    task, teacher_path, teacher_card = make_task(profile, train_cfg, base, out=out)
    cache_seconds = time.perf_counter() - started
    image_size, parts = teacher_card.get("image_size", profile.shapes.image_size), teacher_card.get("parts")
    teacher_name = None if base is None else str(teacher_path)  # None: the reference, wherever the repo is
    card = train_loop(task, train_cfg, out, resume=resume, device=device, command=command, progress=progress,
                      extra_card={"profile": profile.name, "image_size": image_size, "teacher": teacher_name,
                                  "parts": parts, "cache_seconds": round(cache_seconds, 1)})
    if not is_main_process():
        return None
    model, _ = load(out)
    card["metrics"] = evaluate(model, eval_n or default_eval_n(profile))
    atomic_write_file(Path(out) / CARD, lambda path: save_json(path, card))
    return card


# ------------------------------------------------------------------------------------ loading
@dataclass
class Distilled:
    """A trained student and the teacher it was distilled from."""

    student: StudentPipeline
    teacher: DiffusionPipeline
    card: dict
    teacher_card: dict


def load(path: str | Path | None = None) -> tuple[Distilled, dict]:
    folder, state, card = load_stage_checkpoint(path, REFERENCE, STAGE, "an ADD student")
    diffusion = config_from_dict(DiffusionConfig, card["config"]["diffusion"])
    cfg = config_from_dict(AddConfig, card["config"]["add"])
    image_size = card.get("image_size", 32)
    encoder, autoencoder = ldm._parts(diffusion.space, image_size, card.get("parts"))
    model = TextConditionedUNet(UNet(diffusion.unet), copy.deepcopy(encoder.text_model), False)
    load_state_into(model, state, str(folder))
    student = StudentPipeline(model.unet, diffusion, encoder.with_text_model(model.text), autoencoder, image_size,
                              cfg.student_timesteps)
    teacher_path = card.get("teacher")
    if teacher_path is not None and not Path(teacher_path).exists():
        raise UserError(f"{folder} was distilled from {teacher_path}, which is not there any more; "
                        "the evaluation compares the student with its teacher")
    teacher, teacher_card = ldm.load_pipeline(teacher_path)
    return Distilled(student, teacher, card, teacher_card), card


def sampling_pipeline(path: str | Path | None = None) -> tuple[StudentPipeline, dict]:
    model, card = load(path)
    return model.student, card


default_eval_n = ldm.default_eval_n


# ---------------------------------------------------------------------------------- measuring
STUDENT_STEPS = (1, 2, 4)
TEACHER_FEW_STEPS = (1, 4)


@torch.no_grad()
def evaluate(model: Distilled, n: int = 656, seed: int = EVAL_SEED, judge=None) -> dict:
    """The student at 1, 2 and 4 steps against the teacher at 50 guided DDIM steps and forced to
    1 and 4 (module docstring), and the speed figures of :func:`sampling_speed`."""
    from minildm.stages import judge as judge_stage

    judge = judge if judge is not None else judge_stage.load(None)[0]
    records = ldm.evaluation_prompts(n)

    def measure(pipeline, steps: int, guidance: float) -> tuple[dict, float]:
        judged = ldm.judge_samples(pipeline, records, judge, seed, steps=steps, guidance=guidance)
        return ldm.evaluate(pipeline, n, seed, judge=judge, judged=judged), judged["seconds"]

    figures: dict = {"n": n}
    seconds = {}
    for steps in STUDENT_STEPS:
        m, seconds[f"student_{steps}"] = measure(model.student, steps, 1.0)
        figures[f"alignment_{steps}step"], figures[f"fid_{steps}step"] = m["alignment"], m["fid"]
        figures[f"alignment_by_category_{steps}step"] = m["alignment_by_category"]
        figures[f"colour_swaps_{steps}step"] = m["colour_swaps"]
    teacher_cfg = model.teacher.cfg
    m = teacher_figures_from_card(model, n, seed, judge)
    figures["teacher_figures_from"] = "its card" if m is not None else "measured here"
    if m is None:
        m, seconds["teacher"] = measure(model.teacher, teacher_cfg.sample_steps, teacher_cfg.guidance)
    figures.update(teacher_alignment=m["alignment"], teacher_fid=m["fid"],
                   teacher_alignment_by_category=m["alignment_by_category"], teacher_steps=teacher_cfg.sample_steps,
                   teacher_guidance=teacher_cfg.guidance)
    for steps in TEACHER_FEW_STEPS:
        m, _ = measure(model.teacher, steps, teacher_cfg.guidance)
        figures[f"teacher_ddim_{steps}step_alignment"], figures[f"teacher_ddim_{steps}step_fid"] = m["alignment"], m["fid"]
    figures["alignment_4step_minus_1step"] = figures["alignment_4step"] - figures["alignment_1step"]
    for steps in TEACHER_FEW_STEPS:
        figures[f"alignment_{steps}step_minus_teacher_ddim_{steps}step"] = (
            figures[f"alignment_{steps}step"] - figures[f"teacher_ddim_{steps}step_alignment"])
    figures["alignment_ratio_1step"] = figures["alignment_1step"] / max(figures["teacher_alignment"], 1e-9)
    figures["fid_ratio_1step"] = figures["fid_1step"] / max(figures["teacher_fid"], 1e-9)
    figures.update(sampling_speed(model, [r["prompt"] for r in records[:128]], seed))
    figures["generation_seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return figures


def teacher_figures_from_card(model: Distilled, n: int, seed: int, judge) -> dict | None:
    """The teacher's figures at its own 50 guided steps from its card, where its stage measured them
    on the same ``n`` prompts with the same seed, judge and sampling precision as :func:`evaluate`
    would now (:func:`minildm.stages.ldm.measured_with`); None where it did not, or its card says
    nothing of how (cards written before it was recorded). Measuring again would draw the same
    images, up to the rounding of another machine or thread count."""
    figures = model.teacher_card.get("metrics") or {}
    wanted = {"n": n, "steps": model.teacher.cfg.sample_steps, "guidance": model.teacher.cfg.guidance,
              "measured_with": ldm.measured_with(model.teacher, seed, judge)}
    return figures if all(figures.get(key) == value for key, value in wanted.items()) else None


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


@torch.no_grad()
def sampling_speed(model: Distilled, prompts: list[str], seed: int = EVAL_SEED, rounds: int = 3) -> dict:
    """Seconds to sample one batch of ``prompts`` — the teacher's 50 guided DDIM steps, the student's
    1 step, and decoding the latents — in this one process.

    The three are timed in ``rounds`` interleaved rounds (teacher, student, decoder, then again), so
    a burst of load on a shared machine slows both sides of the ratio rather than one; each
    figure is the fastest of its rounds:

    * ``speedup_1step``: teacher over student, both including the decoder (what a user waits for);
    * ``speedup_1step_rounds``: the same ratio in each round on its own, to show the spread;
    * ``speedup_1step_denoising``: the denoising alone (the UNet evaluations ADD removes);
    * ``decode_share_1step``: the decoder's share of the student's time."""
    teacher_cfg = model.teacher.cfg
    model.student.sample_latents(prompts[:2], steps=1)  # warm-up
    model.teacher.sample_latents(prompts[:2], steps=2, guidance=teacher_cfg.guidance)
    latents = {}

    def teacher():
        model.teacher.sample_latents(prompts, steps=teacher_cfg.sample_steps, guidance=teacher_cfg.guidance,
                                     seed=seed)

    def student():
        latents["student"] = model.student.sample_latents(prompts, steps=1, seed=seed)

    timings = [(_timed(teacher), _timed(student), _timed(lambda: model.student.decode(latents["student"])))
               for _ in range(rounds)]
    teacher_s, student_s, decode_s = (min(column) for column in zip(*timings))
    return {"speedup_1step": (teacher_s + decode_s) / (student_s + decode_s),
            "speedup_1step_rounds": [round((t + d) / (s + d), 2) for t, s, d in timings],
            "speedup_1step_denoising": teacher_s / student_s,
            "decode_share_1step": decode_s / (student_s + decode_s),
            "sampling_seconds": {"batch": len(prompts), "rounds": rounds, "teacher_denoising": round(teacher_s, 4),
                                 "student_1step_denoising": round(student_s, 4), "decode": round(decode_s, 4)}}


# ----------------------------------------------------------------------------------- ablation
# the runs of the ablation: Table 1d's rows that this scale can run (NFSD needs a negative prompt
# in words the course's vocabulary does not have)
ABLATION_RUNS = {"both": {"losses": "both"}, "adversarial": {"losses": "adversarial"},
                 "distillation": {"losses": "distillation"}, "both+sds": {"losses": "both", "weighting": "sds"}}
# the levers tried on the 1-step student beyond Table 1d: each changes one setting of "both"
LEVER_RUNS = {"both": {}, "lambda=1": {"distill_weight": 1.0}, "lambda=10": {"distill_weight": 10.0},
              "no-image-condition": {"image_condition": False}, "constant-weighting": {"weighting": "constant"},
              "teacher-t-500-999": {"teacher_t_range": (500, 999)}, "teacher-t-0-499": {"teacher_t_range": (0, 499)},
              "matching-aware-D": {"mismatch_weight": 1.0}, "latent-distillation": {"distill_space": "latent"},
              "teacher-D": {"discriminator": "teacher"}}  # LADD's discriminator (minildm.latent_discriminator)
# the teacher's guidance in the distillation target, the paper's unnamed setting: 3 (the teacher's own
# sampling guidance), 6 (the default, the "both" run), 9 and 12
TEACHER_GUIDANCE_RUNS = {"teacher-guidance=3": {"teacher_guidance": 3.0}, "both": {},
                         "teacher-guidance=9": {"teacher_guidance": 9.0}, "teacher-guidance=12": {"teacher_guidance": 12.0}}


def ablation(profile: Profile, out: str | Path, *, base: str | None = None, steps: int | None = None,
             eval_n: int | None = None, progress: bool = False, command: str | None = None,
             runs: dict[str, dict] | None = None) -> dict:
    """ADD's Table 1d at toy scale: the same run with the distillation loss only, the adversarial
    loss only, both, and both with the SDS weighting c(t) = α_t/(2σ_t) in place of α_t; each
    measured by :func:`evaluate`. Writes ``out/ablation.json``. ``runs`` (name → ``add`` settings)
    replaces the four, e.g. :data:`LEVER_RUNS` or :data:`TEACHER_GUIDANCE_RUNS`."""
    out = Path(out)
    runs = ABLATION_RUNS if runs is None else runs
    named = {"LEVER_RUNS": LEVER_RUNS, "TEACHER_GUIDANCE_RUNS": TEACHER_GUIDANCE_RUNS}
    runs_arg = "" if runs is ABLATION_RUNS else next(
        (f", runs={name}" for name, known in named.items() if runs is known), f", runs={runs!r}")
    command = command or (f"minildm.stages.add.ablation(get_profile({profile.name!r}), {str(out)!r}, "
                          f"steps={steps}, eval_n={eval_n}{runs_arg})")
    results = {"profile": profile.name, "steps": steps or profile.add_train.steps, "eval_n": eval_n,
               "command": command, "runs": {}}
    for name, settings in runs.items():
        run_profile = dataclasses.replace(profile, add=dataclasses.replace(profile.add, **settings))
        run_dir = out / name
        if (run_dir / CARD).exists():
            card = json.loads((run_dir / CARD).read_text())
        else:
            card = train(run_profile, str(run_dir), base=base, steps=steps, eval_n=eval_n, progress=progress,
                         resume=(run_dir / "checkpoint").exists(),
                         command="ablation " + " ".join(f"add.{k}={v}" for k, v in settings.items()))
        metrics = card["metrics"]
        results["runs"][name] = {"settings": settings, "wall_time_s": card["wall_time_s"], **{
            k: metrics[k] for k in ("alignment_1step", "fid_1step", "alignment_4step", "fid_4step",
                                    "teacher_alignment", "teacher_fid")},
            "alignment_by_category_1step": metrics["alignment_by_category_1step"],
            # where the two players ended: D's hinge loss (2: a coin flip) and its share of positive logits
            "critic_end": {k: curve[-1][1] for k, curve in card.get("stat_curves", {}).items() if k.startswith("d_")}}
    atomic_write_file(out / "ablation.json", lambda path: save_json(path, results))
    return results


def seed_spread(profile: Profile, out: str | Path, *, seeds: tuple[int, ...] = (1, 2), base: str | None = None,
                steps: int | None = None, eval_n: int | None = None) -> dict:
    """The yardstick for the levers: the "both" run again at other training seeds, each measured as
    :func:`ablation` measures. The seed draws the training images, the batches, the student's noise
    and timesteps and the discriminator's initial heads; a lever whose difference from "both" is
    inside this spread is indistinguishable from another draw. {"seed=S": the run's figures}."""
    spread = {}
    for seed in seeds:
        seeded = dataclasses.replace(profile, add_train=dataclasses.replace(profile.add_train, seed=seed))
        runs = ablation(seeded, Path(out) / f"seed{seed}", base=base, steps=steps, eval_n=eval_n, runs={"both": {}})
        spread[f"seed={seed}"] = runs["runs"]["both"]
    return spread


def reference_ablation() -> dict:
    """The ablation measured on the cpu profile (``data/measurements/add_ablation.json``)."""
    return json.loads(ABLATION.read_text())


def reference_levers() -> dict:
    """The lever runs (:data:`LEVER_RUNS`, and :data:`TEACHER_GUIDANCE_RUNS` under
    ``"teacher_guidance_sweep"``) measured on the cpu profile (``data/measurements/add_levers.json``)."""
    return json.loads(LEVERS.read_text())


# ------------------------------------------------------------------------------- for notebook 06
@torch.no_grad()
def explain_distillation(model: Distilled, prompt: str, seed: int = 0,
                         teacher_timesteps: tuple[int, ...] = (900, 600, 300, 100)) -> dict:
    """One distillation target, step by step, for notebook 06 (images in [-1, 1], (3, H, W)):

    * ``inputs``/``students``: per student timestep s, the student's input x_s (a real image's
      latent noised; pure noise at the top) and its one-step sample x̂_θ;
    * ``renoised``/``targets``: the top-timestep sample re-noised at each teacher timestep t and the
      guided teacher's one-step x̂_ψ from it — the distillation target at that t;
    * ``weights``: c(t) = α_t at each t (how much each target counts)."""
    from minildm.data.captions import category_caption

    images, scenes = shapes_batch(seed, [0], ShapesConfig(image_size=model.student.image_size))
    caption = prompt or category_caption(scenes[0])
    student, teacher = model.student, model.teacher
    z0 = student.autoencoder.encode(images)
    cond = student.conditioning([caption])
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=generator)
    top = max(student.student_timesteps)
    out = {"caption": caption, "real": images[0], "inputs": {}, "students": {}, "renoised": {}, "targets": {},
           "weights": {}}
    x0_top = None
    for s in sorted(student.student_timesteps, reverse=True):
        t = torch.tensor([s])
        x_s = student_input(student.schedule, z0, noise, t, top)
        x0 = student.denoise_x0(x_s, t, cond)
        x0_top = x0 if x0_top is None else x0_top
        out["inputs"][s], out["students"][s] = student.decode(x_s)[0], student.decode(x0)[0]
    guided = teacher.denoiser(teacher.cfg.guidance, teacher.conditioning([caption]))
    for t_value in teacher_timesteps:
        t = torch.tensor([t_value])
        x_t = teacher.schedule.add_noise(x0_top, torch.randn(x0_top.shape, generator=generator), t)
        target = teacher.schedule.predicted_x0(teacher.cfg.prediction, guided(x_t, t, teacher.conditioning([caption])),
                                               x_t, t)
        out["renoised"][t_value], out["targets"][t_value] = teacher.decode(x_t)[0], teacher.decode(target)[0]
        out["weights"][t_value] = float(distillation_weight(teacher.schedule, t, "exponential", x_t).flatten()[0])
    return out


def speed_quality(metrics: dict) -> list[dict]:
    """The measured points of the speed/quality plot: UNet evaluations per image, alignment, fid."""
    guidance_cost = 2 if metrics["teacher_guidance"] != 1.0 else 1
    points = [{"model": f"student, {k} step{'s' if k > 1 else ''}", "nfe": k,
               "alignment": metrics[f"alignment_{k}step"], "fid": metrics[f"fid_{k}step"]} for k in STUDENT_STEPS]
    points += [{"model": f"teacher DDIM, {k} step{'s' if k > 1 else ''}", "nfe": k * guidance_cost,
                "alignment": metrics[f"teacher_ddim_{k}step_alignment"], "fid": metrics[f"teacher_ddim_{k}step_fid"]}
               for k in TEACHER_FEW_STEPS]
    points.append({"model": f"teacher DDIM, {metrics['teacher_steps']} steps",
                   "nfe": metrics["teacher_steps"] * guidance_cost, "alignment": metrics["teacher_alignment"],
                   "fid": metrics["teacher_fid"]})
    return points
