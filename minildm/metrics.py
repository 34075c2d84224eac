"""The course's yardstick: the same measures for every stage.

* :func:`psnr` — reconstruction fidelity in dB.
* :func:`frechet_distance` — the Fréchet distance between Gaussians fitted to two feature sets
  (Heusel et al. 2017, the "F" of FID): ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½). On judge features
  it is minildm's ``fid``.
* :func:`clauses_hold` — GenEval's rule (Ghosh et al. 2023): an image follows a prompt only if
  every clause holds. An object clause needs at least ``count`` matching objects (exactly
  ``count`` when the prompt says a number); a relation must hold between every pair.
* :func:`alignment_report` — the fraction of images that follow their prompts, per category and
  overall, where overall is the unweighted mean of the categories, as GenEval reports it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch

from minildm.data.captions import Clauses, ObjectClause, relation_between


def psnr(images: torch.Tensor, references: torch.Tensor) -> float:
    """Mean peak signal-to-noise ratio (dB) of images in [-1, 1] (peak-to-peak range 2)."""
    mse = ((images.float() - references.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to (N, D) and (M, D) feature sets.

    Tr((Σ₁Σ₂)^½) is computed as Tr((Σ₁^½ Σ₂ Σ₁^½)^½), which is symmetric PSD and so stable.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    cross = np.trace(_sqrtm_psd(root_a @ cov_b @ root_a))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def _matches(clause: ObjectClause, objects: Sequence) -> list:
    return [o for o in objects
            if o.shape == clause.shape
            and (clause.colour is None or o.colour == clause.colour)
            and (clause.size is None or o.size == clause.size)
            and (clause.cell is None or o.cell == clause.cell)]


def clauses_hold(clauses: Clauses, objects: Sequence) -> bool:
    """Whether the objects (anything with shape, colour, size, cell) satisfy every clause."""
    found = []
    for clause in clauses.objects:
        matching = _matches(clause, objects)
        if len(matching) < clause.count or (clause.exact and len(matching) != clause.count):
            return False
        found.append(matching)
    if clauses.relation is not None:
        return all(relation_between(a.cell, b.cell) == clauses.relation
                   for a in found[0] for b in found[1])
    return True


def alignment_report(correct: Iterable[bool], categories: Iterable[str]) -> dict:
    """``alignment`` (mean over categories) and ``alignment_by_category``."""
    by_category = defaultdict(list)
    for ok, category in zip(correct, categories):
        by_category[category].append(float(ok))
    per = {c: float(np.mean(v)) for c, v in sorted(by_category.items())}
    return {"alignment": float(np.mean(list(per.values()))) if per else float("nan"),
            "alignment_by_category": per}


def bootstrap_alignment(correct_a: Sequence[float], correct_b: Sequence[float], categories: Sequence[str],
                        rounds: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Paired bootstrap over the evaluation prompts: two models judged on the same prompts with the
    same noise. Each round resamples the prompts of every category with replacement and recomputes
    both ``alignment``s (the mean over categories); returns the ``level`` intervals of ``a``, ``b``
    and ``a − b`` as ``[low, high]``. Any per-item measurement works in place of 0/1 verdicts; with
    a single category it is the plain paired bootstrap of two means."""
    a, b = np.asarray(correct_a, float), np.asarray(correct_b, float)
    groups = [np.flatnonzero(np.asarray(categories) == c) for c in sorted(set(categories))]
    rng = np.random.default_rng(seed)
    stats = np.empty((rounds, 2))
    for r in range(rounds):
        picks = [rng.choice(g, size=len(g)) for g in groups]
        stats[r] = [np.mean([a[p].mean() for p in picks]), np.mean([b[p].mean() for p in picks])]
    tail = (1 - level) / 2 * 100

    def interval(x):
        return [float(np.percentile(x, tail)), float(np.percentile(x, 100 - tail))]

    return {"a": interval(stats[:, 0]), "b": interval(stats[:, 1]), "difference": interval(stats[:, 0] - stats[:, 1])}


def retrieval_top1(similarity: torch.Tensor, texts: Sequence[str]) -> dict[str, float]:
    """Top-1 retrieval both ways from a (texts × images) similarity matrix, where text i is the
    caption of image i. A retrieved item counts as right when its caption's text equals the true
    one (two scenes may share a caption; either is then right), as in CLIP's evaluations."""
    texts = list(texts)
    best_image = similarity.argmax(dim=1).tolist()  # for each caption, the image it retrieves
    best_text = similarity.argmax(dim=0).tolist()  # for each image, the caption it retrieves
    return {"text_to_image_top1": float(np.mean([texts[j] == texts[i] for i, j in enumerate(best_image)])),
            "image_to_text_top1": float(np.mean([texts[j] == texts[i] for i, j in enumerate(best_text)]))}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, steps: int = 200, weight_decay: float = 1e-3) -> float:
    """Test accuracy of a linear classifier (multinomial logistic regression) fitted on
    ``(train_x, train_y)``: how linearly an attribute can be read out of an embedding.

    Features are standardised with the training set's statistics; the fit is L-BFGS on the
    L2-regularised cross-entropy, deterministic for given data.
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    linear = torch.nn.Linear(train_x.shape[1], classes, dtype=train_x.dtype)
    torch.nn.init.zeros_(linear.weight), torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) \
            + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float((linear(test_x).argmax(1) == test_y).float().mean())
