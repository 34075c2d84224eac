"""Stage 0 — the judge: train it, load it, and measure it.

``minildm train judge`` trains :class:`minildm.judge.Judge` with the one training loop;
``minildm eval judge`` measures it on held-out renders (the evaluation stream, never seen in
training):

* ``attribute_accuracy`` — over every object and each of its four attributes (its cell, shape,
  colour, size): the fraction read right. An object missed at its cell counts wrong four times.
* ``presence_accuracy`` — over every cell of every image: object or empty, read right.
* ``alignment_true`` — renders scored against their own category captions (GenEval rule).
* ``alignment_mismatched`` — renders scored against another scene's caption: near chance.
* ``fid_heldout`` — the Fréchet distance between two halves of the held-out renders on judge
  features: the floor that any later stage's ``fid`` can be compared with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from minildm.checkpoints import load_checkpoint, load_state_into
from minildm.config import EVAL_SEED, Profile, ShapesConfig
from minildm.data.captions import category_caption, full_caption, parse
from minildm.data.datasets import shapes_batch
from minildm.errors import UserError
from minildm.judge import Judge, JudgeTask, judge_from_card
from minildm.metrics import alignment_report, clauses_hold, frechet_distance

REFERENCE = Path(__file__).resolve().parents[2] / "data" / "checkpoints" / "judge"
TARGETS = {"attribute_accuracy": (">=", 0.98), "alignment_true": (">=", 0.95),
           "alignment_mismatched": ("<=", 0.25)}


def train(profile: Profile, out: str, *, resume=False, steps=None, device=None, data=None,
          command=None, progress=True) -> dict:
    """Train the judge with the profile's config; the card gets the metrics of :func:`evaluate`.

    Returns the card, or ``None`` on the other processes of a multi-process run.
    """
    from minildm.checkpoints import CARD, atomic_write_file, save_json
    from minildm.train import is_main_process, train as train_loop

    if data not in (None, "shapes"):
        raise UserError(f"--data {data}: the judge learns from the shapes world's ground truth "
                        "(shape, colour, size, cell), so it accepts only --data shapes")
    cfg = profile.judge_train if steps is None else dataclasses.replace(profile.judge_train, steps=steps)
    torch.manual_seed(cfg.seed)  # initial weights: a function of the seed alone
    task = JudgeTask(profile.judge, profile.shapes, cfg.batch_size, cfg.seed)
    card = train_loop(task, cfg, out, resume=resume, device=device, command=command,
                      progress=progress, extra_card={"profile": profile.name})
    if not is_main_process():  # under torchrun, rank 0 alone measures and reports
        return None
    judge, _ = load(out)
    card["metrics"] = evaluate(judge, profile.train_eval_n)
    atomic_write_file(Path(out) / CARD, lambda path: save_json(path, card))
    return card


def load(path: str | Path | None = None) -> tuple[Judge, dict]:
    """A trained judge (EMA weights) and its card; ``None`` loads the reference checkpoint."""
    path = REFERENCE if path is None else path
    state, card = load_checkpoint(path)
    if card.get("stage") != "judge":
        raise UserError(f"{path} holds a {card.get('stage')!r} checkpoint, not a judge")
    judge = judge_from_card(card)
    load_state_into(judge, state, str(path))
    return judge.eval(), card


def shapes_config_of(judge: Judge) -> ShapesConfig:
    return ShapesConfig(image_size=judge.cfg.image_size)


@torch.no_grad()
def read_renders(judge: Judge, n: int, seed: int = EVAL_SEED, batch_size: int = 250):
    """Render items 0..n-1 of a stream; return images, scenes, reads and judge features."""
    images, scenes, reads, features = [], [], [], []
    for start in range(0, n, batch_size):
        batch, batch_scenes = shapes_batch(seed, range(start, min(n, start + batch_size)), shapes_config_of(judge))
        images.append(batch)
        scenes += batch_scenes
        reads += judge.read(batch)
        features.append(judge.features(batch).float())
    return torch.cat(images), scenes, reads, torch.cat(features).numpy()


def object_scores(scene, read) -> dict[str, list[bool]]:
    """Per object of the scene: was each attribute read right at its cell?"""
    by_cell = {o.cell: o for o in read}
    out = {"cell": [], "shape": [], "colour": [], "size": []}
    for obj in scene.objects:
        seen = by_cell.get(obj.cell)
        out["cell"].append(seen is not None)
        for name in ("shape", "colour", "size"):
            out[name].append(seen is not None and getattr(seen, name) == getattr(obj, name))
    return out


def attribute_accuracy(scenes, reads) -> float:
    """Over every object and each of its cell, shape, colour and size: the fraction read right."""
    return float(np.mean([v for s, r in zip(scenes, reads) for vs in object_scores(s, r).values() for v in vs]))


def evaluate(judge: Judge, n: int = 1000, seed: int = EVAL_SEED) -> dict:
    """The judge's figures on ``n`` held-out renders (see the module docstring)."""
    if n < 4:
        raise UserError(f"--n {n}: the judge's evaluation needs at least 4 renders")
    _, scenes, reads, features = read_renders(judge, n, seed)
    per_attribute = {"cell": [], "shape": [], "colour": [], "size": []}
    presence, failures = [], []
    for i, (scene, read) in enumerate(zip(scenes, reads)):
        scores = object_scores(scene, read)
        for name, values in scores.items():
            per_attribute[name] += values
        occupied = {o.cell for o in scene.objects}
        found = {o.cell for o in read}
        presence += [(c in occupied) == (c in found) for c in range(9)]
        if not all(all(v) for v in scores.values()) or found != occupied:
            failures.append(i)
    captions = [category_caption(s) for s in scenes]
    categories = [s.category for s in scenes]
    true = [clauses_hold(parse(c), r) for c, r in zip(captions, reads)]
    full = [clauses_hold(parse(full_caption(s)), r) for s, r in zip(scenes, reads)]
    shifted = captions[1:] + captions[:1]  # each render against the next scene's caption
    mismatched = [clauses_hold(parse(c), r) for c, r in zip(shifted, reads)]
    true_report = alignment_report(true, categories)
    mismatched_report = alignment_report(mismatched, categories)
    half = n // 2
    return {
        "n": n,
        "attribute_accuracy": float(np.mean(sum(per_attribute.values(), []))),
        **{f"{name}_accuracy": float(np.mean(v)) for name, v in per_attribute.items()},
        "presence_accuracy": float(np.mean(presence)),
        "scene_accuracy": 1 - len(failures) / n,
        "alignment_true": true_report["alignment"],
        "alignment_true_by_category": true_report["alignment_by_category"],
        "alignment_true_full_caption": float(np.mean(full)),
        "alignment_mismatched": mismatched_report["alignment"],
        "alignment_mismatched_by_category": mismatched_report["alignment_by_category"],
        "fid_heldout": frechet_distance(features[:half], features[half:]),
        "failures": failures[:20],
    }


@torch.no_grad()
def accuracy_under_blur(judge: Judge, sigmas=(0.0, 0.5, 1.0, 1.5, 2.0), n: int = 200,
                        seed: int = EVAL_SEED) -> dict[float, float]:
    """attribute_accuracy on renders blurred with each Gaussian sigma (pixels): how far the
    judge can be trusted on images softer than renders, as generated images are."""
    from minildm.judge import gaussian_blur

    images, scenes = shapes_batch(seed, range(n), shapes_config_of(judge))
    curve = {}
    for sigma in sigmas:
        blurred = gaussian_blur(images, torch.full((n,), float(sigma))) if sigma > 0 else images
        curve[float(sigma)] = attribute_accuracy(scenes, judge.read(blurred))
    return curve
