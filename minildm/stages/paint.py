"""Stage 5 — paint-with-words, measured: does each object land where it was painted?

Nothing is trained (:mod:`minildm.paint` is an inference-time edit of cross-attention), so this
stage only evaluates: ``minildm eval paint --model PATH`` takes an LDM run (default: the
reference) or an experts run, and the colour-attribution prompts of the evaluation set — two
objects, two colours, *no position words* ("a red circle and a blue square"). Each prompt gets
two different cells of the 3×3 grid, one per object (a pure function of the seed and the
prompt's index), painted as that cell's box over the object's words ("red circle"). Every
image is sampled at guidance ``PAINT_GUIDANCE`` (7.5; :mod:`minildm.paint` says why), painted
or not.

* ``placement`` — both objects read by the judge in their painted cells (shape and colour
  right), at the best setting: the highest placement among the recipes
  (:data:`minildm.paint.RECIPES`) and weights w′ whose ``alignment`` stays within 5 points of
  the unpainted one; ``best_recipe``, ``best_weight``;
* ``placement_paper`` — the same with eDiff-I's formula alone (the ``paper`` recipe);
* ``placement_unpainted`` — the same prompts and noise without painting (the model places
  objects where it likes: about chance, 1/72 for two given cells);
* ``placed_first`` / ``placed_second`` (in ``sweeps``) — each object on its own in its cell, the
  one the prompt names first and the second: which of the two painting loses;
* ``alignment`` / ``alignment_unpainted`` — the judge's verdict on the prompt itself (both
  objects, right colours), wherever they are;
* ``sweeps`` — recipe → w′ → {placement, alignment}, for the trade-off plot;
* ``at_model_guidance`` — the best setting and the unpainted model again at the model's own
  guidance (3): how much of the placement the higher guidance buys.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minildm.config import EVAL_SEED, Profile
from minildm.errors import UserError
from minildm.paint_recipe import PAINT_GUIDANCE, RECIPES

STAGE = "paint"
MEASUREMENT = Path(__file__).resolve().parents[2] / "data" / "measurements" / "paint.json"
PAINT_WEIGHTS = (0.25, 0.5, 1.0)
ALIGNMENT_TOLERANCE = 0.05
TARGETS = {"placement": (">=", 0.8), "alignment_drop": ("<=", ALIGNMENT_TOLERANCE)}
GRID = 3


def load(path: str | Path | None = None):
    """The pipeline to paint with — an ldm or pixel run, or an experts run's router (default:
    the reference LDM) — and its card."""
    from minildm.stages import ldm

    return ldm.sampling_pipeline(path)


def reference_measurement(path: Path = MEASUREMENT) -> dict:
    """The stored ``minildm eval paint`` of the reference LDM: {"command", "model", "metrics"}."""
    from minildm.checkpoints import load_json

    return load_json(path)


def default_eval_n(profile: Profile) -> int:
    """Prompts per setting (every colour-attribution prompt twice on the cpu profile)."""
    return profile.extras.get("paint_eval_n", 160)


def cell_box(cell: int) -> tuple[float, float, float, float]:
    """The normalised box of a grid cell (row-major, top left 0)."""
    row, col = divmod(cell, GRID)
    return (col / GRID, row / GRID, (col + 1) / GRID, (row + 1) / GRID)


def painting_tasks(n: int, seed: int = EVAL_SEED) -> list[dict]:
    """``n`` tasks: a two-object prompt without position words, each object's phrase and the
    cell painted for it."""
    from minildm.data.captions import parse
    from minildm.data.prompts import load_evaluation_prompts

    prompts = [r["prompt"] for r in load_evaluation_prompts() if r["category"] == "color_attr"]
    rng = np.random.default_rng(seed)
    tasks = []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        objects = parse(prompt).objects
        cells = [int(c) for c in rng.choice(GRID * GRID, size=2, replace=False)]
        phrases = [f"{o.colour} {o.shape}" for o in objects]
        tasks.append({"prompt": prompt, "objects": objects, "phrases": phrases, "cells": cells,
                      "paint": {p: cell_box(c) for p, c in zip(phrases, cells)}})
    return tasks


def placed_each(task: dict, read) -> list[bool]:
    """For each object of the prompt (in the prompt's order): read in its painted cell, with the
    right shape and colour."""
    return [any(o.shape == obj.shape and o.colour == obj.colour and o.cell == cell for o in read)
            for obj, cell in zip(task["objects"], task["cells"])]


def placed(task: dict, read) -> bool:
    """Both objects read in their painted cells, with the right shape and colour."""
    return all(placed_each(task, read))


def judge_painting(pipeline, tasks: list[dict], judge, weight: float | None, seed: int = EVAL_SEED,
                   recipe: str = "paper", guidance: float = PAINT_GUIDANCE) -> dict:
    """Sample every task (``weight`` None: unpainted) at ``guidance`` and judge placement and
    alignment."""
    from minildm.data.captions import parse
    from minildm.metrics import clauses_hold

    prompts = [t["prompt"] for t in tasks]
    paint = None if weight is None else [t["paint"] for t in tasks]
    images = pipeline(prompts, seed=seed, paint=paint, paint_weight=weight or 0.0, paint_recipe=recipe,
                      steps=pipeline.cfg.sample_steps, guidance=guidance)
    reads = judge.read(images)
    each = np.array([placed_each(t, r) for t, r in zip(tasks, reads)], dtype=float)  # (tasks, 2)
    return {"images": images, "reads": reads,
            "placement": float(np.mean([placed(t, r) for t, r in zip(tasks, reads)])),
            "placed_first": float(each[:, 0].mean()), "placed_second": float(each[:, 1].mean()),
            "alignment": float(np.mean([clauses_hold(parse(p), r) for p, r in zip(prompts, reads)]))}


@torch.no_grad()
def evaluate(pipeline, n: int = 160, seed: int = EVAL_SEED, judge=None, weights=PAINT_WEIGHTS) -> dict:
    """The sweep over recipes and w′ against the unpainted model, then the best setting at the
    model's own guidance (module docstring)."""
    from minildm.stages import judge as judge_stage

    if n < 1:
        raise UserError(f"--n {n}: give at least one prompt")
    judge = judge if judge is not None else judge_stage.load(None)[0]
    tasks = painting_tasks(n, seed)
    plain = judge_painting(pipeline, tasks, judge, None, seed)
    sweeps = {recipe: {f"{w:g}": _figures(judge_painting(pipeline, tasks, judge, w, seed, recipe)) for w in weights}
              for recipe in RECIPES}

    def best(candidates: dict) -> tuple:
        """The highest placement among the settings that keep alignment within the tolerance
        (all settings if none does)."""
        keeping = {k: r for k, r in candidates.items() if alignment_drop(plain, r) <= ALIGNMENT_TOLERANCE}
        pool = keeping or candidates
        key = max(pool, key=lambda k: pool[k]["placement"])
        return key, pool[key]

    paper_weight, paper = best(sweeps["paper"])
    (recipe, weight), chosen = best({(name, w): r for name, sweep in sweeps.items() for w, r in sweep.items()})
    own = pipeline.cfg.guidance
    plain_own = judge_painting(pipeline, tasks, judge, None, seed, guidance=own)
    chosen_own = judge_painting(pipeline, tasks, judge, float(weight), seed, recipe, guidance=own)
    return {
        "n": n, "steps": pipeline.cfg.sample_steps, "guidance": PAINT_GUIDANCE,
        "best_weight": float(weight), "best_recipe": recipe,
        "placement": chosen["placement"], "placement_unpainted": plain["placement"],
        "alignment": chosen["alignment"], "alignment_unpainted": plain["alignment"],
        "alignment_drop": alignment_drop(plain, chosen),
        "placement_paper": paper["placement"], "alignment_paper": paper["alignment"],
        "best_weight_paper": float(paper_weight),
        "sweeps": sweeps,
        "at_model_guidance": {"guidance": own, **_figures(chosen_own),
                              "placement_unpainted": plain_own["placement"], "alignment_unpainted": plain_own["alignment"]},
    }


def alignment_drop(plain: dict, painted: dict) -> float:
    """How much alignment painting cost, rounded to 9 places: alignments are fractions of the
    prompts, and 0.64375 − 0.59375 must read 0.05 (a drop on the tolerance), not 0.05 + 4e-17."""
    return round(plain["alignment"] - painted["alignment"], 9)


def _figures(result: dict) -> dict:
    """The numbers of a setting that the report keeps: placement, alignment, and how often each
    object alone lands in its cell (the first named, the second)."""
    return {key: result[key] for key in ("placement", "alignment", "placed_first", "placed_second")}
