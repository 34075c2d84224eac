"""Stage 2 — the text and image encoders: a tiny CLIP trained contrastively on the shapes world.

``minildm train clip`` trains :class:`minildm.encoders.TextImageEncoder` (a
``transformers.CLIPModel`` from a small config, and a word-level tokenizer) on image–caption
pairs of the training stream with CLIP's symmetric contrastive loss. Each pair's caption is the
scene's full caption ("a small red circle at the top left and …") or, otherwise, its
category caption ("a red circle to the left of a blue square"), so that the encoder knows both
the captions the diffusion model trains on and the prompts it is evaluated with.

``minildm eval clip`` measures, on held-out pairs (the evaluation stream):

* ``text_to_image_top1`` / ``image_to_text_top1`` — retrieval with full captions, each query
  against 100 candidates: right when the retrieved item's caption equals the true one;
* ``…_category`` — the same with category captions. These are *ambiguous* by design: a scene
  drawn for "a red circle" looks exactly like one drawn for "a small red circle", so no encoder
  can reach 1; the full captions name every object and are the headline;
* ``probe_shape`` / ``probe_colour`` / ``probe_size`` / ``probe_position`` — linear read-outs
  of a single object's attributes from the image embedding (1000 images to fit, 500 to test),
  against chance 1/4, 1/6, 1/2, 1/9.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from minildm.checkpoints import load_checkpoint, load_state_into
from minildm.config import EVAL_SEED, ClipConfig, Profile, ShapesConfig, config_from_dict
from minildm.data.captions import category_caption, full_caption
from minildm.data.datasets import render_scenes, shapes_batch
from minildm.data.shapes import COLOURS, SHAPES, SIZES, make_scene
from minildm.encoders.clip import TextImageEncoder, load_hub_encoder, tiny_encoder
from minildm.encoders.tokenizer import known_words
from minildm.errors import UserError
from minildm.metrics import linear_probe, retrieval_top1

REFERENCE = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "clip"
# the study checkpoint of notebook 02: the same training without shape twins (twin_share 0)
NO_TWINS = REFERENCE.parent / "clip-no-twins"
TARGETS = {"text_to_image_top1": (">=", 0.9), "image_to_text_top1": (">=", 0.9)}
RETRIEVAL_CANDIDATES = 100
PROBE_FIT, PROBE_TEST = 1000, 500
PROBE_SEED = EVAL_SEED + 1  # single-object scenes for the attribute probe, apart from both streams
HUB_PREFIX = "hub:"


# Hard negatives: each scene's "shape twin" swaps circle ↔ square and triangle ↔ cross for every
# object (a permutation, so counts and relations stay true). A twin differs from its scene only
# in the shapes, and both sit in the same batch, so the contrastive loss can only tell them
# apart by shape — which random batches almost never ask for (notebook 02, section 7).
SHAPE_TWIN = {"circle": "square", "square": "circle", "triangle": "cross", "cross": "triangle"}


def shape_twin(scene):
    """The scene with every object's shape exchanged by :data:`SHAPE_TWIN`."""
    return dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, shape=SHAPE_TWIN[o.shape])
                                                    for o in scene.objects))


class ClipTask:
    """The tiny CLIP as a :class:`minildm.train.TrainingTask`: batches of image–caption pairs."""

    stage = "clip"
    renders_batches = True  # minildm.prefetch: on a GPU, worker processes draw them ahead

    def __init__(self, cfg: ClipConfig, batch_size: int, seed: int):
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        # eager attention: on this CPU under bf16 it is faster than SDPA for 65-token sequences,
        # and it is the implementation that can return attention maps
        self.model = tiny_encoder(cfg, attention="eager")
        self.shapes = ShapesConfig(image_size=cfg.image_size)

    def batch(self, step: int, rank: int, world_size: int) -> dict:
        """``per_rank`` pairs; with ``twin_share`` > 0 that share of them are the shape twins
        of the others (same caption kind), rendered next to them in the same batch."""
        per_rank = self.batch_size // world_size
        twins = int(round(per_rank * self.cfg.twin_share))
        start = step * self.batch_size + rank * per_rank
        indices = range(start, start + per_rank - twins)
        images, scenes = shapes_batch(self.seed, indices, self.shapes)
        kinds = [np.random.default_rng([self.seed, i, 7]).random() < self.cfg.full_caption_prob for i in indices]
        if twins:
            twin_scenes = [shape_twin(s) for s in scenes[:twins]]
            twin_images = render_scenes(twin_scenes, self.shapes.supersample)
            images, scenes, kinds = torch.cat([images, twin_images]), scenes + twin_scenes, kinds + kinds[:twins]
        captions = [full_caption(s) if full else category_caption(s) for s, full in zip(scenes, kinds)]
        return {**self.model.tokenize(captions), "images": images}

    def loss(self, model, batch):
        out = model(batch["input_ids"], batch["attention_mask"], batch["images"])
        in_batch = (out.logits_per_text.argmax(1) == torch.arange(len(out.logits_per_text),
                                                                  device=out.logits_per_text.device))
        logit_scale = getattr(model, "module", model).clip.logit_scale  # τ = 1 / exp(logit_scale)
        return out.loss, {"in_batch_top1": float(in_batch.float().mean()),
                          "temperature": float(torch.exp(-logit_scale.detach().float()))}

    def card_config(self) -> dict:
        return {"clip": dataclasses.asdict(self.cfg), "vocabulary": known_words(self.model.tokenizer)}


def train(profile: Profile, out: str, *, resume=False, steps=None, device=None, data=None,
          command=None, progress=True) -> dict | None:
    """Train the tiny CLIP with the profile's config; the card gets :func:`evaluate`'s metrics."""
    from minildm.checkpoints import CARD, atomic_write_file, save_json
    from minildm.train import is_main_process, train as train_loop

    if data not in (None, "shapes"):
        raise UserError(f"--data {data}: the tiny CLIP trains on the shapes world's image–caption pairs "
                        "and is measured on its ground truth, so it accepts only --data shapes")
    cfg = profile.clip_train if steps is None else dataclasses.replace(profile.clip_train, steps=steps)
    torch.manual_seed(cfg.seed)  # initial weights: a function of the seed alone
    task = ClipTask(profile.clip, cfg.batch_size, cfg.seed)
    card = train_loop(task, cfg, out, resume=resume, device=device, command=command,
                      progress=progress, extra_card={"profile": profile.name})
    if not is_main_process():
        return None
    encoder, _ = load(out)
    card["metrics"] = evaluate(encoder, profile.train_eval_n)
    atomic_write_file(Path(out) / CARD, lambda path: save_json(path, card))
    return card


def load(path: str | Path | None = None, attention: str = "eager") -> tuple[TextImageEncoder, dict]:
    """A trained tiny CLIP (EMA weights) and its card. ``None``: the reference checkpoint;
    ``hub:OWNER/NAME``: a pretrained CLIP from the hub (online only)."""
    if isinstance(path, str) and path.startswith(HUB_PREFIX):
        return load_hub_encoder(path[len(HUB_PREFIX):], attention).eval(), {"stage": "clip", "source": path}
    path = REFERENCE if path is None else path
    state, card = load_checkpoint(path)
    if card.get("stage") != "clip":
        raise UserError(f"{path} holds a {card.get('stage')!r} checkpoint, not a text/image encoder (clip)")
    cfg = config_from_dict(ClipConfig, card["config"]["clip"])
    encoder = tiny_encoder(cfg, card["config"]["vocabulary"], attention=attention)
    load_state_into(encoder, state, str(path))
    return encoder.eval(), card


@torch.no_grad()
def text_embeddings(encoder: TextImageEncoder, captions: list[str], batch_size: int = 250) -> torch.Tensor:
    """Pooled text embeddings, L2-normalised, in batches: (N, P)."""
    pooled = [encoder.encode_text(captions[i:i + batch_size]).pooled.float() for i in range(0, len(captions), batch_size)]
    return torch.nn.functional.normalize(torch.cat(pooled), dim=-1)


@torch.no_grad()
def image_embeddings(encoder: TextImageEncoder, images: torch.Tensor, batch_size: int = 250,
                     normalise: bool = True) -> torch.Tensor:
    """Image embeddings (L2-normalised unless ``normalise=False``), in batches: (N, P)."""
    out = torch.cat([encoder.encode_image(images[i:i + batch_size]).float() for i in range(0, len(images), batch_size)])
    return torch.nn.functional.normalize(out, dim=-1) if normalise else out


def retrieval(text: torch.Tensor, image: torch.Tensor, captions: list[str], group: int) -> dict[str, float]:
    """Top-1 retrieval in consecutive groups of ``group`` pairs (each query against the group's
    candidates), averaged over the groups."""
    scores = [retrieval_top1(text[i:i + group] @ image[i:i + group].T, captions[i:i + group])
              for i in range(0, len(captions), group)]
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


def single_object_scenes(n: int, image_size: int, seed: int = PROBE_SEED):
    """``n`` held-out one-object scenes, rendered: images (n, 3, H, W) and their objects."""
    cfg = ShapesConfig(image_size=image_size)
    scenes = [make_scene(seed, i, cfg, category="single_object") for i in range(n)]
    return render_scenes(scenes, cfg.supersample), [s.objects[0] for s in scenes]


@torch.no_grad()
def attribute_probe(encoder: TextImageEncoder, fit: int = PROBE_FIT, test: int = PROBE_TEST) -> dict[str, float]:
    """Linear read-out accuracy of shape, colour, size and position (grid cell) of a lone
    object from the image embedding: what the embedding makes *linearly* available."""
    images, objects = single_object_scenes(fit + test, encoder.image_size)
    features = image_embeddings(encoder, images, normalise=False)
    labels = {"shape": [SHAPES.index(o.shape) for o in objects],
              "colour": [COLOURS.index(o.colour) for o in objects],
              "size": [SIZES.index(o.size) for o in objects],
              "position": [o.cell for o in objects]}
    out = {}
    for name, values in labels.items():
        y = torch.tensor(values)
        out[f"probe_{name}"] = linear_probe(features[:fit], y[:fit], features[fit:], y[fit:])
    return out


def evaluate(encoder: TextImageEncoder, n: int = 1000, seed: int = EVAL_SEED) -> dict:
    """The encoder's figures on held-out data (see the module docstring)."""
    if n < 8:
        raise UserError(f"--n {n}: the encoders' evaluation needs at least 8 pairs")
    encoder = encoder.eval()
    group = min(RETRIEVAL_CANDIDATES, n)
    images, scenes = shapes_batch(seed, range(n // group * group), ShapesConfig(image_size=encoder.image_size))
    image = image_embeddings(encoder, images)  # once, for both kinds of caption
    full_captions, category_captions = [full_caption(s) for s in scenes], [category_caption(s) for s in scenes]
    full = retrieval(text_embeddings(encoder, full_captions), image, full_captions, group)
    category = retrieval(text_embeddings(encoder, category_captions), image, category_captions, group)
    return {"n": n, "candidates": min(RETRIEVAL_CANDIDATES, n), **full,
            **{f"{k}_category": v for k, v in category.items()},
            **attribute_probe(encoder)}  # always 1000 + 500 images: cheap, and stable


# ------------------------------------------------------------------------------------------
# What the pooled embedding is sensitive to (notebook 02, section 5)
# ------------------------------------------------------------------------------------------

OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}
SWAP_CATEGORIES = {"colour": "colors", "shape": "colors", "size": "single_object",
                   "binding": "color_attr", "relation": "position"}


def _fix_articles(words: list[str]) -> list[str]:
    return [("an" if words[i + 1][0] in "aeiou" else "a") if w in ("a", "an") else w
            for i, w in enumerate(words)]


def swap_one_word(caption: str, kind: str) -> str:
    """``caption`` with one thing changed: ``colour`` / ``shape`` / ``size`` of the first object,
    ``binding`` (the two objects' colours exchanged: same words, other meaning) or ``relation``
    (its opposite)."""
    words = caption.split()
    if kind == "relation":
        for relation, opposite in OPPOSITE.items():
            if f" {relation} " in caption:
                return caption.replace(f" {relation} ", f" {opposite} ", 1)
    elif kind == "binding":
        positions = [i for i, w in enumerate(words) if w in COLOURS]
        if len(positions) == 2:
            i, j = positions
            words[i], words[j] = words[j], words[i]
            return " ".join(_fix_articles(words))
    else:
        choices = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[kind]
        for i, w in enumerate(words):
            if w in choices:
                words[i] = choices[(choices.index(w) + 1) % len(choices)]
                return " ".join(_fix_articles(words))
    raise ValueError(f"cannot swap {kind!r} in {caption!r}")


@torch.no_grad()
def word_swap_sensitivity(encoder: TextImageEncoder, n: int = 200, seed: int = EVAL_SEED) -> dict[str, dict]:
    """For each kind of swap: on ``n`` held-out scenes of a category whose caption has that word,
    how often the image is closer to its true caption than to the swapped one (``preferred``),
    and the mean drop in cosine similarity (``drop``)."""
    cfg = ShapesConfig(image_size=encoder.image_size)
    out = {}
    for kind, category in SWAP_CATEGORIES.items():
        scenes = [make_scene(seed, i, cfg, category=category) for i in range(n)]
        image = image_embeddings(encoder, render_scenes(scenes, cfg.supersample))
        true = [category_caption(s) for s in scenes]
        swapped = [swap_one_word(c, kind) for c in true]
        true_text, swapped_text = text_embeddings(encoder, true), text_embeddings(encoder, swapped)
        s_true, s_swapped = (true_text * image).sum(1), (swapped_text * image).sum(1)
        out[kind] = {"preferred": float((s_true > s_swapped).float().mean()),
                     "drop": float((s_true - s_swapped).mean()),
                     "example": f"{true[0]!r} → {swapped[0]!r}"}
    return out


@torch.no_grad()
def pooled_and_token_similarity(encoder: TextImageEncoder, caption: str, other: str):
    """Cosine similarity of two captions' pooled embeddings, and of their per-token embeddings
    position by position (the captions must have the same number of tokens): (float, (L,))."""
    a, b = encoder.encode_text([caption]), encoder.encode_text([other])
    if a.tokens.shape != b.tokens.shape:
        raise ValueError("the captions must have the same number of words")
    cosine = torch.nn.functional.cosine_similarity
    return float(cosine(a.pooled.float(), b.pooled.float())), cosine(a.tokens[0].float(), b.tokens[0].float(), dim=-1).numpy()
