"""Paint-with-words (eDiff-I, Balaji et al. 2022, Sec. 4.3): spatial control with no training.

The user paints a region for some phrases of the prompt. In every cross-attention layer the
scores of a pixel for the tokens of a phrase are raised where that phrase was painted:

    Attention = softmax( (Q Kᵀ + w·A) / √d ) V,     w = w′ · log(1 + σ) · max(Q Kᵀ)

* ``A`` (N pixels × L tokens): column j is the mask of the phrase holding token j, resized to the
  layer's resolution (bilinear, anti-aliased); zero for tokens outside every painted phrase;
* ``σ`` is the noise level of the current step, σ_t = √((1 − ᾱ_t)/ᾱ_t) from the schedule, so the
  push is strongest early, when the layout is decided (eDiff-I's σ reaches 80; the course's
  scaled-linear schedule reaches 14.6, so useful ``w′`` differ from the paper's);
* ``max(Q Kᵀ)`` makes the weight independent of the scale of the queries and keys. Here it is
  taken per image (over heads, pixels and tokens), so an image is painted the same way whatever
  else is in its batch; the reference code takes one maximum over the whole batch.

:class:`minildm.attention.Attention` hands its hook the scores already divided by √d, so the
bias added there is ``w′ · log(1 + σ) · max(QKᵀ/√d) · A`` — the same thing: (QKᵀ + w·A)/√d =
QKᵀ/√d + w′·log(1+σ)·max(QKᵀ)/√d·A.

Only the conditional pass of classifier-free guidance is painted; the unconditional one is the
model's own (as in the reference code). Phrases are matched as whole word sequences, so the two
"red"s of "a red circle and a red square" belong to different phrases. :class:`PaintHook` is
installed on a denoiser's attention layers for one sampling run and removed afterwards; it
works with the expert router too (it paints whichever expert runs).

**Beyond the formula: the recipe.** eDiff-I's A leaves every token outside the painted phrases at
zero. On the course's model that moves objects little (notebook 05 measures it): its captions name
no background to paint the rest of the canvas with, and its tiny CLIP text tower is causal, so the
unpainted ``<eos>`` token, which has read the whole caption, offers every pixel every object. A
:class:`PaintRecipe` adds, one at a time, stand-ins for what the reference code gets by painting
every part of the canvas with some phrase, and one step beyond the formula:

* ``background`` — the unpainted rest of the canvas on ``<bos>``, a token that names nothing;
* ``summary`` — ``<eos>`` painted with the union of the regions, so the caption's summary stays
  where the objects are;
* ``outside`` — a phrase's tokens pushed *down* where the phrase is not painted (A = −outside
  there), as DenseDiffusion (Kim et al. 2023) does; the formula only pushes up inside;
* ``carry`` — the words between two painted phrases ("and a" in "a red circle and a blue square")
  painted as the phrase before them. The causal text tower has written the first phrase into
  them: they are where much of the first object lives. Left at zero, they offer it to every pixel
  outside its region, and the first object is the one that goes missing (notebook 05 measures it).
  Only words *between* painted phrases are carried, so an unpainted object named after the last
  painted phrase keeps its own words.

``RECIPES`` names them cumulatively: ``paper`` (the formula alone), ``bos``, ``bos+eos``, ``full``,
``full+carry``.

Guidance matters: only the conditional pass is painted, so the guided prediction
ε_u + g·(ε_c,painted − ε_u) carries g times the painting's effect. Painting is measured at
``PAINT_GUIDANCE`` = 7.5, the scale of the reference code's Stable Diffusion, against the
unpainted model at the same scale (and, for comparison, at the model's own 3).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from minildm.attention import AttentionHook, install_hook
from minildm.errors import UserError
from minildm.paint_recipe import DEFAULT_RECIPE, PAINT_GUIDANCE, RECIPES, PaintRecipe, as_recipe  # noqa: F401

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1], y downwards


def box_mask(box: Box, size: int) -> torch.Tensor:
    """A (size, size) mask of 1s inside a normalised box."""
    if len(box) != 4:
        raise UserError(f"a box is 4 numbers x0,y0,x1,y1 between 0 and 1, got {box}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise UserError(f"box {x0},{y0},{x1},{y1}: need 0 ≤ x0 < x1 ≤ 1 and 0 ≤ y0 < y1 ≤ 1 "
                        "(normalised, y downwards)")
    mask = torch.zeros(size, size)
    mask[int(round(y0 * size)):max(int(round(y1 * size)), int(round(y0 * size)) + 1),
         int(round(x0 * size)):max(int(round(x1 * size)), int(round(x0 * size)) + 1)] = 1.0
    return mask


def as_mask(region, size: int, phrase: str) -> torch.Tensor:
    """A region — a normalised box or a square 2-D mask (any resolution, values in [0, 1]) — as a
    float mask; a wrong shape or an empty mask is one clear error."""
    if isinstance(region, (tuple, list)) and len(region) == 4 and all(np.isscalar(v) for v in region):
        return box_mask(region, size)
    mask = torch.as_tensor(np.asarray(region), dtype=torch.float32)
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise UserError(f"the mask of {phrase!r} has shape {tuple(mask.shape)}; a mask is a square 2-D array "
                        f"(e.g. {size}×{size}) with values in [0, 1], or a box x0,y0,x1,y1")
    if mask.min() < 0 or mask.max() > 1:
        raise UserError(f"the mask of {phrase!r} has values outside [0, 1]")
    if mask.sum() == 0:
        raise UserError(f"the mask of {phrase!r} is empty: paint at least one pixel")
    return mask


def phrase_tokens(encoder, prompt: str, phrase: str) -> list[int]:
    """Token positions of ``phrase`` in ``prompt`` (every occurrence of the whole word sequence)."""
    prompt_ids = encoder.tokenize([prompt])["input_ids"][0].tolist()
    phrase_ids = encoder.tokenize([phrase])["input_ids"][0].tolist()[1:-1]  # without <bos>, <eos>
    n = len(phrase_ids)
    hits = [i for i in range(len(prompt_ids) - n + 1) if n and prompt_ids[i:i + n] == phrase_ids]
    if not hits:
        raise UserError(f"the painted phrase {phrase!r} is not in the prompt {prompt!r}; "
                        "paint words the prompt contains")
    return [i + k for i in hits for k in range(n)]


def token_masks(encoder, prompts: list[str], paints: list[dict], size: int, length: int,
                recipe: PaintRecipe | str = "paper") -> torch.Tensor:
    """A (B, size·size, length) for a batch: column j of image b holds the mask of the phrase
    that token j of prompt b belongs to (the largest value where painted phrases overlap) —
    eDiff-I's A — plus what ``recipe`` adds (:class:`PaintRecipe`): column 0 (``<bos>``) the
    unpainted rest, the ``<eos>`` column the union of the regions, −``outside`` in a phrase's
    columns where it is not painted, and (``carry``) the words between two painted phrases given
    the column of the phrase before them.
    """
    recipe = as_recipe(recipe)
    out = torch.zeros(len(prompts), size * size, length)
    for b, (prompt, paint) in enumerate(zip(prompts, paints)):
        if not paint:
            continue
        union, phrase_columns = torch.zeros(size * size), set()
        for phrase, region in paint.items():
            mask = as_mask(region, size, phrase)
            if mask.shape[0] != size:  # another resolution: resize to the reference one
                mask = resize(mask, (size, size))
            mask = mask.flatten()
            union = torch.maximum(union, mask)
            for j in phrase_tokens(encoder, prompt, phrase):
                out[b, :, j] = torch.maximum(out[b, :, j], mask)
                phrase_columns.add(j)
        for j in phrase_columns:  # 1 inside, −outside outside (soft edges in between)
            out[b, :, j] = out[b, :, j] - recipe.outside * (1 - out[b, :, j])
        if recipe.carry:  # a gap between two painted phrases takes the column of the word before it
            painted_at = sorted(phrase_columns)
            for left, right in zip(painted_at, painted_at[1:]):
                for j in range(left + 1, right):
                    out[b, :, j] = out[b, :, left]
        if recipe.background:
            out[b, :, 0] = 1 - union
        if recipe.summary:
            out[b, :, eos_position(encoder, prompt)] = union
    return out


def eos_position(encoder, prompt: str) -> int:
    """Where ``<eos>`` is in the tokens of ``prompt``."""
    return encoder.tokenize([prompt])["input_ids"][0].tolist().index(encoder.tokenizer.eos_token_id)


def resize(mask: torch.Tensor, spatial: tuple[int, int]) -> torch.Tensor:
    """Bilinear (anti-aliased) resize of a (H, W) or (B, H, W, ...) mask to ``spatial``."""
    squeeze = mask.ndim == 2
    x = mask[None, None] if squeeze else mask
    x = F.interpolate(x, size=spatial, mode="bilinear", antialias=True, align_corners=False)
    return x[0, 0] if squeeze else x


def paint_weight(scores: torch.Tensor, sigma: float, weight: float) -> torch.Tensor:
    """w = w′ · log(1 + σ) · max(scores), one per image: shape (B, 1, 1, 1)."""
    peak = scores.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    return weight * np.log1p(sigma) * peak


class PaintHook(AttentionHook):
    """Adds w·A to the cross-attention scores of the painted images.

    ``masks`` (B, S·S, L) from :func:`token_masks` at resolution S. Before each network call
    the sampler sets ``sigma`` (the step's σ) and ``rows`` (the batch rows to paint: the
    conditional half under guidance). ``maps`` collects the probabilities of the painted rows
    per layer when ``record`` is set, for the widget's per-phrase attention maps.
    """

    def __init__(self, masks: torch.Tensor, weight: float, record: bool = False):
        self.masks, self.weight, self.sigma, self.rows = masks, float(weight), 0.0, slice(None)
        self.side = int(masks.shape[1] ** 0.5)
        self.record_maps, self.maps = record, {}
        self._resized: dict[tuple[int, int], torch.Tensor] = {}

    def at(self, spatial: tuple[int, int], device) -> torch.Tensor:
        """A at a layer's resolution: (B, 1, h·w, L)."""
        if spatial not in self._resized:
            b, _, length = self.masks.shape
            grid = self.masks.transpose(1, 2).reshape(b, length, self.side, self.side)
            small = resize(grid, spatial).reshape(b, length, -1).transpose(1, 2)
            self._resized[spatial] = small[:, None].to(device)
        return self._resized[spatial]

    def bias(self, scores, info):
        if info["kind"] != "cross" or self.weight == 0:
            return None
        bias = torch.zeros_like(scores)
        painted = scores[self.rows]
        a = self.at(info["spatial"], scores.device)[:, :, :, :scores.shape[-1]]
        bias[self.rows] = paint_weight(painted, self.sigma, self.weight) * a
        return bias

    def record(self, probs, info):
        if self.record_maps and info["kind"] == "cross":
            self.maps.setdefault(info["name"], []).append(probs[self.rows].detach().float().cpu())


def painted(denoiser, hook: PaintHook, schedule, painted_batch: int):
    """``denoiser`` (guided or not) with the hook told each step's σ and which rows to paint: the
    last ``painted_batch`` rows of each call (CFG batches [unconditional; conditional])."""

    def call(x, t, cond):
        hook.sigma = float(schedule.sigma(t[:1])[0])
        return denoiser(x, t, cond)

    hook.rows = slice(-painted_batch, None)
    return call


@contextmanager
def installed(model, hook: PaintHook):
    """Install ``hook`` on every attention layer of ``model`` for the duration of a block."""
    install_hook(model, hook)
    try:
        yield hook
    finally:
        install_hook(model, None)


def parse_paint_argument(text: str, mask_image: np.ndarray | None = None, size: int = 32) -> tuple[str, object]:
    """``PHRASE=x0,y0,x1,y1`` (a normalised box) or ``PHRASE=#rrggbb`` (the pixels of that colour
    in ``mask_image``, an (H, W, 3) uint8 array) → (phrase, region)."""
    phrase, sep, value = text.partition("=")
    phrase, value = phrase.strip(), value.strip()
    if not sep or not phrase or not value:
        raise UserError(f"--paint {text!r}: write PHRASE=x0,y0,x1,y1 (a box, 0–1) or PHRASE=#rrggbb "
                        "(a colour of --paint-mask)")
    if value.startswith("#"):
        if mask_image is None:
            raise UserError(f"--paint {text!r}: a colour needs --paint-mask FILE.png")
        try:
            rgb = np.array([int(value[k:k + 2], 16) for k in (1, 3, 5)], dtype=np.uint8)
        except ValueError:
            raise UserError(f"--paint {text!r}: {value} is not a colour #rrggbb") from None
        if len(value) != 7:
            raise UserError(f"--paint {text!r}: {value} is not a colour #rrggbb")
        if mask_image.ndim != 3 or mask_image.shape[0] != mask_image.shape[1]:
            raise UserError(f"--paint-mask has shape {mask_image.shape}; give a square RGB image")
        mask = (mask_image[..., :3] == rgb).all(-1).astype(np.float32)
        if mask.sum() == 0:
            raise UserError(f"--paint {text!r}: no pixel of --paint-mask has the colour {value}")
        return phrase, mask
    try:
        box = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise UserError(f"--paint {text!r}: {value} is not four numbers x0,y0,x1,y1") from None
    box_mask(box, size)  # validates
    return phrase, box


@torch.no_grad()
def sample_painted(pipeline, captions: list[str], paint, weight: float, *, steps: int = 50, guidance: float = 3.0,
                   seed: int = 0, record: bool = False, callback=None,
                   recipe: PaintRecipe | str = DEFAULT_RECIPE) -> tuple[torch.Tensor, PaintHook]:
    """Sample ``captions`` with their phrases painted: ``paint`` is one ``{phrase: box or mask}``
    for every caption, or a list of them (one per caption); ``recipe`` as in
    :func:`token_masks`. Returns the latents and the hook (its ``maps`` hold the painted rows'
    cross-attention when ``record``)."""
    paints = list(paint) if isinstance(paint, (list, tuple)) else [paint] * len(captions)
    if len(paints) != len(captions):
        raise UserError(f"{len(paints)} paint specifications for {len(captions)} prompts")
    cond = pipeline.conditioning(captions)
    masks = token_masks(pipeline.encoder, captions, paints, pipeline.image_size, cond["context"].shape[1], recipe)
    hook = PaintHook(masks, weight, record=record)
    denoiser = painted(pipeline.denoiser(guidance, cond), hook, pipeline.schedule, len(captions))
    with installed(pipeline.unet, hook):
        latents = pipeline.sample_with(denoiser, cond, len(captions), steps=steps, seed=seed, callback=callback)
    return latents, hook


@torch.no_grad()
def explain_step(pipeline, prompt: str, paint: dict, weight: float, t: int = 951, seed: int = 0,
                 recipe: PaintRecipe | str = "paper") -> dict:
    """The formula on one layer: run the conditional UNet once at step ``t`` on noise and keep,
    for the first cross-attention layer at the highest resolution, the scores QKᵀ/√d (mean over
    heads), A, the bias w·A/√d and the attention with and without it. For notebook 05."""
    cond = pipeline.conditioning([prompt])
    masks = token_masks(pipeline.encoder, [prompt], [paint], pipeline.image_size, cond["context"].shape[1], recipe)
    kept = {}

    class Explain(PaintHook):
        def bias(self, scores, info):
            b = super().bias(scores, info)
            if info["kind"] == "cross" and "scores" not in kept:
                shown = torch.zeros_like(scores) if b is None else b  # None: w′ = 0 adds nothing
                kept.update(scores=scores[0].mean(0), bias=shown[0].mean(0), spatial=info["spatial"],
                            a=self.at(info["spatial"], scores.device)[0, 0, :, :scores.shape[-1]],
                            plain=scores[0].softmax(-1).mean(0), painted=(scores + shown)[0].softmax(-1).mean(0),
                            weight=float(paint_weight(scores[:1], self.sigma, self.weight).flatten()[0]))
            return b

    hook = Explain(masks, weight)
    hook.sigma = float(pipeline.schedule.sigma(torch.tensor([t]))[0])
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((1, *pipeline.sample_shape), generator=generator)
    with installed(pipeline.unet, hook):
        pipeline.unet(x, torch.tensor([t]), cond)
    ids = pipeline.encoder.tokenize([prompt])["input_ids"][0].tolist()
    kept.update(sigma=hook.sigma, tokens=pipeline.encoder.tokenizer.convert_ids_to_tokens(ids), t=t)
    return kept
