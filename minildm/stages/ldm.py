"""Stage 3 — latent diffusion: a cross-attention UNet on the autoencoder's latents.

``minildm train ldm`` trains :class:`minildm.unet.UNet` to denoise the reference autoencoder's
latents (8×8×4 for a 32 px image), conditioned by cross-attention on the reference tiny CLIP's
per-token embeddings of the caption (LDM Eq. 3):

    L = E_{z = E(x), y, ε, t} ‖ target − UNet(z_t, t, τ(y)) ‖²,   target = v (default), ε or z.

The autoencoder is frozen. The text tower starts from the tiny CLIP's and, as in LDM (whose
text transformer is trained with the UNet, ``cond_stage_trainable``), is fine-tuned jointly
(``train_text_encoder``): the CLIP learnt what tells captions apart in a batch, which at this
scale hardly includes circle against square; the denoising loss needs it. A share
``cond_drop`` (10%) of the pairs has its context zeroed, so that the same network is also the
unconditional model that classifier-free guidance needs.
Each pair's caption is the category caption, or (a quarter of the time) the full caption.

The data: ``cache_size`` items of the training stream are rendered once and (latent space)
encoded once — encoding costs more than a UNet step on a CPU — and training cycles through them
in a fresh order each epoch; the encoded latents are kept in the run's folder
(:mod:`minildm.stages.items`), so a resumed run and the runs built on this one do not encode
them again. ``minildm train pixel`` (:mod:`minildm.stages.pixel`) trains the
same UNet on the same items' pixels: the baseline of LDM's central claim.

``minildm eval ldm`` generates images for the evaluation prompts (``data/prompts/eval.jsonl``,
balanced over GenEval's six categories) with DDIM and guidance, and measures:

* ``alignment`` / ``alignment_by_category`` — the judge's GenEval-style verdict: every clause of
  the prompt must hold in what the judge reads from the image;
* ``colour_swaps`` — colour-attribution prompts where the two objects came out with each
  other's colours (the attribute-binding failure);
* ``fid`` — Fréchet distance on judge features between the samples and as many real renders;
* ``nfe`` (UNet evaluations per image: steps × 2 with guidance) and ``images_per_second``.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minildm.checkpoints import CARD, atomic_write_file, load_checkpoint, load_state_into, save_json
from minildm.config import EVAL_SEED, DiffusionConfig, Profile, ShapesConfig, config_from_dict
from minildm.data.captions import parse
from minildm.data.datasets import shapes_batch
from minildm.errors import UserError
from minildm.diffusion import NoiseSchedule
from minildm.pipeline import DiffusionPipeline
from minildm.precision import sampling_precision
from minildm.stages.items import ItemCache, item_cache, weights_digest
from minildm.unet import TextConditionedUNet, UNet

REFERENCE = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "ldm"
TARGETS = {"alignment_single_object": (">=", 0.85), "alignment_two_object": (">=", 0.5)}
STAGE = "ldm"


class DiffusionTask:
    """The UNet as a :class:`minildm.train.TrainingTask`: noised samples, captions, the loss."""

    def __init__(self, cfg: DiffusionConfig, cache: ItemCache, encoder, batch_size: int, seed: int, stage: str,
                 autoencoder=None, progress_n: int = 0, t_range: tuple[int, int] | None = None,
                 fixed_length: bool = False):
        if cfg.unet.context_dim != encoder.token_dim:
            raise UserError(f"the UNet's context_dim is {cfg.unet.context_dim} but the text encoder's tokens are "
                            f"{encoder.token_dim} wide; set {stage}.unet.context_dim={encoder.token_dim}")
        self.cfg, self.cache, self.encoder, self.batch_size, self.seed, self.stage = cfg, cache, encoder, batch_size, seed, stage
        self.autoencoder, self.progress_n, self.judge = autoencoder, progress_n, None
        self.model = TextConditionedUNet(UNet(cfg.unet), copy.deepcopy(encoder.text_model), cfg.train_text_encoder)
        self.schedule = NoiseSchedule(zero_terminal_snr=cfg.zero_terminal_snr)
        self.t_range = t_range  # None: every timestep; (lo, hi): an expert's interval (eDiff-I)
        self.fixed_length = fixed_length  # captions padded to the encoder's length: for a compiled model

    @property
    def renders_batches(self) -> bool:
        """Pixel space draws its items' images every step, so on a GPU worker processes draw them
        ahead (:mod:`minildm.prefetch`); latent space looks up their encoded latents."""
        return self.cache.latents is None

    def batch_indices(self, step: int, rank: int, world_size: int) -> list[int]:
        """Cache indices of this rank's share of global batch ``step``."""
        per_rank = self.batch_size // world_size
        positions = range(step * self.batch_size + rank * per_rank, step * self.batch_size + (rank + 1) * per_rank)
        return self.cache.item_order(positions)

    def batch(self, step: int, rank: int, world_size: int) -> dict:
        indices = self.batch_indices(step, rank, world_size)
        per_rank = len(indices)
        rng = np.random.default_rng([self.seed, step, rank, 11])
        use_full = rng.random(per_rank) < self.cfg.full_caption_prob
        captions = [self.cache.full[i] if f else self.cache.category[i] for i, f in zip(indices, use_full)]
        tokens = self.encoder.tokenize(captions, fixed_length=self.fixed_length)
        keep = torch.from_numpy(rng.random(per_rank) >= self.cfg.cond_drop).float()
        return {"x0": self.cache.samples(indices), "input_ids": tokens["input_ids"], "mask": tokens["attention_mask"],
                "keep": keep}

    def loss(self, model, batch):
        x0 = batch["x0"]
        t = self.schedule.sample_timesteps(x0.shape[0], device=x0.device, interval=self.t_range)
        noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        target = self.schedule.target(self.cfg.prediction, x0, noise, t)
        output = model(x_t, t, self.condition(batch)).float()
        loss = F.mse_loss(output, target)
        return loss, {}

    def condition(self, batch: dict) -> dict:
        """What the model's ``forward`` takes besides x_t and t."""
        return {"input_ids": batch["input_ids"], "mask": batch["mask"], "keep": batch["keep"]}

    def progress_eval(self, ema_model) -> dict:
        """Alignment per category and fid on a small balanced set (20 DDIM steps, guided):
        how following the prompt — binding most of all — grows during training."""
        if not self.progress_n:
            return {}
        from minildm.stages import judge as judge_stage

        if self.judge is None:  # loaded once, for every checkpoint's measurement
            self.judge = judge_stage.load(None)[0]
        pipeline = DiffusionPipeline(ema_model.unet, self.cfg, self.encoder.with_text_model(ema_model.text),
                                     self.autoencoder, self.cache.image_size)
        figures = evaluate(pipeline, self.progress_n, steps=20, judge=self.judge)
        return {k: v for k, v in figures.items() if k.startswith("alignment") and k != "alignment_by_category"
                or k in ("fid", "colour_swaps")}

    def card_config(self) -> dict:
        return {"diffusion": dataclasses.asdict(self.cfg)}


def _parts(space: str, image_size: int, parts: dict | None = None):
    """The frozen text/image encoder and, in latent space, the autoencoder of a diffusion model.

    ``parts`` (a card's ``"parts"``) names the runs it was trained with: ``{"encoder": RUN,
    "autoencoder": RUN}``; a missing or None entry means the reference, a model is used as it is. The course trains its
    LDM on its own autoencoder and encoder; ``minildm train ldm`` uses the references unless told.
    """
    from minildm.stages import ae as ae_stage
    from minildm.stages import clip as clip_stage

    parts = parts or {}
    encoder = _part(clip_stage, parts.get("encoder"))
    for p in encoder.parameters():
        p.requires_grad_(False)
    autoencoder = _part(ae_stage, parts.get("autoencoder")) if space == "latent" else None
    if autoencoder is not None and autoencoder.cfg.image_size != image_size:
        raise UserError(f"the autoencoder {parts.get('autoencoder') or '(reference)'} makes {autoencoder.cfg.image_size} px images, this "
                        f"profile {image_size} px; train an autoencoder of that size first")
    return encoder, autoencoder


def _part(stage, given):
    """A frozen part: the run (or checkpoint) ``given`` loaded, the reference when None, or ``given``
    itself when it is already a model (``minildm bench`` times the gpu profile's steps with
    untrained parts of its sizes)."""
    return given if isinstance(given, torch.nn.Module) else stage.load(given)[0]


def make_task(stage: str, cfg: DiffusionConfig, train_cfg, profile: Profile, parts: dict | None = None,
              cache_size: int | None = None, folders=()) -> DiffusionTask:
    """The training task of a diffusion stage: its frozen parts, the encoded item cache (the
    profile's ``cache_size`` items unless given; kept in, or read from, ``folders``: see
    :func:`minildm.stages.items.item_cache`) and a freshly initialised UNet."""
    image_size = profile.shapes.image_size
    encoder, autoencoder = _parts(cfg.space, image_size, parts)
    cache = item_cache(cache_size or profile.extras.get("cache_size", 40_000), train_cfg.seed, image_size,
                       autoencoder, folders)
    torch.manual_seed(train_cfg.seed)  # initial weights: a function of the seed alone, however many processes
    return DiffusionTask(cfg, cache, encoder, train_cfg.batch_size, train_cfg.seed, stage, autoencoder,
                         profile.extras.get("progress_eval_n", 0), fixed_length=train_cfg.compile)


def train_diffusion(stage: str, cfg: DiffusionConfig, train_cfg, profile: Profile, out: str, *, resume=False,
                    steps=None, device=None, data=None, command=None, progress=True,
                    eval_n: int | None = None, autoencoder: str | None = None,
                    encoder: str | None = None) -> dict | None:
    """Train a diffusion stage (``ldm`` or ``pixel``) and measure it for its card.

    ``autoencoder`` and ``encoder``: the runs to work with (default: the references)."""
    from minildm.train import is_main_process, train as train_loop

    if data not in (None, "shapes"):
        raise UserError(f"--data {data}: the diffusion stages are measured by the judge on the shapes "
                        "world's prompts, so they accept only --data shapes")
    train_cfg = train_cfg if steps is None else dataclasses.replace(train_cfg, steps=steps)
    image_size = profile.shapes.image_size
    parts = {"encoder": None if encoder is None else str(encoder),
             "autoencoder": None if autoencoder is None or cfg.space != "latent" else str(autoencoder)}
    started = time.perf_counter()
    task = make_task(stage, cfg, train_cfg, profile, parts, folders=(out,))
    cache_seconds = time.perf_counter() - started
    card = train_loop(task, train_cfg, out, resume=resume, device=device, command=command, progress=progress,
                      extra_card={"profile": profile.name, "cache_seconds": round(cache_seconds, 1),
                                  "image_size": image_size, "parts": parts})
    if not is_main_process():
        return None
    pipeline, _ = load_pipeline(out, stage)
    card["metrics"] = evaluate(pipeline, eval_n or default_eval_n(profile))
    atomic_write_file(Path(out) / CARD, lambda path: save_json(path, card))
    return card


def train(profile: Profile, out: str, **kwargs) -> dict | None:
    return train_diffusion(STAGE, profile.ldm, profile.ldm_train, profile, out, **kwargs)


def load_pipeline(path: str | Path | None, stage: str = STAGE) -> tuple[DiffusionPipeline, dict]:
    """A trained diffusion stage (EMA weights) as a pipeline, and its card."""
    path = (REFERENCE.parent / stage) if path is None else path
    state, card = load_checkpoint(path)
    if card.get("stage") not in ("ldm", "pixel"):
        raise UserError(f"{path} holds a {card.get('stage')!r} checkpoint, not a diffusion model (ldm or pixel)")
    cfg = config_from_dict(DiffusionConfig, card["config"]["diffusion"])
    image_size = card.get("image_size", 32)
    encoder, autoencoder = _parts(cfg.space, image_size, card.get("parts"))
    model = TextConditionedUNet(UNet(cfg.unet), copy.deepcopy(encoder.text_model), cfg.train_text_encoder)
    load_state_into(model, state, str(path))
    return DiffusionPipeline(model.unet, cfg, encoder.with_text_model(model.text), autoencoder, image_size), card


def load(path: str | Path | None = None):
    return load_pipeline(path, STAGE)


def sampling_pipeline(path: str | Path | None = None) -> tuple[DiffusionPipeline, dict]:
    """Any trained text-to-image model as a pipeline: an ldm or pixel run, an experts run (its
    router) or an ADD student; None: the reference LDM."""
    stage = load_checkpoint(path)[1].get("stage") if path is not None else STAGE
    if stage == "experts":
        from minildm.stages import experts

        model, card = experts.load(path)
        return model.pipeline, card
    if stage == "add":  # the distilled student: 1–4 steps of ADD's sampler, no guidance
        from minildm.stages import add

        return add.sampling_pipeline(path)
    return load_pipeline(path)


def default_eval_n(profile: Profile) -> int:
    """Images generated by ``minildm eval ldm`` without ``--n``: every prompt twice (cpu, gpu)."""
    return profile.extras.get("diffusion_eval_n", profile.eval_n)


def evaluation_prompts(n: int) -> list[dict]:
    """``n`` prompts of the evaluation set, round-robin over the categories so that any ``n``
    is balanced (the set is repeated when ``n`` exceeds it)."""
    from minildm.data.prompts import load_evaluation_prompts

    by_category: dict[str, list[dict]] = {}
    for record in load_evaluation_prompts():
        by_category.setdefault(record["category"], []).append(record)
    order, k = [], 0
    while len(order) < n:
        for records in by_category.values():
            if len(order) < n:
                order.append(records[k % len(records)])
        k += 1
    return order


def colour_swapped(clauses, read) -> bool:
    """A two-object colour prompt rendered with the colours exchanged (both swapped objects seen)."""
    a, b = clauses.objects
    if a.colour is None or b.colour is None:
        return False
    seen = {(o.shape, o.colour) for o in read}
    return (a.shape, b.colour) in seen and (b.shape, a.colour) in seen and (a.shape, a.colour) not in seen


@torch.no_grad()
def judge_samples(pipeline: DiffusionPipeline, records: list[dict], judge, seed: int = EVAL_SEED,
                  steps: int | None = None, guidance: float | None = None) -> dict:
    """Generate one image per record (``{"prompt", "category"}``) and judge it: the images, the
    judge's reads, per-image ``correct`` (every clause holds) and the sampling ``seconds``."""
    from minildm.metrics import clauses_hold

    steps = steps or pipeline.cfg.sample_steps
    guidance = pipeline.cfg.guidance if guidance is None else guidance
    started = time.perf_counter()
    images = pipeline([r["prompt"] for r in records], steps=steps, guidance=guidance, seed=seed)
    seconds = time.perf_counter() - started
    reads = judge.read(images)
    correct = [clauses_hold(parse(r["prompt"]), read) for r, read in zip(records, reads)]
    return {"images": images, "reads": reads, "correct": correct, "seconds": seconds,
            "steps": steps, "guidance": guidance}


@torch.no_grad()
def evaluate(pipeline: DiffusionPipeline, n: int = 656, seed: int = EVAL_SEED, steps: int | None = None,
             guidance: float | None = None, judge=None, judged: dict | None = None) -> dict:
    """Generate ``n`` images for the evaluation prompts and measure them (module docstring).
    ``judged``: the output of :func:`judge_samples` on ``evaluation_prompts(n)``, if already made.
    ``measured_with`` (:func:`measured_with`) records what else the figures depend on, so that a
    later stage can tell whether they are the ones it would measure (ADD's teacher figures)."""
    from minildm.metrics import alignment_report, frechet_distance
    from minildm.stages import judge as judge_stage

    if n < 6:
        raise UserError(f"--n {n}: the diffusion evaluation needs at least 6 images (one per category)")
    judge = judge if judge is not None else judge_stage.load(None)[0]
    records = evaluation_prompts(n)
    judged = judged or judge_samples(pipeline, records, judge, seed, steps, guidance)
    categories = [r["category"] for r in records]
    report = alignment_report(judged["correct"], categories)
    colour_attr = [colour_swapped(parse(r["prompt"]), read) for r, read in zip(records, judged["reads"])
                   if r["category"] == "color_attr"]
    real, _ = shapes_batch(seed, range(n), ShapesConfig(image_size=pipeline.image_size))
    return {
        "n": n, "steps": judged["steps"], "guidance": judged["guidance"],
        "alignment": report["alignment"],
        "alignment_by_category": report["alignment_by_category"],
        **{f"alignment_{c}": v for c, v in report["alignment_by_category"].items()},
        "colour_swaps": float(np.mean(colour_attr)) if colour_attr else None,
        "fid": frechet_distance(judge.features(judged["images"]).numpy(), judge.features(real).numpy()),
        "nfe": judged["steps"] * (2 if judged["guidance"] != 1.0 else 1),
        "images_per_second": round(n / judged["seconds"], 2),
        "measured_with": measured_with(pipeline, seed, judge),
    }


def measured_with(pipeline: DiffusionPipeline, seed: int, judge) -> dict:
    """What a diffusion model's figures depend on besides its weights, ``n``, ``steps`` and
    ``guidance``: the noise seed, the judge (a digest of its weights) and the precision the UNet
    sampled in. Two measurements that agree on all of these draw the same images, up to the
    rounding of another machine or thread count."""
    return {"seed": seed, "judge": weights_digest(judge), "sampling": sampling_precision(pipeline.device)}
